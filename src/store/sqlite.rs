//! The embedded SQLite store: WAL, `synchronous=FULL`, one writer thread.
//!
//! All writes go through one thread that owns the connection. Audit appends that arrive
//! together are group-committed: one transaction and one fsync serve the batch, and each
//! caller is answered only after the commit that holds its record. Triggers refuse
//! UPDATE and DELETE on the audit table.

pub mod audit;
mod wal;

use super::{
    Appended, AuditLog, Coordination, Keys, Leases, RootSecrets, StoreError, StoredAuditKey,
    StoredKey, StoredRootSecret,
};
use crate::audit::checkpoint::Checkpoint;
use crate::audit::verify::{Report, VerifyOptions};
use crate::audit::{AuditEntry, AuditQuery, AuditRecord, GENESIS_HASH};
use crate::lease::{LeaseChange, LeaseFilter, LeaseRecord, LeaseState, MintGuard};
use crate::store::CommitError;
use async_trait::async_trait;
use rusqlite::types::Value as SqlValue;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::Duration;
use tokio::sync::{oneshot, watch};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    action TEXT NOT NULL,
    outcome TEXT NOT NULL,
    issuer TEXT,
    identity_key TEXT,
    subject TEXT,
    repository TEXT,
    git_ref TEXT,
    environment TEXT,
    pipeline TEXT,
    token_fingerprint TEXT,
    target TEXT,
    requested_scopes TEXT NOT NULL,
    granted_scopes TEXT NOT NULL,
    ttl_secs INTEGER,
    rule TEXT,
    reason TEXT,
    lease_id TEXT,
    credential_jti TEXT,
    credential_fingerprint TEXT,
    context TEXT NOT NULL,
    claims TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TABLE IF NOT EXISTS signing_keys (
    kid TEXT PRIMARY KEY,
    target TEXT NOT NULL,
    alg TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    sealed BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS rotation_state (
    item TEXT PRIMARY KEY,
    last_run INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS locks (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY,
    issuer TEXT NOT NULL,
    identity_key TEXT NOT NULL,
    subject TEXT NOT NULL,
    repository TEXT,
    target TEXT NOT NULL,
    kind TEXT NOT NULL,
    rule TEXT NOT NULL,
    scopes TEXT NOT NULL,
    issued_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    max_expires_at INTEGER NOT NULL,
    renew_count INTEGER NOT NULL,
    state TEXT NOT NULL,
    revoked_at INTEGER,
    secret_hash TEXT NOT NULL,
    claims TEXT NOT NULL,
    upstream BLOB,
    attempts INTEGER NOT NULL,
    next_attempt_at INTEGER,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS leases_quota ON leases(identity_key, target, state, expires_at);
CREATE INDEX IF NOT EXISTS leases_state ON leases(state, expires_at);
CREATE INDEX IF NOT EXISTS leases_issued ON leases(issued_at, id);
CREATE INDEX IF NOT EXISTS leases_repository ON leases(repository, issued_at);
CREATE INDEX IF NOT EXISTS leases_target ON leases(target, issued_at);
CREATE TABLE IF NOT EXISTS root_secrets (
    target TEXT PRIMARY KEY,
    sealed BLOB NOT NULL,
    pending BLOB,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS token_uses (
    issuer TEXT NOT NULL,
    token_key TEXT NOT NULL,
    uses INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (issuer, token_key)
);
"#;

const AUDIT_COLUMNS: &str = "seq, time_ms, request_id, action, outcome, issuer, identity_key, subject, repository, git_ref, environment, pipeline, token_fingerprint, target, requested_scopes, granted_scopes, ttl_secs, rule, reason, lease_id, credential_jti, credential_fingerprint, context, claims, prev_hash, hash";

const LEASE_COLUMNS: &str = "id, issuer, identity_key, subject, repository, target, kind, rule, scopes, issued_at, expires_at, max_expires_at, renew_count, state, revoked_at, secret_hash, claims, upstream, attempts, next_attempt_at, last_error";

/// Largest number of writes one transaction commits.
const MAX_BATCH: usize = 1024;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// An audit entry with its JSON already rendered on the caller's thread, so the one
/// writer thread only chains, hashes and inserts.
struct Prepared {
    entry: AuditEntry,
    /// SHA-256 of the entry's canonical JSON: the part of the hash input that does not
    /// depend on the record's place in the chain, hashed by the caller, not the writer.
    entry_sha256: [u8; 32],
    requested_scopes: String,
    granted_scopes: String,
    context: String,
    claims: String,
    /// The keys of its search terms.
    terms: audit::RecordTerms,
}

impl Prepared {
    fn new(entry: AuditEntry) -> Prepared {
        let p = crate::audit::PreparedEntry::new(entry);
        Prepared {
            terms: audit::RecordTerms::of(&p.entry),
            entry_sha256: p.entry_sha256,
            requested_scopes: p.requested_scopes,
            granted_scopes: p.granted_scopes,
            context: p.context,
            claims: p.claims,
            entry: p.entry,
        }
    }
}

/// A mint to commit: the lease, its guard, its audit record.
struct MintWrite {
    lease: LeaseRecord,
    guard: MintGuard,
    entry: Prepared,
    now: i64,
}

/// Writes that share one transaction (group commit).
enum Write {
    // Shared with the caller, who drops the last reference once answered: freeing a
    // record's strings and claims is the caller's work, not the one writer thread's.
    Append(Arc<Prepared>, Reply<Appended>),
    Mint(
        Arc<MintWrite>,
        oneshot::Sender<Result<Appended, CommitError>>,
    ),
    Changes(Vec<(LeaseChange, Option<Prepared>)>, Reply<Vec<bool>>),
    Rotation(Box<PreparedStep>, Reply<()>),
}

/// A rotation step with its audit entries rendered.
struct PreparedStep {
    step: crate::store::RotationStep,
    audit: Vec<Prepared>,
}

/// What a write produced, before the transaction commits.
enum Done {
    Append(Appended),
    Mint(Result<Appended, CommitError>),
    Changes(Vec<bool>),
    Rotation,
}

type ReadFn = Box<dyn FnOnce(&Connection) + Send>;

enum Cmd {
    Write(Write),
    Read(ReadFn),
    InsertKey(Box<StoredKey>, Reply<()>),
    CheckWritable(Reply<()>),
}

/// Store settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Database file.
    pub path: PathBuf,
    /// How long a write waits for a lock held elsewhere before failing.
    pub busy_timeout: Duration,
}

/// Handle to the SQLite store; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct SqliteStore {
    tx: mpsc::Sender<Cmd>,
    path: PathBuf,
    head: Arc<watch::Sender<i64>>,
    /// A read-only connection for audit queries, opened on first use: a slow filter
    /// never holds up the writer (and so never holds up Mint).
    reader: Arc<std::sync::Mutex<Option<Connection>>>,
    /// Batch size and commit latency, once the server attaches its metrics.
    metrics: Arc<std::sync::OnceLock<crate::metrics::StoreMetrics>>,
}

fn unavailable(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(match &e {
        rusqlite::Error::SqliteFailure(f, _) => format!("sqlite: {}", f),
        _ => "sqlite error".to_string(),
    })
}

fn stopped() -> StoreError {
    StoreError::Unavailable("writer thread stopped".into())
}

impl SqliteStore {
    /// Opens (creating if needed) the database and starts the writer thread. Fails when
    /// the file cannot be opened or the schema cannot be applied.
    pub fn open(cfg: &Config) -> Result<SqliteStore, StoreError> {
        let conn = open_conn(&cfg.path, cfg.busy_timeout)?;
        let head = load_head(&conn)?;
        let terms_through = audit::terms_through(&conn)?.min(head.0);
        let (tx, rx) = mpsc::channel();
        let head_tx = Arc::new(watch::channel(head.0).0);
        let notify = head_tx.clone();
        let metrics: Arc<std::sync::OnceLock<crate::metrics::StoreMetrics>> = Arc::default();
        let writer_metrics = metrics.clone();
        let path = cfg.path.clone();
        std::thread::Builder::new()
            .name("latchkey-store".into())
            .spawn(move || {
                Writer {
                    wal: wal::WalWatch::start(&conn, &path),
                    conn,
                    head,
                    terms_through,
                    pending: Vec::new(),
                    pending_from: 0,
                    terms_failing: false,
                    notify,
                    metrics: writer_metrics,
                }
                .run(rx)
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start writer thread: {e}")))?;
        Ok(SqliteStore {
            tx,
            path: cfg.path.clone(),
            head: head_tx,
            reader: Arc::default(),
            metrics,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Refuses (or again allows) every write, as a read-only or full disk would: each
    /// commit then fails and every Mint fails closed. For maintenance windows and for
    /// exercising the fail-closed path (as root, file permissions cannot do it).
    pub async fn set_read_only(&self, on: bool) -> Result<(), StoreError> {
        self.read(move |c| c.pragma_update(None, "query_only", on).map_err(unavailable))
            .await
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Runs `f` on the read-only connection (opened on first use), off the writer
    /// thread: for reads that may be slow and need not see the latest uncommitted state.
    async fn read_only<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reader, path) = (self.reader.clone(), self.path.clone());
        tokio::task::spawn_blocking(move || {
            let mut slot = reader.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                *slot = Some(audit::open_read_only(&path)?);
            }
            match slot.as_ref() {
                Some(c) => f(c),
                None => Err(stopped()),
            }
        })
        .await
        .map_err(|_| StoreError::Unavailable("read task failed".into()))?
    }

    /// Runs `f` on the store's connection (reads are served between write batches).
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Read(Box::new(move |c| {
                let _ = reply.send(f(c));
            })))
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

fn open_conn(path: &Path, busy: Duration) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(unavailable)?;
    conn.busy_timeout(busy).map_err(unavailable)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(unavailable)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(unavailable)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(unavailable)?;
    // Index pages of a busy log stay in memory between commits (16 MiB). The WAL is
    // folded back into the database beside the writer, not in its commits (`wal`).
    conn.pragma_update(None, "cache_size", -16384)
        .map_err(unavailable)?;
    conn.execute_batch(SCHEMA).map_err(unavailable)?;
    migrate_signing_keys(&conn)?;
    conn.execute_batch(audit::AUDIT_SCHEMA)
        .map_err(unavailable)?;
    audit::prepare_terms(&conn)?;
    conn.execute(
        "INSERT INTO meta(key, value) VALUES ('schema_version', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![crate::audit::SCHEMA_VERSION.to_string()],
    )
    .map_err(unavailable)?;
    conn.execute(
        "INSERT OR IGNORE INTO meta(key, value) VALUES ('store_id', ?1)",
        params![uuid::Uuid::new_v4().simple().to_string()],
    )
    .map_err(unavailable)?;
    Ok(conn)
}

fn load_head(conn: &Connection) -> Result<(i64, String), StoreError> {
    Ok(conn
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(unavailable)?
        .unwrap_or((0, GENESIS_HASH.to_string())))
}

/// Stores created before rotation lack the key lifecycle columns; add them once.
fn migrate_signing_keys(conn: &Connection) -> Result<(), StoreError> {
    let mut st = conn
        .prepare("SELECT name FROM pragma_table_info('signing_keys')")
        .map_err(unavailable)?;
    let cols: Vec<String> = st
        .query_map([], |r| r.get(0))
        .map_err(unavailable)?
        .collect::<Result<_, _>>()
        .map_err(unavailable)?;
    for col in ["activated_at", "remove_at"] {
        if !cols.iter().any(|c| c == col) {
            conn.execute_batch(&format!(
                "ALTER TABLE signing_keys ADD COLUMN {col} INTEGER"
            ))
            .map_err(unavailable)?;
        }
    }
    Ok(())
}

struct Writer {
    conn: Connection,
    head: (i64, String),
    /// Records up to this sequence number have their search terms indexed.
    terms_through: i64,
    /// The terms of records this writer committed and has not indexed yet, from record
    /// `pending_from` on (see [`Writer::remember`]).
    pending: Vec<audit::RecordTerms>,
    pending_from: i64,
    /// The log's size, and the folding of it back into the database.
    wal: wal::WalWatch,
    /// Whether the last attempt to index terms failed (logged once, not per retry).
    terms_failing: bool,
    /// Tells followers (tail, checkpointer) the committed head moved.
    notify: Arc<watch::Sender<i64>>,
    metrics: Arc<std::sync::OnceLock<crate::metrics::StoreMetrics>>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Cmd>) {
        let mut deferred: Vec<Cmd> = Vec::new();
        loop {
            // A complete run waiting for its terms (after a burst, or records written
            // by an older version) is indexed whenever no write is waiting, one run per
            // turn, so neither a backlog nor its rebuild ever holds writes up for long.
            let first = if self.run_pending() {
                // Right away, unless the last attempt failed.
                let wait = if self.terms_failing {
                    audit::TERMS_RETRY
                } else {
                    Duration::ZERO
                };
                match rx.recv_timeout(wait) {
                    Ok(cmd) => cmd,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.index_run();
                        self.wal.committed(&self.conn);
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(cmd) => cmd,
                    Err(_) => break,
                }
            };
            let mut batch = Vec::new();
            match first {
                // A rotation step may fail on its own (conflict): it gets its own
                // transaction, so it never takes other writers down with it.
                Cmd::Write(w @ Write::Rotation(..)) => deferred.push(Cmd::Write(w)),
                Cmd::Write(w) => batch.push(w),
                other => deferred.push(other),
            }
            // Take whatever else is already waiting: this is the group commit.
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(Cmd::Write(w @ Write::Rotation(..))) => deferred.push(Cmd::Write(w)),
                    Ok(Cmd::Write(w)) => batch.push(w),
                    Ok(other) => deferred.push(other),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.write_batch(batch);
            }
            for cmd in deferred.drain(..) {
                self.handle(cmd);
            }
            if self.run_pending() && !self.terms_failing {
                self.index_run();
            }
            self.wal.committed(&self.conn);
        }
    }

    /// Whether a complete run of records waits for its search terms.
    fn run_pending(&self) -> bool {
        self.head.0 - self.terms_through >= audit::TERMS_RUN
    }

    /// Indexes the search terms of the next complete run after `terms_through`, in one
    /// transaction. A failure (the store is read-only, the disk is full) is logged once
    /// and retried every [`audit::TERMS_RETRY`]; queries meanwhile scan the records not
    /// indexed yet.
    fn index_run(&mut self) {
        let (first, last) = (
            self.terms_through + 1,
            self.terms_through + audit::TERMS_RUN,
        );
        let run = audit::TERMS_RUN as usize;
        let done = if self.pending_from == first && self.pending.len() >= run {
            audit::index_run(&mut self.conn, first, last, &self.pending[..run])
        } else {
            audit::terms_of_rows(&self.conn, first, last)
                .and_then(|terms| audit::index_run(&mut self.conn, first, last, &terms))
        };
        match done {
            Ok(()) => {
                // Forget what the run held.
                let through = (last + 1 - self.pending_from).clamp(0, self.pending.len() as i64);
                self.pending.drain(..through as usize);
                self.pending_from += through;
                if std::mem::take(&mut self.terms_failing) {
                    tracing::info!(through = last, "audit search terms indexed again");
                }
                self.terms_through = last;
            }
            Err(e) => {
                if !std::mem::replace(&mut self.terms_failing, true) {
                    tracing::warn!(error = %e, through = self.terms_through, "audit search terms not indexed yet; queries scan the newest records");
                }
            }
        }
    }

    /// Keeps the terms of the records `first..` just committed, for their run. Kept only
    /// while they follow on from the ones kept before, and never more than a few runs'
    /// worth (if indexing fails for long): a run without them reads its records back.
    fn remember(&mut self, first: i64, added: Vec<audit::RecordTerms>) {
        if added.is_empty() {
            return;
        }
        let follows = self.pending_from + self.pending.len() as i64 == first;
        if !follows || self.pending.len() >= 16 * audit::TERMS_RUN as usize {
            self.pending.clear();
        }
        if self.pending.is_empty() {
            self.pending_from = first;
        }
        self.pending.extend(added);
    }

    fn write_batch(&mut self, batch: Vec<Write>) {
        let started = std::time::Instant::now();
        let mut chain = Chain {
            seq: self.head.0,
            hash: self.head.1.clone(),
            added: Vec::new(),
        };
        let result = (|| -> Result<Vec<Done>, StoreError> {
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let mut out = Vec::with_capacity(batch.len());
            for w in &batch {
                out.push(match w {
                    Write::Append(e, _) => Done::Append(append_row(&tx, &mut chain, e)?),
                    Write::Mint(m, _) => Done::Mint(match apply_mint(&tx, &mut chain, m) {
                        Err(CommitError::Store(e)) => return Err(e),
                        other => other,
                    }),
                    Write::Changes(c, _) => Done::Changes(apply_changes(&tx, &mut chain, c)?),
                    Write::Rotation(step, _) => {
                        apply_rotation(&tx, &mut chain, step)?;
                        Done::Rotation
                    }
                });
            }
            tx.commit().map_err(unavailable)?;
            Ok(out)
        })();
        if let Some(m) = self.metrics.get() {
            m.batch_size.observe(batch.len() as f64);
            m.commit_seconds.observe(started.elapsed().as_secs_f64());
        }
        match result {
            Ok(done) => {
                if chain.seq != self.head.0 {
                    self.notify.send_replace(chain.seq);
                }
                let first = self.head.0 + 1;
                self.head = (chain.seq, chain.hash);
                self.remember(first, chain.added);
                for (w, d) in batch.into_iter().zip(done) {
                    match (w, d) {
                        (Write::Append(p, r), Done::Append(a)) => {
                            drop(p);
                            let _ = r.send(Ok(a));
                        }
                        (Write::Mint(m, r), Done::Mint(a)) => {
                            drop(m);
                            let _ = r.send(a);
                        }
                        (Write::Changes(_, r), Done::Changes(a)) => {
                            let _ = r.send(Ok(a));
                        }
                        (Write::Rotation(_, r), Done::Rotation) => {
                            let _ = r.send(Ok(()));
                        }
                        // `done` is built from `batch` in order, one for one.
                        _ => unreachable!("write and result out of step"),
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, writes = batch.len(), "store commit failed; requests fail closed");
                // The transaction rolled back; re-read the head in case of partial state.
                if let Ok(h) = load_head(&self.conn) {
                    self.head = h;
                }
                for w in batch {
                    match w {
                        Write::Append(p, r) => {
                            drop(p);
                            let _ = r.send(Err(e.clone()));
                        }
                        Write::Mint(m, r) => {
                            drop(m);
                            let _ = r.send(Err(CommitError::Store(e.clone())));
                        }
                        Write::Changes(_, r) => {
                            let _ = r.send(Err(e.clone()));
                        }
                        Write::Rotation(_, r) => {
                            let _ = r.send(Err(e.clone()));
                        }
                    }
                }
            }
        }
    }

    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Write(w) => self.write_batch(vec![w]),
            Cmd::Read(f) => f(&self.conn),
            Cmd::InsertKey(k, r) => {
                let res = self
                    .conn
                    .execute(
                        "INSERT INTO signing_keys (kid, target, alg, state, created_at, sealed, activated_at, remove_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                        params![k.kid, k.target, k.alg, k.state.as_str(), k.created_at, k.sealed, k.activated_at, k.remove_at],
                    )
                    .map(|_| ())
                    .map_err(unavailable);
                let _ = r.send(res);
            }
            Cmd::CheckWritable(r) => {
                let res = self
                    .conn
                    .execute_batch("BEGIN IMMEDIATE; INSERT OR REPLACE INTO meta(key, value) VALUES ('last_write_check', strftime('%s','now')); COMMIT;")
                    .map_err(|e| {
                        let _ = self.conn.execute_batch("ROLLBACK");
                        unavailable(e)
                    });
                let _ = r.send(res);
            }
        }
    }
}

/// The chain's head while a transaction writes, and the terms of the records it added.
struct Chain {
    seq: i64,
    hash: String,
    added: Vec<audit::RecordTerms>,
}

/// Appends one audit record after the chain's head and moves the head to it.
fn append_row(conn: &Connection, chain: &mut Chain, p: &Prepared) -> Result<Appended, StoreError> {
    let seq = chain.seq + 1;
    let hash = crate::audit::chain_hash(seq, chain.hash.as_bytes(), &p.entry_sha256);
    let e = &p.entry;
    static INSERT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!("INSERT INTO audit ({AUDIT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26)")
    });
    conn.prepare_cached(&INSERT)
        .and_then(|mut stmt| {
            stmt.execute(params![
                seq,
                e.time_ms,
                e.request_id,
                e.action,
                e.outcome,
                e.issuer,
                e.identity_key,
                e.subject,
                e.repository,
                e.git_ref,
                e.environment,
                e.pipeline,
                e.token_fingerprint,
                e.target,
                p.requested_scopes,
                p.granted_scopes,
                e.ttl_secs,
                e.rule,
                e.reason,
                e.lease_id,
                e.credential_jti,
                e.credential_fingerprint,
                p.context,
                p.claims,
                chain.hash,
                hash,
            ])
        })
        .map_err(unavailable)?;
    chain.seq = seq;
    chain.hash.clone_from(&hash);
    chain.added.push(p.terms);
    Ok(Appended { seq, hash })
}

