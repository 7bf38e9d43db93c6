//! The use case: verify → decide → mint → audit → answer. Both transports (gRPC and
//! HTTP) call exactly this; no decision logic lives in handlers. Lease operations
//! (renew, revoke, bulk revoke, list, introspect) are in [`leases`].

mod audit;
pub mod checkpoint;
mod health;
pub mod keys;
mod leases;
pub mod reaper;
mod rotation;

pub use audit::{AuditPager, AuditTail, CheckpointList};
pub use health::Readiness;
pub use leases::{
    Introspection, LeaseLister, LeaseProof, RenewRequest, Renewed, RevokeMatching, RevokeSummary,
    Revoked,
};
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
    /// Longest TTL anyone may ask for (caps clamp it further).
    pub const TTL_SECS: u64 = 366 * 24 * 3600;
}

/// A mint request in domain form.
#[derive(Debug, Clone, Default)]
pub struct MintRequest {
    /// Target name.
    pub target: String,
    /// Scopes wanted; empty means all granted.
    pub scopes: Vec<String>,
    /// TTL wanted.
    pub ttl: Option<Duration>,
    /// Context recorded in the audit record.
    pub context: BTreeMap<String, String>,
}

impl MintRequest {
    /// Checks the request's shape. Fails with a message naming the field.
    pub fn validate(&self) -> Result<(), BrokerError> {
        let bad = |m: String| Err(BrokerError::InvalidRequest(m));
        if self.target.is_empty() {
            return bad("target is required".into());
        }
        if self.target.len() > limits::TARGET_LEN
            || self
                .target
                .chars()
                .any(|c| c.is_control() || c.is_whitespace())
        {
            return bad("target is not a valid name".into());
        }
        if self.scopes.len() > limits::SCOPES {
            return bad(format!("at most {} scopes", limits::SCOPES));
        }
        for s in &self.scopes {
            if s.is_empty()
                || s.len() > limits::SCOPE_LEN
                || s.chars().any(|c| c.is_control() || c.is_whitespace())
            {
                return bad("scope is not valid (1-256 characters, no whitespace)".into());
            }
        }
        if let Some(t) = self.ttl {
            if t.is_zero() {
                return bad("ttl must be positive".into());
            }
            if t.as_secs() > limits::TTL_SECS {
                return bad("ttl is too large".into());
            }
        }
        if self.context.len() > limits::CONTEXT_ENTRIES {
            return bad(format!(
                "at most {} context entries",
                limits::CONTEXT_ENTRIES
            ));
        }
        let mut total = 0;
        for (k, v) in &self.context {
            if k.is_empty()
                || k.len() > limits::CONTEXT_KEY_LEN
                || v.len() > limits::CONTEXT_VALUE_LEN
            {
                return bad(format!(
                    "context keys are 1-{} bytes, values at most {} bytes",
                    limits::CONTEXT_KEY_LEN,
                    limits::CONTEXT_VALUE_LEN
                ));
            }
            total += k.len() + v.len();
        }
        if total > limits::CONTEXT_TOTAL {
            return bad(format!(
                "context larger than {} bytes",
                limits::CONTEXT_TOTAL
            ));
        }
        Ok(())
    }
}

/// A lease as callers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Lease id (also the credential's `jti`).
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

/// What Mint returns.
#[derive(Debug)]
pub struct Minted {
    /// The credential.
    pub credential: Credential,
    /// Its lease.
    pub lease: Lease,
    /// Proves ownership of the lease to Renew and Revoke; the store keeps only its hash.
    pub lease_secret: SecretString,
    /// Where its audit record landed.
    pub audit_seq: i64,
}

