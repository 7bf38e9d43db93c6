//! The audit side of the SQLite store: filtered queries, checkpoints, the audit key, and
//! verification straight from the rows.
//!
//! Verification reads each row's columns as borrowed bytes and hashes them through
//! [`crate::audit::StoredEntry`], which writes exactly what `serde_json` writes for an
//! [`crate::audit::AuditEntry`]: nothing is parsed or allocated per record beyond the
//! hash; each JSON column only has its end checked ([`crate::audit::one_json_value`]).
//! It runs on its own read-only connection, so the writer (and Mint) never waits for it.

use super::{row_to_record, unavailable, AUDIT_COLUMNS};
use crate::audit::checkpoint::{Checkpoint, CheckpointKeys};
use crate::audit::verify::{
    check_checkpoints, check_witness, join_reports, Report, Tamper, VerifyOptions, Walker,
};
use crate::audit::{
    one_json_value, stored_entry_json, AuditEntry, AuditQuery, AuditRecord, HashCheck, StoredEntry,
    GENESIS_HASH,
};
use crate::store::{StoreError, StoredAuditKey};
use rusqlite::types::Value as SqlValue;
use rusqlite::{params, params_from_iter, Connection, OpenFlags, OptionalExtension};
use std::path::Path;

pub(super) const AUDIT_SCHEMA: &str = r#"
DROP INDEX IF EXISTS audit_identity;
DROP INDEX IF EXISTS audit_repository;
DROP INDEX IF EXISTS audit_subject;
DROP TABLE IF EXISTS audit_terms;
DELETE FROM meta WHERE key = 'audit_terms_through';
CREATE TABLE IF NOT EXISTS audit_runs (
    run INTEGER PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    min_time_ms INTEGER NOT NULL,
    max_time_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_run_keys (
    run INTEGER NOT NULL,
    term INTEGER NOT NULL,
    PRIMARY KEY (run, term)
) WITHOUT ROWID;
DROP INDEX IF EXISTS audit_issuer;
DROP INDEX IF EXISTS audit_target;
DROP INDEX IF EXISTS audit_lease;
DROP INDEX IF EXISTS audit_request;
DROP INDEX IF EXISTS audit_time;
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

/// Records per run: the writer indexes the search terms of each complete run of this many
/// records in one transaction; queries scan the records of the incomplete run.
pub(super) const TERMS_RUN: i64 = if cfg!(test) { 4 } else { 2048 };
/// How long the writer waits before retrying a run it could not index.
pub(super) const TERMS_RETRY: std::time::Duration = std::time::Duration::from_millis(250);

/// Identity key, repository and subject have thousands of values (a Bitbucket subject is
/// new for every step). As ordinary indexes, every group commit dirtied one index page
/// per record per index and wrote it to the WAL: appends ran at a quarter of their speed
/// with them. Keyed by value, even sorted batches of terms landed all over a tree larger
/// than the page cache. So terms are keyed by run first: the writer appends each complete
/// run of [`TERMS_RUN`] records as one sorted, contiguous slice at the end of
/// `audit_run_keys`, with its sequence and time range in `audit_runs`; a query seeks
/// (run, key) in each run of its time range and scans the incomplete run.
/// Derived data: `verify` never reads it, and a damaged term hides a record from a filter
/// but not from the chain.
///
/// Issuer, target, lease id and request id are terms too: as indexes each cost a B-tree
/// insert and a dirty page per group commit, on the one writer thread.
///
/// A term is stored as one integer: the 47-bit key of its field and value ([`term_key`],
/// hashed on the caller's thread) and the record's place in its run. The writer keeps
/// the keys of the records it appended and inserts a complete run as one sorted array:
/// it never reads the records back (only after a restart, [`terms_of_rows`]). Two terms
/// may share a key; a query re-checks every filter on the record itself, so a shared key
/// only costs a candidate.
const TERM_COLUMNS: [(i64, &str); 7] = [
    (1, "identity_key"),
    (2, "repository"),
    (3, "subject"),
    (4, "issuer"),
    (5, "target"),
    (6, "lease_id"),
    (7, "request_id"),
];

/// Bits of a term's key: the packed term is `key << 16 | offset`, a positive integer.
const KEY_BITS: u32 = 47;

/// The key of a search term: the first 47 bits of SHA-256 over the field number and the
/// value (stable across versions and machines; nobody can choose values that share a key
/// with someone else's, which would only slow their queries anyway).
pub(super) fn term_key(field: i64, value: &str) -> i64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&[field as u8]);
    ctx.update(value.as_bytes());
    let d = ctx.finish();
    let mut k = [0u8; 8];
    k.copy_from_slice(&d.as_ref()[..8]);
    (u64::from_be_bytes(k) >> (64 - KEY_BITS)) as i64
}

