//! Signed checkpoints of the audit chain, and their delivery to a witness.
//!
//! Every `checkpoint_every` records or `checkpoint_interval` (whichever comes first) the
//! [`Checkpointer`] signs the chain head (checkpoint id, sequence number, hash, time) with
//! a dedicated Ed25519 audit key and stores the checkpoint. Someone who rewrites the
//! database file and recomputes every hash still cannot sign: the key is sealed under
//! the master key. Someone who also deletes the checkpoints is caught by a witness: the
//! [`Witness`] task appends each checkpoint to an external file or POSTs it to a URL,
//! from the store (so memory stays bounded however long the witness is down), in order,
//! retrying with backoff; its lag is visible in [`AuditStatus`].

use crate::clock::SharedClock;
use crate::jose::{b64, b64_decode, Alg, SigningKey};
use crate::keys::MasterKey;
use crate::store::{Store, StoreError, StoredAuditKey};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

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

/// Why the audit key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum AuditKeyError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A sealed key does not open under this master key.
    #[error("audit key {0} cannot be decrypted: the master key does not match this store")]
    WrongMasterKey(String),
    /// Stored key material is unusable.
    #[error("audit key {0} is unusable")]
    Invalid(String),
}

/// The broker's audit signing key (newest) and every audit public key.
#[derive(Debug)]
pub struct AuditSigner {
    key: SigningKey,
    keys: CheckpointKeys,
}

fn aad(kid: &str) -> String {
    format!("latchkey-audit-key:{kid}")
}

impl AuditSigner {
    /// Opens the newest stored audit key, or generates and stores one on first start.
    /// Fails when a stored key does not open under `master`.
    pub async fn load(
        store: &dyn Store,
        master: &MasterKey,
        clock: &SharedClock,
    ) -> Result<AuditSigner, AuditKeyError> {
        let stored = store.audit_keys().await?;
        let publics = CheckpointKeys::new(
            stored
                .iter()
                .map(|k| (k.kid.clone(), k.public.clone()))
                .collect::<Vec<_>>(),
        );
        if let Some(newest) = stored.iter().max_by_key(|k| (k.created_at, k.kid.clone())) {
            let pkcs8 = master
                .open(&newest.sealed, aad(&newest.kid).as_bytes())
                .map_err(|_| AuditKeyError::WrongMasterKey(newest.kid.clone()))?;
            let key = SigningKey::from_pkcs8(Alg::EdDSA, pkcs8.expose())
                .map_err(|_| AuditKeyError::Invalid(newest.kid.clone()))?;
            if key.kid() != newest.kid || key.public_key_raw() != newest.public {
                return Err(AuditKeyError::Invalid(newest.kid.clone()));
            }
            return Ok(AuditSigner { key, keys: publics });
        }
        let (key, pkcs8) =
            SigningKey::generate(Alg::EdDSA).map_err(|_| AuditKeyError::Invalid("(new)".into()))?;
        store
            .insert_audit_key(StoredAuditKey {
                kid: key.kid().to_string(),
                created_at: clock.now(),
                public: key.public_key_raw(),
                sealed: master.seal(&pkcs8, aad(key.kid()).as_bytes()),
            })
            .await?;
        tracing::info!(kid = %key.kid(), "generated audit checkpoint key");
        let keys = CheckpointKeys::new([(key.kid().to_string(), key.public_key_raw())]);
        Ok(AuditSigner { key, keys })
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

/// Signs checkpoints of the chain head on schedule.
#[derive(Debug, Clone)]
pub struct Checkpointer {
    store: Arc<dyn Store>,
    signer: Arc<AuditSigner>,
    clock: SharedClock,
    cfg: Config,
    status: Arc<AuditStatus>,
    /// Tells the witness a new checkpoint exists.
    made: watch::Sender<i64>,
}

impl Checkpointer {
    /// A checkpointer; `status` is shared with the witness and readiness.
    pub fn new(
        store: Arc<dyn Store>,
        signer: Arc<AuditSigner>,
        clock: SharedClock,
        cfg: Config,
        status: Arc<AuditStatus>,
    ) -> Checkpointer {
        Checkpointer {
            store,
            signer,
            clock,
            cfg,
            status,
            made: watch::channel(0).0,
        }
    }

    /// Signs and stores a checkpoint of the current head if the head moved past the last
    /// checkpoint. Answers the new checkpoint, or `None` when there was nothing new.
    pub async fn checkpoint_now(&self) -> Result<Option<Checkpoint>, StoreError> {
        let last = self.store.checkpoints_newest().await?;
        let (seq, hash) = self.store.audit_head().await?;
        let (last_id, last_seq) = last.as_ref().map(|c| (c.id, c.seq)).unwrap_or((0, 0));
        self.status.last_checkpoint.store(last_id, Ordering::SeqCst);
        if seq <= last_seq {
            return Ok(None);
        }
        let cp = self
            .signer
            .sign(last_id + 1, seq, &hash, self.clock.now_ms());
        self.store.insert_checkpoint(cp.clone()).await?;
        self.status.last_checkpoint.store(cp.id, Ordering::SeqCst);
        self.made.send_replace(cp.id);
        tracing::debug!(checkpoint = cp.id, seq, "audit checkpoint signed");
        Ok(Some(cp))
    }

    /// Watches for new checkpoints (the witness waits on it).
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.made.subscribe()
    }

    /// Checkpoints every `checkpoint_every` records or `checkpoint_interval`, until
    /// `stop`. (The server signs one last checkpoint after its listeners have drained.)
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut head = self.store.subscribe_head();
        let mut last_seq = match self.store.checkpoints_newest().await {
            Ok(c) => c.map(|c| c.seq).unwrap_or(0),
            Err(_) => 0,
        };
        let mut tick = tokio::time::interval(self.cfg.checkpoint_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let due = tokio::select! {
                _ = stop.wait_for(|v| *v) => break,
                _ = tick.tick() => true,
                changed = head.changed() => {
                    if changed.is_err() { break; }
                    let h = *head.borrow_and_update();
                    h.saturating_sub(last_seq) as u64 >= self.cfg.checkpoint_every
                }
            };
            if due {
                match self.checkpoint_now().await {
                    Ok(Some(c)) => {
                        last_seq = c.seq;
                        tick.reset();
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!(error = %e, "audit checkpoint failed; will retry"),
                }
            }
        }
    }
}

/// Delivers checkpoints to the witness, in order, from the store.
#[derive(Debug, Clone)]
pub struct Witness {
    store: Arc<dyn Store>,
    target: WitnessTarget,
    status: Arc<AuditStatus>,
    http: Option<reqwest::Client>,
    timeout: Duration,
}

/// Longest wait between delivery attempts.
const WITNESS_MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Checkpoints read from the store per round.
const WITNESS_PAGE: usize = 100;

impl Witness {
    /// A witness delivering to `target`, each delivery bounded by `timeout`.
    pub fn new(
        store: Arc<dyn Store>,
        target: WitnessTarget,
        timeout: Duration,
        status: Arc<AuditStatus>,
    ) -> Witness {
        Witness {
            store,
            target,
            status,
            // Only fails when the TLS backend cannot start; then every delivery fails
            // (and is retried) rather than running without a timeout.
            http: reqwest::Client::builder()
                .timeout(timeout)
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .ok(),
            timeout,
        }
    }

