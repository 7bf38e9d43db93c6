//! The broker's own signing keys: generated on first start, sealed at rest under the
//! master key (AES-256-GCM), published as a JWKS.

mod master;

pub use master::{MasterKey, MasterKeyError};

use crate::jose::{Alg, SigningKey};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};

/// Where a signing key is in its life: `next` (published ahead, so verifiers that cache
/// the JWKS know it before it signs) → `current` (signing) → `retired` (published until
/// every token it signed has expired, then removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyState {
    /// Published, not signing yet.
    Next,
    /// Signing.
    Current,
    /// No longer signing; published until `remove_at`.
    Retired,
}

impl KeyState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Next => "next",
            KeyState::Current => "current",
            KeyState::Retired => "retired",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<KeyState> {
        Some(match s {
            "next" => KeyState::Next,
            "current" => KeyState::Current,
            "retired" => KeyState::Retired,
            _ => return None,
        })
    }
}

impl std::fmt::Display for KeyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A signing key as stored: public facts in the clear, the private key sealed under the
/// master key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    /// Key id (JWK thumbprint).
    pub kid: String,
    /// Target the key signs for.
    pub target: String,
    /// JOSE algorithm name.
    pub alg: String,
    /// Where it is in its life.
    pub state: KeyState,
    /// Creation time (seconds since the epoch); a `next` key is published from then.
    pub created_at: i64,
    /// AES-256-GCM sealed PKCS#8.
    pub sealed: Vec<u8>,
    /// When it started signing.
    pub activated_at: Option<i64>,
    /// For a retired key: when every token it signed has expired and it may go.
    pub remove_at: Option<i64>,
}

/// What happens to the key that signed until a rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldKey {
    /// Retired: still published until `remove_at`, when every token it signed has expired.
    Retire {
        /// When it may be removed.
        remove_at: i64,
    },
    /// Removed at once (forced): tokens it signed no longer verify.
    Drop,
}

/// What a signing-key rotation of one target does now, decided from its stored keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotationPlan {
    /// No key is published ahead (a store from before rotation): publish one; it may
    /// sign from `ready`.
    PublishNext {
        /// When the new next key may sign.
        ready: i64,
    },
    /// The next key has been published for less than the verifiers' cache period.
    Wait {
        /// The next key.
        next: String,
        /// When it may sign.
        ready: i64,
    },
    /// The next key signs from now, a fresh next key is published, and the current key
    /// (if any) goes as `old` says.
    Activate {
        /// The key that signs from now.
        next: String,
        /// The key that signed until now.
        current: Option<(String, OldKey)>,
        /// When the next key would have been ready: later than now only when forced.
        ready: i64,
    },
}

/// Retired keys whose tokens have all expired at `now`: they may be removed.
pub fn removable(keys: &[StoredKey], now: i64) -> Vec<&StoredKey> {
    keys.iter()
        .filter(|k| k.state == KeyState::Retired && k.remove_at.is_some_and(|t| t <= now))
        .collect()
}

/// Plans a rotation of one target's keys at `now`. A next key signs only once it has
/// been published for `cache_secs` (verifiers cache the JWKS that long), unless
/// `drop_old` forces it; the current key stays published for `token_secs` (the longest a
/// token it signed lives) unless `drop_old`. Pure: the caller writes the plan.
pub fn plan_rotation(
    keys: &[StoredKey],
    now: i64,
    cache_secs: i64,
    token_secs: i64,
    drop_old: bool,
) -> RotationPlan {
    let current = keys.iter().find(|k| k.state == KeyState::Current);
    let Some(next) = keys.iter().find(|k| k.state == KeyState::Next) else {
        return RotationPlan::PublishNext {
            ready: now.saturating_add(cache_secs),
        };
    };
    let ready = next.created_at.saturating_add(cache_secs);
    if ready > now && !drop_old {
        return RotationPlan::Wait {
            next: next.kid.clone(),
            ready,
        };
    }
    let old = if drop_old {
        OldKey::Drop
    } else {
        OldKey::Retire {
            remove_at: now.saturating_add(token_secs),
        }
    };
    RotationPlan::Activate {
        next: next.kid.clone(),
        current: current.map(|c| (c.kid.clone(), old)),
        ready,
    }
}

