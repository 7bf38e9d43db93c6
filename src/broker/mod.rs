//! The use cases: verify → decide → mint → audit → answer. Both transports (gRPC and
//! HTTP) call exactly these; no decision logic lives in handlers. One file per use case:
//! `mint`, `explain`, `leases` (renew, revoke, bulk revoke, list, introspect),
//! `rotation`, `audit`; `build` wires the broker from its [`Settings`] once; `error` is
//! the one error type; the reaper, the checkpointer and key loading are services here
//! too.

mod audit;
mod build;
pub mod checkpoint;
mod error;
mod explain;
mod health;
pub mod keys;
mod leases;
mod mint;
pub mod reaper;
mod rotation;

pub use audit::{AuditPager, AuditTail, CheckpointList};
pub use build::Settings;
pub use error::BrokerError;
pub use explain::Explained;
pub use health::Readiness;
pub use leases::{
    Introspection, LeaseLister, LeaseProof, RenewRequest, Renewed, RevokeMatching, RevokeSummary,
    Revoked,
};
pub use mint::{MintRequest, Minted};
pub use rotation::{Force, RotationCaller, RotationConfig};

use crate::audit::checkpoint::{AuditStatus, CheckpointKeys};
use crate::audit::AuditEntry;
use crate::clock::SharedClock;
use crate::identity::IssuerConfig;
use crate::identity::{IdentityError, Verifier, WorkloadIdentity};
use crate::keys::{KeyRing, MasterKey};
use crate::lease::LeaseConfig;
use crate::lease::{self, LeaseRecord, LeaseState, MintGuard, ReplayGuard};
use crate::mint::TargetConfig;
use crate::mint::{Credential, MintContext, MintError, Minter};
use crate::policy::{Denied, Policy, Request, Role};
use crate::secret::SecretString;
use crate::store::CommitError;
use crate::store::{Store, StoreError};
use build::minters;
use reaper::Reaper;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Results handed out a page at a time (lease listings, audit queries, audit tails).
#[async_trait::async_trait]
pub trait Pages: Send + 'static {
    /// What a page holds.
    type Item: Send + 'static;
    /// The next page; empty when there is no more (a tail waits instead). Fails when the
    /// store cannot be read.
    async fn next_page(&mut self) -> Result<Vec<Self::Item>, BrokerError>;
}

/// Request limits, checked before anything else.
pub mod limits {
    /// Longest target name.
    pub const TARGET_LEN: usize = 128;
    /// Most scopes in one request.
    pub const SCOPES: usize = 64;
    /// Longest scope.
    pub const SCOPE_LEN: usize = 256;
    /// Most context entries.
    pub const CONTEXT_ENTRIES: usize = 32;
    /// Longest context key.
    pub const CONTEXT_KEY_LEN: usize = 64;
    /// Longest context value.
    pub const CONTEXT_VALUE_LEN: usize = 1024;
    /// Total context size.
    pub const CONTEXT_TOTAL: usize = 8 * 1024;
    /// Longest reason recorded.
    pub const REASON_LEN: usize = 1024;
    /// What an unidentified caller's record keeps of its request: this many scopes,
    /// each cut to this many bytes, and a target cut as short.
    pub const UNIDENTIFIED_SCOPES: usize = 4;
    /// See [`UNIDENTIFIED_SCOPES`].
    pub const UNIDENTIFIED_FIELD_LEN: usize = 64;
    /// Longest TTL anyone may ask for (caps clamp it further).
    pub const TTL_SECS: u64 = 366 * 24 * 3600;
}

/// A lease as callers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Lease id (also the credential's `jti`; Airflow tokens carry it without hyphens).
    pub id: String,
    /// Target.
    pub target: String,
    /// Scopes granted.
    pub scopes: Vec<String>,
    /// Issue time (seconds).
    pub issued_at: i64,
    /// Expiry (seconds).
    pub expires_at: i64,
    /// Whether it can be renewed.
    pub renewable: bool,
    /// State as of now (`live`, `revoking`, `revoked`, `expired`).
    pub state: &'static str,
    /// No renewal reaches past this.
    pub max_expires_at: i64,
    /// Renewals so far.
    pub renew_count: u32,
    /// Holder's identity key.
    pub identity_key: String,
    /// Holder's issuer name.
    pub issuer: String,
    /// Holder's repository.
    pub repository: Option<String>,
    /// The granting rule(s).
    pub rule: String,
    /// When it was revoked.
    pub revoked_at: Option<i64>,
}

