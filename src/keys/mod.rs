//! The broker's own signing keys: generated on first start, sealed at rest under the
//! master key (AES-256-GCM), published as a JWKS.

mod master;

pub use master::{MasterKey, MasterKeyError};

use crate::clock::SharedClock;
use crate::jose::{Alg, SigningKey};
use crate::store::{KeyUpdate, Store, StoreError, StoredKey};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// Key ring failures.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A sealed key does not open under this master key.
    #[error("signing key {kid} cannot be decrypted: the master key does not match this store")]
    WrongMasterKey {
        /// The key id.
        kid: String,
    },
    /// Stored key material is unusable.
    #[error("signing key {kid} is unusable: {reason}")]
    Invalid {
        /// The key id.
        kid: String,
        /// Why.
        reason: String,
    },
    /// No current key for the target.
    #[error("no signing key for target {0}")]
    Missing(String),
}

/// Signing keys by target, and the published JWKS. Each target has a `current` key
/// (signing), a `next` key (published ahead, so verifiers that cache the JWKS know it
/// before it signs) and any `retired` keys still published until every token they signed
/// has expired. Rotation (`crate::rotation`) moves keys between the states in the store
/// and then calls [`KeyRing::reload`].
#[derive(Debug)]
pub struct KeyRing {
    current: RwLock<HashMap<String, Arc<SigningKey>>>,
    /// Every published public key (current, next and retired).
    published: RwLock<Arc<Vec<Value>>>,
    jwks_json: RwLock<Arc<Vec<u8>>>,
}

/// A new key of `alg` for `target` in `state`, sealed for the store.
pub fn new_stored_key(
    master: &MasterKey,
    target: &str,
    alg: Alg,
    state: &str,
    now: i64,
) -> Result<StoredKey, KeyError> {
    let (key, pkcs8) = SigningKey::generate(alg).map_err(|e| KeyError::Invalid {
        kid: "(new)".into(),
        reason: e.to_string(),
    })?;
    Ok(StoredKey {
        kid: key.kid().to_string(),
        target: target.to_string(),
        alg: alg.as_str().to_string(),
        state: state.to_string(),
        created_at: now,
        sealed: master.seal(&pkcs8, aad(key.kid()).as_bytes()),
        activated_at: (state == "current").then_some(now),
        remove_at: None,
    })
}

/// Opens a stored key with the master key (for tools that export its public half).
/// Fails when the master key does not match or the key is unusable.
pub fn open_stored(master: &MasterKey, sk: &StoredKey) -> Result<SigningKey, KeyError> {
    open_key(master, sk)
}

fn open_key(master: &MasterKey, sk: &StoredKey) -> Result<SigningKey, KeyError> {
    let alg = Alg::parse(&sk.alg).ok_or_else(|| KeyError::Invalid {
        kid: sk.kid.clone(),
        reason: format!("unknown algorithm {}", sk.alg),
    })?;
    let pkcs8 = master
        .open(&sk.sealed, aad(&sk.kid).as_bytes())
        .map_err(|_| KeyError::WrongMasterKey {
            kid: sk.kid.clone(),
        })?;
    let key = SigningKey::from_pkcs8(alg, pkcs8.expose()).map_err(|e| KeyError::Invalid {
        kid: sk.kid.clone(),
        reason: e.to_string(),
    })?;
    if key.kid() != sk.kid {
        return Err(KeyError::Invalid {
            kid: sk.kid.clone(),
            reason: "stored kid does not match the key".into(),
        });
    }
    Ok(key)
}