/// The quota and replay checks of a mint, without writing.
fn check_guard(
    conn: &Connection,
    identity_key: &str,
    target: &str,
    guard: &MintGuard,
    now: i64,
) -> Result<(), CommitError> {
    if let Some(limit) = guard.max_live {
        let live: i64 = conn
            .prepare_cached("SELECT COUNT(*) FROM leases WHERE identity_key = ?1 AND target = ?2 AND state = 'live' AND expires_at > ?3")
            .and_then(|mut s| s.query_row(params![identity_key, target, now], |r| r.get(0)))
            .map_err(unavailable)?;
        if live >= i64::from(limit) {
            return Err(CommitError::Quota { limit });
        }
    }
    if let Some(r) = &guard.replay {
        let used: i64 = conn
            .prepare_cached("SELECT uses FROM token_uses WHERE issuer = ?1 AND token_key = ?2")
            .and_then(|mut s| {
                s.query_row(params![r.issuer, r.token_key], |row| row.get(0))
                    .optional()
            })
            .map_err(unavailable)?
            .unwrap_or(0);
        if used >= i64::from(r.max_uses) {
            return Err(CommitError::Replay { limit: r.max_uses });
        }
    }
    Ok(())
}

fn apply_mint(
    conn: &Connection,
    chain: &mut Chain,
    m: &MintWrite,
) -> Result<Appended, CommitError> {
    check_guard(
        conn,
        &m.lease.identity_key,
        &m.lease.target,
        &m.guard,
        m.now,
    )?;
    if let Some(r) = &m.guard.replay {
        conn.prepare_cached("INSERT INTO token_uses (issuer, token_key, uses, expires_at) VALUES (?1, ?2, 1, ?3) ON CONFLICT (issuer, token_key) DO UPDATE SET uses = uses + 1")
            .and_then(|mut s| s.execute(params![r.issuer, r.token_key, r.expires_at]))
            .map_err(unavailable)?;
    }
    insert_lease(conn, &m.lease)?;
    Ok(append_row(conn, chain, &m.entry)?)
}

