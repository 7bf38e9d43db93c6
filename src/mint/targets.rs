//! Checked settings of each target kind: what the minters are built from. The
//! configuration file's raw form and its checks are in `config`, which builds these.
//! Upstream secrets are never in the file: each is a [`SecretRef`] naming a file or an
//! environment variable.

use super::*;
use crate::jose::Alg;
use crate::secret::{Secret, SecretBytes, SecretString};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// One target.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// Name requested by callers.
    pub name: String,
    /// TTL when the request names none.
    pub default_ttl: Duration,
    /// Hard TTL cap.
    pub max_ttl: Duration,
    /// Longest total lifetime of a lease, renewals included.
    pub max_lifetime: Duration,
    /// Most live leases one identity key may hold on this target; `None` is unlimited.
    pub max_live_leases: Option<u32>,
    /// When the target's signing key rotates by itself; `None`: only when forced.
    pub rotation: Option<crate::rotation::Schedule>,
    /// When the target's upstream root credential rotates; `None`: only when forced.
    pub root_rotation: Option<crate::rotation::Schedule>,
    /// `token_issuer = "target"`: the target's tokens carry its own issuer
    /// (`<issuer_url>/targets/<name>`) and its keys stay out of the shared JWKS, so only a
    /// verifier set up for this target accepts them.
    pub own_issuer: bool,
    /// Kind-specific settings.
    pub kind: TargetKind,
}

/// The issuer of a target's tokens under `token_issuer = "target"`, and the base of its
/// own discovery document and JWKS (served for every signing target).
pub fn target_issuer_url(broker_issuer: &str, target: &str) -> String {
    format!("{}/targets/{target}", broker_issuer.trim_end_matches('/'))
}

impl TargetConfig {
    /// The `iss` of what this target signs.
    pub fn issuer_url(&self, broker_issuer: &str) -> String {
        if self.own_issuer {
            target_issuer_url(broker_issuer, &self.name)
        } else {
            broker_issuer.to_string()
        }
    }

    /// The limits policy applies on this target.
    pub fn limits(&self) -> crate::policy::TargetLimits {
        crate::policy::TargetLimits {
            default_ttl: self.default_ttl,
            max_ttl: self.max_ttl,
            max_lifetime: self.max_lifetime,
        }
    }
}

/// Where an upstream secret is read from, at startup. Never the secret itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// A file whose contents (without a trailing newline) are the secret.
    File(PathBuf),
    /// An environment variable.
    Env(String),
}

impl SecretRef {
    /// Where it comes from, for messages (`file /run/x`, `environment variable X`).
    pub fn describe(&self) -> String {
        match self {
            SecretRef::File(p) => format!("file {}", p.display()),
            SecretRef::Env(v) => format!("environment variable {v}"),
        }
    }

    /// Reads the secret as text. Fails when the file cannot be read, the variable is
    /// unset, or the value is empty; the message names the source, never the value.
    pub fn load(&self) -> Result<SecretString, String> {
        let raw = match self {
            SecretRef::File(p) => std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read {}: {e}", self.describe()))?,
            SecretRef::Env(v) => {
                std::env::var(v).map_err(|_| format!("{} is not set", self.describe()))?
            }
        };
        let raw = Secret::new(raw);
        let value = raw.expose().trim_end_matches(['\r', '\n']);
        if value.is_empty() {
            return Err(format!("{} is empty", self.describe()));
        }
        Ok(Secret::new(value.to_string()))
    }

    /// Reads key bytes: a file's raw bytes, or a variable's base64 text. Fails like
    /// [`SecretRef::load`], or when the variable is not base64.
    pub fn load_bytes(&self) -> Result<SecretBytes, String> {
        let bytes = match self {
            SecretRef::File(p) => {
                std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", self.describe()))?
            }
            SecretRef::Env(_) => {
                use base64::Engine;
                let text = self.load()?;
                base64::engine::general_purpose::STANDARD
                    .decode(text.expose().trim())
                    .map_err(|_| format!("{} is not base64", self.describe()))?
            }
        };
        if bytes.is_empty() {
            return Err(format!("{} is empty", self.describe()));
        }
        Ok(Secret::new(bytes))
    }
}

/// Kind-specific target settings.
#[derive(Debug, Clone)]
pub enum TargetKind {
    /// A JWT signed by the broker's key ring.
    Jwt(JwtTargetConfig),
    /// An Apache Pulsar token.
    Pulsar(PulsarConfig),
    /// An Apache Airflow 3 API token.
    Airflow(AirflowConfig),
    /// A Databricks OAuth token or personal access token.
    Databricks(DatabricksConfig),
    /// A Vercel access token.
    Vercel(VercelConfig),
    /// A Prefect Cloud service-account API key.
    Prefect(PrefectConfig),
    /// A Bitbucket Cloud OAuth access token (client credentials).
    Bitbucket(OAuthClientConfig),
    /// A PostgreSQL login role per lease.
    Postgres(PostgresConfig),
    /// A token from any OAuth2 server.
    OAuth2(OAuth2Config),
}

