//! Lease rows: filters, reads, purge, and the `Leases` port.

use super::*;

/// The WHERE clause (and its parameters) for a lease filter at `now`.
pub(super) fn filter_sql(f: &LeaseFilter, now: i64) -> (String, Vec<SqlValue>) {
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

pub(super) fn read_leases(
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

pub(super) fn query_leases(
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

pub(super) fn row_to_lease(
    r: &rusqlite::Row<'_>,
) -> rusqlite::Result<Result<LeaseRecord, StoreError>> {
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

pub(super) fn purge(
    conn: &Connection,
    before: i64,
    now: i64,
    limit: usize,
) -> Result<usize, StoreError> {
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
        self.read_only(move |c| {
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
        self.read_only(move |c| read_leases(c, &f, now, after, limit))
            .await
    }

    async fn lease_ids(
        &self,
        filter: &LeaseFilter,
        now: i64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let f = filter.clone();
        self.read_only(move |c| {
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
        self.read_only(move |c| {
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