fn insert_lease(conn: &Connection, l: &LeaseRecord) -> Result<(), StoreError> {
    static INSERT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!("INSERT INTO leases ({LEASE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21)")
    });
    conn.prepare_cached(&INSERT)
        .and_then(|mut s| {
            s.execute(params![
                l.id,
                l.issuer,
                l.identity_key,
                l.subject,
                l.repository,
                l.target,
                l.kind,
                l.rule,
                crate::audit::column_json(&l.scopes),
                l.issued_at,
                l.expires_at,
                l.max_expires_at,
                l.renew_count,
                l.state.as_str(),
                l.revoked_at,
                l.secret_hash,
                l.claims_json,
                l.upstream,
                l.attempts,
                l.next_attempt_at,
                l.last_error,
            ])
        })
        .map(|_| ())
        .map_err(unavailable)
}

/// One rotation step, in a transaction of its own (see `Writer::run`). A key not in the
/// expected state fails the step before anything is written.
fn apply_rotation(
    conn: &Connection,
    chain: &mut Chain,
    p: &PreparedStep,
) -> Result<(), StoreError> {
    let step = &p.step;
    for u in &step.update {
        let state: Option<String> = conn
            .query_row(
                "SELECT state FROM signing_keys WHERE kid = ?1",
                [&u.kid],
                |r| r.get(0),
            )
            .optional()
            .map_err(unavailable)?;
        if state.as_deref() != Some(u.expect_state.as_str()) {
            return Err(StoreError::Conflict(format!(
                "signing key {} is {} (expected {})",
                u.kid,
                state.as_deref().unwrap_or("gone"),
                u.expect_state
            )));
        }
    }
    for k in &step.insert {
        conn.execute(
            "INSERT INTO signing_keys (kid, target, alg, state, created_at, sealed, activated_at, remove_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![k.kid, k.target, k.alg, k.state.as_str(), k.created_at, k.sealed, k.activated_at, k.remove_at],
        )
        .map_err(unavailable)?;
    }
    for u in &step.update {
        conn.execute(
            "UPDATE signing_keys SET state = ?2, activated_at = COALESCE(?3, activated_at), remove_at = COALESCE(?4, remove_at) WHERE kid = ?1",
            params![u.kid, u.state.as_str(), u.activated_at, u.remove_at],
        )
        .map_err(unavailable)?;
    }
    for kid in &step.remove {
        conn.execute("DELETE FROM signing_keys WHERE kid = ?1", [kid])
            .map_err(unavailable)?;
    }
    if let Some(st) = &step.state {
        conn.execute(
            "INSERT INTO rotation_state (item, last_run) VALUES (?1, ?2) ON CONFLICT(item) DO UPDATE SET last_run = excluded.last_run",
            params![st.item, st.last_run],
        )
        .map_err(unavailable)?;
    }
    for e in &p.audit {
        append_row(conn, chain, e)?;
    }
    Ok(())
}