/// What a run needs of one record: its time and the keys of its terms
/// ([`TERM_COLUMNS`] order; [`NO_TERM`] where the field is empty). Computed on the
/// caller's thread as the record is prepared, so the writer only sorts and inserts.
#[derive(Debug, Clone, Copy)]
pub(super) struct RecordTerms {
    pub(super) time_ms: i64,
    keys: [i64; TERM_COLUMNS.len()],
}

/// A field without a value.
const NO_TERM: i64 = -1;

impl RecordTerms {
    pub(super) fn of(e: &AuditEntry) -> RecordTerms {
        let values = [
            e.identity_key.as_deref(),
            e.repository.as_deref(),
            e.subject.as_deref(),
            e.issuer.as_deref(),
            e.target.as_deref(),
            e.lease_id.as_deref(),
            Some(e.request_id.as_str()),
        ];
        RecordTerms::from_values(e.time_ms, values)
    }

    fn from_values(time_ms: i64, values: [Option<&str>; TERM_COLUMNS.len()]) -> RecordTerms {
        let mut keys = [NO_TERM; TERM_COLUMNS.len()];
        for ((k, v), (field, _)) in keys.iter_mut().zip(values).zip(TERM_COLUMNS) {
            if let Some(v) = v {
                *k = term_key(field, v);
            }
        }
        RecordTerms { time_ms, keys }
    }
}

/// Loads `rarray` (a run's terms are inserted as one array) on the writer's connection,
/// and moves a store written with terms as text (`audit_run_terms`) to keys: its runs
/// are indexed again, one per turn.
pub(super) fn prepare_terms(conn: &Connection) -> Result<(), StoreError> {
    rusqlite::vtab::array::load_module(conn).map_err(unavailable)?;
    let old: bool = conn
        .query_row(
            "SELECT COUNT(*) > 0 FROM sqlite_master WHERE name = 'audit_run_terms'",
            [],
            |r| r.get(0),
        )
        .map_err(unavailable)?;
    if old {
        conn.execute_batch(
            "BEGIN IMMEDIATE; DROP TABLE audit_run_terms; DELETE FROM audit_run_keys; DELETE FROM audit_runs; COMMIT;",
        )
        .map_err(unavailable)?;
    }
    Ok(())
}

/// The last record whose terms are indexed (0 when none are).
pub(super) fn terms_through(conn: &Connection) -> Result<i64, StoreError> {
    conn.query_row(&format!("SELECT {LAST_INDEXED}"), [], |r| r.get(0))
        .map_err(unavailable)
}

/// The terms of the stored records `first..=last`, read back from the rows (after a
/// restart, or when the writer did not see them appended).
pub(super) fn terms_of_rows(
    conn: &Connection,
    first: i64,
    last: i64,
) -> Result<Vec<RecordTerms>, StoreError> {
    let cols = TERM_COLUMNS
        .iter()
        .map(|(_, c)| *c)
        .collect::<Vec<_>>()
        .join(", ");
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT seq, time_ms, {cols} FROM audit WHERE seq >= ?1 AND seq <= ?2 ORDER BY seq"
        ))
        .map_err(unavailable)?;
    let mut rows = stmt.query(params![first, last]).map_err(unavailable)?;
    let mut out = Vec::with_capacity((last - first + 1).clamp(0, TERMS_RUN) as usize);
    let mut expect = first;
    while let Some(r) = rows.next().map_err(unavailable)? {
        let seq: i64 = r.get(0).map_err(unavailable)?;
        if seq != expect {
            return Err(StoreError::Corrupt(format!(
                "audit record {expect} is missing"
            )));
        }
        expect += 1;
        let mut values = [None; TERM_COLUMNS.len()];
        for (i, v) in values.iter_mut().enumerate() {
            *v = r
                .get_ref(2 + i)
                .map_err(unavailable)?
                .as_str_or_null()
                .ok()
                .flatten();
        }
        out.push(RecordTerms::from_values(
            r.get(1).map_err(unavailable)?,
            values,
        ));
    }
    Ok(out)
}

