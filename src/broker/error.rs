//! Why a broker request failed: one error type, each variant one gRPC status.

use super::*;

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