fn apply_changes(
    conn: &Connection,
    chain: &mut Chain,
    changes: &[(LeaseChange, Option<Prepared>)],
) -> Result<Vec<bool>, StoreError> {
    let mut out = Vec::with_capacity(changes.len());
    for (c, entry) in changes {
        let n = conn
            .prepare_cached(
                "UPDATE leases SET
                    state = COALESCE(?3, state),
                    expires_at = COALESCE(?4, expires_at),
                    renew_count = COALESCE(?5, renew_count),
                    revoked_at = COALESCE(?6, revoked_at),
                    attempts = COALESCE(?7, attempts),
                    next_attempt_at = CASE WHEN ?8 THEN ?9 ELSE next_attempt_at END,
                    last_error = CASE WHEN ?10 THEN ?11 ELSE last_error END
                 WHERE id = ?1 AND state = ?2 AND (?12 IS NULL OR renew_count = ?12)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    c.id,
                    c.expect_state.as_str(),
                    c.state.map(LeaseState::as_str),
                    c.expires_at,
                    c.renew_count,
                    c.revoked_at,
                    c.attempts,
                    c.next_attempt_at.is_some(),
                    c.next_attempt_at.flatten(),
                    c.last_error.is_some(),
                    c.last_error.clone().flatten(),
                    c.expect_renew_count,
                ])
            })
            .map_err(unavailable)?;
        let applied = n == 1;
        if applied {
            if let Some(e) = entry {
                append_row(conn, chain, e)?;
            }
        }
        out.push(applied);
    }
    Ok(out)
}

/// The WHERE clause (and its parameters) for a lease filter at `now`.
fn filter_sql(f: &LeaseFilter, now: i64) -> (String, Vec<SqlValue>) {
    let mut clauses: Vec<&str> = Vec::new();
    let mut args: Vec<SqlValue> = Vec::new();
    let mut text = |clause: &'static str, v: &Option<String>| {
        if let Some(v) = v {
            clauses.push(clause);
            args.push(SqlValue::Text(v.clone()));
        }
    };
    text("id = ?", &f.id);
    text("identity_key = ?", &f.identity_key);
    text("issuer = ?", &f.issuer);
    text("repository = ?", &f.repository);
    text("target = ?", &f.target);
    text("instr(',' || rule || ',', ',' || ? || ',') > 0", &f.rule);
    if let Some(t) = f.issued_before {
        clauses.push("issued_at < ?");
        args.push(SqlValue::Integer(t));
    }
    if !f.include_inactive {
        clauses.push("state = 'live' AND expires_at > ?");
        args.push(SqlValue::Integer(now));
    }
    let sql = if clauses.is_empty() {
        "1".to_string()
    } else {
        clauses.join(" AND ")
    };
    (sql, args)
}

fn read_leases(
    conn: &Connection,
    filter: &LeaseFilter,
    now: i64,
    after: Option<(i64, String)>,
    limit: usize,
) -> Result<Vec<LeaseRecord>, StoreError> {
    let (mut sql, mut args) = filter_sql(filter, now);
    if let Some((t, id)) = after {
        // Spelled so the `issued_at <= ?` bound is an index range: the next page starts
        // where the last ended instead of rescanning what was already returned.
        sql.push_str(" AND issued_at <= ? AND (issued_at < ? OR id < ?)");
        args.push(SqlValue::Integer(t));
        args.push(SqlValue::Integer(t));
        args.push(SqlValue::Text(id));
    }
    args.push(SqlValue::Integer(limit as i64));
    query_leases(
        conn,
        &format!("SELECT {LEASE_COLUMNS} FROM leases WHERE {sql} ORDER BY issued_at DESC, id DESC LIMIT ?"),
        args,
    )
}

