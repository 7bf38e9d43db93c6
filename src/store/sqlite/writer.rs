//! The one writer thread: commands, group commit, and the statements of each write (audit append, mint with its guard, lease changes, rotation steps).

use super::*;

pub(super) const MAX_BATCH: usize = 1024;

pub(super) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// An audit entry with its JSON already rendered on the caller's thread, so the one
/// writer thread only chains, hashes and inserts.
pub(super) struct Prepared {
    pub(super) entry: AuditEntry,
    /// SHA-256 of the entry's canonical JSON: the part of the hash input that does not
    /// depend on the record's place in the chain, hashed by the caller, not the writer.
    pub(super) entry_sha256: [u8; 32],
    pub(super) requested_scopes: String,
    pub(super) granted_scopes: String,
    pub(super) context: String,
    pub(super) claims: String,
    /// The keys of its search terms.
    pub(super) terms: audit::RecordTerms,
}

impl Prepared {
    pub(super) fn new(entry: AuditEntry) -> Prepared {
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
pub(super) struct MintWrite {
    pub(super) lease: LeaseRecord,
    pub(super) guard: MintGuard,
    pub(super) entry: Prepared,
    pub(super) now: i64,
}

/// Writes that share one transaction (group commit).
pub(super) enum Write {
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
pub(super) struct PreparedStep {
    pub(super) step: crate::store::RotationStep,
    pub(super) audit: Vec<Prepared>,
}

/// What a write produced, before the transaction commits.
pub(super) enum Done {
    Append(Appended),
    Mint(Result<Appended, CommitError>),
    Changes(Vec<bool>),
    Rotation,
}

pub(super) type ReadFn = Box<dyn FnOnce(&Connection) + Send>;

pub(super) enum Cmd {
    Write(Write),
    Read(ReadFn),
    InsertKey(Box<StoredKey>, Reply<()>),
    CheckWritable(Reply<()>),
}
pub(super) struct Writer {
    pub(super) conn: Connection,
    /// How long a commit waits on a lock held elsewhere (`[store] busy_timeout`).
    pub(super) busy: Duration,
    pub(super) head: (i64, String),
    /// Records up to this sequence number have their search terms indexed.
    pub(super) terms_through: i64,
    /// The terms of records this writer committed and has not indexed yet, from record
    /// `pending_from` on (see [`Writer::remember`]).
    pub(super) pending: Vec<audit::RecordTerms>,
    pub(super) pending_from: i64,
    /// The log's size, and the folding of it back into the database.
    pub(super) wal: wal::WalWatch,
    /// Whether the last attempt to index terms failed (logged once, not per retry).
    pub(super) terms_failing: bool,
    /// Tells followers (tail, checkpointer) the committed head moved.
    pub(super) notify: Arc<watch::Sender<i64>>,
    pub(super) metrics: Arc<std::sync::OnceLock<crate::metrics::StoreMetrics>>,
    /// Failed commits, logged at most once per [`FAILURE_LOG_EVERY`].
    pub(super) failures: FailureLog,
}

/// How often a run of failed commits is logged (the first at once, then a summary).
pub(super) const FAILURE_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Failed commits are logged once per [`FAILURE_LOG_EVERY`], with how many failed
/// since the last line: a store outage under load fails a batch every few milliseconds,
/// and one line each would bury everything else in the log.
#[derive(Debug, Default)]
pub(super) struct FailureLog {
    last: Option<std::time::Instant>,
    since: u64,
}

impl FailureLog {
    /// Whether to log this failure now, and how many went unlogged before it.
    pub(super) fn record(&mut self, now: std::time::Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.duration_since(t) < FAILURE_LOG_EVERY => {
                self.since += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.since))
            }
        }
    }

    /// A commit worked: the next failure is logged at once.
    pub(super) fn recovered(&mut self) -> Option<u64> {
        self.last.take().map(|_| std::mem::take(&mut self.since))
    }
}