/// Indexes the search terms of the run of records `first..=last` (`records` holds them
/// in order) in one transaction: each term packed with the record's place in the run as
/// `key << 16 | offset`, sorted, inserted as one array at the end of `audit_run_keys`.
pub(super) fn index_run(
    conn: &mut Connection,
    first: i64,
    last: i64,
    records: &[RecordTerms],
) -> Result<(), StoreError> {
    if records.len() as i64 != last - first + 1 {
        return Err(StoreError::Unavailable(format!(
            "run {first}..={last} has {} records",
            records.len()
        )));
    }
    let mut terms: Vec<i64> = Vec::with_capacity(records.len() * TERM_COLUMNS.len());
    let (mut min_time, mut max_time) = (i64::MAX, i64::MIN);
    for (offset, r) in records.iter().enumerate() {
        min_time = min_time.min(r.time_ms);
        max_time = max_time.max(r.time_ms);
        terms.extend(
            r.keys
                .iter()
                .filter(|k| **k != NO_TERM)
                .map(|k| k << 16 | offset as i64),
        );
    }
    terms.sort_unstable();
    // Two fields of one record may share a key.
    terms.dedup();
    let terms: rusqlite::vtab::array::Array =
        std::rc::Rc::new(terms.into_iter().map(SqlValue::Integer).collect());
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(unavailable)?;
    tx.prepare_cached("INSERT INTO audit_run_keys (run, term) SELECT ?1, value FROM rarray(?2)")
        .and_then(|mut s| s.execute(params![first, terms]))
        .map_err(unavailable)?;
    tx.prepare_cached(
        "INSERT INTO audit_runs (run, last_seq, min_time_ms, max_time_ms) VALUES (?1, ?2, ?3, ?4)",
    )
    .and_then(|mut s| s.execute(params![first, last, min_time, max_time]))
    .map_err(unavailable)?;
    tx.commit().map_err(unavailable)
}

/// The WHERE clause (without `WHERE`) and its arguments for a query. With `by_term`, the
/// record set comes from a search term, so no other index may drive the query (`+col`).
fn query_sql(q: &AuditQuery, by_term: bool) -> (String, Vec<SqlValue>) {
    let mut sql = String::from("1 = 1");
    let mut args = Vec::new();
    let plus = if by_term { "+" } else { "" };
    let mut int = |clause: &str, v: Option<i64>| {
        if let Some(v) = v {
            sql.push_str(&format!(" AND {plus}{clause}"));
            args.push(SqlValue::Integer(v));
        }
    };
    int("time_ms >= ?", q.since_ms);
    int("time_ms < ?", q.until_ms);
    int("seq > ?", q.after_seq);
    int("seq <= ?", q.until_seq);
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
            sql.push_str(&format!(" AND {plus}{col} = ?"));
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
    let (sql, args) = query_statement(q, limit);
    let mut stmt = conn.prepare_cached(&sql).map_err(unavailable)?;
    let rows = stmt
        .query_map(params_from_iter(args), row_to_record)
        .map_err(unavailable)?;
    rows.map(|r| r.map_err(unavailable).and_then(|r| r))
        .collect()
}