fn query_leases(
    conn: &Connection,
    sql: &str,
    args: Vec<SqlValue>,
) -> Result<Vec<LeaseRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(unavailable)?;
    let rows = stmt
        .query_map(params_from_iter(args), row_to_lease)
        .map_err(unavailable)?;
    rows.map(|r| r.map_err(unavailable).and_then(|r| r))
        .collect()
}

fn row_to_lease(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<LeaseRecord, StoreError>> {
    let id: String = r.get(0)?;
    let corrupt = |what: &str| StoreError::Corrupt(format!("lease {id}: invalid {what}"));
    let scopes: String = r.get(8)?;
    let state: String = r.get(13)?;
    let Ok(scopes) = serde_json::from_str(&scopes) else {
        return Ok(Err(corrupt("scopes")));
    };
    let Some(state) = LeaseState::parse(&state) else {
        return Ok(Err(corrupt("state")));
    };
    Ok(Ok(LeaseRecord {
        issuer: r.get(1)?,
        identity_key: r.get(2)?,
        subject: r.get(3)?,
        repository: r.get(4)?,
        target: r.get(5)?,
        kind: r.get(6)?,
        rule: r.get(7)?,
        scopes,
        issued_at: r.get(9)?,
        expires_at: r.get(10)?,
        max_expires_at: r.get(11)?,
        renew_count: r.get(12)?,
        state,
        revoked_at: r.get(14)?,
        secret_hash: r.get(15)?,
        claims_json: r.get(16)?,
        upstream: r.get(17)?,
        attempts: r.get(18)?,
        next_attempt_at: r.get(19)?,
        last_error: r.get(20)?,
        id,
    }))
}

fn purge(conn: &Connection, before: i64, now: i64, limit: usize) -> Result<usize, StoreError> {
    let n = conn
        .execute(
            "DELETE FROM leases WHERE id IN (SELECT id FROM leases WHERE state IN ('revoked', 'expired') AND expires_at < ?1 AND COALESCE(revoked_at, expires_at) < ?1 LIMIT ?2)",
            params![before, limit as i64],
        )
        .map_err(unavailable)?;
    conn.execute("DELETE FROM token_uses WHERE expires_at < ?1", params![now])
        .map_err(unavailable)?;
    Ok(n)
}

fn read_records(
    conn: &Connection,
    after: i64,
    limit: usize,
) -> Result<Vec<AuditRecord>, StoreError> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2"
        ))
        .map_err(unavailable)?;
    let rows = stmt
        .query_map(params![after, limit as i64], row_to_record)
        .map_err(unavailable)?;
    rows.map(|r| r.map_err(unavailable).and_then(|r| r))
        .collect()
}

fn row_to_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<AuditRecord, StoreError>> {
    fn j<T: serde::de::DeserializeOwned>(s: String, seq: i64) -> Result<T, StoreError> {
        serde_json::from_str(&s)
            .map_err(|_| StoreError::Corrupt(format!("audit record {seq}: invalid JSON column")))
    }
    let seq: i64 = r.get(0)?;
    let (rs, gs, ctx, claims): (String, String, String, String) =
        (r.get(14)?, r.get(15)?, r.get(22)?, r.get(23)?);
    let build = || -> Result<AuditRecord, StoreError> {
        Ok(AuditRecord {
            seq,
            prev_hash: r.get(24).map_err(unavailable)?,
            hash: r.get(25).map_err(unavailable)?,
            entry: AuditEntry {
                time_ms: r.get(1).map_err(unavailable)?,
                request_id: r.get(2).map_err(unavailable)?,
                action: r.get(3).map_err(unavailable)?,
                outcome: r.get(4).map_err(unavailable)?,
                issuer: r.get(5).map_err(unavailable)?,
                identity_key: r.get(6).map_err(unavailable)?,
                subject: r.get(7).map_err(unavailable)?,
                repository: r.get(8).map_err(unavailable)?,
                git_ref: r.get(9).map_err(unavailable)?,
                environment: r.get(10).map_err(unavailable)?,
                pipeline: r.get(11).map_err(unavailable)?,
                token_fingerprint: r.get(12).map_err(unavailable)?,
                target: r.get(13).map_err(unavailable)?,
                requested_scopes: j(rs, seq)?,
                granted_scopes: j(gs, seq)?,
                ttl_secs: r.get(16).map_err(unavailable)?,
                rule: r.get(17).map_err(unavailable)?,
                reason: r.get(18).map_err(unavailable)?,
                lease_id: r.get(19).map_err(unavailable)?,
                credential_jti: r.get(20).map_err(unavailable)?,
                credential_fingerprint: r.get(21).map_err(unavailable)?,
                context: j(ctx, seq)?,
                claims: j(claims, seq)?,
            },
        })
    };
    Ok(build())
}

fn read_keys(conn: &Connection) -> Result<Vec<StoredKey>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT kid, target, alg, state, created_at, sealed, activated_at, remove_at FROM signing_keys ORDER BY created_at, kid")
        .map_err(unavailable)?;
    let rows = stmt
        .query_map([], |r| {
            let state: String = r.get(3)?;
            Ok((
                StoredKey {
                    kid: r.get(0)?,
                    target: r.get(1)?,
                    alg: r.get(2)?,
                    state: crate::keys::KeyState::Next,
                    created_at: r.get(4)?,
                    sealed: r.get(5)?,
                    activated_at: r.get(6)?,
                    remove_at: r.get(7)?,
                },
                state,
            ))
        })
        .map_err(unavailable)?;
    rows.map(|r| {
        let (mut k, state) = r.map_err(unavailable)?;
        k.state = crate::keys::KeyState::parse(&state).ok_or_else(|| {
            StoreError::Corrupt(format!("signing key {} has state {state:?}", k.kid))
        })?;
        Ok(k)
    })
    .collect()
}

#[async_trait]
impl AuditLog for SqliteStore {
    async fn append(&self, entry: AuditEntry) -> Result<Appended, StoreError> {
        let p = Arc::new(Prepared::new(entry));
        let answer = self.call(|r| Cmd::Write(Write::Append(p.clone(), r))).await;
        drop(p);
        answer
    }

    async fn records(&self, after: i64, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        self.read(move |c| read_records(c, after, limit)).await
    }

    async fn audit_head(&self) -> Result<(i64, String), StoreError> {
        self.read(load_head).await
    }

    async fn query_audit(
        &self,
        query: &AuditQuery,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let q = query.clone();
        self.read_only(move |c| audit::query(c, &q, limit)).await
    }

    async fn audit_keys(&self) -> Result<Vec<StoredAuditKey>, StoreError> {
        self.read(audit::audit_keys).await
    }

    async fn insert_audit_key(&self, key: StoredAuditKey) -> Result<(), StoreError> {
        self.read(move |c| audit::insert_audit_key(c, &key)).await
    }

    async fn insert_checkpoint(&self, checkpoint: Checkpoint) -> Result<(), StoreError> {
        self.read(move |c| audit::insert_checkpoint(c, &checkpoint))
            .await
    }

    async fn checkpoints(&self, after: i64, limit: usize) -> Result<Vec<Checkpoint>, StoreError> {
        self.read(move |c| audit::checkpoints(c, after, limit))
            .await
    }

    async fn checkpoints_newest(&self) -> Result<Option<Checkpoint>, StoreError> {
        self.read(audit::newest_checkpoint).await
    }