/// Key ring failures.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
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
/// has expired. Rotation moves keys between the states in the store and then installs
/// the stored keys again ([`KeyRing::install`]).
///
/// Two documents are published: each target's own JWKS (its keys only), and the shared
/// JWKS, which holds the keys of every target except the private ones (targets with
/// their own issuer), so a verifier can trust exactly one target's keys.
#[derive(Debug)]
pub struct KeyRing {
    current: RwLock<HashMap<String, Arc<SigningKey>>>,
    /// Every published public key (current, next and retired), with its target.
    published: RwLock<Arc<Vec<(String, Value)>>>,
    /// Targets whose keys stay out of the shared JWKS.
    private: RwLock<HashSet<String>>,
    jwks_json: RwLock<Arc<Vec<u8>>>,
    target_jwks: RwLock<Arc<BTreeMap<String, Arc<Vec<u8>>>>>,
}

/// A new key of `alg` for `target` in `state`, sealed for the store.
pub fn new_stored_key(
    master: &MasterKey,
    target: &str,
    alg: Alg,
    state: KeyState,
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
        state,
        created_at: now,
        sealed: master.seal(&pkcs8, aad(key.kid()).as_bytes()),
        activated_at: (state == KeyState::Current).then_some(now),
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
    /// An empty ring: no signers, an empty JWKS.
    pub fn empty() -> KeyRing {
        KeyRing {
            current: RwLock::new(HashMap::new()),
            published: RwLock::new(Arc::new(Vec::new())),
            private: RwLock::new(HashSet::new()),
            jwks_json: RwLock::new(Arc::new(Vec::new())),
            target_jwks: RwLock::new(Arc::new(BTreeMap::new())),
        }
    }

    /// Keeps these targets' keys out of the shared JWKS (each is still published in
    /// its own target's JWKS).
    pub fn set_private_targets(&self, targets: HashSet<String>) {
        *self.private.write().unwrap_or_else(|e| e.into_inner()) = targets;
        let keys = self
            .published
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .clone();
        self.publish(keys);
    }

    /// Puts the stored keys in service: signers from `current` keys, the JWKS from every
    /// current, next and retired key. Fails when a key does not open under `master` or
    /// is unusable; the ring in service then stays as it was.
    pub fn install(&self, stored: &[StoredKey], master: &MasterKey) -> Result<(), KeyError> {
        let mut current = HashMap::new();
        let mut published = Vec::new();
        for sk in stored {
            let key = open_key(master, sk)?;
            published.push((sk.target.clone(), key.public_jwk()));
            if sk.state == KeyState::Current {
                current.insert(sk.target.clone(), Arc::new(key));
            }
        }
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = current;
        self.publish(published);
        Ok(())
    }

    fn publish(&self, keys: Vec<(String, Value)>) {
        let doc = |keys: Vec<&Value>| {
            Arc::new(serde_json::to_vec(&json!({ "keys": keys })).unwrap_or_default())
        };
        let private = self.private.read().unwrap_or_else(|e| e.into_inner());
        let shared = doc(keys
            .iter()
            .filter(|(t, _)| !private.contains(t))
            .map(|(_, k)| k)
            .collect());
        let mut by_target: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
        for (t, k) in &keys {
            by_target.entry(t.clone()).or_default().push(k);
        }
        let by_target = by_target.into_iter().map(|(t, ks)| (t, doc(ks))).collect();
        drop(private);
        *self.published.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        *self.jwks_json.write().unwrap_or_else(|e| e.into_inner()) = shared;
        *self.target_jwks.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(by_target);
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
            .map(|(_, j)| j)
            .filter(|j| j.get("kid").and_then(Value::as_str) == Some(kid))
            .filter_map(crate::identity::jwks::VerifyKey::from_jwk)
            .any(|k| k.alg == Some(alg) && k.verify(alg, msg, sig))
    }

    /// The shared JWKS document, serialised once per change.
    pub fn jwks_json(&self) -> Arc<Vec<u8>> {
        self.jwks_json
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// One target's own JWKS document (its keys only); `None` when it has no keys.
    pub fn target_jwks_json(&self, target: &str) -> Option<Arc<Vec<u8>>> {
        self.target_jwks
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(target)
            .cloned()
    }

    /// Algorithms of the keys in the shared JWKS, or of one target's keys (for the
    /// discovery documents).
    pub fn algorithms(&self, target: Option<&str>) -> Vec<String> {
        let private = self
            .private
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut v: Vec<String> = self
            .published
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(t, _)| match target {
                Some(want) => t == want,
                None => !private.contains(t),
            })
            .filter_map(|(_, k)| k.get("alg").and_then(Value::as_str).map(str::to_string))
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

    fn stored(kid: &str, state: KeyState, created_at: i64, remove_at: Option<i64>) -> StoredKey {
        StoredKey {
            kid: kid.into(),
            target: "t".into(),
            alg: "ES256".into(),
            state,
            created_at,
            sealed: Vec::new(),
            activated_at: None,
            remove_at,
        }
    }

    #[test]
    fn a_rotation_publishes_waits_then_activates_and_retires() {
        let cur = stored("c", KeyState::Current, 0, None);
        assert_eq!(
            plan_rotation(std::slice::from_ref(&cur), 100, 300, 3600, false),
            RotationPlan::PublishNext { ready: 400 }
        );
        let keys = [cur, stored("n", KeyState::Next, 50, None)];
        assert_eq!(
            plan_rotation(&keys, 100, 300, 3600, false),
            RotationPlan::Wait {
                next: "n".into(),
                ready: 350
            }
        );
        assert_eq!(
            plan_rotation(&keys, 350, 300, 3600, false),
            RotationPlan::Activate {
                next: "n".into(),
                current: Some(("c".into(), OldKey::Retire { remove_at: 3950 })),
                ready: 350
            }
        );
        assert_eq!(
            plan_rotation(&keys, 100, 300, 3600, true),
            RotationPlan::Activate {
                next: "n".into(),
                current: Some(("c".into(), OldKey::Drop)),
                ready: 350
            }
        );
    }

    #[test]
    fn only_retired_keys_past_their_time_are_removable() {
        let keys = [
            stored("a", KeyState::Retired, 0, Some(10)),
            stored("b", KeyState::Retired, 0, Some(11)),
            stored("c", KeyState::Current, 0, Some(1)),
            stored("d", KeyState::Retired, 0, None),
        ];
        let kids: Vec<&str> = removable(&keys, 10)
            .iter()
            .map(|k| k.kid.as_str())
            .collect();
        assert_eq!(kids, ["a"]);
    }

    proptest::proptest! {
        /// Without force, a key never signs before it has been published for the cache
        /// period, and a retired key stays published for every token it signed.
        #[test]
        fn no_key_signs_early_and_no_token_outlives_its_key(
            created in 0i64..10_000,
            now in 0i64..20_000,
            cache in 0i64..5_000,
            token in 0i64..100_000,
        ) {
            let keys = [
                stored("c", KeyState::Current, 0, None),
                stored("n", KeyState::Next, created, None),
            ];
            match plan_rotation(&keys, now, cache, token, false) {
                RotationPlan::Activate { ready, current, .. } => {
                    proptest::prop_assert!(ready <= now);
                    proptest::prop_assert!(created + cache <= now);
                    match current {
                        Some((_, OldKey::Retire { remove_at })) => {
                            proptest::prop_assert!(remove_at >= now + token)
                        }
                        other => proptest::prop_assert!(false, "{other:?}"),
                    }
                }
                RotationPlan::Wait { ready, .. } => {
                    proptest::prop_assert!(ready > now);
                    proptest::prop_assert_eq!(ready, created + cache);
                }
                RotationPlan::PublishNext { .. } => proptest::prop_assert!(false),
            }
        }
    }

    #[test]
    fn key_states_round_trip_their_stored_names() {
        for st in [KeyState::Next, KeyState::Current, KeyState::Retired] {
            assert_eq!(KeyState::parse(st.as_str()), Some(st));
            assert_eq!(st.to_string(), st.as_str());
        }
        assert_eq!(KeyState::parse("Current"), None);
        assert_eq!(KeyState::parse(""), None);
    }

    #[test]
    fn a_key_that_does_not_open_leaves_the_ring_as_it_was() {
        let master = MasterKey::generate();
        let k = new_stored_key(&master, "a", Alg::ES256, KeyState::Current, 1).unwrap();
        let ring = KeyRing::empty();
        ring.install(std::slice::from_ref(&k), &master).unwrap();
        let kid = ring.signer("a").unwrap().kid().to_string();
        let other = new_stored_key(
            &MasterKey::generate(),
            "a",
            Alg::ES256,
            KeyState::Current,
            2,
        )
        .unwrap();
        let err = ring.install(&[other], &master).unwrap_err();
        assert!(matches!(err, KeyError::WrongMasterKey { .. }), "{err}");
        assert_eq!(ring.signer("a").unwrap().kid(), kid);
        assert!(ring.signer("b").is_err());
    }

    #[test]
    fn each_target_has_its_own_jwks_and_private_ones_stay_out_of_the_shared_one() {
        let master = MasterKey::generate();
        let keys = [
            new_stored_key(&master, "a", Alg::ES256, KeyState::Current, 1).unwrap(),
            new_stored_key(&master, "a", Alg::ES256, KeyState::Next, 1).unwrap(),
            new_stored_key(&master, "b", Alg::RS256, KeyState::Current, 1).unwrap(),
        ];
        let kids = |doc: &[u8]| -> Vec<String> {
            let v: Value = serde_json::from_slice(doc).unwrap();
            let mut k: Vec<String> = v["keys"]
                .as_array()
                .unwrap()
                .iter()
                .map(|j| j["kid"].as_str().unwrap().to_string())
                .collect();
            k.sort();
            k
        };
        let mut a = vec![keys[0].kid.clone(), keys[1].kid.clone()];
        a.sort();
        let ring = KeyRing::empty();
        ring.install(&keys, &master).unwrap();
        assert_eq!(kids(&ring.jwks_json()).len(), 3);
        assert_eq!(kids(&ring.target_jwks_json("a").unwrap()), a);
        assert_eq!(
            kids(&ring.target_jwks_json("b").unwrap()),
            vec![keys[2].kid.clone()]
        );
        assert!(ring.target_jwks_json("c").is_none());
        assert_eq!(ring.algorithms(None), vec!["ES256", "RS256"]);

        ring.set_private_targets(HashSet::from(["b".to_string()]));
        assert_eq!(kids(&ring.jwks_json()), a, "b's key left the shared JWKS");
        assert_eq!(ring.algorithms(None), vec!["ES256"]);
        assert_eq!(ring.algorithms(Some("b")), vec!["RS256"]);
        // ... stays out after a rotation installs the keys again, and still verifies.
        ring.install(&keys, &master).unwrap();
        assert_eq!(kids(&ring.jwks_json()), a);
        assert_eq!(
            kids(&ring.target_jwks_json("b").unwrap()),
            vec![keys[2].kid.clone()]
        );
        let signer = ring.signer("b").unwrap();
        let token = signer.sign_jwt(&serde_json::json!({"x": 1}), None).unwrap();
        let (input, sig) = token.rsplit_once('.').unwrap();
        let sig = crate::jose::b64_decode(sig).unwrap();
        assert!(ring.verify(signer.kid(), Alg::RS256, input.as_bytes(), &sig));
    }
}
