//! Minting: one [`Minter`] per target kind behind one trait, and the [`Template`]s
//! targets use to put caller claims into what they mint.

mod airflow;
mod check;
mod databricks;
mod jwt;
mod oauth;
mod postgres;
mod prefect;
mod pulsar;
mod root;
mod targets;
mod template;
mod upstream;
mod vercel;

pub use airflow::{AirflowAuthManager, AirflowConfig, AirflowMinter};
pub use check::{check_url, Check, CheckError};
pub use databricks::{DatabricksConfig, DatabricksMinter, DatabricksMode, Federation};
pub use jwt::{JwtMinter, JwtTargetConfig};
pub use oauth::{
    BitbucketMinter, ClientAuth, OAuth2Config, OAuth2Grant, OAuth2Minter, OAuthClientConfig,
};
pub use postgres::{PostgresConfig, PostgresMinter};
pub use prefect::{PrefectConfig, PrefectMinter};
pub use pulsar::{
    pulsar_public_key, spki_der, PulsarAdmin, PulsarConfig, PulsarKey, PulsarMinter,
    PulsarPermission, PulsarResource,
};
pub use targets::*;
pub use template::Template;
pub use vercel::VercelConfig;

use crate::clock::SharedClock;
use crate::identity::WorkloadIdentity;
use crate::keys::{KeyRing, MasterKey};
use crate::secret::SecretString;
use crate::store::Store;
use async_trait::async_trait;
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// What a minter needs to know about one request that policy allowed.
#[derive(Debug)]
pub struct MintContext<'a> {
    /// The verified caller.
    pub identity: &'a WorkloadIdentity,
    /// Scopes granted.
    pub scopes: &'a [String],
    /// Lifetime granted.
    pub ttl: Duration,
    /// Now, in seconds since the epoch.
    pub now: i64,
    /// The lease id, also used as the credential's unique id (`jti`).
    pub lease_id: &'a str,
}

/// An issued credential. Secret fields are [`SecretString`]s; `Debug` shows none of them.
pub struct Credential {
    /// Target kind (`jwt`, ...).
    pub kind: &'static str,
    /// Bearer token, if the credential is one.
    pub token: Option<SecretString>,
    /// Login name, if the credential is a login.
    pub username: Option<String>,
    /// Password, if the credential is a login.
    pub password: Option<SecretString>,
    /// Further non-secret fields.
    pub fields: BTreeMap<String, String>,
    /// Expiry, seconds since the epoch.
    pub expires_at: i64,
    /// Unique id of the credential at the target (`jti` for JWTs).
    pub id: String,
    /// What the target needs to revoke it later (a token id, a role name); sealed
    /// before it is stored. `None` for self-contained credentials.
    pub upstream: Option<SecretString>,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("kind", &self.kind)
            .field("token", &self.token.as_ref().map(|_| "[REDACTED]"))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "[REDACTED]"))
            .field("fields", &self.fields)
            .field("expires_at", &self.expires_at)
            .field("id", &self.id)
            .field("upstream", &self.upstream.as_ref().map(|_| "[REDACTED]"))
            .finish()
    }
}

impl Credential {
    /// SHA-256 of the secret part (token, else password), for the audit record.
    pub fn fingerprint(&self) -> Option<String> {
        self.token
            .as_ref()
            .or(self.password.as_ref())
            .map(|s| crate::jose::sha256_hex(s.expose().as_bytes()))
    }
}

/// One step of an upstream root rotation, for the audit log. Never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootStep {
    /// `create`, `verify`, `switch`, `delete`, `cleanup`.
    pub phase: &'static str,
    /// What was done (credential ids, never credentials).
    pub detail: String,
}

/// Why minting failed. Messages are safe to show the caller.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MintError {
    /// The target's template needs a claim the caller's token lacks.
    #[error("target needs claim {0}, absent from the caller's token")]
    MissingClaim(String),
    /// The broker cannot sign (no key, signing failure).
    #[error("signing failed for target {0}")]
    Signing(String),
    /// The kind cannot do this (renew a credential it cannot extend, ...).
    #[error("target kind {kind} cannot {action}")]
    Unsupported {
        /// The kind.
        kind: &'static str,
        /// What was asked.
        action: &'static str,
    },
    /// The request cannot be served as asked (scopes that map to more than one role,
    /// a claim the target cannot take).
    #[error("{0}")]
    Invalid(String),
    /// The upstream refused the broker's own credential (HTTP 401/403, a failed login):
    /// the broker is not allowed to do this there.
    #[error("upstream {target} refused the broker: {reason}")]
    Refused {
        /// The target.
        target: String,
        /// A short, secret-free reason.
        reason: String,
    },
    /// The upstream system failed, timed out or is rate limiting.
    #[error("upstream {target} unavailable: {reason}")]
    Upstream {
        /// The target.
        target: String,
        /// A short, secret-free reason.
        reason: String,
    },
}

