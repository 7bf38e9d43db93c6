//! The schema, the column lists, opening a connection (pragmas, schema, migrations) and loading the chain head.

use super::*;

pub(super) const SCHEMA: &str = r#"
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

pub(super) const AUDIT_COLUMNS: &str = "seq, time_ms, request_id, action, outcome, issuer, identity_key, subject, repository, git_ref, environment, pipeline, token_fingerprint, target, requested_scopes, granted_scopes, ttl_secs, rule, reason, lease_id, credential_jti, credential_fingerprint, context, claims, prev_hash, hash";

pub(super) const LEASE_COLUMNS: &str = "id, issuer, identity_key, subject, repository, target, kind, rule, scopes, issued_at, expires_at, max_expires_at, renew_count, state, revoked_at, secret_hash, claims, upstream, attempts, next_attempt_at, last_error";

/// Largest number of writes one transaction commits.
pub(super) fn open_conn(path: &Path, busy: Duration) -> Result<Connection, StoreError> {
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
    // Each time the log starts over, the WAL file is cut back to this size (it peaks at
    // `wal::RESTART_FRAMES` pages under sustained writes).
    conn.pragma_update(None, "journal_size_limit", super::wal::JOURNAL_SIZE_LIMIT)
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

pub(super) fn load_head(conn: &Connection) -> Result<(i64, String), StoreError> {
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
pub(super) fn migrate_signing_keys(conn: &Connection) -> Result<(), StoreError> {
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
