//! Workload identity: verify the caller's OIDC token and normalise its claims.
//!
//! - [`jwt`]: compact-JWS parsing and the header checks (before any key is looked up).
//! - [`jwks`]: per-issuer key cache (discovery, background refresh, refresh on unknown
//!   `kid` with a cooldown, last good keys served up to a maximum staleness).
//! - [`presets`]: platform presets normalising claims into a [`WorkloadIdentity`].
//! - [`Verifier`]: ties them together; the only entry point the broker uses.

pub mod jwks;
pub mod jwt;
mod presets;
mod verifier;

pub use presets::Preset;
pub use verifier::{issuer_http_client, verify_with_key, Verifier};

use crate::jose::Alg;
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// One trusted issuer of workload identity tokens.
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    /// Name used by rules.
    pub name: String,
    /// Platform preset (claim normalisation).
    pub preset: Preset,
    /// Exact `iss` value.
    pub issuer: String,
    /// Accepted audiences (a token must carry one).
    pub audiences: Vec<String>,
    /// JWKS URL; when absent it comes from OIDC discovery.
    pub jwks_url: Option<String>,
    /// Clock leeway for `exp`, `nbf`, `iat`.
    pub leeway: Duration,
    /// Refuse tokens issued longer ago than this.
    pub max_token_age: Option<Duration>,
    /// Signature algorithms accepted from this issuer.
    pub algorithms: Vec<Alg>,
    /// Background JWKS refresh period.
    pub jwks_refresh: Duration,
    /// Minimum time between refreshes triggered by an unknown `kid`.
    pub jwks_cooldown: Duration,
    /// How long the last good key set keeps serving while the issuer is unreachable.
    pub jwks_max_staleness: Duration,
    /// Largest discovery or JWKS document accepted, in bytes; a larger one is refused
    /// while it streams and the last good keys keep serving.
    pub jwks_max_bytes: usize,
    /// Most keys a JWKS may hold; a larger set is refused as a whole.
    pub jwks_max_keys: usize,
    /// Replay guard: how many credentials one identity token (by `jti`, else by its
    /// fingerprint) may mint; `None` means unlimited.
    pub max_mints_per_token: Option<u32>,
    /// Extra CA certificates (PEM) trusted for this issuer's discovery and JWKS, besides
    /// the public roots: a Kubernetes API server's own CA, an internal GitLab's.
    pub ca_file: Option<PathBuf>,
    /// Whether identity keys include the deployment environment (`:env:…`). Quotas and
    /// rate limits count per identity key, and on GitHub and GitLab the workflow names its
    /// environment, so with it a workflow can multiply its own budget by naming more.
    pub key_environment: bool,
}

/// A verified caller.
#[derive(Debug, Clone)]
pub struct WorkloadIdentity {
    /// Configured issuer name.
    pub issuer_name: String,
    /// `iss` claim.
    pub issuer: String,
    /// `sub` claim.
    pub subject: String,
    /// Stable identity key (e.g. Bitbucket repository + environment; never the per-step `sub`).
    pub key: String,
    /// Repository (name or UUID, per platform).
    pub repository: Option<String>,
    /// Branch or ref.
    pub git_ref: Option<String>,
    /// Deployment environment.
    pub environment: Option<String>,
    /// Pipeline or run id.
    pub pipeline: Option<String>,
    /// Commit SHA.
    pub commit: Option<String>,
    /// `jti`, when present.
    pub jti: Option<String>,
    /// `exp` of the caller's token.
    pub expires_at: i64,
    /// SHA-256 (hex) of the token bytes: identifies the token without revealing it.
    pub token_fingerprint: String,
    /// SHA-256 (hex) of the token's signed content (header and payload): the same for
    /// every signature over that content, so a token re-signed or with its ECDSA
    /// signature malleated (`s` → `n − s`) is still the same token to the replay guard.
    /// Computed only for issuers with `max_mints_per_token` (empty otherwise).
    pub content_fingerprint: String,
    /// Every raw claim, for rules and templates.
    pub claims: Arc<Map<String, Value>>,
}

impl WorkloadIdentity {
    /// The normalised fields as name/value pairs (for `Explain` and logs).
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            ("issuer", self.issuer_name.clone()),
            ("iss", self.issuer.clone()),
            ("sub", self.subject.clone()),
            ("identity_key", self.key.clone()),
        ];
        for (k, f) in [
            ("repository", &self.repository),
            ("ref", &self.git_ref),
            ("environment", &self.environment),
            ("pipeline", &self.pipeline),
            ("commit", &self.commit),
        ] {
            if let Some(f) = f {
                v.push((k, f.clone()));
            }
        }
        v
    }
}

/// Why a token was not accepted. Messages are stable and never contain token bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// No bearer token was presented.
    #[error("missing bearer token")]
    Missing,
    /// Over the size limit; refused before parsing.
    #[error("token larger than {0} bytes")]
    Oversized(usize),
    /// Not a compact JWS, bad base64url, or bad JSON.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// `alg` is `none`, HMAC, unknown, or not allowed for this issuer or key.
    #[error("algorithm refused: {0}")]
    Algorithm(String),
    /// The header carries a parameter that would let the token choose its own key.
    #[error("header parameter {0} refused")]
    ForbiddenHeader(&'static str),
    /// `iss` names no configured issuer.
    #[error("unknown issuer")]
    UnknownIssuer,
    /// No key with the token's `kid`, even after a refresh.
    #[error("unknown signing key")]
    UnknownKey,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// `exp` is in the past.
    #[error("token expired")]
    Expired,
    /// `nbf` (or `iat`) is in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// `iat` is older than the issuer's `max_token_age`.
    #[error("token too old")]
    TooOld,
    /// `aud` carries none of the configured audiences.
    #[error("audience not accepted")]
    Audience,
    /// A required claim is absent or of the wrong type.
    #[error("claim {0} missing or invalid")]
    Claim(&'static str),
    /// The issuer's keys cannot be had and none are cached.
    #[error("keys for issuer {0} unavailable")]
    KeysUnavailable(String),
}

impl IdentityError {
    /// A short stable code for metrics and audit (`expired`, `audience`, ...).
    pub fn code(&self) -> &'static str {
        match self {
            IdentityError::Missing => "missing_token",
            IdentityError::Oversized(_) => "oversized",
            IdentityError::Malformed(_) => "malformed",
            IdentityError::Algorithm(_) => "algorithm",
            IdentityError::ForbiddenHeader(_) => "forbidden_header",
            IdentityError::UnknownIssuer => "unknown_issuer",
            IdentityError::UnknownKey => "unknown_key",
            IdentityError::BadSignature => "bad_signature",
            IdentityError::Expired => "expired",
            IdentityError::NotYetValid => "not_yet_valid",
            IdentityError::TooOld => "too_old",
            IdentityError::Audience => "audience",
            IdentityError::Claim(_) => "claim",
            IdentityError::KeysUnavailable(_) => "keys_unavailable",
        }
    }
}