impl Lease {
    /// The caller's view of a stored lease at `now`.
    pub fn from_record(l: &LeaseRecord, renewable: bool, now: i64) -> Lease {
        Lease {
            id: l.id.clone(),
            target: l.target.clone(),
            scopes: l.scopes.clone(),
            issued_at: l.issued_at,
            expires_at: l.expires_at,
            renewable,
            state: l.effective_state(now).as_str(),
            max_expires_at: l.max_expires_at,
            renew_count: l.renew_count,
            identity_key: l.identity_key.clone(),
            issuer: l.issuer.clone(),
            repository: l.repository.clone(),
            rule: l.rule.clone(),
            revoked_at: l.revoked_at,
        }
    }
}

struct Target {
    cfg: TargetConfig,
    minter: Arc<dyn Minter>,
}

/// The broker.
pub struct Broker {
    verifier: Verifier,
    /// Replaced whole on config reload; a request uses the policy it started with.
    policy: std::sync::RwLock<Arc<Policy>>,
    rate_limits: crate::ratelimit::RateLimits,
    rotation_cfg: RotationConfig,
    targets: HashMap<String, Target>,
    store: Arc<dyn Store>,
    keys: Arc<KeyRing>,
    master: Arc<MasterKey>,
    clock: SharedClock,
    issuer_url: String,
    replay_limits: HashMap<String, u32>,
    lease_cfg: LeaseConfig,
    reaper: Reaper,
    audit: AuditParts,
    /// Set when the server shuts down: open streams (audit tails) end.
    stopping: tokio::sync::watch::Sender<bool>,
    metrics: Arc<crate::metrics::Metrics>,
    /// The last answer of the store to "can you commit?", for readiness.
    store_probe: Arc<health::StoreProbe>,
    /// The last periodic integrity check's finding, when it found something wrong.
    integrity: std::sync::Mutex<Option<String>>,
}

/// What the audit service needs: the keys checkpoints verify with, live checkpoint and
/// witness state, and which claims records redact.
#[derive(Debug, Default)]
struct AuditParts {
    keys: CheckpointKeys,
    status: Arc<AuditStatus>,
    redact: Vec<String>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("targets", &self.targets.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts a new policy and new rate limits in force (config reload). Requests already
    /// deciding finish with the policy they started with.
    pub fn reconfigure(&self, policy: Policy, limits: crate::ratelimit::Limits) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
        self.rate_limits.reconfigure(limits);
    }

    /// Records a configuration reload, applied or refused, in the audit log (a policy
    /// change is a security event). Fails when the record cannot be committed.
    pub async fn audit_reload(
        &self,
        applied: bool,
        reason: &str,
        context: BTreeMap<String, String>,
    ) -> Result<(), BrokerError> {
        let id = crate::clock::new_id();
        let mut entry = self.entry("config_reload", &id, None, "", &[]);
        entry.outcome = if applied { "allowed" } else { "denied" }.into();
        entry.reason = Some(truncate(reason, 1024));
        entry.context = context;
        self.store.append(entry).await.map_err(BrokerError::Audit)?;
        Ok(())
    }

    /// The rate limiters (the transports check source addresses here).
    pub fn rate_limits(&self) -> &crate::ratelimit::RateLimits {
        &self.rate_limits
    }