    async fn witness_position(&self) -> Result<i64, StoreError> {
        self.read(|c| audit::meta_int(c, "witness_delivered")).await
    }

    async fn set_witness_position(&self, id: i64) -> Result<(), StoreError> {
        self.read(move |c| audit::set_meta_int(c, "witness_delivered", id))
            .await
    }

    async fn verify_audit(&self, opts: VerifyOptions) -> Result<Report, StoreError> {
        // Its own read-only connection: a long walk never holds up the writer.
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || audit::verify_file(&path, &opts))
            .await
            .map_err(|_| StoreError::Unavailable("verification task failed".into()))?
    }

    fn attach_metrics(&self, metrics: crate::metrics::StoreMetrics) {
        let _ = self.metrics.set(metrics);
    }
}

#[async_trait]
impl Leases for SqliteStore {
    async fn commit_mint(
        &self,
        lease: LeaseRecord,
        guard: MintGuard,
        entry: AuditEntry,
        now: i64,
    ) -> Result<Appended, CommitError> {
        let (reply, rx) = oneshot::channel();
        let w = Arc::new(MintWrite {
            lease,
            guard,
            entry: Prepared::new(entry),
            now,
        });
        self.tx
            .send(Cmd::Write(Write::Mint(w.clone(), reply)))
            .map_err(|_| stopped())?;
        let answer = rx.await.map_err(|_| stopped())?;
        drop(w);
        answer
    }

    async fn check_mint_guard(
        &self,
        identity_key: &str,
        target: &str,
        guard: &MintGuard,
        now: i64,
    ) -> Result<(), CommitError> {
        let (k, t, g) = (identity_key.to_string(), target.to_string(), guard.clone());
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Read(Box::new(move |c| {
                let _ = reply.send(check_guard(c, &k, &t, &g, now));
            })))
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    async fn lease(&self, id: &str) -> Result<Option<LeaseRecord>, StoreError> {
        let id = id.to_string();
        self.read(move |c| {
            Ok(query_leases(
                c,
                &format!("SELECT {LEASE_COLUMNS} FROM leases WHERE id = ?"),
                vec![SqlValue::Text(id)],
            )?
            .pop())
        })
        .await
    }

    async fn leases(
        &self,
        filter: &LeaseFilter,
        now: i64,
        after: Option<(i64, String)>,
        limit: usize,
    ) -> Result<Vec<LeaseRecord>, StoreError> {
        let f = filter.clone();
        self.read(move |c| read_leases(c, &f, now, after, limit))
            .await
    }

    async fn lease_ids(
        &self,
        filter: &LeaseFilter,
        now: i64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let f = filter.clone();
        self.read(move |c| {
            let (sql, mut args) = filter_sql(&f, now);
            args.push(SqlValue::Integer(limit as i64));
            let mut stmt = c
                .prepare_cached(&format!("SELECT id FROM leases WHERE {sql} LIMIT ?"))
                .map_err(unavailable)?;
            let rows = stmt
                .query_map(params_from_iter(args), |r| r.get::<_, String>(0))
                .map_err(unavailable)?;
            rows.map(|r| r.map_err(unavailable)).collect()
        })
        .await
    }

    async fn leases_by_id(&self, ids: &[String]) -> Result<Vec<LeaseRecord>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = ids.to_vec();
        self.read(move |c| {
            let marks = vec!["?"; ids.len()].join(", ");
            query_leases(
                c,
                &format!("SELECT {LEASE_COLUMNS} FROM leases WHERE id IN ({marks})"),
                ids.into_iter().map(SqlValue::Text).collect(),
            )
        })
        .await
    }

    async fn commit_changes(
        &self,
        changes: Vec<(LeaseChange, Option<AuditEntry>)>,
    ) -> Result<Vec<bool>, StoreError> {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        let changes = changes
            .into_iter()
            .map(|(c, e)| (c, e.map(Prepared::new)))
            .collect();
        self.call(|r| Cmd::Write(Write::Changes(changes, r))).await
    }

    async fn expired_live(&self, now: i64, limit: usize) -> Result<Vec<LeaseRecord>, StoreError> {
        self.read(move |c| {
            query_leases(
                c,
                &format!("SELECT {LEASE_COLUMNS} FROM leases WHERE state = 'live' AND expires_at <= ? ORDER BY expires_at LIMIT ?"),
                vec![SqlValue::Integer(now), SqlValue::Integer(limit as i64)],
            )
        })
        .await
    }

    async fn due_revocations(
        &self,
        now: i64,
        limit: usize,
    ) -> Result<Vec<LeaseRecord>, StoreError> {
        self.read(move |c| {
            query_leases(
                c,
                &format!("SELECT {LEASE_COLUMNS} FROM leases WHERE state = 'revoking' AND COALESCE(next_attempt_at, 0) <= ? ORDER BY next_attempt_at LIMIT ?"),
                vec![SqlValue::Integer(now), SqlValue::Integer(limit as i64)],
            )
        })
        .await
    }

    async fn purge(&self, before: i64, now: i64, limit: usize) -> Result<usize, StoreError> {
        // A write, but not one that belongs in an audited batch: run it between batches.
        self.read(move |c| purge(c, before, now, limit)).await
    }

    async fn live_lease_counts(&self, now: i64) -> Result<Vec<(String, u64)>, StoreError> {
        // On the read-only connection: a scrape never waits for, or holds up, a commit.
        self.read_only(move |c| {
            let mut st = c
                .prepare_cached("SELECT target, count(*) FROM leases WHERE state = 'live' AND expires_at > ? GROUP BY target ORDER BY target")
                .map_err(unavailable)?;
            let rows = st
                .query_map([now], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))
                .map_err(unavailable)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(unavailable)
        })
        .await
    }
}

#[async_trait]
impl Keys for SqliteStore {
    async fn signing_keys(&self) -> Result<Vec<StoredKey>, StoreError> {
        self.read(read_keys).await
    }

    async fn insert_signing_key(&self, key: StoredKey) -> Result<(), StoreError> {
        self.call(|r| Cmd::InsertKey(Box::new(key), r)).await
    }

    async fn commit_rotation(&self, step: crate::store::RotationStep) -> Result<(), StoreError> {
        let audit = step.audit.iter().cloned().map(Prepared::new).collect();
        let p = PreparedStep { step, audit };
        self.call(|r| Cmd::Write(Write::Rotation(Box::new(p), r)))
            .await
    }

    async fn rotation_states(&self) -> Result<Vec<crate::store::RotationState>, StoreError> {
        self.read(|c| {
            let mut st = c
                .prepare_cached("SELECT item, last_run FROM rotation_state ORDER BY item")
                .map_err(unavailable)?;
            let rows = st
                .query_map([], |r| {
                    Ok(crate::store::RotationState {
                        item: r.get(0)?,
                        last_run: r.get(1)?,
                    })
                })
                .map_err(unavailable)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(unavailable)
        })
        .await
    }
}

#[async_trait]
impl Coordination for SqliteStore {
    async fn try_lock(
        &self,
        name: &str,
        holder: &str,
        now: i64,
        ttl_secs: i64,
    ) -> Result<bool, StoreError> {
        let (name, holder) = (name.to_string(), holder.to_string());
        self.read(move |c| {
            // One statement: take a free or expired lock, or keep our own.
            let n = c
                .execute(
                    "INSERT INTO locks (name, holder, expires_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT(name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
                     WHERE locks.expires_at <= ?4 OR locks.holder = excluded.holder",
                    params![name, holder, now.saturating_add(ttl_secs), now],
                )
                .map_err(unavailable)?;
            Ok(n == 1)
        })
        .await
    }

