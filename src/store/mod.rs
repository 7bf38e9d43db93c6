//! Persistent state behind ports named after what the domain needs: [`AuditLog`],
//! [`Leases`], [`Keys`], [`Coordination`] and [`RootSecrets`] ([`Store`] is all of them).
//! Each method's doc says the isolation it needs, so a backend shared by several
//! replicas knows what it must guarantee; `tests/store_conformance.rs` checks every
//! backend against them. SQLite ([`sqlite`]) is the embedded default; [`backend::open`]
//! chooses a backend by [`Location`].

pub mod backend;
pub mod sqlite;

use std::path::{Path, PathBuf};

use crate::audit::checkpoint::Checkpoint;
use crate::audit::verify::{Report, VerifyOptions};
use crate::audit::{AuditEntry, AuditQuery, AuditRecord};
use crate::lease::{LeaseChange, LeaseFilter, LeaseRecord, MintGuard};
use async_trait::async_trait;

/// A store fault. Messages never contain record contents or key material.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store could not commit (disk full, read-only, locked past the bound, gone).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store's contents are not what this version expects.
    #[error("store corrupt: {0}")]
    Corrupt(String),
    /// The data changed under the write (another replica got there first); nothing was
    /// written.
    #[error("conflict: {0}")]
    Conflict(String),
}

/// Where a store is, chosen by its URL (`[store] url`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// An SQLite file (`sqlite:///var/lib/latchkey/latchkey.db`, `sqlite://latchkey.db`
    /// relative to the working directory, or a bare path).
    Sqlite(PathBuf),
}

impl Location {
    /// Parses a store URL. Fails, saying which forms are supported, on an empty path or
    /// an unsupported scheme.
    pub fn parse(url: &str) -> Result<Location, String> {
        let path = if let Some(rest) = url.strip_prefix("sqlite://") {
            rest
        } else if let Some(rest) = url.strip_prefix("sqlite:") {
            rest
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Err(
                "a PostgreSQL store is not supported by this version; use sqlite:///PATH".into(),
            );
        } else if url.contains("://") {
            return Err("unsupported store URL scheme; use sqlite:///PATH".into());
        } else {
            url
        };
        if path.is_empty() {
            return Err("the store URL names no file; use sqlite:///PATH".into());
        }
        Ok(Location::Sqlite(PathBuf::from(path)))
    }

    /// The file of an SQLite store.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match self {
            Location::Sqlite(p) => Some(p),
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sqlite(p) => write!(f, "sqlite://{}", p.display()),
        }
    }
}

/// Why a mint could not be committed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The identity key holds its maximum of live leases on the target.
    #[error("quota exceeded: at most {limit} live leases per identity on this target")]
    Quota {
        /// The limit.
        limit: u32,
    },
    /// The identity token has minted its maximum number of times.
    #[error("identity token already used {limit} times; request a fresh one")]
    Replay {
        /// The limit.
        limit: u32,
    },
}

/// Where an appended record landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Sequence number.
    pub seq: i64,
    /// Record hash.
    pub hash: String,
}

pub use crate::keys::{KeyState, StoredKey};

/// A change of a signing key's state (rotation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUpdate {
    /// The key.
    pub kid: String,
    /// Its state now must be this, or nothing is changed and the step fails.
    pub expect_state: KeyState,
    /// The new state.
    pub state: KeyState,
    /// Set when it starts signing.
    pub activated_at: Option<i64>,
    /// Set when it retires.
    pub remove_at: Option<i64>,
}

/// When a rotatable item last rotated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationState {
    /// `signing-key:<target>` or `root:<target>`.
    pub item: String,
    /// Last successful rotation (seconds since the epoch).
    pub last_run: i64,
}

/// One rotation step, committed atomically with its audit records.
#[derive(Debug, Default)]
pub struct RotationStep {
    /// Keys to add (sealed).
    pub insert: Vec<StoredKey>,
    /// State changes of existing keys.
    pub update: Vec<KeyUpdate>,
    /// Keys to delete (their private material goes with the row).
    pub remove: Vec<String>,
    /// The item's new rotation state.
    pub state: Option<RotationState>,
    /// One audit record per phase.
    pub audit: Vec<AuditEntry>,
}

/// The audit checkpoint key as stored: the public key in the clear, the private key
/// sealed under the master key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAuditKey {
    /// Key id (JWK thumbprint).
    pub kid: String,
    /// Creation time (seconds since the epoch).
    pub created_at: i64,
    /// Raw Ed25519 public key.
    pub public: Vec<u8>,
    /// AES-256-GCM sealed PKCS#8.
    pub sealed: Vec<u8>,
}

/// An upstream root credential the broker rotated, sealed under the master key. Once
/// rotated, only the broker knows it: the stored one wins over the configured one.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredRootSecret {
    /// Target name.
    pub target: String,
    /// The credential in service (AES-256-GCM sealed).
    pub sealed: Vec<u8>,
    /// A new credential set upstream but not yet switched to (two-phase rotation).
    pub pending: Option<Vec<u8>>,
    /// When it last changed (seconds since the epoch).
    pub updated_at: i64,
}