/// SQLite's plan for a query (`EXPLAIN QUERY PLAN`, one line per step).
#[cfg(test)]
pub(super) fn plan(conn: &Connection, q: &AuditQuery) -> String {
    let (sql, args) = query_statement(q, 100);
    let mut stmt = conn
        .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
        .expect("plan");
    let rows = stmt
        .query_map(params_from_iter(args), |r| r.get::<_, String>(3))
        .expect("plan");
    rows.map(|r| r.expect("plan row"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The last record of the indexed runs (0 when none), in SQL.
const LAST_INDEXED: &str =
    "(SELECT COALESCE((SELECT last_seq FROM audit_runs ORDER BY run DESC LIMIT 1), 0))";

/// The statement and arguments of a query.
fn query_statement(q: &AuditQuery, limit: usize) -> (String, Vec<SqlValue>) {
    // The most selective term the query has drives it.
    let term = [
        ("lease_id", &q.lease_id),
        ("request_id", &q.request_id),
        ("subject", &q.subject),
        ("identity_key", &q.identity_key),
        ("repository", &q.repository),
        ("target", &q.target),
        ("issuer", &q.issuer),
    ]
    .into_iter()
    .find_map(|(col, v)| {
        let field = TERM_COLUMNS.iter().find(|(_, c)| *c == col)?.0;
        v.as_ref().map(|v| (field, v))
    });
    let window = q.since_ms.is_some() || q.until_ms.is_some();
    // Records come from the terms or the runs' bounds: no other index may drive.
    let (sql, mut args) = query_sql(q, term.is_some() || window);
    let sql = match term {
        // A time window without a term: the runs bound it (each run's time range is
        // known), plus every record after the indexed runs. Times are not in sequence
        // order (a record's time is its decision's, before a slow upstream call), so a
        // window starts at the first run reaching it and ends after the last run starting
        // in it.
        None if window => {
            let filter_args = std::mem::take(&mut args);
            let lo = match q.since_ms {
                Some(since) => {
                    args.push(SqlValue::Integer(since));
                    format!(
                        "COALESCE((SELECT MIN(run) FROM audit_runs WHERE max_time_ms >= ?), {})",
                        i64::MAX
                    )
                }
                None => "0".to_string(),
            };
            let hi = match q.until_ms {
                Some(until) => {
                    args.push(SqlValue::Integer(until));
                    "COALESCE((SELECT MAX(last_seq) FROM audit_runs WHERE min_time_ms < ?), 0)"
                }
                None => LAST_INDEXED,
            };
            // The filters hold on both parts of the union.
            args.extend(filter_args.iter().cloned());
            args.extend(filter_args);
            format!(
                "SELECT {AUDIT_COLUMNS} FROM audit WHERE seq >= {lo} AND seq <= {hi} AND {sql} \
                 UNION ALL \
                 SELECT {AUDIT_COLUMNS} FROM audit WHERE seq > {LAST_INDEXED} AND {sql} \
                 ORDER BY seq LIMIT ?"
            )
        }
        None => format!("SELECT {AUDIT_COLUMNS} FROM audit WHERE {sql} ORDER BY seq LIMIT ?"),
        Some((field, value)) => {
            // The indexed records carrying the term (sought run by run, in the runs that
            // overlap the query), plus every record of the incomplete run; the filters
            // then hold on each.
            let mut runs = String::from("SELECT run FROM audit_runs WHERE 1 = 1");
            let mut targs = Vec::new();
            for (clause, v) in [
                (" AND max_time_ms >= ?", q.since_ms),
                (" AND min_time_ms < ?", q.until_ms),
                (" AND last_seq > ?", q.after_seq),
                (" AND run <= ?", q.until_seq),
            ] {
                if let Some(v) = v {
                    runs.push_str(clause);
                    targs.push(SqlValue::Integer(v));
                }
            }
            let lo = term_key(field, value) << 16;
            targs.push(SqlValue::Integer(lo));
            targs.push(SqlValue::Integer(lo | 0xffff));
            targs.append(&mut args);
            args = targs;
            format!(
                "SELECT {AUDIT_COLUMNS} FROM audit WHERE seq IN (\
                   SELECT run + (term & 65535) FROM audit_run_keys WHERE run IN ({runs}) AND term >= ? AND term <= ? \
                   UNION ALL SELECT seq FROM audit WHERE seq > {LAST_INDEXED}\
                 ) AND {sql} ORDER BY seq LIMIT ?"
            )
        }
    };
    args.push(SqlValue::Integer(limit as i64));
    (sql, args)
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

/// The hash of audit record `seq`, if the log has it.
pub(super) fn record_hash_at(conn: &Connection, seq: i64) -> Result<Option<String>, StoreError> {
    conn.query_row("SELECT hash FROM audit WHERE seq = ?1", params![seq], |r| {
        r.get(0)
    })
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
    let hash = record_hash_at(conn, c.seq)?;
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
    // A reader waits only for the brief WAL index locks, never for a writer.
    let _ = conn.busy_timeout(std::time::Duration::from_secs(1));
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

/// The audit keys to check with: pinned ones, else those stored in the file.
fn keys_for(conn: &Connection, opts: &VerifyOptions) -> CheckpointKeys {
    match &opts.keys {
        Some(k) => k.clone(),
        None => CheckpointKeys::new(
            audit_keys(conn)
                .unwrap_or_default()
                .into_iter()
                .map(|k| (k.kid, k.public)),
        ),
    }
}

/// Walks the records with `lo <= seq <= hi` (each row hashed from its borrowed columns).
/// A row whose columns do not have the types that were written (text, integer, null) is
/// reported as edited.
fn walk_rows(conn: &Connection, w: &mut Walker, lo: i64, hi: i64) -> Result<(), StoreError> {
    if w.failed() {
        return Ok(());
    }
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit WHERE seq >= ?1 AND seq <= ?2 ORDER BY seq"
        ))
        .map_err(unavailable)?;
    let mut rows = stmt.query(params![lo, hi]).map_err(unavailable)?;
    let (mut buf, mut check) = (Vec::with_capacity(4096), HashCheck::default());
    while let Some(r) = rows.next().map_err(unavailable)? {
        let seq: i64 = r.get(0).unwrap_or(0);
        match step_row(r, w, &mut buf, &mut check) {
            Ok(true) => {}
            Ok(false) => break,
            Err(()) => {
                w.fail(Tamper::Edited { seq });
                break;
            }
        }
    }
    Ok(())
}

/// One row into the walker; `Err` when a column does not hold the type written.
fn step_row(
    r: &rusqlite::Row<'_>,
    w: &mut Walker,
    buf: &mut Vec<u8>,
    check: &mut HashCheck,
) -> Result<bool, ()> {
    use rusqlite::types::ValueRef;
    let text = |i: usize| -> Result<&[u8], ()> {
        match r.get_ref(i) {
            Ok(ValueRef::Text(t)) => Ok(t),
            _ => Err(()),
        }
    };
    let opt = |i: usize| -> Result<Option<&[u8]>, ()> {
        match r.get_ref(i) {
            Ok(ValueRef::Text(t)) => Ok(Some(t)),
            Ok(ValueRef::Null) => Ok(None),
            _ => Err(()),
        }
    };
    // A JSON column must hold one JSON value: the four are hashed as they are, side by
    // side, and only their own ends keep bytes from being moved from one into the next
    // (a caller's context holding `,"claims":` would otherwise let an attacker shift text
    // between context and claims without changing the hash).
    let json = |i: usize| -> Result<&[u8], ()> {
        let t = text(i)?;
        if one_json_value(t) {
            Ok(t)
        } else {
            Err(())
        }
    };
    let int = |i: usize| -> Result<Option<i64>, ()> {
        match r.get_ref(i) {
            Ok(ValueRef::Integer(v)) => Ok(Some(v)),
            Ok(ValueRef::Null) => Ok(None),
            _ => Err(()),
        }
    };
    let seq = int(0)?.ok_or(())?;
    let entry = StoredEntry {
        time_ms: int(1)?.ok_or(())?,
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
        requested_scopes: json(14)?,
        granted_scopes: json(15)?,
        ttl_secs: int(16)?,
        rule: opt(17)?,
        reason: opt(18)?,
        lease_id: opt(19)?,
        credential_jti: opt(20)?,
        credential_fingerprint: opt(21)?,
        context: json(22)?,
        claims: json(23)?,
    };
    let prev_hash = text(24)?;
    let hash = std::str::from_utf8(text(25)?).map_err(|_| ())?;
    let prev = std::str::from_utf8(prev_hash).map_err(|_| ())?;
    stored_entry_json(buf, &entry);
    Ok(w.step(seq, prev, hash, |s| check.matches(s, prev_hash, buf, hash)))
}

/// Walks every record and checkpoint of the store at `path`: the records in `parts`
/// consecutive ranges walked at once, each on its own read-only connection, joined into
/// one report (0 parts: one per core for large logs).
pub fn verify_in_parts(
    path: &Path,
    opts: &VerifyOptions,
    parts: usize,
) -> Result<Report, StoreError> {
    let conn = open_read_only(path)?;
    let keys = keys_for(&conn, opts);
    let stored = checkpoints(&conn, 0, i64::MAX as usize)?;
    let (first, last): (Option<i64>, Option<i64>) = conn
        .query_row("SELECT MIN(seq), MAX(seq) FROM audit", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .map_err(unavailable)?;
    let total = stored.len() as u64;
    let fail = |p: Tamper| Report {
        records: 0,
        head_seq: 0,
        head_hash: GENESIS_HASH.to_string(),
        last_checkpoint: None,
        checkpoints: total,
        unattested: 0,
        problem: Some(p),
    };
    if let Err(p) = check_checkpoints(&stored, &keys) {
        return Ok(fail(p));
    }
    if !opts.witnessed.is_empty() {
        let at = |seq: i64| -> Option<String> {
            conn.query_row("SELECT hash FROM audit WHERE seq = ?1", params![seq], |r| {
                r.get(0)
            })
            .ok()
        };
        if let Some(p) = check_witness(&opts.witnessed, &stored, &keys, at) {
            return Ok(fail(p));
        }
    }
    let (Some(first), Some(last)) = (first, last) else {
        let mut w = Walker::new_checked(0, GENESIS_HASH, stored);
        walk_rows(&conn, &mut w, 1, 0)?;
        return Ok(w.finish());
    };
    // Parts: [1, b1], [b1 + 1, b2], ..., [.., last]. The first part also reads any row
    // numbered below 1 (which only a forger puts there) so it is reported, and starts its
    // chain at 1 whatever the smallest number is, so missing leading records are found.
    let n = match parts {
        0 if last < 100_000 => 1,
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 8),
        n => n,
    };
    let n = (n as i64).clamp(1, last.max(1));
    let bounds: Vec<(i64, i64)> = (0..n)
        .map(|k| {
            let at = |k: i64| (i128::from(last) * i128::from(k) / i128::from(n)) as i64;
            let lo = 1 + at(k);
            let hi = if k == n - 1 { last } else { at(k + 1) };
            (lo, hi)
        })
        .collect();
    let parts: Vec<Result<Report, StoreError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = bounds
            .iter()
            .enumerate()
            .map(|(k, &(lo, hi))| {
                let mine: Vec<Checkpoint> = stored
                    .iter()
                    .filter(|c| c.seq >= lo && (c.seq <= hi || k as i64 == n - 1))
                    .cloned()
                    .collect();
                let before = stored.iter().rev().find(|c| c.seq < lo).cloned();
                scope.spawn(move || -> Result<Report, StoreError> {
                    let conn = open_read_only(path)?;
                    let prev_hash = if lo == 1 {
                        GENESIS_HASH.to_string()
                    } else {
                        conn.query_row(
                            "SELECT hash FROM audit WHERE seq = ?1",
                            params![lo - 1],
                            |r| r.get(0),
                        )
                        .optional()
                        .map_err(unavailable)?
                        // Missing: the part before reports it.
                        .unwrap_or_default()
                    };
                    let mut cps = mine;
                    if let Some(b) = before {
                        cps.insert(0, b);
                    }
                    let mut w = Walker::new_checked(lo - 1, &prev_hash, cps);
                    walk_rows(&conn, &mut w, if k == 0 { first.min(1) } else { lo }, hi)?;
                    w.expect_through(hi);
                    Ok(w.finish())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(StoreError::Unavailable("verifier thread failed".into()))
                })
            })
            .collect()
    });
    let parts = parts.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(join_reports(parts, total))
}

/// Verifies a database file offline (open a copy, not the live file, if the broker is
/// running on it). Fails only when the file cannot be read as a Latchkey store; a
/// tampered log is a [`Report`] with a problem.
pub fn verify_file(path: &Path, opts: &VerifyOptions) -> Result<Report, StoreError> {
    verify_in_parts(path, opts, 0)
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
