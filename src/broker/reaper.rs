//! The reaper: marks leases whose time ran out, revokes upstream what the target cannot
//! expire on its own, retries failed upstream revocations with backoff, reports what is
//! stuck, and purges finished leases past their retention. It reads time from a
//! [`Clock`](crate::clock::Clock), so tests drive it by moving a manual clock.

use crate::audit::AuditEntry;
use crate::clock::SharedClock;
use crate::keys::MasterKey;
use crate::lease::LeaseConfig;
use crate::lease::{backoff, upstream_aad, LeaseChange, LeaseFilter, LeaseRecord, LeaseState};
use crate::mint::Minter;
use crate::secret::SecretString;
use crate::store::{Store, StoreError};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Semaphore};

/// Longest a single upstream revocation may take.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Upstream revocations in flight at once.
const CONCURRENCY: usize = 16;
/// Leases handled per store round trip.
const PAGE: usize = 1000;

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReapReport {
    /// Live leases found past their expiry and marked (or queued for upstream revocation).
    pub expired: usize,
    /// Upstream revocations that succeeded.
    pub revoked_upstream: usize,
    /// Upstream revocations that failed this pass (retried later).
    pub failed: usize,
    /// Leases whose upstream revocation has failed `stuck_after` times or more.
    pub stuck: Vec<String>,
    /// Finished leases deleted after their retention.
    pub purged: usize,
    /// Upstream credentials no lease owned (orphans), removed at their target.
    pub reconciled: usize,
}

struct Inner {
    store: Arc<dyn Store>,
    minters: HashMap<String, Arc<dyn Minter>>,
    master: Arc<MasterKey>,
    cfg: LeaseConfig,
    clock: SharedClock,
}

/// The reaper; cheap to clone.
#[derive(Clone)]
pub struct Reaper(Arc<Inner>);