    /// The longest one delivery may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Delivers what is pending; answers how many were delivered. Stops at the first
    /// failure (the next call starts there again).
    pub async fn deliver_pending(&self) -> Result<usize, String> {
        let mut done = 0;
        loop {
            let from = self
                .store
                .witness_position()
                .await
                .map_err(|e| e.to_string())?;
            self.status.witness_delivered.store(from, Ordering::SeqCst);
            let page = self
                .store
                .checkpoints(from, WITNESS_PAGE)
                .await
                .map_err(|e| e.to_string())?;
            if page.is_empty() {
                return Ok(done);
            }
            for c in page {
                self.deliver(&c).await?;
                self.store
                    .set_witness_position(c.id)
                    .await
                    .map_err(|e| e.to_string())?;
                self.status.witness_delivered.store(c.id, Ordering::SeqCst);
                done += 1;
            }
        }
    }

    async fn deliver(&self, c: &Checkpoint) -> Result<(), String> {
        let line = serde_json::to_string(c).map_err(|e| e.to_string())?;
        match &self.target {
            WitnessTarget::File(p) => {
                let p = p.clone();
                let write = tokio::task::spawn_blocking(move || {
                    use std::io::Write;
                    let mut f = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&p)?;
                    f.write_all(format!("{line}\n").as_bytes())?;
                    f.sync_data()
                });
                match tokio::time::timeout(self.timeout, write).await {
                    Ok(Ok(Ok(()))) => Ok(()),
                    Ok(Ok(Err(e))) => Err(format!("witness file: {}", e.kind())),
                    Ok(Err(_)) => Err("witness file: writer failed".into()),
                    Err(_) => Err("witness file: timed out".into()),
                }
            }
            WitnessTarget::Url(u) => {
                let http = self.http.as_ref().ok_or("witness url: no HTTP client")?;
                let r = http
                    .post(u)
                    .header("content-type", "application/json")
                    .body(line)
                    .send()
                    .await
                    .map_err(|e| {
                        if e.is_timeout() {
                            "witness url: timed out".to_string()
                        } else {
                            "witness url: unreachable".to_string()
                        }
                    })?;
                if r.status().is_success() {
                    Ok(())
                } else {
                    Err(format!("witness url: HTTP {}", r.status().as_u16()))
                }
            }
        }
    }

    /// Delivers whenever a checkpoint is made, retrying failures with backoff (1 s
    /// doubling to 60 s), until `stop`.
    pub async fn run(self, mut made: watch::Receiver<i64>, mut stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_secs(1);
        loop {
            let wait = match self.deliver_pending().await {
                Ok(_) => {
                    self.status.witness_failures.store(0, Ordering::SeqCst);
                    backoff = Duration::from_secs(1);
                    None
                }
                Err(e) => {
                    let n = self.status.witness_failures.fetch_add(1, Ordering::SeqCst) + 1;
                    tracing::warn!(error = %e, failures = n, lag = self.status.witness_lag(), "audit witness delivery failed; retrying");
                    let w = backoff;
                    backoff = (backoff * 2).min(WITNESS_MAX_BACKOFF);
                    Some(w)
                }
            };
            tokio::select! {
                _ = stop.wait_for(|v| *v) => return,
                r = made.changed(), if wait.is_none() => { if r.is_err() { return; } }
                _ = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {}
            }
        }
    }
}

/// Replaces the listed claims (top-level names, or JSON pointers starting with `/`)
/// with `"[REDACTED]"`.
pub fn redact(claims: &mut Value, paths: &[String]) {
    for p in paths {
        let slot = if p.starts_with('/') {
            claims.pointer_mut(p)
        } else {
            claims.get_mut(p.as_str())
        };
        if let Some(v) = slot {
            *v = Value::String("[REDACTED]".into());
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::audit::AuditRecord;

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
