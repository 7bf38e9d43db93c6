//! The embedded SQLite store: WAL, `synchronous=FULL`, one writer thread.
//!
//! All writes go through one thread that owns the connection. Audit appends that arrive
//! together are group-committed: one transaction and one fsync serve the batch, and each
//! caller is answered only after the commit that holds its record. Triggers refuse
//! UPDATE and DELETE on the audit table.

use super::{Appended, Store, StoreError, StoredKey};
use crate::audit::{AuditEntry, AuditRecord, GENESIS_HASH};
use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;
use tokio::sync::oneshot;

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
CREATE INDEX IF NOT EXISTS audit_time ON audit(time_ms);
CREATE INDEX IF NOT EXISTS audit_identity ON audit(identity_key, time_ms);
CREATE INDEX IF NOT EXISTS audit_target ON audit(target, time_ms);
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
"#;

const AUDIT_COLUMNS: &str = "seq, time_ms, request_id, action, outcome, issuer, identity_key, subject, repository, git_ref, environment, pipeline, token_fingerprint, target, requested_scopes, granted_scopes, ttl_secs, rule, reason, lease_id, credential_jti, credential_fingerprint, context, claims, prev_hash, hash";

/// Largest number of appends one transaction commits.
const MAX_BATCH: usize = 1024;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Cmd {
    Append(Box<AuditEntry>, Reply<Appended>),
    Records(i64, usize, Reply<Vec<AuditRecord>>),
    Keys(Reply<Vec<StoredKey>>),
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
}

fn unavailable(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(match &e {
        rusqlite::Error::SqliteFailure(f, _) => format!("sqlite: {}", f),
        _ => "sqlite error".to_string(),
    })
}

