//! Minting: one [`Minter`] per target kind behind one trait, and the [`Template`]s
//! targets use to put caller claims into what they mint.

mod jwt;
mod template;

pub use jwt::JwtMinter;
pub use template::Template;

use crate::identity::WorkloadIdentity;
use crate::secret::SecretString;
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::fmt;
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
    /// The upstream system failed or refused.
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

    /// Revokes the credential at the target. Idempotent: revoking what is already gone
    /// succeeds. Self-contained credentials (no upstream handle) need nothing here: the
    /// lease's state is what introspection reports.
    async fn revoke(
        &self,
        lease_id: &str,
        upstream: Option<&SecretString>,
    ) -> Result<(), MintError> {
        let _ = (lease_id, upstream);
        Ok(())
    }
}
