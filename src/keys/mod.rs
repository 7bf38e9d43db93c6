//! The broker's own signing keys: generated on first start, sealed at rest under the
//! master key (AES-256-GCM), published as a JWKS.

mod master;

pub use master::{MasterKey, MasterKeyError};

use crate::clock::SharedClock;
use crate::jose::{Alg, SigningKey};
use crate::store::{Store, StoreError, StoredKey};
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

/// Signing keys by target, and the published JWKS.
#[derive(Debug)]
pub struct KeyRing {
    current: RwLock<HashMap<String, Arc<SigningKey>>>,
    /// Every published public key (current, next and retired).
    published: RwLock<Arc<Vec<Value>>>,
    jwks_json: RwLock<Arc<Vec<u8>>>,
}

impl KeyRing {
    /// Loads every stored key (opening it with `master`) and generates a key for each
    /// `(target, alg)` that has none. Fails when a stored key does not open (wrong master
    /// key) or the store fails.
    pub async fn load(
        store: &dyn Store,
        master: &MasterKey,
        wanted: &[(String, Alg)],
        clock: &SharedClock,
    ) -> Result<KeyRing, KeyError> {
        let mut current = HashMap::new();
        let mut published = Vec::new();
        for sk in store.signing_keys().await? {
            let alg = Alg::parse(&sk.alg).ok_or_else(|| KeyError::Invalid {
                kid: sk.kid.clone(),
                reason: format!("unknown algorithm {}", sk.alg),
            })?;
            let pkcs8 = master
                .open(&sk.sealed, aad(&sk.kid).as_bytes())
                .map_err(|_| KeyError::WrongMasterKey {
                    kid: sk.kid.clone(),
                })?;
            let key =
                SigningKey::from_pkcs8(alg, pkcs8.expose()).map_err(|e| KeyError::Invalid {
                    kid: sk.kid.clone(),
                    reason: e.to_string(),
                })?;
            if key.kid() != sk.kid {
                return Err(KeyError::Invalid {
                    kid: sk.kid,
                    reason: "stored kid does not match the key".into(),
                });
            }
            published.push(key.public_jwk());
            if sk.state == "current" && wanted.iter().any(|(t, a)| *t == sk.target && *a == alg) {
                current.insert(sk.target.clone(), Arc::new(key));
            }
        }
        for (target, alg) in wanted {
            if current.contains_key(target) {
                continue;
            }
            let (key, pkcs8) = SigningKey::generate(*alg).map_err(|e| KeyError::Invalid {
                kid: "(new)".into(),
                reason: e.to_string(),
            })?;
            let sealed = master.seal(&pkcs8, aad(key.kid()).as_bytes());
            store
                .insert_signing_key(StoredKey {
                    kid: key.kid().to_string(),
                    target: target.clone(),
                    alg: alg.as_str().to_string(),
                    state: "current".into(),
                    created_at: clock.now(),
                    sealed,
                })
                .await?;
            tracing::info!(target = %target, kid = %key.kid(), alg = %alg, "generated signing key");
            published.push(key.public_jwk());
            current.insert(target.clone(), Arc::new(key));
        }
        let ring = KeyRing {
            current: RwLock::new(current),
            published: RwLock::new(Arc::new(Vec::new())),
            jwks_json: RwLock::new(Arc::new(Vec::new())),
        };
        ring.publish(published);
        Ok(ring)
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
        assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
        assert!(
            !String::from_utf8_lossy(&ring.jwks_json()).contains("\"d\""),
            "no private members"
        );

        // Same master key: same keys, nothing new generated.
        let again = KeyRing::load(&store, &master, &wanted, &clock)
            .await
            .unwrap();
        assert_eq!(again.signer("a").unwrap().kid(), kid_a);
        assert_eq!(store.signing_keys().await.unwrap().len(), 2);

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
