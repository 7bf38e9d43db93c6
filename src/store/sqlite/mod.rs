//! The embedded SQLite store: WAL, `synchronous=FULL`, one writer thread.
//!
//! All writes go through one thread that owns the connection. Audit appends that arrive
//! together are group-committed: one transaction and one fsync serve the batch, and each
//! caller is answered only after the commit that holds its record. Triggers refuse
//! UPDATE and DELETE on the audit table.

pub mod audit;
mod keys;
mod leases;
mod schema;
mod wal;
mod writer;

use schema::*;
use writer::*;

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

/// Makes a new store private to the broker's user: a missing directory is created 0700
/// and a missing database file 0600 (SQLite gives its WAL and shared-memory files the
/// database file's permissions). Existing files and directories keep theirs.
fn create_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let fail = |what: &str, e: std::io::Error| {
        StoreError::Unavailable(format!("{what} {}: {}", path.display(), e.kind()))
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| fail("cannot create the directory of", e))?;
        }
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(fail("cannot create", e)),
    }
}

/// How every SQLite database file begins.
const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

/// Why an existing file at `path` is not a store this broker may open: empty,
/// not SQLite, or a SQLite database without Latchkey's tables. Opening any of these would
/// start a new audit chain and new signing keys without a word, erasing what the old
/// chain proved (a truncated file) or writing into someone else's database. A file that
/// does not exist is a first start and is fine.
fn refuse_foreign(path: &Path) -> Result<(), StoreError> {
    use std::io::Read;
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(StoreError::Unavailable(format!(
                "cannot read {}: {}",
                path.display(),
                e.kind()
            )))
        }
    };
    let mut header = [0u8; 16];
    let n = f.read(&mut header).unwrap_or(0);
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let refuse = |what: &str| {
        Err(StoreError::Corrupt(format!(
            "{} {what}: refusing to start a new audit chain and new signing keys over it. If this is a first start, run `latchkey store init` (it replaces an empty file); otherwise restore the store from a backup",
            path.display()
        )))
    };
    if len == 0 {
        return refuse("is empty");
    }
    if n < 16 || &header != SQLITE_HEADER {
        return refuse("is not a SQLite database (no SQLite header)");
    }
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(unavailable)?;
    let tables: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name IN ('audit', 'meta')",
            [],
            |r| r.get(0),
        )
        .map_err(|e| StoreError::Corrupt(format!("{}: {}", path.display(), unavailable(e))))?;
    if tables < 2 {
        return refuse("is a SQLite database but not a Latchkey store");
    }
    Ok(())
}

/// SQLite's own check of the file's pages and indexes (`PRAGMA quick_check`): a damaged
/// store is refused, not served while its chain can no longer be read back.
fn integrity(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let problems = quick_check(conn)?;
    if problems.is_empty() {
        return Ok(());
    }
    Err(StoreError::Corrupt(format!(
        "{} failed its integrity check ({}); restore it from a backup",
        path.display(),
        problems.join("; ")
    )))
}

/// What `PRAGMA quick_check` finds wrong (at most 5 lines); empty when the file is sound.
/// A file too damaged for the check to run is one problem, SQLite's own words.
pub(super) fn quick_check(conn: &Connection) -> Result<Vec<String>, StoreError> {
    let run = || -> rusqlite::Result<Vec<String>> {
        let mut stmt = conn.prepare("PRAGMA quick_check(5)")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        rows.collect()
    };
    Ok(match run() {
        Ok(rows) => rows.into_iter().filter(|r| r != "ok").collect(),
        Err(rusqlite::Error::SqliteFailure(f, msg)) => {
            vec![msg.unwrap_or_else(|| f.to_string())]
        }
        Err(e) => vec![e.to_string()],
    })
}