    /// This broker's metrics.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// The metrics exposition, with scrape-time values (JWKS state, live leases, audit
    /// head, witness lag) read now. A store that cannot answer leaves those at their
    /// last values; the scrape itself never fails.
    pub async fn render_metrics(&self) -> String {
        let now = self.clock.now();
        let mut snap = crate::metrics::Snapshot {
            issuers: self
                .verifier
                .status()
                .into_iter()
                .map(|(n, st)| {
                    (
                        n,
                        st.fetches,
                        st.failures,
                        st.keys,
                        st.fetched_at.map(|t| now - t),
                    )
                })
                .collect(),
            witness_lag: self.audit.status.witness_lag(),
            ..Default::default()
        };
        // A scrape answers within a second from what the broker holds; store reads that do
        // not answer in time are left out of this scrape (latchkey_store_answered 0).
        let bound = std::time::Duration::from_millis(300);
        let mut answered = true;
        let counts = tokio::time::timeout(bound, self.store.live_lease_counts(now)).await;
        answered &= counts.is_ok();
        if let Ok(Ok(counts)) = counts {
            let mut all: BTreeMap<String, u64> =
                self.targets.keys().map(|k| (k.clone(), 0)).collect();
            all.extend(counts);
            snap.live_leases = all.into_iter().collect();
        }
        snap.audit_head = *self.store.subscribe_head().borrow();
        let items = tokio::time::timeout(bound, self.scheduled_items()).await;
        answered &= items.is_ok();
        snap.store_answered = answered;
        if let Ok(Ok(items)) = items {
            for i in items {
                if let Some(due) = i.next_due {
                    snap.rotation_due.push((i.item.clone(), (due - now).max(0)));
                }
                if i.kind == crate::rotation::ItemKind::SigningKey {
                    if let Some(last) = i.last_rotated {
                        snap.key_age.push((i.target.clone(), now - last));
                    }
                }
            }
        }
        self.metrics.render(&snap)
    }