/// What Explain returns.
#[derive(Debug, Clone)]
pub struct Explained {
    /// Whether Mint would succeed.
    pub allowed: bool,
    /// Deciding rule.
    pub rule: String,
    /// Scopes Mint would grant.
    pub scopes: Vec<String>,
    /// TTL cap that applies.
    pub max_ttl: Duration,
    /// One line per rule considered.
    pub trace: Vec<String>,
    /// The caller's normalised identity.
    pub identity: Vec<(&'static str, String)>,
    /// Why not, when not allowed.
    pub reason: String,
}

/// Why a request failed. Each variant maps to exactly one gRPC status (see
/// `transport::status`).
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The caller could not be identified.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// Policy said no.
    #[error(transparent)]
    Denied(#[from] Denied),
    /// The request is malformed.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// No such target.
    #[error("unknown target {0}")]
    UnknownTarget(String),
    /// Minting failed.
    #[error(transparent)]
    Mint(#[from] MintError),
    /// The audit record could not be committed: nothing was issued.
    #[error("audit store unavailable; no credential issued")]
    Audit(#[source] StoreError),
    /// The store could not be read.
    #[error("store unavailable")]
    Store(#[source] StoreError),
    /// The identity holds its maximum of live leases on the target.
    #[error("quota exceeded: at most {0} live leases per identity on this target")]
    Quota(u32),
    /// The identity token has minted its maximum number of times.
    #[error("identity token already used {0} times; request a fresh one")]
    Replay(u32),
    /// No such lease.
    #[error("unknown lease")]
    UnknownLease,
    /// The lease belongs to another identity (or the lease secret is wrong).
    #[error("lease belongs to another identity")]
    NotLeaseOwner,
    /// The lease cannot be renewed (revoked, expired, at its maximum lifetime, or its
    /// target kind cannot renew).
    #[error("lease cannot be renewed: {0}")]
    NotRenewable(String),
    /// The lease changed while this request was handled; retrying may succeed.
    #[error("lease changed concurrently; retry")]
    Conflict,
    /// Another run holds the rotation lock past the wait.
    #[error("busy: {0}")]
    Busy(String),
    /// The caller's identity exceeded its rate limit.
    #[error("rate limit exceeded for this identity; retry in {}s", .0.retry_after_secs())]
    RateLimited(crate::ratelimit::Exceeded),
}

impl From<CommitError> for BrokerError {
    fn from(e: CommitError) -> Self {
        match e {
            CommitError::Store(e) => BrokerError::Audit(e),
            CommitError::Quota { limit } => BrokerError::Quota(limit),
            CommitError::Replay { limit } => BrokerError::Replay(limit),
        }
    }
}

impl BrokerError {
    /// Short stable code for logs and audit.
    pub fn code(&self) -> &'static str {
        match self {
            BrokerError::Identity(e) => e.code(),
            BrokerError::Denied(Denied::DenyRule { .. }) => "deny_rule",
            BrokerError::Denied(Denied::NoRuleMatched { .. }) => "no_rule",
            BrokerError::Denied(Denied::ScopeNotGranted { .. }) => "scope_not_granted",
            BrokerError::Denied(Denied::RoleNotGranted(_)) => "role_not_granted",
            BrokerError::InvalidRequest(_) => "invalid_request",
            BrokerError::UnknownTarget(_) => "unknown_target",
            BrokerError::Mint(MintError::MissingClaim(_)) => "missing_claim",
            BrokerError::Mint(MintError::Signing(_)) => "signing",
            BrokerError::Mint(MintError::Upstream { .. }) => "upstream",
            BrokerError::Mint(MintError::Refused { .. }) => "upstream_refused",
            BrokerError::Mint(MintError::Invalid(_)) => "invalid_request",
            BrokerError::Mint(MintError::Unsupported { .. }) => "unsupported",
            BrokerError::Audit(_) => "audit_unavailable",
            BrokerError::Store(_) => "store_unavailable",
            BrokerError::Quota(_) => "quota",
            BrokerError::Replay(_) => "replay",
            BrokerError::UnknownLease => "unknown_lease",
            BrokerError::NotLeaseOwner => "not_lease_owner",
            BrokerError::NotRenewable(_) => "not_renewable",
            BrokerError::Conflict => "conflict",
            BrokerError::RateLimited(_) => "rate_limited",
            BrokerError::Busy(_) => "busy",
        }
    }
}

/// What a broker is built from (the assembling layer makes it from the configuration).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The broker's issuer URL (`iss` of what it signs).
    pub issuer_url: String,
    /// Trusted issuers of callers' tokens.
    pub issuers: Vec<IssuerConfig>,
    /// Targets.
    pub targets: Vec<TargetConfig>,
    /// The rules.
    pub policy: Policy,
    /// Lease bookkeeping.
    pub leases: LeaseConfig,
    /// Per-identity and per-source rate limits.
    pub rate: crate::ratelimit::Limits,
    /// The rotation scheduler.
    pub rotation: RotationConfig,
    /// Claims replaced in audit records.
    pub redact_claims: Vec<String>,
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
    /// [`Broker::new`] with every target's minter built from the config (reading the
    /// targets' upstream secrets). Fails, naming the target, when one cannot be built.
    pub async fn build(
        cfg: &Settings,
        store: Arc<dyn Store>,
        keys: Arc<KeyRing>,
        master: Arc<MasterKey>,
        clock: SharedClock,
    ) -> Result<Broker, String> {
        let deps = crate::mint::Deps {
            issuer_url: cfg.issuer_url.clone(),
            keys: keys.clone(),
            store: store.clone(),
            master: master.clone(),
            clock: clock.clone(),
        };
        let minters = crate::mint::build_all(&cfg.targets, &deps).await?;
        Ok(Broker::new(cfg, store, keys, master, clock, minters))
    }

    /// Builds the broker from checked config, an open store, a loaded key ring, and the
    /// targets' minters ([`crate::mint::build_all`]). A target without a minter here
    /// cannot be minted for.
    pub fn new(
        cfg: &Settings,
        store: Arc<dyn Store>,
        keys: Arc<KeyRing>,
        master: Arc<MasterKey>,
        clock: SharedClock,
        mut built: HashMap<String, Arc<dyn Minter>>,
    ) -> Broker {
        let targets: HashMap<String, Target> = cfg
            .targets
            .iter()
            .filter_map(|t| {
                let minter = built.remove(&t.name)?;
                Some((
                    t.name.clone(),
                    Target {
                        cfg: t.clone(),
                        minter,
                    },
                ))
            })
            .collect();
        let reaper = Reaper::new(
            store.clone(),
            minters(&targets),
            master.clone(),
            cfg.leases.clone(),
            clock.clone(),
        );
        Broker {
            reaper,
            verifier: Verifier::new(&cfg.issuers, clock.clone()),
            policy: std::sync::RwLock::new(Arc::new(cfg.policy.clone())),
            rate_limits: crate::ratelimit::RateLimits::new(cfg.rate),
            rotation_cfg: cfg.rotation.clone(),
            targets,
            store,
            keys,
            master,
            clock,
            issuer_url: cfg.issuer_url.clone(),
            replay_limits: cfg
                .issuers
                .iter()
                .filter_map(|i| i.max_mints_per_token.map(|n| (i.name.clone(), n)))
                .collect(),
            lease_cfg: cfg.leases.clone(),
            audit: AuditParts {
                redact: cfg.redact_claims.clone(),
                ..AuditParts::default()
            },
            stopping: tokio::sync::watch::channel(false).0,
            metrics: Arc::new(crate::metrics::Metrics::new()),
        }
    }

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
        if let Ok(counts) = self.store.live_lease_counts(now).await {
            let mut all: BTreeMap<String, u64> =
                self.targets.keys().map(|k| (k.clone(), 0)).collect();
            all.extend(counts);
            snap.live_leases = all.into_iter().collect();
        }
        if let Ok((seq, _)) = self.store.audit_head().await {
            snap.audit_head = seq;
        }
        if let Ok(items) = self.scheduled_items().await {
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

    /// The `iss` of minted tokens.
    pub fn issuer_url(&self) -> &str {
        &self.issuer_url
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
        crate::audit::checkpoint::redact(&mut entry.claims, &self.audit.redact);
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
        entry.reason = Some(err.to_string());
        if let BrokerError::Denied(Denied::DenyRule { rule }) = &err {
            entry.rule = Some(rule.clone());
        }
        log_decision(&entry, started, Some(err.code()));
        self.metrics.denied(err.code());
        if entry.action == "mint" {
            self.metrics.mint(
                self.target_label(entry.target.as_deref().unwrap_or("")),
                &entry.outcome,
            );
        }
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

    /// Verify → decide → mint → audit. The credential is returned only after its audit
    /// record is committed; if the record cannot be committed, the caller gets
    /// [`BrokerError::Audit`] and the credential is dropped.
    pub async fn mint(
        &self,
        token: Option<&str>,
        req: MintRequest,
        request_id: &str,
    ) -> Result<Minted, BrokerError> {
        let started = Instant::now();
        let mut entry = self.entry("mint", request_id, token, &req.target, &req.scopes);
        if let Err(e) = req.validate() {
            return self.fail(entry, e, started).await;
        }
        entry.context = req.context.clone();
        let stage = Instant::now();
        let identity = self.identify(token, &mut entry).await;
        self.metrics.stage("verify", stage.elapsed());
        let identity = match identity {
            Ok(i) => i,
            Err(e) => return self.fail(entry, e, started).await,
        };
        let target = match self.target(&req.target) {
            Ok(t) => t,
            Err(e) => return self.fail(entry, e, started).await,
        };
        let limits = target.cfg.limits();
        let stage = Instant::now();
        let decision = self.policy().decide(
            &identity.issuer_name,
            &identity.claims,
            limits,
            Request {
                target: &req.target,
                scopes: &req.scopes,
                ttl: req.ttl,
            },
        );
        self.metrics.stage("decide", stage.elapsed());
        let allowed = match decision {
            Ok(a) => a,
            Err(d) => return self.fail(entry, d.into(), started).await,
        };
        entry.rule = Some(allowed.rule.clone());
        entry.granted_scopes = allowed.scopes.clone();
        entry.ttl_secs = Some(allowed.ttl.as_secs() as i64);

        let now = self.clock.now();
        let guard = MintGuard {
            max_live: target.cfg.max_live_leases,
            replay: self
                .replay_limits
                .get(&identity.issuer_name)
                .map(|&n| ReplayGuard {
                    issuer: identity.issuer_name.clone(),
                    token_key: match &identity.jti {
                        Some(j) => format!("jti:{j}"),
                        None => format!("sha256:{}", identity.token_fingerprint),
                    },
                    max_uses: n,
                    expires_at: identity.expires_at,
                }),
        };
        // Refuse before anything is created upstream; the commit checks again atomically.
        if guard != MintGuard::default() {
            if let Err(e) = self
                .store
                .check_mint_guard(&identity.key, &req.target, &guard, now)
                .await
            {
                return self.fail(entry, e.into(), started).await;
            }
        }
        let lease_id = crate::clock::new_id();
        let ctx = MintContext {
            identity: &identity,
            scopes: &allowed.scopes,
            ttl: allowed.ttl,
            now,
            lease_id: &lease_id,
        };
        let stage = Instant::now();
        let credential = target.minter.mint(&ctx).await;
        self.metrics.stage("mint", stage.elapsed());
        let credential = match credential {
            Ok(c) => c,
            Err(e) => return self.fail(entry, e.into(), started).await,
        };
        entry.outcome = "allowed".into();
        entry.lease_id = Some(lease_id.clone());
        entry.credential_jti = Some(credential.id.clone());
        entry.credential_fingerprint = credential.fingerprint();
        let (lease_secret, secret_hash) = lease::new_secret();
        let record = LeaseRecord {
            id: lease_id.clone(),
            issuer: identity.issuer_name.clone(),
            identity_key: identity.key.clone(),
            subject: identity.subject.clone(),
            repository: identity.repository.clone(),
            target: req.target.clone(),
            kind: target.minter.kind().to_string(),
            rule: allowed.rule.clone(),
            scopes: allowed.scopes.clone(),
            issued_at: now,
            expires_at: credential.expires_at,
            max_expires_at: now.saturating_add(allowed.max_lifetime.as_secs() as i64),
            renew_count: 0,
            state: LeaseState::Live,
            revoked_at: None,
            secret_hash,
            claims_json: serde_json::to_string(&*identity.claims).unwrap_or_default(),
            upstream: credential.upstream.as_ref().map(|u| {
                self.master
                    .seal(u.expose().as_bytes(), &lease::upstream_aad(&lease_id))
            }),
            attempts: 0,
            next_attempt_at: None,
            last_error: None,
        };
        let lease = Lease::from_record(&record, target.minter.renewable(), now);
        let stage = Instant::now();
        let committed = self
            .store
            .commit_mint(record, guard, entry.clone(), now)
            .await;
        self.metrics.stage("audit_commit", stage.elapsed());
        match committed {
            Ok(appended) => {
                log_decision(&entry, started, None);
                self.metrics.mint(&req.target, "allowed");
                self.metrics.stage("total", started.elapsed());
                Ok(Minted {
                    lease,
                    credential,
                    lease_secret,
                    audit_seq: appended.seq,
                })
            }
            Err(e) => {
                // Nothing may stay behind upstream for a credential that was not issued.
                if credential.upstream.is_some() {
                    if let Err(u) = target
                        .minter
                        .revoke(&lease_id, credential.upstream.as_ref())
                        .await
                    {
                        tracing::error!(lease_id = %lease_id, target = %req.target, error = %u, "could not undo an upstream credential after a failed commit");
                    }
                }
                match e {
                    CommitError::Store(s) => {
                        log_decision(&entry, started, Some("audit_unavailable"));
                        self.metrics.denied("audit_unavailable");
                        self.metrics.mint(&req.target, "error");
                        Err(BrokerError::Audit(s))
                    }
                    other => {
                        entry.lease_id = None;
                        entry.credential_jti = None;
                        entry.credential_fingerprint = None;
                        self.fail(entry, other.into(), started).await
                    }
                }
            }
        }
    }

    /// What Mint would decide, with a trace; mints nothing. The explanation is audited.
    pub async fn explain(
        &self,
        token: Option<&str>,
        target: &str,
        scopes: &[String],
        request_id: &str,
    ) -> Result<Explained, BrokerError> {
        let started = Instant::now();
        let mut entry = self.entry("explain", request_id, token, target, scopes);
        let probe = MintRequest {
            target: target.to_string(),
            scopes: scopes.to_vec(),
            ..MintRequest::default()
        };
        if let Err(e) = probe.validate() {
            return self.fail(entry, e, started).await;
        }
        let identity = match self.identify(token, &mut entry).await {
            Ok(i) => i,
            Err(e) => return self.fail(entry, e, started).await,
        };
        let t = match self.target(target) {
            Ok(t) => t,
            Err(e) => return self.fail(entry, e, started).await,
        };
        let limits = t.cfg.limits();
        let ex = self.policy().explain(
            &identity.issuer_name,
            &identity.claims,
            limits,
            Request {
                target,
                scopes,
                ttl: None,
            },
        );
        let out = match &ex.decision {
            Ok(a) => Explained {
                allowed: true,
                rule: a.rule.clone(),
                scopes: a.scopes.clone(),
                max_ttl: a.max_ttl,
                trace: ex.trace.clone(),
                identity: identity.fields(),
                reason: String::new(),
            },
            Err(d) => Explained {
                allowed: false,
                rule: match d {
                    Denied::DenyRule { rule } => rule.clone(),
                    _ => String::new(),
                },
                scopes: Vec::new(),
                max_ttl: Duration::ZERO,
                trace: ex.trace.clone(),
                identity: identity.fields(),
                reason: d.to_string(),
            },
        };
        entry.outcome = if out.allowed { "allowed" } else { "denied" }.into();
        entry.rule = (!out.rule.is_empty()).then(|| out.rule.clone());
        entry.granted_scopes = out.scopes.clone();
        entry.reason = (!out.reason.is_empty()).then(|| out.reason.clone());
        log_decision(&entry, started, None);
        self.store.append(entry).await.map_err(BrokerError::Audit)?;
        Ok(out)
    }
}

fn minters(targets: &HashMap<String, Target>) -> HashMap<String, Arc<dyn Minter>> {
    targets
        .iter()
        .map(|(k, t)| (k.clone(), t.minter.clone()))
        .collect()
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
    fn request_validation_names_the_field() {
        let ok = MintRequest {
            target: "t".into(),
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
        let cases = [
            MintRequest::default(),
            MintRequest {
                target: "a b".into(),
                ..ok.clone()
            },
            MintRequest {
                target: "x".repeat(200),
                ..ok.clone()
            },
            MintRequest {
                scopes: vec!["".into()],
                ..ok.clone()
            },
            MintRequest {
                scopes: vec!["a b".into()],
                ..ok.clone()
            },
            MintRequest {
                scopes: vec!["s".into(); 65],
                ..ok.clone()
            },
            MintRequest {
                ttl: Some(Duration::ZERO),
                ..ok.clone()
            },
            MintRequest {
                ttl: Some(Duration::from_secs(limits::TTL_SECS + 1)),
                ..ok.clone()
            },
            MintRequest {
                context: (0..33).map(|i| (format!("k{i}"), "v".into())).collect(),
                ..ok.clone()
            },
            MintRequest {
                context: [("k".to_string(), "v".repeat(2000))].into(),
                ..ok.clone()
            },
            MintRequest {
                context: (0..20)
                    .map(|i| (format!("k{i}"), "v".repeat(1000)))
                    .collect(),
                ..ok.clone()
            },
        ];
        for c in cases {
            assert!(
                matches!(c.validate(), Err(BrokerError::InvalidRequest(_))),
                "{c:?}"
            );
        }
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 5), "abc");
    }
}