impl std::fmt::Debug for StoredRootSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredRootSecret")
            .field("target", &self.target)
            .field("pending", &self.pending.is_some())
            .field("updated_at", &self.updated_at)
            .finish_non_exhaustive()
    }
}

/// The audit chain: append-only, gapless, totally ordered, hash-linked. The chain itself
/// (canonical JSON, digests, hash links, verification) is domain code in
/// [`crate::audit`]: a backend orders and stores records and calls that code, it does not
/// compute or check the chain its own way.
#[async_trait]
pub trait AuditLog: Send + Sync {
    /// Appends a record; returns once it is durably committed. Sequence numbers are
    /// gapless and totally ordered across every writer of the store (every replica): the
    /// record links to the head committed before it (serialised against other writers,
    /// e.g. by a chain-head row lock or one writer thread). Fails, writing nothing, when
    /// it cannot commit; the caller must then fail closed.
    async fn append(&self, entry: AuditEntry) -> Result<Appended, StoreError>;

    /// Committed records with `seq > after`, in order, at most `limit`.
    async fn records(&self, after: i64, limit: usize) -> Result<Vec<AuditRecord>, StoreError>;

    /// The committed head: `(seq, hash)`, `(0, GENESIS_HASH)` when empty. Reads what any
    /// writer has committed, not only this process.
    async fn audit_head(&self) -> Result<(i64, String), StoreError>;

    /// Records matching `query`, in sequence order, at most `limit`. Never blocks
    /// appends for longer than a read needs.
    async fn query_audit(
        &self,
        query: &AuditQuery,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError>;

    /// Every stored audit checkpoint key.
    async fn audit_keys(&self) -> Result<Vec<StoredAuditKey>, StoreError>;

    /// Adds an audit checkpoint key. Fails if the kid exists.
    async fn insert_audit_key(&self, key: StoredAuditKey) -> Result<(), StoreError>;

    /// Stores a checkpoint. Fails, atomically against other writers, unless it is the
    /// next id and attests a stored record with that record's hash (two replicas
    /// checkpointing at once: one wins, the other gets [`StoreError::Conflict`] or an
    /// error and tries again later).
    async fn insert_checkpoint(&self, checkpoint: Checkpoint) -> Result<(), StoreError>;

    /// Checkpoints with `id > after`, oldest first, at most `limit`.
    async fn checkpoints(&self, after: i64, limit: usize) -> Result<Vec<Checkpoint>, StoreError>;

    /// The newest checkpoint.
    async fn checkpoints_newest(&self) -> Result<Option<Checkpoint>, StoreError>;

    /// Id of the newest checkpoint the witness has.
    async fn witness_position(&self) -> Result<i64, StoreError>;

    /// Records that the witness has every checkpoint up to `id`.
    async fn set_witness_position(&self, id: i64) -> Result<(), StoreError>;

    /// Walks the whole chain and every checkpoint with the domain's walker
    /// ([`crate::audit::verify::Walker`]) without holding up writers. Fails only when the
    /// store cannot be read; a tampered log is a report with a problem.
    async fn verify_audit(&self, opts: VerifyOptions) -> Result<Report, StoreError>;

    /// Lets the store report its writer's batch sizes and commit latency (a backend
    /// without such a writer ignores it).
    fn attach_metrics(&self, metrics: crate::metrics::StoreMetrics) {
        let _ = metrics;
    }
}

/// Lease rows: every issued credential, with the limits checked when it is committed.
#[async_trait]
pub trait Leases: Send + Sync {
    /// Commits a mint: checks `guard` (live-lease quota of the lease's identity key on
    /// its target, the token's replay counter), inserts the lease and appends its audit
    /// record, all in one transaction. The checks and the insert are atomic against
    /// every other writer (every replica): concurrent mints never exceed the quota or
    /// the replay limit. Nothing is written when a check fails.
    async fn commit_mint(
        &self,
        lease: LeaseRecord,
        guard: MintGuard,
        entry: AuditEntry,
        now: i64,
    ) -> Result<Appended, CommitError>;

    /// The same checks as [`Leases::commit_mint`], without writing: lets the broker refuse
    /// before it creates anything upstream (a hint; `commit_mint` decides).
    async fn check_mint_guard(
        &self,
        identity_key: &str,
        target: &str,
        guard: &MintGuard,
        now: i64,
    ) -> Result<(), CommitError>;

    /// One lease, as committed by any writer.
    async fn lease(&self, id: &str) -> Result<Option<LeaseRecord>, StoreError>;

    /// Leases matching `filter` at `now`, newest first, after the `(issued_at, id)`
    /// cursor, at most `limit`.
    async fn leases(
        &self,
        filter: &LeaseFilter,
        now: i64,
        after: Option<(i64, String)>,
        limit: usize,
    ) -> Result<Vec<LeaseRecord>, StoreError>;

