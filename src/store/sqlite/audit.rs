//! The audit side of the SQLite store: filtered queries, checkpoints, the audit key, and
//! verification straight from the rows.
//!
//! Verification reads each row's columns as borrowed text and hashes them through
//! [`crate::audit::RawEntry`], which serialises exactly as [`crate::audit::AuditEntry`]
//! does: no JSON is parsed into values, nothing is allocated per record beyond the hash.
//! It runs on its own read-only connection, so the writer (and Mint) never waits for it.

use super::{row_to_record, unavailable, AUDIT_COLUMNS};
use crate::audit::checkpoint::{Checkpoint, CheckpointKeys};
use crate::audit::verify::{check_witness, Report, VerifyOptions, Walker};
use crate::audit::{raw_record_hash, AuditQuery, AuditRecord, RawEntry};
use crate::store::{StoreError, StoredAuditKey};
use rusqlite::types::Value as SqlValue;
use rusqlite::{params, params_from_iter, Connection, OpenFlags, OptionalExtension};
use serde_json::value::RawValue;
use std::path::Path;

pub(super) const AUDIT_SCHEMA: &str = r#"
CREATE INDEX IF NOT EXISTS audit_repository ON audit(repository, time_ms);
CREATE INDEX IF NOT EXISTS audit_subject ON audit(subject, time_ms);
CREATE INDEX IF NOT EXISTS audit_issuer ON audit(issuer, time_ms);
CREATE INDEX IF NOT EXISTS audit_lease ON audit(lease_id);
CREATE INDEX IF NOT EXISTS audit_request ON audit(request_id);
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    id INTEGER PRIMARY KEY,
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    kid TEXT NOT NULL,
    signature TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
    BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
    BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;
CREATE TABLE IF NOT EXISTS audit_keys (
    kid TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    public BLOB NOT NULL,
    sealed BLOB NOT NULL
);
"#;

/// The WHERE clause (without `WHERE`) and its arguments for a query.
fn query_sql(q: &AuditQuery) -> (String, Vec<SqlValue>) {
    let mut sql = String::from("1 = 1");
    let mut args = Vec::new();
    let mut int = |clause: &str, v: Option<i64>| {
        if let Some(v) = v {
            sql.push_str(clause);
            args.push(SqlValue::Integer(v));
        }
    };
    int(" AND time_ms >= ?", q.since_ms);
    int(" AND time_ms < ?", q.until_ms);
    int(" AND seq > ?", q.after_seq);
    int(" AND seq <= ?", q.until_seq);
    for (col, v) in [
        ("issuer", &q.issuer),
        ("identity_key", &q.identity_key),
        ("repository", &q.repository),
        ("subject", &q.subject),
        ("target", &q.target),
        ("outcome", &q.outcome),
        ("action", &q.action),
        ("lease_id", &q.lease_id),
        ("request_id", &q.request_id),
    ] {
        if let Some(v) = v {
            sql.push_str(&format!(" AND {col} = ?"));
            args.push(SqlValue::Text(v.clone()));
        }
    }
    if let Some(t) = &q.reason_contains {
        sql.push_str(" AND instr(lower(reason), lower(?)) > 0");
        args.push(SqlValue::Text(t.clone()));
    }
    (sql, args)
}

/// Records matching `q`, in sequence order, at most `limit`.
pub(super) fn query(
    conn: &Connection,
    q: &AuditQuery,
    limit: usize,
) -> Result<Vec<AuditRecord>, StoreError> {
    let (sql, mut args) = query_sql(q);
    args.push(SqlValue::Integer(limit as i64));
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit WHERE {sql} ORDER BY seq LIMIT ?"
        ))
        .map_err(unavailable)?;
    let rows = stmt
        .query_map(params_from_iter(args), row_to_record)
        .map_err(unavailable)?;
    rows.map(|r| r.map_err(unavailable).and_then(|r| r))
        .collect()
}

/// The committed head: `(seq, hash)` of the last record, `(0, GENESIS_HASH)` when empty.
pub(super) fn head(conn: &Connection) -> Result<(i64, String), StoreError> {
    super::load_head(conn)
}

fn row_to_checkpoint(r: &rusqlite::Row<'_>) -> rusqlite::Result<Checkpoint> {
    Ok(Checkpoint {
        id: r.get(0)?,
        seq: r.get(1)?,
        hash: r.get(2)?,
        time_ms: r.get(3)?,
        kid: r.get(4)?,
        signature: r.get(5)?,
    })
}

