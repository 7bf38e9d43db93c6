//! Signed checkpoints of the audit chain: the [`Checkpoint`] format and its signing input,
//! the audit public keys ([`CheckpointKeys`], as a JWKS too), the [`AuditSigner`], the
//! witness settings and the claim redaction applied before a record is written. The
//! running parts (loading the key from the store, signing on schedule, delivering to the
//! witness) are broker services in `broker::checkpoint`.

use crate::jose::{b64, b64_decode, SigningKey};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// A signed statement that the chain had this head at this time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Checkpoint number, from 1, without gaps.
    pub id: i64,
    /// Sequence number of the record attested.
    pub seq: i64,
    /// That record's hash.
    pub hash: String,
    /// When it was signed (milliseconds since the epoch).
    pub time_ms: i64,
    /// The audit key that signed it.
    pub kid: String,
    /// Ed25519 signature over [`Checkpoint::signing_input`], base64url.
    pub signature: String,
}

impl Checkpoint {
    /// The exact bytes signed.
    pub fn signing_input(id: i64, seq: i64, hash: &str, time_ms: i64) -> String {
        format!("latchkey-audit-checkpoint:v1:{id}:{seq}:{hash}:{time_ms}")
    }
}

/// The public halves of the audit keys, by kid.
#[derive(Debug, Clone, Default)]
pub struct CheckpointKeys(HashMap<String, Vec<u8>>);

impl CheckpointKeys {
    /// From `(kid, raw Ed25519 public key)` pairs.
    pub fn new(keys: impl IntoIterator<Item = (String, Vec<u8>)>) -> CheckpointKeys {
        CheckpointKeys(keys.into_iter().collect())
    }

    /// From a JWKS document as `/v1/audit/keys` publishes it. Fails naming what is wrong.
    pub fn from_jwks(doc: &Value) -> Result<CheckpointKeys, String> {
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("not a JWKS: no \"keys\" array")?;
        let mut out = HashMap::new();
        for k in keys {
            let field = |n: &str| k.get(n).and_then(Value::as_str);
            if field("kty") != Some("OKP") || field("crv") != Some("Ed25519") {
                return Err("audit keys are Ed25519 (kty OKP, crv Ed25519)".into());
            }
            let (Some(kid), Some(x)) = (field("kid"), field("x").and_then(b64_decode)) else {
                return Err("an audit key lacks kid or x".into());
            };
            out.insert(kid.to_string(), x);
        }
        Ok(CheckpointKeys(out))
    }

    /// The keys as a JWKS document.
    pub fn to_jwks(&self) -> Value {
        let mut kids: Vec<&String> = self.0.keys().collect();
        kids.sort();
        json!({ "keys": kids.into_iter().map(|kid| json!({
            "kty": "OKP", "crv": "Ed25519", "x": b64(&self.0[kid]), "kid": kid,
            "alg": "EdDSA", "use": "latchkey-audit",
        })).collect::<Vec<_>>() })
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Checks a checkpoint's signature. Fails saying why.
    pub fn verify(&self, c: &Checkpoint) -> Result<(), String> {
        let key = self
            .0
            .get(&c.kid)
            .ok_or_else(|| format!("signed by unknown audit key {}", c.kid))?;
        let sig = b64_decode(&c.signature).ok_or("signature is not base64url")?;
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
            .verify(
                Checkpoint::signing_input(c.id, c.seq, &c.hash, c.time_ms).as_bytes(),
                &sig,
            )
            .map_err(|_| "signature does not verify (forged or altered)".to_string())
    }
}

/// The broker's audit signing key (newest) and every audit public key.
#[derive(Debug)]
pub struct AuditSigner {
    key: SigningKey,
    keys: CheckpointKeys,
}

impl AuditSigner {
    /// A signer with `key`, knowing the public `keys` (which include its own).
    pub fn new(key: SigningKey, keys: CheckpointKeys) -> AuditSigner {
        AuditSigner { key, keys }
    }

    /// Every audit public key.
    pub fn keys(&self) -> &CheckpointKeys {
        &self.keys
    }

    /// Signs a checkpoint of the record `(seq, hash)`.
    pub fn sign(&self, id: i64, seq: i64, hash: &str, time_ms: i64) -> Checkpoint {
        let input = Checkpoint::signing_input(id, seq, hash, time_ms);
        // Ed25519 signing in ring cannot fail.
        let sig = self.key.sign(input.as_bytes()).unwrap_or_default();
        Checkpoint {
            id,
            seq,
            hash: hash.to_string(),
            time_ms,
            kid: self.key.kid().to_string(),
            signature: b64(sig),
        }
    }
}

/// Where checkpoints are also sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WitnessTarget {
    /// Appended as one JSON line each, fsynced.
    File(PathBuf),
    /// POSTed as JSON; any 2xx answer means delivered.
    Url(String),
}