    /// Ids of the leases matching `filter` at `now`, in no particular order, at most
    /// `limit` (bulk revocation takes them all in one pass, then works in chunks).
    async fn lease_ids(
        &self,
        filter: &LeaseFilter,
        now: i64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError>;

    /// The leases with these ids (those that exist).
    async fn leases_by_id(&self, ids: &[String]) -> Result<Vec<LeaseRecord>, StoreError>;

    /// Applies each compare-and-set change, appending its audit record only when the
    /// change applied; one transaction. Each compare-and-set is atomic against every
    /// other writer: of two racing changes of one lease in one state, one applies.
    /// Answers, per change, whether it applied.
    async fn commit_changes(
        &self,
        changes: Vec<(LeaseChange, Option<AuditEntry>)>,
    ) -> Result<Vec<bool>, StoreError>;

    /// Live leases whose expiry has passed, oldest first, at most `limit`.
    async fn expired_live(&self, now: i64, limit: usize) -> Result<Vec<LeaseRecord>, StoreError>;

    /// Leases in `revoking` whose next attempt is due, at most `limit`.
    async fn due_revocations(&self, now: i64, limit: usize)
        -> Result<Vec<LeaseRecord>, StoreError>;

    /// Deletes revoked and expired leases that ended (were revoked, or ran out) and whose
    /// original expiry passed before `before`, and replay counters of tokens expired
    /// before `now`; at most `limit` leases. Never touches a live lease or an audit
    /// record. Answers how many leases.
    async fn purge(&self, before: i64, now: i64, limit: usize) -> Result<usize, StoreError>;

    /// Live leases per target at `now`.
    async fn live_lease_counts(&self, now: i64) -> Result<Vec<(String, u64)>, StoreError>;
}

/// The broker's signing keys and rotation state.
#[async_trait]
pub trait Keys: Send + Sync {
    /// Every stored signing key.
    async fn signing_keys(&self) -> Result<Vec<StoredKey>, StoreError>;

    /// Adds a signing key. Fails if the kid exists.
    async fn insert_signing_key(&self, key: StoredKey) -> Result<(), StoreError>;

    /// Commits a rotation step: keys added, changed and removed, the item's state and the
    /// step's audit records, all or nothing, atomic against every other writer. Fails
    /// with [`StoreError::Conflict`], changing nothing, when a key is not in the state
    /// the step expects (another replica rotated first).
    async fn commit_rotation(&self, step: RotationStep) -> Result<(), StoreError>;

    /// When each item last rotated.
    async fn rotation_states(&self) -> Result<Vec<RotationState>, StoreError>;
}

/// What replicas of one store coordinate through.
#[async_trait]
pub trait Coordination: Send + Sync {
    /// Takes the named lock for `holder` until `now + ttl_secs`, unless another holder has
    /// it and it has not expired; the holder taking it again extends it. Atomic against
    /// every other replica: of racing takers, one wins. Answers whether it was taken.
    async fn try_lock(
        &self,
        name: &str,
        holder: &str,
        now: i64,
        ttl_secs: i64,
    ) -> Result<bool, StoreError>;

    /// Releases the lock if `holder` holds it (another holder's lock is left alone).
    async fn unlock(&self, name: &str, holder: &str) -> Result<(), StoreError>;

    /// Follows the sequence number of the committed chain head, including appends made
    /// by other processes on the same store (within a bound a backend states), so Tail
    /// and the checkpointer see every replica's records.
    fn subscribe_head(&self) -> tokio::sync::watch::Receiver<i64>;

    /// Whether the store can commit right now (for readiness).
    async fn check_writable(&self) -> Result<(), StoreError>;

    /// A random id made when the store was created, the same for every replica on it and
    /// kept across restarts: it marks what the broker creates upstream, so a reconciler
    /// removes only what this store's leases made.
    async fn store_id(&self) -> Result<String, StoreError>;

    /// Checks that the store is what it claims, reading it afresh: its pages and indexes
    /// sound, its audit chain still reaching the newest signed checkpoint. Slow (it reads
    /// everything); run now and then, never per request. `Err(StoreError::Corrupt)` says
    /// what is wrong.
    async fn check_integrity(&self) -> Result<(), StoreError>;
}

/// Upstream root credentials the broker rotated, sealed under the master key.
#[async_trait]
pub trait RootSecrets: Send + Sync {
    /// The rotated root credential of a target, if it was ever rotated.
    async fn root_secret(&self, target: &str) -> Result<Option<StoredRootSecret>, StoreError>;

    /// Stores (replaces) a target's rotated root credential.
    async fn put_root_secret(&self, secret: StoredRootSecret) -> Result<(), StoreError>;
}

/// Everything the broker needs from its store: one value implementing every port. A
/// backend implements the ports; this follows.
pub trait Store:
    AuditLog + Leases + Keys + Coordination + RootSecrets + std::fmt::Debug + 'static
{
}

impl<T> Store for T where
    T: AuditLog + Leases + Keys + Coordination + RootSecrets + std::fmt::Debug + 'static
{
}