impl std::fmt::Debug for Reaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reaper")
            .field("targets", &self.0.minters.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Reaper {
    /// A reaper over this store, revoking through these minters (by target name).
    pub fn new(
        store: Arc<dyn Store>,
        minters: HashMap<String, Arc<dyn Minter>>,
        master: Arc<MasterKey>,
        cfg: LeaseConfig,
        clock: SharedClock,
    ) -> Reaper {
        Reaper(Arc::new(Inner {
            store,
            minters,
            master,
            cfg,
            clock,
        }))
    }

    async fn revoke_upstream(&self, l: &LeaseRecord) -> Result<(), String> {
        let minter = self
            .0
            .minters
            .get(&l.target)
            .ok_or_else(|| format!("target {} is no longer configured", l.target))?;
        let handle = match &l.upstream {
            None => None,
            Some(sealed) => {
                let bytes = self
                    .0
                    .master
                    .open(sealed, &upstream_aad(&l.id))
                    .map_err(|_| "upstream handle cannot be opened".to_string())?;
                let s = String::from_utf8(bytes.expose().clone())
                    .map_err(|_| "upstream handle cannot be opened".to_string())?;
                Some(SecretString::new(s))
            }
        };
        match tokio::time::timeout(
            UPSTREAM_TIMEOUT,
            minter.revoke(&l.id, handle.as_ref(), l.expires_at),
        )
        .await
        {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("upstream revocation timed out".into()),
        }
    }

    /// Revokes a `revoking` lease at its target and records the outcome: `revoked` (or
    /// `expired`, when it was the reaper's own expiry) on success, another attempt with
    /// backoff on failure. Answers the failure reason.
    pub async fn settle(&self, l: &LeaseRecord, now: i64) -> Result<(), String> {
        let result = self.revoke_upstream(l).await;
        let mut change = LeaseChange::new(&l.id, LeaseState::Revoking);
        let mut entry = None;
        match &result {
            Ok(()) => {
                let by_expiry = l.revoked_at.is_none();
                change.state = Some(if by_expiry {
                    LeaseState::Expired
                } else {
                    LeaseState::Revoked
                });
                change.next_attempt_at = Some(None);
                change.last_error = Some(None);
                if by_expiry {
                    entry = Some(self.expiry_entry(l));
                }
                tracing::info!(lease_id = %l.id, target = %l.target, "revoked upstream");
            }
            Err(reason) => {
                let attempts = l.attempts.saturating_add(1);
                let wait = backoff(attempts, self.0.cfg.retry_max_backoff).as_secs() as i64;
                change.attempts = Some(attempts);
                change.next_attempt_at = Some(Some(now.saturating_add(wait)));
                change.last_error = Some(Some(reason.chars().take(256).collect()));
                if attempts >= self.0.cfg.stuck_after {
                    tracing::warn!(lease_id = %l.id, target = %l.target, attempts, error = %reason, "upstream revocation stuck; retrying");
                } else {
                    tracing::info!(lease_id = %l.id, target = %l.target, attempts, retry_in_secs = wait, error = %reason, "upstream revocation failed; will retry");
                }
            }
        }
        if let Err(e) = self.0.store.commit_changes(vec![(change, entry)]).await {
            tracing::error!(lease_id = %l.id, error = %e, "cannot record upstream revocation outcome");
        }
        result
    }

    /// [`Reaper::settle`] for many leases, a bounded number at once. Answers the failures
    /// as (lease id, reason).
    pub async fn settle_many(&self, leases: Vec<LeaseRecord>, now: i64) -> Vec<(String, String)> {
        let sem = Arc::new(Semaphore::new(CONCURRENCY));
        let mut set = tokio::task::JoinSet::new();
        for l in leases {
            let me = self.clone();
            let sem = sem.clone();
            set.spawn(async move {
                let _permit = sem.acquire_owned().await;
                let r = me.settle(&l, now).await;
                (l.id, r)
            });
        }
        let mut failed = Vec::new();
        while let Some(done) = set.join_next().await {
            match done {
                Ok((id, Err(reason))) => failed.push((id, reason)),
                Ok((_, Ok(()))) => {}
                Err(e) => tracing::error!(error = %e, "upstream revocation task failed"),
            }
        }
        failed.sort();
        failed
    }

    fn expiry_entry(&self, l: &LeaseRecord) -> AuditEntry {
        AuditEntry {
            time_ms: self.0.clock.now_ms(),
            request_id: format!("reaper-{}", crate::clock::new_id()),
            action: "expire".into(),
            outcome: "allowed".into(),
            issuer: Some(l.issuer.clone()),
            identity_key: Some(l.identity_key.clone()),
            subject: Some(l.subject.clone()),
            repository: l.repository.clone(),
            target: Some(l.target.clone()),
            requested_scopes: l.scopes.clone(),
            granted_scopes: l.scopes.clone(),
            reason: Some("lease expired; revoked at the target".into()),
            lease_id: Some(l.id.clone()),
            credential_jti: Some(l.id.clone()),
            context: [("actor".to_string(), "reaper".to_string())].into(),
            claims: serde_json::Value::Null,
            ..AuditEntry::default()
        }
    }

    /// One pass: expire, retry what is due, purge. Store faults end the pass early.
    pub async fn run_once(&self) -> Result<ReapReport, StoreError> {
        let now = self.0.clock.now();
        let store = &self.0.store;
        let mut report = ReapReport::default();
        loop {
            let due = store.expired_live(now, PAGE).await?;
            let n = due.len();
            let changes = due
                .iter()
                .map(|l| {
                    let mut c = LeaseChange::new(&l.id, LeaseState::Live);
                    if l.upstream.is_some() {
                        // The target will not expire it on its own: revoke it there.
                        c.state = Some(LeaseState::Revoking);
                        c.next_attempt_at = Some(Some(now));
                    } else {
                        c.state = Some(LeaseState::Expired);
                    }
                    (c, None)
                })
                .collect();
            let applied = store.commit_changes(changes).await?;
            report.expired += applied.iter().filter(|a| **a).count();
            if n < PAGE {
                break;
            }
        }
        let due = store.due_revocations(now, PAGE).await?;
        for l in &due {
            if l.attempts + 1 >= self.0.cfg.stuck_after {
                report.stuck.push(l.id.clone());
            }
        }
        let tried = due.len();
        let failed = self.settle_many(due, now).await;
        report.failed = failed.len();
        report.revoked_upstream = tried - failed.len();
        report
            .stuck
            .retain(|id| failed.iter().any(|(f, _)| f == id));
        report.reconciled = self.reconcile(now).await?;
        let retain = i64::try_from(self.0.cfg.retain.as_secs()).unwrap_or(i64::MAX);
        report.purged = store
            .purge(now.saturating_sub(retain), now, 10 * PAGE)
            .await?;
        Ok(report)
    }

    /// Asks each target that can list what the broker created there to remove what no
    /// live lease owns; audits each removal. The handles passed as live are those of
    /// every live lease in the store, of every target (two targets on one upstream, or
    /// replicas whose configurations differ, never lose a live credential to each
    /// other); a handle that cannot be opened stops the pass, since what it owns cannot
    /// be told. An unreachable target is logged and tried again next pass. Answers how
    /// many were removed.
    pub async fn reconcile(&self, now: i64) -> Result<usize, StoreError> {
        let mut removed = 0;
        let mut targets: Vec<(&String, &Arc<dyn Minter>)> = self
            .0
            .minters
            .iter()
            .filter(|(_, m)| m.reconciles())
            .collect();
        if targets.is_empty() {
            return Ok(0);
        }
        targets.sort_by_key(|(t, _)| *t);
        // Live leases only: a lease being revoked (or past its expiry, which this pass
        // has just queued for revocation) loses its credential either way, and dropping
        // it here is the same idempotent revocation.
        let filter = LeaseFilter::default();
        let mut live = std::collections::HashSet::new();
        let mut after = None;
        loop {
            let page = self.0.store.leases(&filter, now, after, PAGE).await?;
            for l in &page {
                if let Some(sealed) = &l.upstream {
                    match self.0.master.open(sealed, &upstream_aad(&l.id)) {
                        Ok(b) => {
                            if let Ok(h) = String::from_utf8(b.expose().clone()) {
                                live.insert(h);
                            }
                        }
                        Err(_) => {
                            // Cannot tell what this lease owns: touch nothing.
                            tracing::warn!(lease_id = %l.id, target = %l.target, "upstream handle cannot be opened; skipping reconciliation");
                            return Ok(0);
                        }
                    }
                }
            }
            if page.len() < PAGE {
                break;
            }
            after = page.last().map(|l| (l.issued_at, l.id.clone()));
        }
        for (target, minter) in targets {
            match tokio::time::timeout(UPSTREAM_TIMEOUT * 4, minter.reconcile(&live, now)).await {
                Ok(Ok(gone)) => {
                    for handle in gone {
                        removed += 1;
                        tracing::warn!(target = %target, credential = %handle, "removed an upstream credential no lease owned");
                        let entry = AuditEntry {
                            time_ms: self.0.clock.now_ms(),
                            request_id: format!("reaper-{}", crate::clock::new_id()),
                            action: "reconcile".into(),
                            outcome: "allowed".into(),
                            target: Some(target.clone()),
                            reason: Some(format!(
                                "upstream credential {handle} was owned by no live lease; removed"
                            )),
                            context: [("actor".to_string(), "reaper".to_string())].into(),
                            claims: serde_json::Value::Null,
                            ..AuditEntry::default()
                        };
                        self.0.store.append(entry).await?;
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(target = %target, error = %e, "reconciliation failed; will retry")
                }
                Err(_) => tracing::warn!(target = %target, "reconciliation timed out; will retry"),
            }
        }
        Ok(removed)
    }

    /// Runs a pass every `interval` until `stop` turns true.
    pub async fn run(self, interval: Duration, mut stop: watch::Receiver<bool>) {
        loop {
            match self.run_once().await {
                Ok(r) if r != ReapReport::default() => tracing::info!(
                    expired = r.expired,
                    revoked_upstream = r.revoked_upstream,
                    failed = r.failed,
                    stuck = r.stuck.len(),
                    purged = r.purged,
                    "reaper pass"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "reaper pass failed; retrying next interval"),
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.wait_for(|v| *v) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::lease::{LeaseFilter, MintGuard};
    use crate::mint::{Credential, MintContext, MintError};
    use crate::store::sqlite::{self, SqliteStore};
    use async_trait::async_trait;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;

    /// An upstream that fails the first `fail_first` revocations, and records the
    /// handles it was asked to revoke.
    #[derive(Debug, Default)]
    struct FlakyUpstream {
        fail_first: u32,
        calls: AtomicU32,
        revoked: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl Minter for FlakyUpstream {
        fn kind(&self) -> &'static str {
            "fake"
        }
        async fn mint(&self, _ctx: &MintContext<'_>) -> Result<Credential, MintError> {
            Err(MintError::Upstream {
                target: "fake".into(),
                reason: "not used".into(),
            })
        }
        async fn revoke(
            &self,
            _lease_id: &str,
            upstream: Option<&SecretString>,
            _expires_at: i64,
        ) -> Result<(), MintError> {
            if self.calls.fetch_add(1, Ordering::SeqCst) < self.fail_first {
                return Err(MintError::Upstream {
                    target: "fake".into(),
                    reason: "HTTP 503".into(),
                });
            }
            self.revoked
                .lock()
                .unwrap()
                .push(upstream.map(|s| s.expose().clone()).unwrap_or_default());
            Ok(())
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Arc<dyn Store>,
        master: Arc<MasterKey>,
        clock: ManualClock,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&sqlite::Config {
            path: dir.path().join("r.db"),
            busy_timeout: Duration::from_millis(500),
        })
        .unwrap();
        Fixture {
            _dir: dir,
            store: Arc::new(store),
            master: Arc::new(MasterKey::generate()),
            clock: ManualClock::new(1_000_000),
        }
    }

    fn reaper(f: &Fixture, minter: Arc<dyn Minter>, cfg: LeaseConfig) -> Reaper {
        Reaper::new(
            f.store.clone(),
            [("up".to_string(), minter)].into(),
            f.master.clone(),
            cfg,
            Arc::new(f.clock.clone()),
        )
    }

    async fn insert(f: &Fixture, target: &str, ttl: i64, handle: Option<&str>) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let now = f.clock.now();
        let l = LeaseRecord {
            id: id.clone(),
            issuer: "bb".into(),
            identity_key: "bb:w/r".into(),
            subject: "s".into(),
            repository: Some("r".into()),
            target: target.into(),
            kind: "fake".into(),
            rule: "r1".into(),
            scopes: vec![],
            issued_at: now,
            expires_at: now + ttl,
            max_expires_at: now + ttl,
            renew_count: 0,
            state: LeaseState::Live,
            revoked_at: None,
            secret_hash: "h".into(),
            claims_json: "{}".into(),
            upstream: handle.map(|h| f.master.seal(h.as_bytes(), &upstream_aad(&id))),
            attempts: 0,
            next_attempt_at: None,
            last_error: None,
        };
        let entry = AuditEntry {
            action: "mint".into(),
            ..AuditEntry::default()
        };
        f.store
            .commit_mint(l, MintGuard::default(), entry, now)
            .await
            .unwrap();
        id
    }

    async fn state(f: &Fixture, id: &str) -> LeaseRecord {
        f.store.lease(id).await.unwrap().unwrap()
    }

    #[tokio::test]
    async fn expires_self_contained_leases_and_revokes_upstream_ones_with_backoff() {
        let f = fixture();
        let up = Arc::new(FlakyUpstream {
            fail_first: 2,
            ..Default::default()
        });
        let cfg = LeaseConfig {
            stuck_after: 2,
            retain: Duration::from_secs(3600),
            ..LeaseConfig::default()
        };
        let r = reaper(&f, up.clone(), cfg);
        let jwt = insert(&f, "jwt-target", 60, None).await;
        let pg = insert(&f, "up", 60, Some("role_lk_123")).await;
        let live = insert(&f, "up", 600, Some("role_lk_456")).await;

        // Nothing is due yet.
        assert_eq!(r.run_once().await.unwrap(), ReapReport::default());
        f.clock.advance(61);
        let rep = r.run_once().await.unwrap();
        assert_eq!(rep.expired, 2);
        assert_eq!((rep.revoked_upstream, rep.failed), (0, 1));
        assert_eq!(state(&f, &jwt).await.state, LeaseState::Expired);
        let p = state(&f, &pg).await;
        assert_eq!(p.state, LeaseState::Revoking);
        assert_eq!(p.attempts, 1);
        assert_eq!(p.next_attempt_at, Some(f.clock.now() + 5));
        assert_eq!(
            p.last_error.as_deref(),
            Some("upstream fake unavailable: HTTP 503")
        );
        assert_eq!(state(&f, &live).await.state, LeaseState::Live);

        // Not due again before the backoff passes.
        let rep = r.run_once().await.unwrap();
        assert_eq!((rep.revoked_upstream, rep.failed), (0, 0));
        f.clock.advance(5);
        let rep = r.run_once().await.unwrap();
        assert_eq!(rep.failed, 1);
        assert_eq!(
            rep.stuck,
            vec![pg.clone()],
            "second failure reaches stuck_after"
        );
        assert_eq!(
            state(&f, &pg).await.next_attempt_at,
            Some(f.clock.now() + 10)
        );
        f.clock.advance(10);
        let rep = r.run_once().await.unwrap();
        assert_eq!((rep.revoked_upstream, rep.failed), (1, 0));
        assert!(rep.stuck.is_empty());
        let p = state(&f, &pg).await;
        assert_eq!(p.state, LeaseState::Expired);
        assert_eq!(p.last_error, None);
        assert_eq!(*up.revoked.lock().unwrap(), vec!["role_lk_123".to_string()]);

        // The upstream revocation on expiry is audited; the handle is not.
        let recs = f.store.records(0, 100).await.unwrap();
        let exp: Vec<_> = recs.iter().filter(|r| r.entry.action == "expire").collect();
        assert_eq!(exp.len(), 1);
        assert_eq!(exp[0].entry.lease_id.as_deref(), Some(pg.as_str()));
        assert!(!serde_json::to_string(&recs)
            .unwrap()
            .contains("role_lk_123"));

        // Finished leases are purged after the retention; live ones stay.
        f.clock.advance(3600);
        let rep = r.run_once().await.unwrap();
        assert_eq!(rep.expired, 1, "the 600 s lease ran out meanwhile");
        assert_eq!(rep.purged, 2, "the two that ended an hour ago");
        f.clock.advance(3601);
        let rep = r.run_once().await.unwrap();
        assert_eq!(rep.purged, 1);
        let left = f
            .store
            .leases(
                &LeaseFilter {
                    include_inactive: true,
                    ..Default::default()
                },
                f.clock.now(),
                None,
                10,
            )
            .await
            .unwrap();
        assert!(left.is_empty(), "{left:?}");
    }

    #[tokio::test]
    async fn a_target_removed_from_config_is_reported_not_dropped() {
        let f = fixture();
        let r = reaper(
            &f,
            Arc::new(FlakyUpstream::default()),
            LeaseConfig::default(),
        );
        let gone = insert(&f, "removed-target", 10, Some("h")).await;
        f.clock.advance(11);
        let rep = r.run_once().await.unwrap();
        assert_eq!(rep.failed, 1);
        let l = state(&f, &gone).await;
        assert_eq!(l.state, LeaseState::Revoking);
        assert!(l.last_error.unwrap().contains("no longer configured"));
    }

    #[tokio::test]
    async fn run_stops_when_told() {
        let f = fixture();
        let r = reaper(
            &f,
            Arc::new(FlakyUpstream::default()),
            LeaseConfig::default(),
        );
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(r.run(Duration::from_secs(3600), rx));
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}
