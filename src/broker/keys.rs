//! The broker's signing keys from the store: on start, every target that signs gets a
//! `current` and a `next` key (generated and stored sealed where missing; keys of a
//! target whose algorithm changed retire); after a rotation the ring is rebuilt from the
//! store.

use crate::clock::SharedClock;
use crate::jose::Alg;
use crate::keys::{new_stored_key, KeyError, KeyRing, KeyState, MasterKey};
use crate::store::{KeyUpdate, RotationStep, Store, StoreError};

/// Why the key ring could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyLoadError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A key did not open or is unusable.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Loads every stored key (opening it with `master`) and generates, for each
/// `(target, alg)`, a current key and a next key where there are none. Fails when a
/// stored key does not open (wrong master key) or the store fails.
pub async fn load_key_ring(
    store: &dyn Store,
    master: &MasterKey,
    wanted: &[(String, Alg)],
    clock: &SharedClock,
) -> Result<KeyRing, KeyLoadError> {
    let stored = store.signing_keys().await?;
    // A target whose algorithm changed in the config: its old keys retire (still
    // published until tokens they signed are gone: max_ttl is at most 24h).
    let changed: Vec<KeyUpdate> = stored
        .iter()
        .filter(|k| k.state == KeyState::Current || k.state == KeyState::Next)
        .filter(|k| {
            wanted
                .iter()
                .any(|(t, a)| *t == k.target && a.as_str() != k.alg)
        })
        .map(|k| KeyUpdate {
            kid: k.kid.clone(),
            expect_state: k.state,
            state: KeyState::Retired,
            activated_at: None,
            remove_at: Some(clock.now() + 24 * 3600),
        })
        .collect();
    if !changed.is_empty() {
        store
            .commit_rotation(RotationStep {
                update: changed,
                ..Default::default()
            })
            .await?;
    }
    for (target, alg) in wanted {
        let has = |state: KeyState| {
            stored
                .iter()
                .any(|k| k.target == *target && k.state == state && k.alg == alg.as_str())
        };
        for state in [KeyState::Current, KeyState::Next] {
            if !has(state) {
                let k = new_stored_key(master, target, *alg, state, clock.now())?;
                tracing::info!(target = %target, kid = %k.kid, alg = %alg, state = %state, "generated signing key");
                store.insert_signing_key(k).await?;
            }
        }
    }
    let ring = KeyRing::empty();
    reload_key_ring(&ring, store, master).await?;
    Ok(ring)
}

/// Rebuilds the ring from the store (after a rotation). On failure the ring in service
/// stays.
pub async fn reload_key_ring(
    ring: &KeyRing,
    store: &dyn Store,
    master: &MasterKey,
) -> Result<(), KeyLoadError> {
    let stored = store.signing_keys().await?;
    ring.install(&stored, master)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::store::sqlite::{Config, SqliteStore};
    use crate::store::Keys;
    use serde_json::Value;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn keys_persist_sealed_and_need_the_same_master_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&Config {
            path: dir.path().join("k.db"),
            busy_timeout: Duration::from_secs(1),
        })
        .unwrap();
        let clock: SharedClock = Arc::new(SystemClock);
        let master = MasterKey::generate();
        let wanted = vec![("a".to_string(), Alg::ES256), ("b".to_string(), Alg::EdDSA)];
        let ring = load_key_ring(&store, &master, &wanted, &clock)
            .await
            .unwrap();
        let kid_a = ring.signer("a").unwrap().kid().to_string();
        let jwks: Value = serde_json::from_slice(&ring.jwks_json()).unwrap();
        assert_eq!(
            jwks["keys"].as_array().unwrap().len(),
            4,
            "a current and a next key per target"
        );
        assert!(
            !String::from_utf8_lossy(&ring.jwks_json()).contains("\"d\""),
            "no private members"
        );

        // Same master key: same keys, nothing new generated.
        let again = load_key_ring(&store, &master, &wanted, &clock)
            .await
            .unwrap();
        assert_eq!(again.signer("a").unwrap().kid(), kid_a);
        assert_eq!(store.signing_keys().await.unwrap().len(), 4);

        // Other master key: refused with a clear error.
        let err = load_key_ring(&store, &MasterKey::generate(), &wanted, &clock)
            .await
            .unwrap_err();
        assert!(
            matches!(err, KeyLoadError::Key(KeyError::WrongMasterKey { .. })),
            "{err}"
        );
        assert!(err.to_string().contains("master key does not match"));

        // The private key is not in the database file in the clear.
        let sealed = &store.signing_keys().await.unwrap()[0].sealed;
        assert!(master.open(sealed, b"wrong aad").is_err());
        assert!(ring.signer("zzz").is_err());
    }
}