    async fn unlock(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let (name, holder) = (name.to_string(), holder.to_string());
        self.read(move |c| {
            c.execute(
                "DELETE FROM locks WHERE name = ?1 AND holder = ?2",
                params![name, holder],
            )
            .map(|_| ())
            .map_err(unavailable)
        })
        .await
    }

    fn subscribe_head(&self) -> watch::Receiver<i64> {
        self.head.subscribe()
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        self.call(Cmd::CheckWritable).await
    }

    async fn store_id(&self) -> Result<String, StoreError> {
        self.read(|c| {
            c.query_row("SELECT value FROM meta WHERE key = 'store_id'", [], |r| {
                r.get(0)
            })
            .map_err(unavailable)
        })
        .await
    }
}

#[async_trait]
impl RootSecrets for SqliteStore {
    async fn root_secret(&self, target: &str) -> Result<Option<StoredRootSecret>, StoreError> {
        let target = target.to_string();
        self.read(move |c| {
            c.query_row(
                "SELECT target, sealed, pending, updated_at FROM root_secrets WHERE target = ?1",
                params![target],
                |r| {
                    Ok(StoredRootSecret {
                        target: r.get(0)?,
                        sealed: r.get(1)?,
                        pending: r.get(2)?,
                        updated_at: r.get(3)?,
                    })
                },
            )
            .optional()
            .map_err(unavailable)
        })
        .await
    }

    async fn put_root_secret(&self, secret: StoredRootSecret) -> Result<(), StoreError> {
        self.read(move |c| {
            c.execute(
                "INSERT INTO root_secrets (target, sealed, pending, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(target) DO UPDATE SET sealed = excluded.sealed,
                     pending = excluded.pending, updated_at = excluded.updated_at",
                params![secret.target, secret.sealed, secret.pending, secret.updated_at],
            )
            .map(|_| ())
            .map_err(unavailable)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::verify_chain;

    fn store(dir: &tempfile::TempDir) -> SqliteStore {
        SqliteStore::open(&Config {
            path: dir.path().join("t.db"),
            busy_timeout: Duration::from_millis(200),
        })
        .unwrap()
    }

    fn entry(i: usize) -> AuditEntry {
        AuditEntry {
            time_ms: i as i64,
            request_id: format!("r{i}"),
            action: "mint".into(),
            outcome: "allowed".into(),
            requested_scopes: vec!["a".into()],
            context: [("k".to_string(), "v".to_string())].into(),
            claims: serde_json::json!({"sub": "x", "n": 1}),
            ..Default::default()
        }
    }

    fn terms_through(dir: &tempfile::TempDir) -> i64 {
        let c = audit::open_read_only(&dir.path().join("t.db")).unwrap();
        audit::terms_through(&c).unwrap()
    }

    async fn wait_terms(dir: &tempfile::TempDir, through: i64) {
        let waited = std::time::Instant::now();
        while terms_through(dir) < through {
            assert!(waited.elapsed() < Duration::from_secs(5), "terms indexed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn search_terms_are_indexed_in_runs_and_queries_never_miss_a_record() {
        assert_eq!(audit::TERMS_RUN, 4, "the test's arithmetic");
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        let with = |i: usize| {
            let repo = if i % 2 == 0 { "even" } else { "odd" };
            AuditEntry {
                identity_key: Some(format!("id-{repo}")),
                repository: Some(repo.into()),
                subject: Some(format!("{repo}:{i}")),
                ..entry(i)
            }
        };
        let q = |repo: Option<&str>, subject: Option<&str>| AuditQuery {
            repository: repo.map(str::to_string),
            subject: subject.map(str::to_string),
            since_ms: Some(2),
            ..Default::default()
        };
        let seqs = |r: Vec<AuditRecord>| r.iter().map(|r| r.seq).collect::<Vec<_>>();
        // Record i has sequence i + 1 and time i.
        for i in 0..3 {
            s.append(with(i)).await.unwrap();
        }
        // No complete run yet: the records come from the scan of the newest ones.
        assert_eq!(terms_through(&dir), 0);
        assert_eq!(
            seqs(s.query_audit(&q(Some("even"), None), 10).await.unwrap()),
            [3]
        );
        for i in 3..9 {
            s.append(with(i)).await.unwrap();
        }
        // Two complete runs are indexed; record 9 is in the incomplete one.
        wait_terms(&dir, 8).await;
        assert_eq!(terms_through(&dir), 8);
        assert_eq!(
            seqs(s.query_audit(&q(Some("even"), None), 10).await.unwrap()),
            [3, 5, 7, 9],
            "indexed records and the one after them"
        );
        assert_eq!(
            seqs(s.query_audit(&q(None, Some("odd:3")), 10).await.unwrap()),
            [4]
        );
        let by_identity = AuditQuery {
            identity_key: Some("id-odd".into()),
            repository: Some("odd".into()),
            after_seq: Some(4),
            ..Default::default()
        };
        assert_eq!(
            seqs(s.query_audit(&by_identity, 1).await.unwrap()),
            [6],
            "paged"
        );
        let window = AuditQuery {
            repository: Some("odd".into()),
            since_ms: Some(4),
            until_ms: Some(6),
            ..Default::default()
        };
        assert_eq!(seqs(s.query_audit(&window, 10).await.unwrap()), [6]);
        // A time window alone: bounded by the runs' time ranges, plus the newest records.
        for (since, until, want) in [
            (Some(2), Some(6), vec![3, 4, 5, 6]),
            (Some(6), None, vec![7, 8, 9]),
            (None, Some(3), vec![1, 2, 3]),
            (Some(5), Some(5), vec![]),
            (Some(100), None, vec![]),
        ] {
            let w = AuditQuery {
                since_ms: since,
                until_ms: until,
                ..Default::default()
            };
            assert_eq!(
                seqs(s.query_audit(&w, 10).await.unwrap()),
                want,
                "{since:?}..{until:?}"
            );
        }
        for (request, seq) in [("r5", 6), ("r8", 9)] {
            let by_request = AuditQuery {
                request_id: Some(request.into()),
                outcome: Some("allowed".into()),
                ..Default::default()
            };
            assert_eq!(seqs(s.query_audit(&by_request, 10).await.unwrap()), [seq]);
        }
        // Another filter never drives a term query: the plan seeks the terms of each run,
        // it does not scan the records.
        let c = audit::open_read_only(&dir.path().join("t.db")).unwrap();
        let plan = audit::plan(&c, &q(Some("even"), None));
        assert!(
            plan.contains("audit_run_keys USING PRIMARY KEY (run=? AND term>? AND term<?)"),
            "{plan}"
        );
        assert!(!plan.contains("SCAN audit "), "{plan}");
        let plan = audit::plan(
            &c,
            &AuditQuery {
                since_ms: Some(2),
                until_ms: Some(6),
                outcome: Some("allowed".into()),
                ..Default::default()
            },
        );
        assert!(!plan.contains("SCAN audit "), "{plan}");
        assert!(
            plan.contains("SEARCH audit USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)"),
            "{plan}"
        );
        drop(s);

        // A store whose terms are missing (or an older store) indexes them on opening,
        // from the records: exactly the terms the writer kept as it appended them.
        let stored = |dir: &tempfile::TempDir| -> Vec<(i64, i64, i64, i64, i64)> {
            let c = Connection::open(dir.path().join("t.db")).unwrap();
            let mut st = c
                .prepare("SELECT k.run, k.term, r.last_seq, r.min_time_ms, r.max_time_ms FROM audit_run_keys k JOIN audit_runs r USING (run) ORDER BY 1, 2")
                .unwrap();
            let rows = st
                .query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })
                .unwrap();
            rows.map(Result::unwrap).collect()
        };
        let kept = stored(&dir);
        assert_eq!(
            kept.len(),
            8 * 4,
            "identity, repository, subject, request id"
        );
        let conn = Connection::open(dir.path().join("t.db")).unwrap();
        conn.execute_batch("DELETE FROM audit_run_keys; DELETE FROM audit_runs;")
            .unwrap();
        drop(conn);
        let s = store(&dir);
        wait_terms(&dir, 8).await;
        assert_eq!(stored(&dir), kept);
        assert_eq!(
            seqs(s.query_audit(&q(Some("odd"), None), 10).await.unwrap()),
            [4, 6, 8]
        );
        drop(s);

        // A store from the version that kept terms as text: the old table goes, and its
        // runs are indexed again as keys.
        let conn = Connection::open(dir.path().join("t.db")).unwrap();
        conn.execute_batch(
            "CREATE TABLE audit_run_terms (run INTEGER NOT NULL, field INTEGER NOT NULL, value TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (run, field, value, seq)) WITHOUT ROWID;
             INSERT INTO audit_run_terms VALUES (1, 2, 'odd', 2);",
        )
        .unwrap();
        drop(conn);
        let s = store(&dir);
        wait_terms(&dir, 8).await;
        assert_eq!(stored(&dir), kept);
        let c = audit::open_read_only(&dir.path().join("t.db")).unwrap();
        let old: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'audit_run_terms'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(old, 0);
        assert_eq!(
            seqs(s.query_audit(&q(Some("odd"), None), 10).await.unwrap()),
            [4, 6, 8]
        );
    }

    #[tokio::test]
    async fn bytes_moved_between_json_columns_are_an_edit() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        let tricky = AuditEntry {
            context: [
                ("a".to_string(), "b".to_string()),
                ("claims".to_string(), "x".to_string()),
            ]
            .into(),
            claims: serde_json::json!({"sub": "s"}),
            ..entry(1)
        };
        for e in [entry(0), tricky, entry(2)] {
            s.append(e).await.unwrap();
        }
        drop(s);
        let path = dir.path().join("t.db");
        assert!(audit::verify_file(&path, &VerifyOptions::default())
            .unwrap()
            .intact());
        // The same bytes, split differently: `{"a":"b"` + `,"claims":` + `"x"},...`.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            r#"DROP TRIGGER audit_no_update;
               UPDATE audit SET context = '{"a":"b"', claims = '"x"},"claims":{"sub":"s"}' WHERE seq = 2;"#,
        )
        .unwrap();
        drop(conn);
        let report = audit::verify_file(&path, &VerifyOptions::default()).unwrap();
        assert_eq!(
            report.problem,
            Some(crate::audit::verify::Tamper::Edited { seq: 2 }),
            "{report}"
        );
    }

    #[tokio::test]
    async fn a_log_begun_in_hash_format_1_verifies_and_continues_in_format_2() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let s = store(&dir);
        for i in 0..3 {
            s.append(entry(i)).await.unwrap();
        }
        drop(s);
        // What a store written before format 2 holds: the same rows, hashed in format 1.
        let rehash = |edit: Option<i64>| {
            let mut prev = GENESIS_HASH.to_string();
            let mut sql = String::from("DROP TRIGGER IF EXISTS audit_no_update;");
            for (i, e) in (0..3).map(entry).enumerate() {
                let seq = i as i64 + 1;
                let hash = crate::audit::record_hash_v1(seq, &prev, &e);
                let outcome = if edit == Some(seq) {
                    "denied"
                } else {
                    "allowed"
                };
                sql.push_str(&format!(
                    "UPDATE audit SET prev_hash = '{prev}', hash = '{hash}', outcome = '{outcome}' WHERE seq = {seq};"
                ));
                prev = hash;
            }
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(&sql).unwrap();
        };
        rehash(None);
        let third = |col: &str| -> String {
            let c = Connection::open(&path).unwrap();
            c.query_row(&format!("SELECT {col} FROM audit WHERE seq = 3"), [], |r| {
                r.get(0)
            })
            .unwrap()
        };
        let v1_head = third("hash");
        assert_ne!(
            v1_head,
            crate::audit::record_hash(3, &third("prev_hash"), &entry(2))
        );
        let s = store(&dir);
        for i in 3..6 {
            s.append(entry(i)).await.unwrap();
        }
        let recs = s.records(0, 100).await.unwrap();
        drop(s);
        assert_eq!(
            recs[3].prev_hash, v1_head,
            "format 2 continues the format 1 chain"
        );
        assert_eq!(
            recs[4].hash,
            crate::audit::record_hash(5, &recs[4].prev_hash, &recs[4].entry)
        );
        assert_eq!(verify_chain(&recs, (0, GENESIS_HASH)).unwrap().0, 6);
        let report = audit::verify_file(&path, &VerifyOptions::default()).unwrap();
        assert!(report.intact(), "{report}");
        assert_eq!(report.records, 6);
        // An edit in the format 1 part is still an edit.
        rehash(Some(2));
        let report = audit::verify_file(&path, &VerifyOptions::default()).unwrap();
        assert_eq!(
            report.problem,
            Some(crate::audit::verify::Tamper::Edited { seq: 2 }),
            "{report}"
        );
    }