/// Checkpoints with `id > after`, oldest first, at most `limit`.
pub(super) fn checkpoints(
    conn: &Connection,
    after: i64,
    limit: usize,
) -> Result<Vec<Checkpoint>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT id, seq, hash, time_ms, kid, signature FROM audit_checkpoints WHERE id > ?1 ORDER BY id LIMIT ?2")
        .map_err(unavailable)?;
    let rows = stmt
        .query_map(params![after, limit as i64], row_to_checkpoint)
        .map_err(unavailable)?;
    rows.map(|r| r.map_err(unavailable)).collect()
}

/// The newest checkpoint.
pub(super) fn newest_checkpoint(conn: &Connection) -> Result<Option<Checkpoint>, StoreError> {
    conn.query_row(
        "SELECT id, seq, hash, time_ms, kid, signature FROM audit_checkpoints ORDER BY id DESC LIMIT 1",
        [],
        row_to_checkpoint,
    )
    .optional()
    .map_err(unavailable)
}

/// Stores a checkpoint. Refused unless it is the next id and attests a record the log
/// has, with that record's hash.
pub(super) fn insert_checkpoint(conn: &Connection, c: &Checkpoint) -> Result<(), StoreError> {
    let last = newest_checkpoint(conn)?.map(|c| c.id).unwrap_or(0);
    if c.id != last + 1 {
        return Err(StoreError::Unavailable(format!(
            "checkpoint {} is not the next one after {last}",
            c.id
        )));
    }
    let hash: Option<String> = conn
        .query_row(
            "SELECT hash FROM audit WHERE seq = ?1",
            params![c.seq],
            |r| r.get(0),
        )
        .optional()
        .map_err(unavailable)?;
    if hash.as_deref() != Some(c.hash.as_str()) {
        return Err(StoreError::Corrupt(format!(
            "checkpoint {} does not match record {}",
            c.id, c.seq
        )));
    }
    conn.execute(
        "INSERT INTO audit_checkpoints (id, seq, hash, time_ms, kid, signature) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![c.id, c.seq, c.hash, c.time_ms, c.kid, c.signature],
    )
    .map_err(unavailable)?;
    Ok(())
}

/// Every stored audit key.
pub(super) fn audit_keys(conn: &Connection) -> Result<Vec<StoredAuditKey>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT kid, created_at, public, sealed FROM audit_keys ORDER BY created_at, kid",
        )
        .map_err(unavailable)?;
    let rows = stmt
        .query_map([], |r| {
            Ok(StoredAuditKey {
                kid: r.get(0)?,
                created_at: r.get(1)?,
                public: r.get(2)?,
                sealed: r.get(3)?,
            })
        })
        .map_err(unavailable)?;
    rows.map(|r| r.map_err(unavailable)).collect()
}

/// Adds an audit key.
pub(super) fn insert_audit_key(conn: &Connection, k: &StoredAuditKey) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO audit_keys (kid, created_at, public, sealed) VALUES (?1, ?2, ?3, ?4)",
        params![k.kid, k.created_at, k.public, k.sealed],
    )
    .map(|_| ())
    .map_err(unavailable)
}

/// A meta value as an integer (0 when unset).
pub(super) fn meta_int(conn: &Connection, key: &str) -> Result<i64, StoreError> {
    let v: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
            r.get(0)
        })
        .optional()
        .map_err(unavailable)?;
    Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// Sets a meta value.
pub(super) fn set_meta_int(conn: &Connection, key: &str, v: i64) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key, v.to_string()],
    )
    .map(|_| ())
    .map_err(unavailable)
}

/// Opens a database file read-only for verification. Fails when it is not a Latchkey
/// store.
pub fn open_read_only(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| StoreError::Unavailable(format!("{}: {}", path.display(), unavailable(e))))?;
    let has_audit: bool = conn
        .query_row(
            "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'audit'",
            [],
            |r| r.get(0),
        )
        .map_err(|_| StoreError::Corrupt(format!("{} is not a SQLite database", path.display())))?;
    if !has_audit {
        return Err(StoreError::Corrupt(format!(
            "{} has no audit table: not a Latchkey store",
            path.display()
        )));
    }
    Ok(conn)
}