impl Writer {
    pub(super) fn run(mut self, rx: mpsc::Receiver<Cmd>) {
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
                if let Some(e) = self.write_batch(batch) {
                    // The lock is held elsewhere and this batch waited the whole busy
                    // timeout: the writes that queued meanwhile fail now instead of each
                    // batch waiting it again, so no write waits more than one timeout.
                    // Writes arriving from now on try the lock afresh.
                    loop {
                        match rx.try_recv() {
                            Ok(Cmd::Write(w)) => fail_write(w, &e),
                            Ok(other) => deferred.push(other),
                            Err(_) => break,
                        }
                    }
                }
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

    /// Commits a batch; answers the error when it failed for a lock held elsewhere (the
    /// busy timeout ran out), so the writes queued meanwhile can be failed at once.
    fn write_batch(&mut self, batch: Vec<Write>) -> Option<StoreError> {
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
                if let Some(unlogged) = self.failures.recovered() {
                    tracing::warn!(unlogged_failures = unlogged, "store commits work again");
                }
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
                if let Some(unlogged) = self.failures.record(std::time::Instant::now()) {
                    tracing::error!(error = %e, writes = batch.len(), unlogged_failures = unlogged, "store commit failed; requests fail closed (further failures are summarised every 10 s)");
                }
                // The transaction rolled back; re-read the head in case of partial state.
                if let Ok(h) = load_head(&self.conn) {
                    self.head = h;
                }
                for w in batch {
                    fail_write(w, &e);
                }
                return is_locked(&e).then_some(e);
            }
        }
        None
    }

    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Write(w) => {
                self.write_batch(vec![w]);
            }
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
                // A readiness check must not hold the writer for a whole busy timeout
                // while another process has the lock: it asks briefly.
                let _ = self.conn.busy_timeout(Duration::from_millis(100));
                let res = self
                    .conn
                    .execute_batch("BEGIN IMMEDIATE; INSERT OR REPLACE INTO meta(key, value) VALUES ('last_write_check', strftime('%s','now')); COMMIT;")
                    .map_err(|e| {
                        let _ = self.conn.execute_batch("ROLLBACK");
                        unavailable(e)
                    });
                let _ = self.conn.busy_timeout(self.busy);
                let _ = r.send(res);
            }
        }
    }
}

/// The chain's head while a transaction writes, and the terms of the records it added.
pub(super) struct Chain {
    pub(super) seq: i64,
    pub(super) hash: String,
    pub(super) added: Vec<audit::RecordTerms>,
}

/// Appends one audit record after the chain's head and moves the head to it.
pub(super) fn append_row(
    conn: &Connection,
    chain: &mut Chain,
    p: &Prepared,
) -> Result<Appended, StoreError> {
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
pub(super) fn check_guard(
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

pub(super) fn apply_mint(
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

pub(super) fn insert_lease(conn: &Connection, l: &LeaseRecord) -> Result<(), StoreError> {
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
pub(super) fn apply_rotation(
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

pub(super) fn apply_changes(
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

/// Answers a write that was not committed with `e`.
fn fail_write(w: Write, e: &StoreError) {
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

/// Whether a commit failed because another connection holds the database's lock.
fn is_locked(e: &StoreError) -> bool {
    matches!(e, StoreError::Unavailable(m) if m.contains("locked") || m.contains("busy"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_run_of_failures_is_one_line_per_period_with_a_count() {
        let mut f = FailureLog::default();
        let t0 = Instant::now();
        assert_eq!(f.record(t0), Some(0), "the first is logged at once");
        for i in 1..=500 {
            assert_eq!(f.record(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(f.record(t0 + FAILURE_LOG_EVERY), Some(500));
        assert_eq!(f.record(t0 + FAILURE_LOG_EVERY), None);
        assert_eq!(f.recovered(), Some(1));
        assert_eq!(f.recovered(), None);
        assert_eq!(
            f.record(t0 + FAILURE_LOG_EVERY),
            Some(0),
            "after recovery, at once"
        );
    }
}
