//! Checked settings of each target kind: what the minters are built from. The
//! configuration file's raw form and its checks are in `config`, which builds these.
//! Upstream secrets are never in the file: each is a [`SecretRef`] naming a file or an
//! environment variable.

use super::Template;
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

/// Settings of a `jwt` target.
#[derive(Debug, Clone)]
pub struct JwtTargetConfig {
    /// `aud` of minted tokens.
    pub audience: String,
    /// Signing algorithm.
    pub algorithm: Alg,
    /// `sub` template; `None` means the caller's stable identity key.
    pub subject: Option<Template>,
    /// Extra claims, templated.
    pub claims: Vec<(String, Template)>,
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

/// How Pulsar tokens are signed.
#[derive(Debug, Clone)]
pub enum PulsarKey {
    /// The broker's own key (RS256 or ES256); Pulsar gets the public key
    /// (`latchkey keys export --format pulsar`).
    Broker(Alg),
    /// An HS256 secret shared with Pulsar (`tokenSecretKey`).
    Shared(SecretRef),
}

/// Settings of a `pulsar` target.
#[derive(Debug, Clone)]
pub struct PulsarConfig {
    /// Signing key.
    pub key: PulsarKey,
    /// Claim carrying the role (`tokenAuthClaim`), default `sub`.
    pub role_claim: String,
    /// Claim carrying the audience (`tokenAudienceClaim`), if Pulsar checks one.
    pub audience_claim: Option<String>,
    /// The audience value (`tokenAudience`).
    pub audience: Option<String>,
    /// Role template when no `roles` map applies; default the caller's identity key.
    pub role: Option<Template>,
    /// Scope → role.
    pub roles: BTreeMap<String, String>,
    /// Per-lease permissions through the admin REST API.
    pub admin: Option<PulsarAdmin>,
}

/// Pulsar admin REST settings for per-lease permissions.
#[derive(Debug, Clone)]
pub struct PulsarAdmin {
    /// Admin REST base URL (`http://pulsar:8080`).
    pub url: String,
    /// Admin token.
    pub token: SecretRef,
    /// Scope → what it grants.
    pub permissions: BTreeMap<String, PulsarPermission>,
    /// Upstream call timeout.
    pub timeout: Duration,
}

/// One scope's Pulsar permission grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulsarPermission {
    /// `tenant/namespace` or `persistent://tenant/namespace/topic`.
    pub resource: PulsarResource,
    /// Actions granted.
    pub actions: Vec<String>,
}

/// A namespace or a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PulsarResource {
    /// `tenant/namespace`.
    Namespace {
        /// Tenant.
        tenant: String,
        /// Namespace.
        namespace: String,
    },
    /// `persistent://tenant/namespace/topic`.
    Topic {
        /// Tenant.
        tenant: String,
        /// Namespace.
        namespace: String,
        /// Topic.
        topic: String,
    },
}

impl PulsarResource {
    /// The admin REST path of its permission for `role` (segments percent-encoded).
    pub fn permission_path(&self, role: &str) -> String {
        let enc = |s: &str| -> String {
            form_urlencoded::byte_serialize(s.as_bytes())
                .collect::<String>()
                .replace('+', "%20")
        };
        match self {
            PulsarResource::Namespace { tenant, namespace } => format!(
                "/admin/v2/namespaces/{}/{}/permissions/{}",
                enc(tenant),
                enc(namespace),
                enc(role)
            ),
            PulsarResource::Topic {
                tenant,
                namespace,
                topic,
            } => format!(
                "/admin/v2/persistent/{}/{}/{}/permissions/{}",
                enc(tenant),
                enc(namespace),
                enc(topic),
                enc(role)
            ),
        }
    }
}

/// Which Airflow auth manager reads the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AirflowAuthManager {
    /// The simple auth manager: `sub` is a user name, `role` the role.
    Simple,
    /// The FAB auth manager: `sub` is the numeric user id.
    Fab,
}

/// Settings of an `airflow` target.
#[derive(Debug, Clone)]
pub struct AirflowConfig {
    /// Signing algorithm; Airflow's `jwt_algorithm` must say the same.
    pub algorithm: Alg,
    /// `aud` (Airflow's `jwt_audience`).
    pub audience: String,
    /// `sub` template; default the caller's identity key.
    pub subject: Option<Template>,
    /// The auth manager.
    pub auth_manager: AirflowAuthManager,
    /// Role when no `roles` map applies (simple auth manager).
    pub role: Option<String>,
    /// Scope → role (simple auth manager).
    pub roles: BTreeMap<String, String>,
}

