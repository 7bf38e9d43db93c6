//! The audit trail's running parts: the audit key loaded from the store, the
//! [`Checkpointer`] that signs the chain head on schedule, and the [`Witness`] that
//! delivers each checkpoint elsewhere.
//!
//! Every `checkpoint_every` records or `checkpoint_interval` (whichever comes first) the
//! [`Checkpointer`] signs the chain head (checkpoint id, sequence number, hash, time) with
//! a dedicated Ed25519 audit key and stores the checkpoint. Someone who rewrites the
//! database file and recomputes every hash still cannot sign: the key is sealed under
//! the master key. Someone who also deletes the checkpoints is caught by a witness: the
//! [`Witness`] task appends each checkpoint to an external file or POSTs it to a URL,
//! from the store (so memory stays bounded however long the witness is down), in order,
//! retrying with backoff; its lag is visible in [`AuditStatus`]. The checkpoint format
//! and its verification are in [`crate::audit::checkpoint`].

use crate::audit::checkpoint::{
    AuditSigner, AuditStatus, Checkpoint, CheckpointKeys, Config, WitnessTarget,
};
use crate::clock::SharedClock;
use crate::jose::{Alg, SigningKey};
use crate::keys::MasterKey;
use crate::store::{Store, StoreError, StoredAuditKey};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

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

fn aad(kid: &str) -> String {
    format!("latchkey-audit-key:{kid}")
}

/// Opens the newest stored audit key, or generates and stores one on first start.
/// Fails when a stored key does not open under `master`.
pub async fn load_audit_signer(
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
        return Ok(AuditSigner::new(key, publics));
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
    Ok(AuditSigner::new(key, keys))
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