    /// The target name as a metric label: configured names only, so a caller cannot
    /// grow the label set by asking for made-up targets.
    fn target_label<'a>(&self, target: &'a str) -> &'a str {
        if self.targets.contains_key(target) {
            target
        } else {
            "(unknown)"
        }
    }

    /// Ends open streams (audit tails), so a graceful shutdown is not held up by them.
    pub fn stop_streams(&self) {
        self.stopping.send_replace(true);
    }

    /// Gives the broker the audit keys and the live checkpoint/witness state (the server
    /// does this after loading the audit key).
    pub fn with_audit(mut self, keys: CheckpointKeys, status: Arc<AuditStatus>) -> Broker {
        self.audit.keys = keys;
        self.audit.status = status;
        self
    }

    /// Live checkpoint and witness state.
    pub fn audit_status(&self) -> &Arc<AuditStatus> {
        &self.audit.status
    }

    /// The audit public keys, as a JWKS document.
    pub fn audit_keys_jwks(&self) -> serde_json::Value {
        self.audit.keys.to_jwks()
    }

    /// Replaces the minter of a configured target (tests use it to stand in a fake
    /// upstream).
    pub fn set_minter(&mut self, target: &str, minter: Arc<dyn Minter>) {
        if let Some(t) = self.targets.get_mut(target) {
            t.minter = minter;
        }
        self.reaper = Reaper::new(
            self.store.clone(),
            minters(&self.targets),
            self.master.clone(),
            self.lease_cfg.clone(),
            self.clock.clone(),
        );
    }

    /// The reaper that expires leases and finishes upstream revocations.
    pub fn reaper(&self) -> &Reaper {
        &self.reaper
    }

    /// Lease bookkeeping settings.
    pub fn lease_config(&self) -> &LeaseConfig {
        &self.lease_cfg
    }

    /// The identity verifier (for background refresh and readiness).
    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// The key ring (for the JWKS endpoint).
    pub fn keys(&self) -> &Arc<KeyRing> {
        &self.keys
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Now, by the broker's clock (seconds since the epoch).
    pub fn now(&self) -> i64 {
        self.clock.now()
    }

    /// How long verifiers may cache the JWKS (its `Cache-Control: max-age`).
    pub fn jwks_max_age(&self) -> u64 {
        self.rotation_cfg.jwks_cache.as_secs()
    }

    /// The broker's issuer URL: the `iss` of minted tokens, except those of targets
    /// with their own issuer.
    pub fn issuer_url(&self) -> &str {
        &self.issuer_url
    }

    /// For a target that signs with a broker key: the `iss` of its tokens, and whether
    /// it is the target's own (`token_issuer = "target"`). `None` for other targets.
    pub fn target_issuer(&self, target: &str) -> Option<(String, bool)> {
        let t = self.targets.get(target)?;
        t.cfg.kind.signing_alg()?;
        Some((t.cfg.issuer_url(&self.issuer_url), t.cfg.own_issuer))
    }

    fn entry(
        &self,
        action: &str,
        request_id: &str,
        token: Option<&str>,
        target: &str,
        scopes: &[String],
    ) -> AuditEntry {
        AuditEntry {
            time_ms: self.clock.now_ms(),
            request_id: request_id.to_string(),
            action: action.to_string(),
            outcome: "denied".into(),
            token_fingerprint: token.map(crate::jose::sha256_hex),
            target: (!target.is_empty()).then(|| truncate(target, limits::TARGET_LEN)),
            requested_scopes: scopes
                .iter()
                .take(limits::SCOPES)
                .map(|s| truncate(s, limits::SCOPE_LEN))
                .collect(),
            claims: serde_json::Value::Null,
            ..AuditEntry::default()
        }
    }

    async fn identify(
        &self,
        token: Option<&str>,
        entry: &mut AuditEntry,
    ) -> Result<WorkloadIdentity, BrokerError> {
        let token = token.ok_or(IdentityError::Missing)?;
        let id = self.verifier.verify(token).await?;
        entry.issuer = Some(id.issuer_name.clone());
        entry.identity_key = Some(id.key.clone());
        entry.subject = Some(id.subject.clone());
        entry.repository = id.repository.clone();
        entry.git_ref = id.git_ref.clone();
        entry.environment = id.environment.clone();
        entry.pipeline = id.pipeline.clone();
        entry.claims = serde_json::Value::Object((*id.claims).clone());
        let hidden = crate::audit::checkpoint::redact(&mut entry.claims, &self.audit.redact);
        // The normalised fields come from the same claims: one that shows a redacted
        // value is hidden too (the identity key stays, the log is grouped by it).
        let hidden: Vec<&String> = hidden.iter().filter(|h| !h.is_empty()).collect();
        for field in [
            &mut entry.subject,
            &mut entry.repository,
            &mut entry.git_ref,
            &mut entry.environment,
            &mut entry.pipeline,
        ] {
            if field
                .as_ref()
                .is_some_and(|v| hidden.iter().any(|h| v.contains(h.as_str())))
            {
                *field = Some(crate::audit::checkpoint::REDACTED.into());
            }
        }
        // Counted once the caller is known, so the refusal's record says who it was.
        if let Err(e) = self.rate_limits.check_identity(&id.key) {
            self.metrics
                .rate_limited
                .get_or_create(&crate::metrics::LimitScope { scope: "identity" })
                .inc();
            return Err(BrokerError::RateLimited(e));
        }
        Ok(id)
    }

    fn target(&self, name: &str) -> Result<&Target, BrokerError> {
        self.targets
            .get(name)
            .ok_or_else(|| BrokerError::UnknownTarget(name.to_string()))
    }

    /// Records a failure and returns it, or the audit failure if even that cannot be
    /// recorded.
    async fn fail<T>(
        &self,
        mut entry: AuditEntry,
        err: BrokerError,
        started: Instant,
    ) -> Result<T, BrokerError> {
        entry.outcome = match err {
            BrokerError::Mint(_) | BrokerError::Store(_) | BrokerError::Conflict => "error".into(),
            _ => "denied".into(),
        };
        entry.reason = Some(truncate(&err.to_string(), limits::REASON_LEN));
        if let BrokerError::Denied(Denied::DenyRule { rule }) = &err {
            entry.rule = Some(rule.clone());
        }
        if entry.identity_key.is_none() {
            // Nobody we know asked: record what was asked in bounded form (anyone can send
            // these, and the log never gives space back), and charge the source's
            // allowance of such requests.
            bound_unidentified(&mut entry);
            if let Some(ip) = crate::net::current_source() {
                if !self.rate_limits.charge_unidentified(ip) {
                    tracing::info!(source = %crate::net::source_key(ip), "unidentified requests over their allowance; refusing this source for a while");
                }
            }
        }
        log_decision(&entry, started, Some(err.code()));
        self.metrics.denied(err.code());
        if entry.action == "mint" {
            self.metrics.mint(
                self.target_label(entry.target.as_deref().unwrap_or("")),
                &entry.outcome,
            );
        }
        // The record keeps the whole reason; the caller learns what `denial_detail` allows.
        let err = match err {
            BrokerError::Denied(d) => {
                BrokerError::Denied(d.for_caller(self.policy().denial_detail()))
            }
            e => e,
        };
        match self.store.append(entry).await {
            Ok(_) => Err(err),
            Err(e) => Err(BrokerError::Audit(e)),
        }
    }

    /// Identifies the caller, checks that policy grants it `role`, and audits the attempt
    /// (action, `target` if any, `context`). The record of an allowed call is committed
    /// before the call proceeds; a refused one is committed before the refusal returns.
    pub(crate) async fn require_role(
        &self,
        action: &str,
        role: Role,
        token: Option<&str>,
        target: &str,
        context: std::collections::BTreeMap<String, String>,
        request_id: &str,
    ) -> Result<WorkloadIdentity, BrokerError> {
        let started = Instant::now();
        let mut entry = self.entry(action, request_id, token, target, &[]);
        entry.context = context;
        let caller = match self.identify(token, &mut entry).await {
            Ok(i) => i,
            Err(e) => return self.fail(entry, e, started).await,
        };
        if let Err(d) = self
            .policy()
            .has_role(&caller.issuer_name, &caller.claims, role)
        {
            return self.fail(entry, d.into(), started).await;
        }
        entry.outcome = "allowed".into();
        log_decision(&entry, started, None);
        self.store.append(entry).await.map_err(BrokerError::Audit)?;
        Ok(caller)
    }
}