impl SqliteStore {
    /// Opens (creating if needed) the database and starts the writer thread. Fails when
    /// the file cannot be opened or the schema cannot be applied.
    pub fn open(cfg: &Config) -> Result<SqliteStore, StoreError> {
        let conn = open_conn(&cfg.path, cfg.busy_timeout)?;
        let head = load_head(&conn)?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("latchkey-store".into())
            .spawn(move || Writer { conn, head }.run(rx))
            .map_err(|e| StoreError::Unavailable(format!("cannot start writer thread: {e}")))?;
        Ok(SqliteStore {
            tx,
            path: cfg.path.clone(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .map_err(|_| StoreError::Unavailable("writer thread stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("writer thread stopped".into()))?
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
    conn.execute_batch(SCHEMA).map_err(unavailable)?;
    conn.execute(
        "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?1)",
        params![crate::audit::SCHEMA_VERSION.to_string()],
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

struct Writer {
    conn: Connection,
    head: (i64, String),
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Cmd>) {
        let mut deferred: Vec<Cmd> = Vec::new();
        while let Ok(first) = rx.recv() {
            let mut batch = Vec::new();
            match first {
                Cmd::Append(e, r) => batch.push((e, r)),
                other => deferred.push(other),
            }
            // Take whatever else is already waiting: this is the group commit.
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(Cmd::Append(e, r)) => batch.push((e, r)),
                    Ok(other) => deferred.push(other),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.append_batch(batch);
            }
            for cmd in deferred.drain(..) {
                self.handle(cmd);
            }
        }
    }

    fn append_batch(&mut self, batch: Vec<(Box<AuditEntry>, Reply<Appended>)>) {
        let mut head = self.head.clone();
        let result = (|| -> Result<Vec<Appended>, StoreError> {
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let mut out = Vec::with_capacity(batch.len());
            {
                let mut stmt = tx
                    .prepare_cached(&format!(
                        "INSERT INTO audit ({AUDIT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26)"
                    ))
                    .map_err(unavailable)?;
                for (entry, _) in &batch {
                    let rec = AuditRecord::chain(head.0, &head.1, (**entry).clone());
                    let e = &rec.entry;
                    stmt.execute(params![
                        rec.seq,
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
                        json(&e.requested_scopes),
                        json(&e.granted_scopes),
                        e.ttl_secs,
                        e.rule,
                        e.reason,
                        e.lease_id,
                        e.credential_jti,
                        e.credential_fingerprint,
                        json(&e.context),
                        json(&e.claims),
                        rec.prev_hash,
                        rec.hash,
                    ])
                    .map_err(unavailable)?;
                    out.push(Appended {
                        seq: rec.seq,
                        hash: rec.hash.clone(),
                    });
                    head = (rec.seq, rec.hash);
                }
            }
            tx.commit().map_err(unavailable)?;
            Ok(out)
        })();
        match result {
            Ok(done) => {
                self.head = head;
                for ((_, reply), appended) in batch.into_iter().zip(done) {
                    let _ = reply.send(Ok(appended));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, records = batch.len(), "audit commit failed; requests fail closed");
                // The transaction rolled back; re-read the head in case of partial state.
                if let Ok(h) = load_head(&self.conn) {
                    self.head = h;
                }
                for (_, reply) in batch {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Append(e, r) => self.append_batch(vec![(e, r)]),
            Cmd::Records(after, limit, r) => {
                let _ = r.send(read_records(&self.conn, after, limit));
            }
            Cmd::Keys(r) => {
                let _ = r.send(read_keys(&self.conn));
            }
            Cmd::InsertKey(k, r) => {
                let res = self
                    .conn
                    .execute(
                        "INSERT INTO signing_keys (kid, target, alg, state, created_at, sealed) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        params![k.kid, k.target, k.alg, k.state, k.created_at, k.sealed],
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

/// JSON text for the JSON-valued columns: the same canonical serde_json form the hash
/// covers, so reading back reproduces the hash input exactly.
fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
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
        .prepare_cached("SELECT kid, target, alg, state, created_at, sealed FROM signing_keys ORDER BY created_at, kid")
        .map_err(unavailable)?;
    let rows = stmt
        .query_map([], |r| {
            Ok(StoredKey {
                kid: r.get(0)?,
                target: r.get(1)?,
                alg: r.get(2)?,
                state: r.get(3)?,
                created_at: r.get(4)?,
                sealed: r.get(5)?,
            })
        })
        .map_err(unavailable)?;
    rows.map(|r| r.map_err(unavailable)).collect()
}

#[async_trait]
impl Store for SqliteStore {
    async fn append(&self, entry: AuditEntry) -> Result<Appended, StoreError> {
        self.call(|r| Cmd::Append(Box::new(entry), r)).await
    }

    async fn records(&self, after: i64, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        self.call(|r| Cmd::Records(after, limit, r)).await
    }

    async fn signing_keys(&self) -> Result<Vec<StoredKey>, StoreError> {
        self.call(Cmd::Keys).await
    }

    async fn insert_signing_key(&self, key: StoredKey) -> Result<(), StoreError> {
        self.call(|r| Cmd::InsertKey(Box::new(key), r)).await
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        self.call(Cmd::CheckWritable).await
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

    #[tokio::test]
    async fn concurrent_appends_form_one_chain_that_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(store(&dir));
        let mut handles = Vec::new();
        for i in 0..200 {
            let s = s.clone();
            handles.push(tokio::spawn(
                async move { s.append(entry(i)).await.unwrap() },
            ));
        }
        let mut seqs = Vec::new();
        for h in handles {
            seqs.push(h.await.unwrap().seq);
        }
        seqs.sort();
        assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
        let recs = s.records(0, 1000).await.unwrap();
        assert_eq!(verify_chain(&recs, (0, GENESIS_HASH)).unwrap().0, 200);
        drop(s);
        let s = store(&dir);
        let a = s.append(entry(999)).await.unwrap();
        assert_eq!(a.seq, 201, "head reloaded on reopen");
        let recs = s.records(0, 1000).await.unwrap();
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

    #[tokio::test]
    async fn keys_round_trip_and_duplicates_fail() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        let k = StoredKey {
            kid: "k".into(),
            target: "t".into(),
            alg: "ES256".into(),
            state: "current".into(),
            created_at: 5,
            sealed: vec![1, 2, 3],
        };
        s.insert_signing_key(k.clone()).await.unwrap();
        assert!(s.insert_signing_key(k.clone()).await.is_err());
        assert_eq!(s.signing_keys().await.unwrap(), vec![k]);
    }
}