impl TargetKind {
    /// The kind's name as written in config.
    pub fn name(&self) -> &'static str {
        match self {
            TargetKind::Jwt(_) => "jwt",
            TargetKind::Pulsar(_) => "pulsar",
            TargetKind::Airflow(_) => "airflow",
            TargetKind::Databricks(_) => "databricks",
            TargetKind::Vercel(_) => "vercel",
            TargetKind::Prefect(_) => "prefect",
            TargetKind::Bitbucket(_) => "bitbucket",
            TargetKind::Postgres(_) => "postgres",
            TargetKind::OAuth2(_) => "oauth2",
        }
    }

    /// The algorithm of the broker key this target signs with, for kinds that sign
    /// with the key ring (their keys are published in the JWKS and rotate on
    /// `rotation`); `None` for kinds that do not.
    pub fn signing_alg(&self) -> Option<Alg> {
        match self {
            TargetKind::Jwt(j) => Some(j.algorithm),
            TargetKind::Pulsar(p) => match &p.key {
                PulsarKey::Broker(alg) => Some(*alg),
                PulsarKey::Shared(_) => None,
            },
            TargetKind::Airflow(a) => Some(a.algorithm),
            TargetKind::Databricks(d) => match &d.mode {
                DatabricksMode::Federation(f) => Some(f.algorithm),
                DatabricksMode::M2m { .. } | DatabricksMode::Pat { .. } => None,
            },
            TargetKind::OAuth2(o) => match &o.grant {
                OAuth2Grant::TokenExchange(f) => Some(f.algorithm),
                OAuth2Grant::ClientCredentials => None,
            },
            TargetKind::Vercel(_)
            | TargetKind::Prefect(_)
            | TargetKind::Bitbucket(_)
            | TargetKind::Postgres(_) => None,
        }
    }

    /// Whether the credential itself is a token signed with the target's broker key
    /// (dropping the key makes it stop verifying), as opposed to a credential the
    /// target's API issued in exchange for a broker-signed assertion.
    pub fn credential_is_signed(&self) -> bool {
        matches!(self, TargetKind::Jwt(_) | TargetKind::Airflow(_))
            || matches!(self, TargetKind::Pulsar(p) if matches!(p.key, PulsarKey::Broker(_)))
    }

    /// The least time this kind's verifiers are known to cache the broker's JWKS, which
    /// a next key must be published for before it signs, whatever `[rotation]` says:
    /// Airflow reads an http(s) JWKS at most once an hour and never refetches on an
    /// unknown `kid`.
    pub fn verifier_cache_floor(&self) -> std::time::Duration {
        match self {
            TargetKind::Airflow(_) => std::time::Duration::from_secs(3600),
            _ => std::time::Duration::ZERO,
        }
    }

    /// The audiences (`aud`) of the tokens this target signs with a broker key, which a
    /// verifier of the broker's JWKS checks; empty for kinds that do not sign or sign
    /// without an `aud` claim.
    pub fn token_audiences(&self) -> Vec<&str> {
        match self {
            TargetKind::Jwt(j) => vec![j.audience.as_str()],
            TargetKind::Airflow(a) => vec![a.audience.as_str()],
            TargetKind::Pulsar(p) => match (&p.key, &p.audience_claim, &p.audience) {
                (PulsarKey::Broker(_), Some(c), Some(a)) if c == "aud" => vec![a.as_str()],
                _ => Vec::new(),
            },
            TargetKind::Databricks(d) => match &d.mode {
                DatabricksMode::Federation(f) => vec![f.audience.as_str()],
                _ => Vec::new(),
            },
            TargetKind::OAuth2(o) => match &o.grant {
                OAuth2Grant::TokenExchange(f) => vec![f.audience.as_str()],
                OAuth2Grant::ClientCredentials => Vec::new(),
            },
            TargetKind::Vercel(_)
            | TargetKind::Prefect(_)
            | TargetKind::Bitbucket(_)
            | TargetKind::Postgres(_) => Vec::new(),
        }
    }

    /// The scopes this kind knows, where it maps scopes to something at the target;
    /// `None` where any scope name is accepted.
    pub fn known_scopes(&self) -> Option<Vec<&str>> {
        fn keys(m: &BTreeMap<String, String>) -> Option<Vec<&str>> {
            (!m.is_empty()).then(|| m.keys().map(String::as_str).collect())
        }
        match self {
            TargetKind::Pulsar(p) => match &p.admin {
                Some(a) => Some(a.permissions.keys().map(String::as_str).collect()),
                None => keys(&p.roles),
            },
            TargetKind::Airflow(a) => keys(&a.roles),
            TargetKind::Prefect(p) => keys(&p.roles),
            TargetKind::Postgres(p) => Some(p.roles.keys().map(String::as_str).collect()),
            TargetKind::OAuth2(o) => keys(&o.scopes),
            TargetKind::Jwt(_)
            | TargetKind::Databricks(_)
            | TargetKind::Vercel(_)
            | TargetKind::Bitbucket(_) => None,
        }
    }
}