/// Shrinks the record of a request whose caller was not identified to a bounded size:
/// the first few scopes, cut short, with their count and digest; the context as a count,
/// a size and a digest; the target cut short. What it was stays provable (the digests),
/// what it costs stays small (under about 1 KiB whatever was sent).
fn bound_unidentified(entry: &mut AuditEntry) {
    use limits::{UNIDENTIFIED_FIELD_LEN as LEN, UNIDENTIFIED_SCOPES as N};
    if let Some(t) = &entry.target {
        entry.target = Some(truncate(t, LEN));
    }
    let asked = std::mem::take(&mut entry.context);
    if !asked.is_empty() {
        let bytes: usize = asked.iter().map(|(k, v)| k.len() + v.len()).sum();
        let canonical = serde_json::to_string(&asked).unwrap_or_default();
        entry
            .context
            .insert("context_entries".into(), asked.len().to_string());
        entry
            .context
            .insert("context_bytes".into(), bytes.to_string());
        entry
            .context
            .insert("context_sha256".into(), crate::jose::sha256_hex(canonical));
    }
    let scopes = std::mem::take(&mut entry.requested_scopes);
    if scopes.len() > N || scopes.iter().any(|s| s.len() > LEN) {
        entry
            .context
            .insert("scopes_count".into(), scopes.len().to_string());
        entry.context.insert(
            "scopes_sha256".into(),
            crate::jose::sha256_hex(scopes.join(" ")),
        );
    }
    entry.requested_scopes = scopes.iter().take(N).map(|s| truncate(s, LEN)).collect();
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn log_decision(e: &AuditEntry, started: Instant, code: Option<&str>) {
    tracing::info!(
        request_id = %e.request_id,
        action = %e.action,
        issuer = e.issuer.as_deref().unwrap_or("-"),
        identity_key = e.identity_key.as_deref().unwrap_or("-"),
        target = e.target.as_deref().unwrap_or("-"),
        outcome = %e.outcome,
        code = code.unwrap_or("-"),
        reason = e.reason.as_deref().unwrap_or("-"),
        latency_us = started.elapsed().as_micros() as u64,
        "decision"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 5), "abc");
    }
}