/// Checkpoint and witness settings (`[audit]`).
#[derive(Debug, Clone)]
pub struct Config {
    /// A checkpoint after this many records.
    pub checkpoint_every: u64,
    /// A checkpoint at least this often while records arrive.
    pub checkpoint_interval: Duration,
    /// Where checkpoints are also delivered.
    pub witness: Option<WitnessTarget>,
    /// Longest one delivery may take before it counts as failed.
    pub witness_timeout: Duration,
    /// Claims replaced by `"[REDACTED]"` before a record is written: top-level names or
    /// JSON pointers (`/kubernetes.io/pod/name`).
    pub redact_claims: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(60),
            witness: None,
            witness_timeout: Duration::from_secs(10),
            redact_claims: Vec::new(),
        }
    }
}

/// Live state of checkpointing and witness delivery (for readiness and `Checkpoints`).
#[derive(Debug, Default)]
pub struct AuditStatus {
    /// Id of the newest checkpoint.
    pub last_checkpoint: AtomicI64,
    /// Id of the newest checkpoint the witness has.
    pub witness_delivered: AtomicI64,
    /// Consecutive failed witness deliveries.
    pub witness_failures: AtomicI64,
}

impl AuditStatus {
    /// Checkpoints not yet delivered to the witness.
    pub fn witness_lag(&self) -> i64 {
        (self.last_checkpoint.load(Ordering::SeqCst)
            - self.witness_delivered.load(Ordering::SeqCst))
        .max(0)
    }
}

/// What a redacted value is replaced with.
pub const REDACTED: &str = "[REDACTED]";

/// Replaces the listed claims (top-level names, or JSON pointers starting with `/`)
/// with `"[REDACTED]"`. Answers the values it replaced (strings as they were, anything
/// else as JSON text), so fields derived from them can be hidden too.
pub fn redact(claims: &mut Value, paths: &[String]) -> Vec<String> {
    let mut hidden = Vec::new();
    for p in paths {
        let slot = if p.starts_with('/') {
            claims.pointer_mut(p)
        } else {
            claims.get_mut(p.as_str())
        };
        if let Some(v) = slot {
            let old = std::mem::replace(v, Value::String(REDACTED.into()));
            hidden.push(match old {
                Value::String(s) => s,
                other => other.to_string(),
            });
        }
    }
    hidden
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::audit::AuditRecord;
    use crate::jose::Alg;

    pub(crate) fn keys_and_signer() -> (CheckpointKeys, AuditSigner) {
        let (key, _) = SigningKey::generate(Alg::EdDSA).unwrap();
        let keys = CheckpointKeys::new([(key.kid().to_string(), key.public_key_raw())]);
        (
            keys.clone(),
            AuditSigner {
                key,
                keys: keys.clone(),
            },
        )
    }

    pub(crate) fn sign(s: &AuditSigner, id: i64, r: &AuditRecord, time_ms: i64) -> Checkpoint {
        s.sign(id, r.seq, &r.hash, time_ms)
    }

    #[test]
    fn signatures_verify_and_any_change_breaks_them() {
        let (keys, s) = keys_and_signer();
        let c = s.sign(3, 10, "abc", 5);
        assert_eq!(keys.verify(&c), Ok(()));
        for bad in [
            Checkpoint { id: 4, ..c.clone() },
            Checkpoint {
                seq: 11,
                ..c.clone()
            },
            Checkpoint {
                hash: "abd".into(),
                ..c.clone()
            },
            Checkpoint {
                time_ms: 6,
                ..c.clone()
            },
            Checkpoint {
                signature: "!!".into(),
                ..c.clone()
            },
        ] {
            assert!(keys.verify(&bad).is_err(), "{bad:?}");
        }
        let unknown = Checkpoint {
            kid: "other".into(),
            ..c.clone()
        };
        assert!(keys
            .verify(&unknown)
            .unwrap_err()
            .contains("unknown audit key"));
    }

    #[test]
    fn jwks_round_trip_and_rejections() {
        let (keys, s) = keys_and_signer();
        let doc = keys.to_jwks();
        let back = CheckpointKeys::from_jwks(&doc).unwrap();
        assert_eq!(back.verify(&s.sign(1, 1, "h", 1)), Ok(()));
        assert!(CheckpointKeys::from_jwks(&json!({})).is_err());
        assert!(CheckpointKeys::from_jwks(&json!({"keys": [{"kty": "RSA"}]})).is_err());
        assert!(
            CheckpointKeys::from_jwks(&json!({"keys": [{"kty": "OKP", "crv": "Ed25519"}]}))
                .is_err()
        );
    }

    #[test]
    fn redaction_by_name_and_pointer() {
        let mut c = json!({"email": "a@b", "kubernetes.io": {"pod": {"name": "p1", "uid": "u"}}, "sub": "s"});
        redact(
            &mut c,
            &[
                "email".into(),
                "/kubernetes.io/pod/name".into(),
                "absent".into(),
            ],
        );
        assert_eq!(c["email"], "[REDACTED]");
        assert_eq!(c["kubernetes.io"]["pod"]["name"], "[REDACTED]");
        assert_eq!(c["kubernetes.io"]["pod"]["uid"], "u");
        assert_eq!(c["sub"], "s");
        assert!(c.get("absent").is_none());
    }
}