    #[tokio::test]
    async fn the_wal_starts_over_under_continuous_writes() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(store(&dir));
        let big = |i: usize| AuditEntry {
            claims: serde_json::json!({ "pad": "x".repeat(2000), "i": i }),
            ..entry(i)
        };
        let mut handles = Vec::new();
        for t in 0..32 {
            let s = s.clone();
            handles.push(tokio::spawn(async move {
                for i in 0..60 {
                    s.append(big(t * 100 + i)).await.unwrap();
                }
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        // ~1,900 records of 2 KB wrote well over 4 MiB of frames; the log kept starting
        // over at 64 frames (256 KiB), so it never grew past a few batches beyond that.
        let wal = std::fs::metadata(dir.path().join("t.db-wal"))
            .unwrap()
            .len();
        assert!(wal < 2 * 1024 * 1024, "WAL is {wal} bytes");
        let recs = s.records(0, 5000).await.unwrap();
        assert_eq!(recs.len(), 1920);
        assert!(verify_chain(&recs, (0, GENESIS_HASH)).is_ok());
    }

    #[tokio::test]
    async fn update_and_delete_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        s.append(entry(1)).await.unwrap();
        let c = Connection::open(dir.path().join("t.db")).unwrap();
        let e = c
            .execute("UPDATE audit SET outcome = 'denied'", [])
            .unwrap_err();
        assert!(e.to_string().contains("append-only"), "{e}");
        let e = c.execute("DELETE FROM audit", []).unwrap_err();
        assert!(e.to_string().contains("append-only"), "{e}");
    }

    #[tokio::test]
    async fn locked_store_fails_then_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        s.append(entry(1)).await.unwrap();
        let c = Connection::open(dir.path().join("t.db")).unwrap();
        c.execute_batch("BEGIN EXCLUSIVE").unwrap();
        assert!(matches!(
            s.append(entry(2)).await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(s.check_writable().await.is_err());
        c.execute_batch("COMMIT").unwrap();
        assert_eq!(
            s.append(entry(3)).await.unwrap().seq,
            2,
            "the failed append left no gap"
        );
        assert!(s.check_writable().await.is_ok());
    }
}
