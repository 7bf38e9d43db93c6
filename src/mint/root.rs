//! An upstream root credential: read from its configured source at startup unless the
//! broker has rotated it, in which case the sealed copy in the store wins (only the
//! broker knows it then). Rotation is two-phase: the new credential is staged (sealed,
//! as `pending`) before it is set upstream, and switched to once it has been verified,
//! so a crash in between never loses the only working credential.

use super::MintError;
use super::SecretRef;
use crate::keys::MasterKey;
use crate::secret::{Secret, SecretString};
use crate::store::{Store, StoredRootSecret};
use std::sync::{Arc, RwLock};

/// One target's root credential.
#[derive(Debug)]
pub(crate) struct RootCredential {
    target: String,
    current: RwLock<Arc<SecretString>>,
    store: Arc<dyn Store>,
    master: Arc<MasterKey>,
    now: crate::clock::SharedClock,
}

fn aad(target: &str, slot: &str) -> Vec<u8> {
    format!("latchkey-root:{target}:{slot}").into_bytes()
}

impl RootCredential {
    /// Loads the credential: the stored one when the broker rotated it, else the
    /// configured source. Answers also a staged (`pending`) credential left by an
    /// interrupted rotation, for the caller to verify and [`RootCredential::commit`] or
    /// [`RootCredential::discard`]. Fails when the configured source cannot be read or a
    /// stored credential does not open under the master key.
    pub(crate) async fn load(
        target: &str,
        source: &SecretRef,
        deps: &super::Deps,
    ) -> Result<(RootCredential, Option<SecretString>), String> {
        let stored = deps
            .store
            .root_secret(target)
            .await
            .map_err(|e| format!("cannot read its rotated credential: {e}"))?;
        let open = |sealed: &[u8], slot: &str| -> Result<SecretString, String> {
            let bytes = deps.master.open(sealed, &aad(target, slot)).map_err(|_| {
                "its rotated credential does not open under this master key".to_string()
            })?;
            String::from_utf8(bytes.expose().clone())
                .map(Secret::new)
                .map_err(|_| "its rotated credential is corrupt".to_string())
        };
        let (current, pending) = match &stored {
            Some(s) => (
                open(&s.sealed, "current")?,
                s.pending
                    .as_deref()
                    .map(|p| open(p, "pending"))
                    .transpose()?,
            ),
            None => (source.load()?, None),
        };
        Ok((
            RootCredential {
                target: target.to_string(),
                current: RwLock::new(Arc::new(current)),
                store: deps.store.clone(),
                master: deps.master.clone(),
                now: deps.clock.clone(),
            },
            pending,
        ))
    }

    /// The credential in service.
    pub(crate) fn get(&self) -> Arc<SecretString> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn save(
        &self,
        current: &SecretString,
        pending: Option<&SecretString>,
    ) -> Result<(), MintError> {
        let t = &self.target;
        self.store
            .put_root_secret(StoredRootSecret {
                target: t.clone(),
                sealed: self
                    .master
                    .seal(current.expose().as_bytes(), &aad(t, "current")),
                pending: pending
                    .map(|p| self.master.seal(p.expose().as_bytes(), &aad(t, "pending"))),
                updated_at: self.now.now(),
            })
            .await
            .map_err(|e| MintError::Upstream {
                target: t.clone(),
                reason: format!("cannot store the root credential: {e}"),
            })
    }

    /// Stages `next` (sealed, beside the one in service) before it is set upstream.
    pub(crate) async fn stage(&self, next: &SecretString) -> Result<(), MintError> {
        self.save(&self.get(), Some(next)).await
    }

    /// Makes `next` the credential in service, in the store and in memory.
    pub(crate) async fn commit(&self, next: SecretString) -> Result<(), MintError> {
        self.save(&next, None).await?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        Ok(())
    }

    /// Forgets a staged credential that was never set upstream (or was undone).
    pub(crate) async fn discard(&self) -> Result<(), MintError> {
        self.save(&self.get(), None).await
    }
}