/// Settings of a `databricks` target.
#[derive(Debug, Clone)]
pub struct DatabricksConfig {
    /// `https://<workspace>`.
    pub workspace_url: String,
    /// How tokens are obtained.
    pub mode: DatabricksMode,
    /// Upstream call timeout.
    pub timeout: Duration,
}

/// The three Databricks modes.
#[derive(Debug, Clone)]
pub enum DatabricksMode {
    /// A broker-signed JWT exchanged under a service principal's federation policy.
    Federation(Federation),
    /// Client credentials with a stored service-principal secret.
    M2m {
        /// The service principal's application id.
        client_id: String,
        /// Its OAuth secret.
        client_secret: SecretRef,
    },
    /// A personal access token with a lifetime.
    Pat {
        /// The token that creates tokens.
        token: SecretRef,
        /// Create on behalf of this service principal (token management API).
        application_id: Option<String>,
    },
}

/// A broker-signed JWT presented to an OAuth2 server by RFC 8693 token exchange.
#[derive(Debug, Clone)]
pub struct Federation {
    /// The OAuth client id sent with the exchange.
    pub client_id: Option<String>,
    /// `aud` of the broker's JWT.
    pub audience: String,
    /// `sub` template; default the caller's identity key.
    pub subject: Option<Template>,
    /// Signing algorithm.
    pub algorithm: Alg,
}

/// Settings of a `vercel` target.
#[derive(Debug, Clone)]
pub struct VercelConfig {
    /// API base, default `https://api.vercel.com`.
    pub api_url: String,
    /// Team the tokens are created for.
    pub team_id: Option<String>,
    /// The full-account token that creates tokens.
    pub token: SecretRef,
    /// Upstream call timeout.
    pub timeout: Duration,
}

/// Settings of a `prefect` target.
#[derive(Debug, Clone)]
pub struct PrefectConfig {
    /// API base, default `https://api.prefect.cloud/api`.
    pub api_url: String,
    /// Account id.
    pub account_id: String,
    /// Account role of created service accounts, unless `roles` maps the scope.
    pub account_role_id: String,
    /// Scope → account role id.
    pub roles: BTreeMap<String, String>,
    /// API key of an account member allowed to manage service accounts.
    pub token: SecretRef,
    /// Upstream call timeout.
    pub timeout: Duration,
}

/// OAuth client credentials (`bitbucket`).
#[derive(Debug, Clone)]
pub struct OAuthClientConfig {
    /// Token endpoint.
    pub token_url: String,
    /// Client id (the consumer key).
    pub client_id: String,
    /// Client secret.
    pub client_secret: SecretRef,
    /// Upstream call timeout.
    pub timeout: Duration,
}

/// Settings of a `postgres` target.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// Admin connection URL, without a password.
    pub url: String,
    /// The admin's password, if it logs in with one (needed for root rotation).
    pub password: Option<SecretRef>,
    /// Prefix of every role the broker creates; the reconciler owns these names.
    pub role_prefix: String,
    /// Scope → group roles granted.
    pub roles: BTreeMap<String, Vec<String>>,
    /// Further databases where revocation drops what the role owns.
    pub databases: Vec<String>,
    /// Connect and statement timeout.
    pub timeout: Duration,
}

/// How a generic OAuth2 client authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// HTTP Basic (`client_secret_basic`).
    Basic,
    /// Form fields (`client_secret_post`).
    Post,
}

/// The grant a generic `oauth2` target uses.
#[derive(Debug, Clone)]
pub enum OAuth2Grant {
    /// `client_credentials`.
    ClientCredentials,
    /// RFC 8693 exchange of a broker-signed JWT.
    TokenExchange(Federation),
}

/// Settings of an `oauth2` target.
#[derive(Debug, Clone)]
pub struct OAuth2Config {
    /// Token endpoint.
    pub token_url: String,
    /// Grant.
    pub grant: OAuth2Grant,
    /// Client id.
    pub client_id: Option<String>,
    /// Client secret (required for client credentials).
    pub client_secret: Option<SecretRef>,
    /// How the client authenticates.
    pub client_auth: ClientAuth,
    /// `audience` parameter.
    pub audience: Option<String>,
    /// `resource` parameter.
    pub resource: Option<String>,
    /// Scope → upstream scope string; empty passes scopes through.
    pub scopes: BTreeMap<String, String>,
    /// Upstream call timeout.
    pub timeout: Duration,
}