/// Walks every record and checkpoint of the store on `conn`.
pub fn verify_conn(conn: &Connection, opts: &VerifyOptions) -> Result<Report, StoreError> {
    let keys = match &opts.keys {
        Some(k) => k.clone(),
        None => CheckpointKeys::new(
            audit_keys(conn)
                .or_else(|_| Ok::<_, StoreError>(Vec::new()))?
                .into_iter()
                .map(|k| (k.kid, k.public)),
        ),
    };
    let stored = checkpoints(conn, 0, usize::MAX >> 1).unwrap_or_default();
    if !opts.witnessed.is_empty() {
        let at = |seq: i64| -> Option<String> {
            conn.query_row("SELECT hash FROM audit WHERE seq = ?1", params![seq], |r| {
                r.get(0)
            })
            .ok()
        };
        if let Some(p) = check_witness(&opts.witnessed, &stored, &keys, at) {
            let mut w = Walker::whole(Vec::new(), &keys);
            let report = {
                // Still report how far the chain itself is intact.
                walk_rows(conn, &mut w)?;
                w.finish()
            };
            return Ok(Report {
                problem: Some(p),
                ..report
            });
        }
    }
    let mut w = Walker::whole(stored, &keys);
    walk_rows(conn, &mut w)?;
    Ok(w.finish())
}

fn walk_rows(conn: &Connection, w: &mut Walker) -> Result<(), StoreError> {
    if w.failed() {
        return Ok(());
    }
    let mut stmt = conn
        .prepare(&format!("SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq"))
        .map_err(unavailable)?;
    let mut rows = stmt.query([]).map_err(unavailable)?;
    while let Some(r) = rows.next().map_err(unavailable)? {
        let seq: i64 = r.get(0).map_err(unavailable)?;
        let corrupt = |what: &str| StoreError::Corrupt(format!("audit record {seq}: {what}"));
        let text = |i: usize| -> Result<&str, StoreError> {
            r.get_ref(i)
                .map_err(unavailable)?
                .as_str()
                .map_err(|_| corrupt("a text column holds something else"))
        };
        let opt = |i: usize| -> Result<Option<&str>, StoreError> {
            r.get_ref(i)
                .map_err(unavailable)?
                .as_str_or_null()
                .map_err(|_| corrupt("a text column holds something else"))
        };
        let raw = |i: usize| -> Result<&RawValue, StoreError> {
            serde_json::from_str::<&RawValue>(text(i)?)
                .map_err(|_| corrupt("a JSON column is not JSON"))
        };
        let entry = RawEntry {
            time_ms: r.get(1).map_err(unavailable)?,
            request_id: text(2)?,
            action: text(3)?,
            outcome: text(4)?,
            issuer: opt(5)?,
            identity_key: opt(6)?,
            subject: opt(7)?,
            repository: opt(8)?,
            git_ref: opt(9)?,
            environment: opt(10)?,
            pipeline: opt(11)?,
            token_fingerprint: opt(12)?,
            target: opt(13)?,
            requested_scopes: raw(14)?,
            granted_scopes: raw(15)?,
            ttl_secs: r.get(16).map_err(unavailable)?,
            rule: opt(17)?,
            reason: opt(18)?,
            lease_id: opt(19)?,
            credential_jti: opt(20)?,
            credential_fingerprint: opt(21)?,
            context: raw(22)?,
            claims: raw(23)?,
        };
        let prev_hash = text(24)?;
        let hash = text(25)?;
        if !w.step(seq, prev_hash, hash, |s| {
            raw_record_hash(s, prev_hash, &entry)
        }) {
            break;
        }
    }
    Ok(())
}

/// Verifies a database file offline (open a copy, not the live file, if the broker is
/// running on it). Fails only when the file cannot be read as a Latchkey store; a
/// tampered log is a [`Report`] with a problem.
pub fn verify_file(path: &Path, opts: &VerifyOptions) -> Result<Report, StoreError> {
    let conn = open_read_only(path)?;
    verify_conn(&conn, opts)
}

/// Records of a database file matching `q`, for offline export, at most `limit`.
pub fn query_file(
    path: &Path,
    q: &AuditQuery,
    limit: usize,
) -> Result<Vec<AuditRecord>, StoreError> {
    let conn = open_read_only(path)?;
    query(&conn, q, limit)
}
