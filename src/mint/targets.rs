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
    /// Kind-specific settings.
    pub kind: TargetKind,
}

impl TargetConfig {
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