/// One target kind.
#[async_trait]
pub trait Minter: Send + Sync + fmt::Debug {
    /// The kind's name.
    fn kind(&self) -> &'static str;

    /// Whether leases of this kind can be renewed.
    fn renewable(&self) -> bool {
        false
    }

    /// Mints a credential. Fails without side effects at the target, or, if it created
    /// something upstream before failing, removes it again.
    async fn mint(&self, ctx: &MintContext<'_>) -> Result<Credential, MintError>;

    /// Extends a lease to `ctx.now + ctx.ttl`. Answers a fresh credential for kinds whose
    /// credential carries its own expiry, `None` where the target extended the existing
    /// one. Called only when [`Minter::renewable`] holds.
    async fn renew(
        &self,
        ctx: &MintContext<'_>,
        upstream: Option<&SecretString>,
    ) -> Result<Option<Credential>, MintError> {
        let _ = (ctx, upstream);
        Err(MintError::Unsupported {
            kind: self.kind(),
            action: "renew",
        })
    }

    /// Whether this kind holds an upstream root credential it can rotate.
    fn rotates_root(&self) -> bool {
        false
    }

    /// Rotates the upstream root credential, in this order: create the new credential,
    /// verify it works, switch to it, then delete the old one, recording each step done
    /// in `journal` (each becomes an audit record). A failure at any step leaves the old
    /// credential in service (removing whatever was created) and is returned. Answers a
    /// short, secret-free summary (the new credential's id).
    async fn rotate_root(&self, journal: &mut Vec<RootStep>) -> Result<String, MintError> {
        let _ = journal;
        Err(MintError::Unsupported {
            kind: self.kind(),
            action: "rotate a root credential",
        })
    }

    /// Whether this kind can list what it created upstream (see [`Minter::reconcile`]).
    fn reconciles(&self) -> bool {
        false
    }

    /// Removes credentials this broker created upstream that no lease owns any more
    /// (`live` holds the upstream handles of every live lease), leaving alone anything
    /// created too recently to have its lease committed yet. Answers the handles
    /// removed; they are logged and audited, so only kinds whose handles are names, not
    /// secrets, may reconcile.
    async fn reconcile(&self, live: &HashSet<String>, now: i64) -> Result<Vec<String>, MintError> {
        let _ = (live, now);
        Ok(Vec::new())
    }

    /// Revokes the credential at the target. Idempotent: revoking what is already gone
    /// succeeds. Self-contained credentials (no upstream handle) need nothing here: the
    /// lease's state is what introspection reports. `expires_at` is the lease's expiry
    /// (the latest any of its credentials lives).
    async fn revoke(
        &self,
        lease_id: &str,
        upstream: Option<&SecretString>,
        expires_at: i64,
    ) -> Result<(), MintError> {
        let _ = (lease_id, upstream, expires_at);
        Ok(())
    }
}

/// What minters are built from besides their own config.
#[derive(Debug, Clone)]
pub struct Deps {
    /// The broker's issuer URL (`iss` of what it signs).
    pub issuer_url: String,
    /// The broker's signing keys.
    pub keys: Arc<KeyRing>,
    /// The store (rotated root credentials live there, sealed).
    pub store: Arc<dyn Store>,
    /// The master key.
    pub master: Arc<MasterKey>,
    /// The clock.
    pub clock: SharedClock,
}

/// Builds the minter of a target: reads its upstream secrets (files, environment),
/// prefers a root credential the broker rotated and stored over the configured one.
/// Fails, naming the target and the secret's source (never its value), when a secret
/// cannot be read or the target's settings cannot be used.
pub async fn build(t: &TargetConfig, deps: &Deps) -> Result<Arc<dyn Minter>, String> {
    let name = t.name.as_str();
    let own;
    let deps = if t.own_issuer {
        own = Deps {
            issuer_url: t.issuer_url(&deps.issuer_url),
            ..deps.clone()
        };
        &own
    } else {
        deps
    };
    let m: Arc<dyn Minter> = match &t.kind {
        TargetKind::Jwt(j) => Arc::new(JwtMinter::new(
            name,
            j.clone(),
            &deps.issuer_url,
            deps.keys.clone(),
        )),
        TargetKind::Pulsar(p) => Arc::new(PulsarMinter::new(name, p.clone(), deps)?),
        TargetKind::Airflow(a) => Arc::new(AirflowMinter::new(name, a.clone(), deps)?),
        TargetKind::Databricks(d) => Arc::new(DatabricksMinter::new(name, d.clone(), deps)?),
        TargetKind::Vercel(v) => Arc::new(vercel::VercelMinter::new(name, v.clone(), deps).await?),
        TargetKind::Prefect(p) => Arc::new(PrefectMinter::new(name, p.clone())?),
        TargetKind::Bitbucket(b) => Arc::new(BitbucketMinter::new(name, b.clone())?),
        TargetKind::Postgres(p) => Arc::new(PostgresMinter::new(name, p.clone(), deps).await?),
        TargetKind::OAuth2(o) => Arc::new(OAuth2Minter::new(name, o.clone(), deps)?),
    };
    Ok(m)
}

/// Builds every target's minter, by target name. Fails like [`build`], naming the target.
pub async fn build_all(
    targets: &[TargetConfig],
    deps: &Deps,
) -> Result<std::collections::HashMap<String, Arc<dyn Minter>>, String> {
    let mut out = std::collections::HashMap::new();
    for t in targets {
        let m = build(t, deps)
            .await
            .map_err(|e| format!("target {}: {e}", t.name))?;
        out.insert(t.name.clone(), m);
    }
    Ok(out)
}

/// The value `map` gives the requested scopes: exactly one distinct value, or a clear
/// refusal. Used by kinds whose credential carries one role.
fn one_mapped<'a>(
    map: &'a BTreeMap<String, String>,
    scopes: &[String],
    what: &str,
) -> Result<&'a str, MintError> {
    let mut found: Vec<&str> = scopes
        .iter()
        .filter_map(|s| map.get(s).map(String::as_str))
        .collect();
    found.sort_unstable();
    found.dedup();
    match found.as_slice() {
        [one] => Ok(one),
        [] => Err(MintError::Invalid(format!(
            "ask for one scope; each maps to one {what}"
        ))),
        _ => Err(MintError::Invalid(format!(
            "the scopes asked for map to {} different {what}s; a credential carries one: ask for one scope",
            found.len()
        ))),
    }
}