/// The chain reaches the newest signed checkpoint with the same hash: records the
/// checkpoint attested are still there. A store restored from an older copy, or cut
/// short, fails here instead of appending to a chain that contradicts what was signed.
fn head_reaches_checkpoint(conn: &Connection, head: &(i64, String)) -> Result<(), StoreError> {
    let Some(c) = audit::newest_checkpoint(conn)? else {
        return Ok(());
    };
    match audit::record_hash_at(conn, c.seq)? {
        Some(h) if h == c.hash && head.0 >= c.seq => Ok(()),
        Some(_) => Err(StoreError::Corrupt(format!(
            "audit record {} does not have the hash checkpoint #{} signed: the log was altered; run latchkey audit verify",
            c.seq, c.id
        ))),
        None => Err(StoreError::Corrupt(format!(
            "the audit log ends at record {} but checkpoint #{} attests record {}: records were lost (a restored or truncated store); run latchkey audit verify",
            head.0, c.id, c.seq
        ))),
    }
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
        refuse_foreign(&cfg.path)?;
        create_private(&cfg.path)?;
        let conn = open_conn(&cfg.path, cfg.busy_timeout)?;
        integrity(&conn, &cfg.path)?;
        let head = load_head(&conn)?;
        head_reaches_checkpoint(&conn, &head)?;
        let terms_through = audit::terms_through(&conn)?.min(head.0);
        let (tx, rx) = mpsc::channel();
        let head_tx = Arc::new(watch::channel(head.0).0);
        let notify = head_tx.clone();
        let metrics: Arc<std::sync::OnceLock<crate::metrics::StoreMetrics>> = Arc::default();
        let writer_metrics = metrics.clone();
        let busy_timeout = cfg.busy_timeout;
        let path = cfg.path.clone();
        std::thread::Builder::new()
            .name("latchkey-store".into())
            .spawn(move || {
                Writer {
                    busy: busy_timeout,
                    wal: wal::WalWatch::start(&conn, &path),
                    conn,
                    head,
                    terms_through,
                    pending: Vec::new(),
                    pending_from: 0,
                    terms_failing: false,
                    failures: Default::default(),
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
    /// thread: it sees everything committed, and it answers while the writer waits on a
    /// lock (another process's transaction, a stuck disk), which WAL readers never wait
    /// for. Lease and record lookups go here, so Renew, Introspect and listing keep
    /// working, or fail on their own bound, whatever the writer is doing.
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

#[async_trait]
impl AuditLog for SqliteStore {
    async fn append(&self, entry: AuditEntry) -> Result<Appended, StoreError> {
        let p = Arc::new(Prepared::new(entry));
        let answer = self.call(|r| Cmd::Write(Write::Append(p.clone(), r))).await;
        drop(p);
        answer
    }

    async fn records(&self, after: i64, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        self.read_only(move |c| read_records(c, after, limit)).await
    }

    async fn audit_head(&self) -> Result<(i64, String), StoreError> {
        self.read_only(load_head).await
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

    async fn check_integrity(&self) -> Result<(), StoreError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            // A connection of its own: what is on disk now, not a cached page.
            let conn = audit::open_read_only(&path)?;
            integrity(&conn, &path)?;
            let head = load_head(&conn)?;
            head_reaches_checkpoint(&conn, &head)
        })
        .await
        .map_err(|_| StoreError::Unavailable("integrity check task failed".into()))?
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
        // And the file shrinks: when the log next starts over, it is cut back to
        // journal_size_limit (without it, a WAL file never gets smaller than its peak).
        // (The burst's log peaked at RESTART_FRAMES pages, 256 KiB here, four times the
        // limit; without the limit the file never drops below that peak.)
        let mut smallest = wal;
        for i in 0..300 {
            s.append(entry(10_000 + i)).await.unwrap();
            let now = std::fs::metadata(dir.path().join("t.db-wal"))
                .unwrap()
                .len();
            smallest = smallest.min(now);
        }
        assert!(
            smallest <= wal::JOURNAL_SIZE_LIMIT as u64 + 16 * 4096,
            "the WAL file stayed at {smallest} bytes (peak {wal})"
        );
    }

    fn open_err(path: &Path) -> String {
        match SqliteStore::open(&Config {
            path: path.to_path_buf(),
            busy_timeout: Duration::from_millis(200),
        }) {
            Ok(_) => panic!("{} opened", path.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn an_empty_foreign_or_headerless_file_is_not_made_a_new_store() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.db");
        std::fs::write(&empty, b"").unwrap();
        let e = open_err(&empty);
        assert!(
            e.contains("is empty") && e.contains("latchkey store init"),
            "{e}"
        );
        assert_eq!(
            std::fs::metadata(&empty).unwrap().len(),
            0,
            "left as it was"
        );
        let junk = dir.path().join("junk.db");
        std::fs::write(&junk, vec![0x42u8; 8192]).unwrap();
        assert!(open_err(&junk).contains("no SQLite header"));
        let foreign = dir.path().join("foreign.db");
        Connection::open(&foreign)
            .unwrap()
            .execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        assert!(open_err(&foreign).contains("not a Latchkey store"));
    }

    #[tokio::test]
    async fn a_damaged_store_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        {
            let s = store(&dir);
            for i in 0..400 {
                s.append(AuditEntry {
                    claims: serde_json::json!({ "pad": "x".repeat(1500), "i": i }),
                    ..entry(i)
                })
                .await
                .unwrap();
            }
        }
        // Fold the WAL in, so the damage below lands on pages in use.
        Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len > 200_000, "{len}");
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = (len / 2) as usize / 4096 * 4096;
        for b in &mut bytes[mid..mid + 8192] {
            *b = 0x5a;
        }
        std::fs::write(&path, &bytes).unwrap();
        let e = open_err(&path);
        assert!(e.contains("failed its integrity check"), "{e}");
    }

    #[tokio::test]
    async fn a_chain_that_no_longer_reaches_its_checkpoint_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        {
            let s = store(&dir);
            for i in 0..6 {
                s.append(entry(i)).await.unwrap();
            }
        }
        let c = Connection::open(&path).unwrap();
        let hash5: String = c
            .query_row("SELECT hash FROM audit WHERE seq = 5", [], |r| r.get(0))
            .unwrap();
        c.execute(
            "INSERT INTO audit_checkpoints (id, seq, hash, time_ms, kid, signature) VALUES (1, 5, ?1, 0, 'k', 's')",
            params![hash5],
        )
        .unwrap();
        drop(c);
        drop(store(&dir)); // still fine
                           // Records 4.. lost, as a restored older copy or a cut file would have them.
        Connection::open(&path)
            .unwrap()
            .execute_batch("DROP TRIGGER audit_no_delete; DELETE FROM audit WHERE seq > 3;")
            .unwrap();
        let e = open_err(&path);
        assert!(e.contains("records were lost"), "{e}");
    }

    #[tokio::test]
    async fn a_new_store_is_private_to_the_broker() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("state/latchkey");
        let path = sub.join("l.db");
        let s = SqliteStore::open(&Config {
            path: path.clone(),
            busy_timeout: Duration::from_millis(200),
        })
        .unwrap();
        s.append(entry(1)).await.unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&sub), 0o700);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&sub.join("l.db-wal")), 0o600);
        assert_eq!(mode(&sub.join("l.db-shm")), 0o600);
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
