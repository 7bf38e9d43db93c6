//! The raw serde mirror of the TOML file. Unknown keys are errors everywhere.

use serde::Deserialize;

pub use crate::clock::Dur;
pub use crate::policy::RawRule;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub server: RawServer,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub issuers: Vec<RawIssuer>,
    #[serde(default)]
    pub targets: Vec<RawTarget>,
    #[serde(default)]
    pub rules: Vec<RawRule>,
    #[serde(default)]
    pub leases: RawLeases,
    #[serde(default)]
    pub audit: RawAudit,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub rotation: RawRotation,
    #[serde(default)]
    pub policy: RawPolicy,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub denial_detail: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawRotation {
    pub scheduler: Option<bool>,
    pub check_interval: Option<Dur>,
    pub jwks_cache: Option<Dur>,
    pub lock_ttl: Option<Dur>,
    pub jitter: Option<Dur>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub identity_rate: Option<f64>,
    pub identity_burst: Option<u32>,
    pub source_ip_rate: Option<f64>,
    pub source_ip_burst: Option<u32>,
    pub unidentified_rate: Option<f64>,
    pub unidentified_burst: Option<u32>,
    pub request_timeout: Option<Dur>,
    pub body_timeout: Option<Dur>,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    pub max_connections: Option<usize>,
    pub max_connections_per_source: Option<usize>,
    pub handshake_timeout: Option<Dur>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub checkpoint_every: Option<u64>,
    pub checkpoint_interval: Option<Dur>,
    pub witness_file: Option<String>,
    pub witness_url: Option<String>,
    pub witness_timeout: Option<Dur>,
    #[serde(default)]
    pub redact_claims: Vec<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawLeases {
    pub reap_interval: Option<Dur>,
    pub retain: Option<Dur>,
    pub retry_max_backoff: Option<Dur>,
    pub stuck_after: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub grpc_addr: String,
    pub http_addr: String,
    pub issuer_url: String,
    pub tls: Option<RawTls>,
    #[serde(default)]
    pub allow_plaintext: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert_file: String,
    pub key_file: String,
    pub client_ca_file: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub url: Option<String>,
    pub path: Option<String>,
    pub master_key_file: Option<String>,
    pub busy_timeout: Option<Dur>,
    pub integrity_check_interval: Option<Dur>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub level: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIssuer {
    pub name: String,
    #[serde(default)]
    pub preset: Option<String>,
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    pub jwks_url: Option<String>,
    pub leeway: Option<Dur>,
    pub max_token_age: Option<Dur>,
    pub algorithms: Option<Vec<String>>,
    pub jwks_refresh: Option<Dur>,
    pub jwks_cooldown: Option<Dur>,
    pub jwks_max_staleness: Option<Dur>,
    pub jwks_max_bytes: Option<usize>,
    pub jwks_max_keys: Option<usize>,
    pub max_mints_per_token: Option<u32>,
    pub identity_key_environment: Option<bool>,
    pub ca_file: Option<String>,
}

/// The keys every target has; the kind's own keys stay in `settings` and are checked
/// against the kind's mirror (which refuses unknown keys).
#[derive(Debug, Deserialize)]
pub struct RawTarget {
    pub name: String,
    pub kind: String,
    pub default_ttl: Option<Dur>,
    pub max_ttl: Option<Dur>,
    pub max_lifetime: Option<Dur>,
    pub max_live_leases: Option<u32>,
    pub rotation: Option<Dur>,
    pub rotation_window: Option<String>,
    pub root_rotation: Option<Dur>,
    pub root_rotation_window: Option<String>,
    pub token_issuer: Option<String>,
    #[serde(flatten)]
    pub settings: toml::Table,
}