/// Signs `claims` with the target's current broker key; answers the token and its `kid`.
fn sign_with_ring(
    keys: &KeyRing,
    target: &str,
    claims: &Value,
) -> Result<(SecretString, String), MintError> {
    let signer = keys
        .signer(target)
        .map_err(|_| MintError::Signing(target.to_string()))?;
    let token = signer
        .sign_jwt(claims, None)
        .map_err(|_| MintError::Signing(target.to_string()))?;
    Ok((crate::secret::Secret::new(token), signer.kid().to_string()))
}

/// A self-contained bearer token of `kind` for this request: it expires with the lease
/// and its id is the lease id (`jti`).
fn bearer_credential(
    kind: &'static str,
    token: SecretString,
    fields: BTreeMap<String, String>,
    ctx: &MintContext<'_>,
) -> Credential {
    Credential {
        kind,
        token: Some(token),
        username: None,
        password: None,
        fields,
        expires_at: ctx.now + ctx.ttl.as_secs() as i64,
        id: ctx.lease_id.to_string(),
        upstream: None,
    }
}

/// `sub` from an optional template, else the caller's identity key.
fn subject(t: &Option<Template>, id: &WorkloadIdentity) -> Result<String, MintError> {
    match t {
        Some(t) => t.render(&id.claims).map_err(MintError::MissingClaim),
        None => Ok(id.key.clone()),
    }
}

/// A random secret of `bytes` bytes, base64url without padding. Fails only when the
/// system RNG does.
fn random_secret(target: &str, bytes: usize) -> Result<SecretString, MintError> {
    use ring::rand::SecureRandom;
    use zeroize::Zeroize;
    let mut raw = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut raw)
        .map_err(|_| MintError::Signing(target.to_string()))?;
    let out = crate::secret::Secret::new(crate::jose::b64(&raw));
    raw.zeroize();
    Ok(out)
}

/// RFC 3339 (UTC, seconds) of a Unix time.
fn rfc3339(secs: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}