impl KeyRing {
    /// Loads every stored key (opening it with `master`) and generates, for each
    /// `(target, alg)`, a current key and a next key where there are none. Fails when a
    /// stored key does not open (wrong master key) or the store fails.
    pub async fn load(
        store: &dyn Store,
        master: &MasterKey,
        wanted: &[(String, Alg)],
        clock: &SharedClock,
    ) -> Result<KeyRing, KeyError> {
        let stored = store.signing_keys().await?;
        // A target whose algorithm changed in the config: its old keys retire (still
        // published until tokens they signed are gone: max_ttl is at most 24h).
        let changed: Vec<KeyUpdate> = stored
            .iter()
            .filter(|k| k.state == "current" || k.state == "next")
            .filter(|k| {
                wanted
                    .iter()
                    .any(|(t, a)| *t == k.target && a.as_str() != k.alg)
            })
            .map(|k| KeyUpdate {
                kid: k.kid.clone(),
                expect_state: k.state.clone(),
                state: "retired".into(),
                activated_at: None,
                remove_at: Some(clock.now() + 24 * 3600),
            })
            .collect();
        if !changed.is_empty() {
            store
                .commit_rotation(crate::store::RotationStep {
                    update: changed,
                    ..Default::default()
                })
                .await?;
        }
        for (target, alg) in wanted {
            let has = |state: &str| {
                stored
                    .iter()
                    .any(|k| k.target == *target && k.state == state && k.alg == alg.as_str())
            };
            for state in ["current", "next"] {
                if !has(state) {
                    let k = new_stored_key(master, target, *alg, state, clock.now())?;
                    tracing::info!(target = %target, kid = %k.kid, alg = %alg, state, "generated signing key");
                    store.insert_signing_key(k).await?;
                }
            }
        }
        let ring = KeyRing {
            current: RwLock::new(HashMap::new()),
            published: RwLock::new(Arc::new(Vec::new())),
            jwks_json: RwLock::new(Arc::new(Vec::new())),
        };
        ring.reload(store, master).await?;
        Ok(ring)
    }

    /// Rebuilds the ring from the store: signers from `current` keys, the JWKS from
    /// every current, next and retired key. On failure the ring in service stays.
    pub async fn reload(&self, store: &dyn Store, master: &MasterKey) -> Result<(), KeyError> {
        let mut current = HashMap::new();
        let mut published = Vec::new();
        for sk in store.signing_keys().await? {
            let key = open_key(master, &sk)?;
            published.push(key.public_jwk());
            if sk.state == "current" {
                current.insert(sk.target.clone(), Arc::new(key));
            }
        }
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = current;
        self.publish(published);
        Ok(())
    }

    fn publish(&self, keys: Vec<Value>) {
        let doc = serde_json::to_vec(&json!({ "keys": keys })).unwrap_or_default();
        *self.published.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        *self.jwks_json.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(doc);
    }

    /// The current signing key of a target.
    pub fn signer(&self, target: &str) -> Result<Arc<SigningKey>, KeyError> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(target)
            .cloned()
            .ok_or_else(|| KeyError::Missing(target.to_string()))
    }

    /// Whether `sig` over `msg` is a signature by the published key `kid` with `alg`
    /// (retired keys included while they are published).
    pub fn verify(&self, kid: &str, alg: Alg, msg: &[u8], sig: &[u8]) -> bool {
        let published = self
            .published
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        published
            .iter()
            .filter(|j| j.get("kid").and_then(Value::as_str) == Some(kid))
            .filter_map(crate::identity::jwks::VerifyKey::from_jwk)
            .any(|k| k.alg == Some(alg) && k.verify(alg, msg, sig))
    }

    /// The JWKS document, serialised once per change.
    pub fn jwks_json(&self) -> Arc<Vec<u8>> {
        self.jwks_json
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Algorithms of published keys (for the discovery document).
    pub fn algorithms(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .published
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|k| k.get("alg").and_then(Value::as_str).map(str::to_string))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Associated data binding a sealed key to its row: a sealed key copied onto another
/// row does not open.
fn aad(kid: &str) -> String {
    format!("latchkey/signing-key/v1/{kid}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::store::sqlite::{Config, SqliteStore};
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
        let ring = KeyRing::load(&store, &master, &wanted, &clock)
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
        let again = KeyRing::load(&store, &master, &wanted, &clock)
            .await
            .unwrap();
        assert_eq!(again.signer("a").unwrap().kid(), kid_a);
        assert_eq!(store.signing_keys().await.unwrap().len(), 4);

        // Other master key: refused with a clear error.
        let err = KeyRing::load(&store, &MasterKey::generate(), &wanted, &clock)
            .await
            .unwrap_err();
        assert!(matches!(err, KeyError::WrongMasterKey { .. }), "{err}");
        assert!(err.to_string().contains("master key does not match"));

        // The private key is not in the database file in the clear.
        let sealed = &store.signing_keys().await.unwrap()[0].sealed;
        assert!(master.open(sealed, b"wrong aad").is_err());
        assert!(ring.signer("zzz").is_err());
    }
}
