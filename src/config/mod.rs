//! Configuration: one TOML file, parsed into a raw serde mirror ([`raw`], unknown keys
//! refused), then checked into [`Config`]. Every error names the file, the key and the
//! reason. Secrets are never in the file itself: the master key comes from the
//! environment or a key file named here.

mod raw;
mod targets;

pub use crate::broker::RotationConfig;
pub use crate::identity::IssuerConfig;
pub use crate::lease::LeaseConfig;
pub use crate::mint::{
    AirflowAuthManager, AirflowConfig, ClientAuth, DatabricksConfig, DatabricksMode, Federation,
    JwtTargetConfig, OAuth2Config, OAuth2Grant, OAuthClientConfig, PostgresConfig, PrefectConfig,
    PulsarAdmin, PulsarConfig, PulsarKey, PulsarPermission, PulsarResource, SecretRef,
    TargetConfig, TargetKind, VercelConfig,
};

use crate::identity::Preset;
use crate::jose::Alg;
use crate::policy::{DenialDetail, KnownTarget, Policy, Rule};
use raw::*;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration problem: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or `<inline>`).
    pub file: String,
    /// The key, as a TOML path (`rules[0].grants[1].target`), or `line N` for syntax errors.
    pub key: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.file, self.key, self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was read from.
    pub source: String,
    /// Listeners and the broker's own issuer URL.
    pub server: ServerConfig,
    /// The embedded store.
    pub store: StoreConfig,
    /// Logging defaults (the CLI may override).
    pub log: LogConfig,
    /// Trusted identity token issuers.
    pub issuers: Vec<IssuerConfig>,
    /// Targets credentials are minted for.
    pub targets: Vec<TargetConfig>,
    /// The compiled policy.
    pub policy: Policy,
    /// Lease bookkeeping.
    pub leases: LeaseConfig,
    /// Audit checkpoints, witness and redaction.
    pub audit: crate::audit::checkpoint::Config,
    /// Rate limits, timeouts and connection caps.
    pub limits: LimitsConfig,
    /// The rotation scheduler.
    pub rotation: RotationConfig,
}

/// Rate limits, timeouts and connection caps (`[limits]`).
#[derive(Debug, Clone, PartialEq)]
pub struct LimitsConfig {
    /// Per-identity and per-source-IP rate limits.
    pub rate: crate::ratelimit::Limits,
    /// Longest time one request may take, on either port.
    pub request_timeout: Duration,
    /// Most open connections per port; further connections wait to be accepted.
    pub max_connections: usize,
    /// Most open connections per port from one source (an IPv4 address or an IPv6 /64);
    /// more are closed at once. Behind a reverse proxy every client shares the proxy's
    /// address: raise it to `max_connections` there.
    pub max_connections_per_source: usize,
    /// Longest from accept to a usable connection (TLS handshake, HTTP/2 preface).
    pub handshake_timeout: Duration,
    /// Longest an HTTP request body may take to arrive whole.
    pub body_timeout: Duration,
    /// Proxies whose `X-Forwarded-For` is believed for the source limits.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            rate: crate::ratelimit::Limits::default(),
            request_timeout: Duration::from_secs(30),
            max_connections: 4096,
            max_connections_per_source: 256,
            handshake_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(5),
            trusted_proxies: Vec::new(),
        }
    }
}

/// Listener settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// gRPC listener.
    pub grpc_addr: SocketAddr,
    /// HTTP listener (discovery, JWKS).
    pub http_addr: SocketAddr,
    /// The `iss` of tokens Latchkey signs, without a trailing slash.
    pub issuer_url: String,
    /// TLS for the listeners.
    pub tls: Option<TlsConfig>,
}

/// TLS files.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
    /// PEM CA bundle; when set, clients must present a certificate it signed.
    pub client_ca_file: Option<PathBuf>,
}

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Where the store is (`url`, or `path` for an SQLite file).
    pub location: crate::store::Location,
    /// File holding the base64 master key (else `LATCHKEY_MASTER_KEY`).
    pub master_key_file: Option<PathBuf>,
    /// How long a commit waits on a lock held elsewhere before failing closed.
    pub busy_timeout: Duration,
    /// How often the running broker checks the store's integrity (zero: only at start).
    pub integrity_check_interval: Duration,
}

/// Log settings.
#[derive(Debug, Clone, Default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub json: bool,
    /// An `EnvFilter` directive.
    pub level: Option<String>,
}

const MAX_TTL_CEILING: Duration = Duration::from_secs(24 * 3600);
const MAX_LIFETIME_CEILING: Duration = Duration::from_secs(30 * 24 * 3600);

impl Config {
    /// What the broker is built from: the parts of this configuration it uses.
    pub fn broker_settings(&self) -> crate::broker::Settings {
        crate::broker::Settings {
            issuer_url: self.server.issuer_url.clone(),
            issuers: self.issuers.clone(),
            targets: self.targets.clone(),
            policy: self.policy.clone(),
            leases: self.leases.clone(),
            rate: self.limits.rate,
            rotation: self.rotation.clone(),
            redact_claims: self.audit.redact_claims.clone(),
        }
    }

    /// Reads and checks a file. Fails with the file, key and reason.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "(file)".into(),
            reason: format!("cannot read: {e}"),
        })?;
        Config::parse(&text, &file)
    }

    /// Parses and checks TOML text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| syntax_error(text, file, &e))?;
        Checker { file }.check(raw)
    }

    /// The target of that name.
    pub fn target(&self, name: &str) -> Option<&TargetConfig> {
        self.targets.iter().find(|t| t.name == name)
    }
}

fn syntax_error(text: &str, file: &str, e: &toml::de::Error) -> ConfigError {
    let key = match e.span() {
        Some(span) => {
            let line_no = text[..span.start.min(text.len())].matches('\n').count() + 1;
            let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
            match line.split_once('=') {
                Some((k, _)) if !line.starts_with('[') => {
                    format!("line {line_no}, key `{}`", k.trim())
                }
                _ => format!("line {line_no}, `{line}`"),
            }
        }
        None => "(document)".into(),
    };
    ConfigError {
        file: file.into(),
        key,
        reason: e.message().trim().to_string(),
    }
}

struct Checker<'a> {
    file: &'a str,
}

impl Checker<'_> {
    fn err(&self, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.into(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    fn check(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let server = self.server(raw.server)?;
        let location =
            match (raw.store.url, raw.store.path) {
                (Some(_), Some(_)) => return Err(self.err(
                    "store.path",
                    "set store.url or store.path (the same as url = \"sqlite://PATH\"), not both",
                )),
                (Some(url), None) => {
                    crate::store::Location::parse(&url).map_err(|e| self.err("store.url", e))?
                }
                (None, Some(path)) => {
                    if path.is_empty() {
                        return Err(self.err("store.path", "must not be empty"));
                    }
                    crate::store::Location::Sqlite(PathBuf::from(path))
                }
                (None, None) => crate::store::Location::Sqlite(PathBuf::from("latchkey.db")),
            };
        let store = StoreConfig {
            location,
            master_key_file: raw.store.master_key_file.map(PathBuf::from),
            busy_timeout: raw
                .store
                .busy_timeout
                .map(|d| d.0)
                .unwrap_or(Duration::from_secs(5)),
            integrity_check_interval: raw
                .store
                .integrity_check_interval
                .map(|d| d.0)
                .unwrap_or(Duration::from_secs(3600)),
        };
        if !store.integrity_check_interval.is_zero()
            && store.integrity_check_interval < Duration::from_secs(60)
        {
            return Err(self.err(
                "store.integrity_check_interval",
                "must be at least 1m (the check reads the whole store), or 0s to check only at start",
            ));
        }
        if store.busy_timeout > Duration::from_secs(60) {
            return Err(self.err(
                "store.busy_timeout",
                "must be at most 60s (requests wait this long before failing closed)",
            ));
        }
        let log = LogConfig {
            json: match raw.log.format.as_deref() {
                None | Some("text") => false,
                Some("json") => true,
                Some(other) => {
                    return Err(self.err(
                        "log.format",
                        format!("unknown format {other:?}; use \"text\" or \"json\""),
                    ))
                }
            },
            level: raw.log.level,
        };
        let mut issuers = Vec::new();
        for (i, ri) in raw.issuers.into_iter().enumerate() {
            let key = format!("issuers[{i}]");
            let issuer = self.issuer(&key, ri)?;
            if issuers.iter().any(|x: &IssuerConfig| x.name == issuer.name) {
                return Err(self.err(
                    format!("{key}.name"),
                    format!("duplicate issuer name {:?}", issuer.name),
                ));
            }
            if issuers
                .iter()
                .any(|x: &IssuerConfig| x.issuer == issuer.issuer)
            {
                return Err(self.err(
                    format!("{key}.issuer"),
                    "another issuer entry has the same issuer URL",
                ));
            }
            issuers.push(issuer);
        }
        let mut targets: Vec<TargetConfig> = Vec::new();
        for (i, rt) in raw.targets.into_iter().enumerate() {
            let key = format!("targets[{i}]");
            let t = self.target(&key, rt)?;
            if targets.iter().any(|x| x.name == t.name) {
                return Err(self.err(
                    format!("{key}.name"),
                    format!("duplicate target name {:?}", t.name),
                ));
            }
            if let Some((other, aud)) = targets
                .iter()
                .find_map(|x| shared_audience(x, &t).map(|a| (x, a)))
            {
                return Err(self.err(
                    format!("{key}.token_issuer"),
                    format!(
                        "target {:?} also signs tokens for audience {aud:?} with keys in the shared JWKS, so a verifier trusting {iss}/.well-known/jwks.json would take either target's tokens for the other's. Set token_issuer = \"target\" on one of them (it then signs as {iss}/targets/<name>, with its own discovery document and JWKS), or give each its own audience",
                        other.name,
                        iss = server.issuer_url,
                    ),
                ));
            }
            if let Some(other) = targets.iter().find(|x| same_role_space(x, &t)) {
                return Err(self.err(
                    format!("{key}.role_prefix"),
                    format!(
                        "target {:?} creates roles under the same prefix on the same server; give each target its own role_prefix",
                        other.name
                    ),
                ));
            }
            targets.push(t);
        }
        let issuer_names: Vec<&str> = issuers.iter().map(|i| i.name.as_str()).collect();
        let known: Vec<KnownTarget<'_>> = targets
            .iter()
            .map(|t| KnownTarget {
                name: &t.name,
                max_ttl: t.max_ttl,
                max_lifetime: t.max_lifetime,
                known_scopes: t.kind.known_scopes(),
            })
            .collect();
        let mut rules: Vec<Rule> = Vec::new();
        for (i, rr) in raw.rules.into_iter().enumerate() {
            let key = format!("rules[{i}]");
            let r = Rule::parse(&key, rr, &issuer_names, &known)
                .map_err(|e| self.err(e.key, e.reason))?;
            if rules.iter().any(|x| x.name == r.name) {
                return Err(self.err(
                    format!("{key}.name"),
                    format!("duplicate rule name {:?}", r.name),
                ));
            }
            rules.push(r);
        }
        let rotation = self.rotation(raw.rotation)?;
        let denial_detail = match raw.policy.denial_detail.as_deref() {
            None => DenialDetail::default(),
            Some(d) => DenialDetail::parse(d).ok_or_else(|| {
                self.err(
                    "policy.denial_detail",
                    format!("{d:?} is not a detail level; use \"none\", \"names\" or \"full\""),
                )
            })?,
        };
        Ok(Config {
            source: self.file.into(),
            server,
            store,
            log,
            issuers,
            targets,
            policy: Policy::new(rules).with_denial_detail(denial_detail),
            leases: self.leases(raw.leases)?,
            audit: self.audit(raw.audit)?,
            limits: self.limits(raw.limits)?,
            rotation,
        })
    }

    fn rotation(&self, r: RawRotation) -> Result<RotationConfig, ConfigError> {
        let d = RotationConfig::default();
        let c = RotationConfig {
            scheduler: r.scheduler.unwrap_or(d.scheduler),
            check_interval: r.check_interval.map(|x| x.0).unwrap_or(d.check_interval),
            jwks_cache: r.jwks_cache.map(|x| x.0).unwrap_or(d.jwks_cache),
            lock_ttl: r.lock_ttl.map(|x| x.0).unwrap_or(d.lock_ttl),
            jitter: r.jitter.map(|x| x.0).unwrap_or(d.jitter),
        };
        if c.check_interval < Duration::from_secs(1) || c.check_interval > Duration::from_secs(3600)
        {
            return Err(self.err("rotation.check_interval", "must be between 1s and 1h"));
        }
        if c.jwks_cache > Duration::from_secs(86_400) {
            return Err(self.err("rotation.jwks_cache", "must be at most 24h"));
        }
        if c.lock_ttl < Duration::from_secs(10) || c.lock_ttl > Duration::from_secs(3600) {
            return Err(self.err("rotation.lock_ttl", "must be between 10s and 1h"));
        }
        Ok(c)
    }

    fn schedule(
        &self,
        key: &str,
        period: Option<raw::Dur>,
        window: Option<String>,
    ) -> Result<Option<crate::rotation::Schedule>, ConfigError> {
        let Some(period) = period else {
            if window.is_some() {
                return Err(self.err(format!("{key}_window"), "a window needs a rotation period"));
            }
            return Ok(None);
        };
        if period.0 < Duration::from_secs(3600) {
            return Err(self.err(key, "must be at least 1h"));
        }
        let window = window
            .map(|w| crate::rotation::Window::parse(&w))
            .transpose()
            .map_err(|e| self.err(format!("{key}_window"), e))?;
        Ok(Some(crate::rotation::Schedule {
            period: period.0,
            window,
            jitter: Duration::ZERO,
        }))
    }

    fn limits(&self, r: RawLimits) -> Result<LimitsConfig, ConfigError> {
        use crate::ratelimit::Limit;
        let d = LimitsConfig::default();
        let limit = |name: &str, rate: Option<f64>, burst: Option<u32>, d: Limit| {
            let l = Limit {
                rate: rate.unwrap_or(d.rate),
                burst: burst.unwrap_or(if rate.is_some() {
                    (rate.unwrap_or(0.0) * 2.0).ceil().max(1.0) as u32
                } else {
                    d.burst
                }),
            };
            if !l.rate.is_finite() || l.rate < 0.0 || (l.rate > 0.0 && l.rate < 0.001) {
                return Err(self.err(
                    format!("limits.{name}_rate"),
                    "must be a number of requests per second, at least 0.001, or 0 to turn the limit off",
                ));
            }
            if l.rate > 0.0 && l.burst == 0 {
                return Err(self.err(format!("limits.{name}_burst"), "must be at least 1"));
            }
            Ok(l)
        };
        let c = LimitsConfig {
            rate: crate::ratelimit::Limits {
                identity: limit(
                    "identity",
                    r.identity_rate,
                    r.identity_burst,
                    d.rate.identity,
                )?,
                source_ip: limit(
                    "source_ip",
                    r.source_ip_rate,
                    r.source_ip_burst,
                    d.rate.source_ip,
                )?,
                unidentified: limit(
                    "unidentified",
                    r.unidentified_rate,
                    r.unidentified_burst,
                    d.rate.unidentified,
                )?,
            },
            request_timeout: r.request_timeout.map(|x| x.0).unwrap_or(d.request_timeout),
            max_connections: r.max_connections.unwrap_or(d.max_connections),
            max_connections_per_source: r
                .max_connections_per_source
                .unwrap_or(d.max_connections_per_source),
            handshake_timeout: r
                .handshake_timeout
                .map(|x| x.0)
                .unwrap_or(d.handshake_timeout),
            body_timeout: r.body_timeout.map(|x| x.0).unwrap_or(d.body_timeout),
            trusted_proxies: r
                .trusted_proxies
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    p.parse::<ipnet::IpNet>()
                        .or_else(|_| p.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                        .map_err(|_| {
                            self.err(
                                format!("limits.trusted_proxies[{i}]"),
                                format!("{p:?} is not an address or a CIDR range"),
                            )
                        })
                })
                .collect::<Result<_, _>>()?,
        };
        if c.body_timeout < Duration::from_millis(100) || c.body_timeout > Duration::from_secs(60) {
            return Err(self.err("limits.body_timeout", "must be between 100ms and 60s"));
        }
        if c.request_timeout < Duration::from_secs(1)
            || c.request_timeout > Duration::from_secs(600)
        {
            return Err(self.err("limits.request_timeout", "must be between 1s and 10m"));
        }
        if c.max_connections == 0 {
            return Err(self.err("limits.max_connections", "must be at least 1"));
        }
        if c.max_connections_per_source == 0 {
            return Err(self.err("limits.max_connections_per_source", "must be at least 1"));
        }
        if c.handshake_timeout < Duration::from_millis(100)
            || c.handshake_timeout > Duration::from_secs(60)
        {
            return Err(self.err("limits.handshake_timeout", "must be between 100ms and 60s"));
        }
        Ok(c)
    }

    fn audit(&self, r: RawAudit) -> Result<crate::audit::checkpoint::Config, ConfigError> {
        use crate::audit::checkpoint::{Config as AuditConfig, WitnessTarget};
        let d = AuditConfig::default();
        let checkpoint_every = r.checkpoint_every.unwrap_or(d.checkpoint_every);
        if !(1..=10_000_000).contains(&checkpoint_every) {
            return Err(self.err(
                "audit.checkpoint_every",
                "must be between 1 and 10000000 records",
            ));
        }
        let checkpoint_interval = r
            .checkpoint_interval
            .map(|x| x.0)
            .unwrap_or(d.checkpoint_interval);
        if checkpoint_interval < Duration::from_secs(1)
            || checkpoint_interval > Duration::from_secs(24 * 3600)
        {
            return Err(self.err("audit.checkpoint_interval", "must be between 1s and 24h"));
        }
        let witness = match (r.witness_file, r.witness_url) {
            (Some(_), Some(_)) => {
                return Err(self.err(
                    "audit.witness_url",
                    "set witness_file or witness_url, not both",
                ))
            }
            (Some(f), None) if f.trim().is_empty() => {
                return Err(self.err("audit.witness_file", "must not be empty"))
            }
            (Some(f), None) => Some(WitnessTarget::File(PathBuf::from(f))),
            (None, Some(u)) => Some(WitnessTarget::Url(self.url(
                "audit.witness_url",
                &u,
                true,
            )?)),
            (None, None) => None,
        };
        for (i, c) in r.redact_claims.iter().enumerate() {
            if c.is_empty() || c == "/" || c.chars().any(char::is_control) {
                return Err(self.err(
                    format!("audit.redact_claims[{i}]"),
                    "must be a claim name or a JSON pointer like \"/kubernetes.io/pod/name\"",
                ));
            }
        }
        let witness_timeout = r.witness_timeout.map(|x| x.0).unwrap_or(d.witness_timeout);
        if witness_timeout < Duration::from_millis(100)
            || witness_timeout > Duration::from_secs(300)
        {
            return Err(self.err("audit.witness_timeout", "must be between 100ms and 5m"));
        }
        Ok(AuditConfig {
            checkpoint_every,
            checkpoint_interval,
            witness,
            witness_timeout,
            redact_claims: r.redact_claims,
        })
    }

    fn leases(&self, r: RawLeases) -> Result<LeaseConfig, ConfigError> {
        let d = LeaseConfig::default();
        let c = LeaseConfig {
            reap_interval: r.reap_interval.map(|x| x.0).unwrap_or(d.reap_interval),
            retain: r.retain.map(|x| x.0).unwrap_or(d.retain),
            retry_max_backoff: r
                .retry_max_backoff
                .map(|x| x.0)
                .unwrap_or(d.retry_max_backoff),
            stuck_after: r.stuck_after.unwrap_or(d.stuck_after),
        };
        if c.reap_interval < Duration::from_secs(1) || c.reap_interval > Duration::from_secs(3600) {
            return Err(self.err("leases.reap_interval", "must be between 1s and 1h"));
        }
        if c.retry_max_backoff < Duration::from_secs(1) {
            return Err(self.err("leases.retry_max_backoff", "must be at least 1s"));
        }
        if c.stuck_after == 0 {
            return Err(self.err("leases.stuck_after", "must be at least 1"));
        }
        Ok(c)
    }

    fn server(&self, s: RawServer) -> Result<ServerConfig, ConfigError> {
        let grpc_addr: SocketAddr = s.grpc_addr.parse().map_err(|_| {
            self.err(
                "server.grpc_addr",
                format!("{:?} is not an address like 127.0.0.1:7443", s.grpc_addr),
            )
        })?;
        let http_addr: SocketAddr = s.http_addr.parse().map_err(|_| {
            self.err(
                "server.http_addr",
                format!("{:?} is not an address like 127.0.0.1:7480", s.http_addr),
            )
        })?;
        if grpc_addr == http_addr && grpc_addr.port() != 0 {
            return Err(self.err("server.http_addr", "must differ from server.grpc_addr"));
        }
        let issuer_url = self.url("server.issuer_url", &s.issuer_url, true)?;
        let tls = s.tls.map(|t| TlsConfig {
            cert_file: t.cert_file.into(),
            key_file: t.key_file.into(),
            client_ca_file: t.client_ca_file.map(PathBuf::from),
        });
        if let Some(t) = &tls {
            for (k, p) in [
                ("server.tls.cert_file", Some(&t.cert_file)),
                ("server.tls.key_file", Some(&t.key_file)),
                ("server.tls.client_ca_file", t.client_ca_file.as_ref()),
            ] {
                if let Some(p) = p {
                    if !p.is_file() {
                        return Err(self.err(k, format!("{} is not a readable file", p.display())));
                    }
                }
            }
        }
        if !s.allow_plaintext {
            if tls.is_none() && !grpc_addr.ip().is_loopback() {
                return Err(self.err("server.grpc_addr", format!("{grpc_addr} is not loopback and [server.tls] is not configured; configure TLS or set server.allow_plaintext = true behind a TLS-terminating proxy")));
            }
            if tls.is_none() && !http_addr.ip().is_loopback() {
                return Err(self.err("server.http_addr", format!("{http_addr} is not loopback and [server.tls] is not configured; configure TLS or set server.allow_plaintext = true behind a TLS-terminating proxy")));
            }
        }
        Ok(ServerConfig {
            grpc_addr,
            http_addr,
            issuer_url,
            tls,
        })
    }

    /// An absolute http(s) URL; plain http only to a loopback host.
    fn url(&self, key: &str, s: &str, allow_path: bool) -> Result<String, ConfigError> {
        crate::mint::check_url(s, allow_path).map_err(|r| self.err(key, r))
    }

    fn issuer(&self, key: &str, r: RawIssuer) -> Result<IssuerConfig, ConfigError> {
        self.name(&format!("{key}.name"), &r.name)?;
        let preset = match r.preset.as_deref() {
            None => Preset::Generic,
            Some(p) => Preset::parse(p).ok_or_else(|| {
                self.err(format!("{key}.preset"), format!("unknown preset {p:?}; use bitbucket, github, gitlab, kubernetes or generic"))
            })?,
        };
        // The `iss` claim must equal this string exactly, so it is kept as written (but
        // checked as a URL).
        self.url(&format!("{key}.issuer"), &r.issuer, true)?;
        if r.audiences.is_empty() {
            return Err(self.err(
                format!("{key}.audiences"),
                "required: list the audiences this broker accepts (a token must carry one)",
            ));
        }
        for (j, a) in r.audiences.iter().enumerate() {
            if a.trim().is_empty() {
                return Err(self.err(format!("{key}.audiences[{j}]"), "must not be empty"));
            }
            if preset == Preset::Kubernetes && a.contains("kubernetes.default.svc") {
                return Err(self.err(format!("{key}.audiences[{j}]"), "the API server's own audience accepts every default service-account token; use a dedicated audience"));
            }
        }
        let jwks_url = match r.jwks_url {
            Some(u) => Some(self.url(&format!("{key}.jwks_url"), &u, true)?),
            None => None,
        };
        let ca_file = match r.ca_file {
            Some(f) if f.trim().is_empty() => {
                return Err(self.err(format!("{key}.ca_file"), "must not be empty"))
            }
            Some(f) => Some(PathBuf::from(f)),
            None => None,
        };
        let leeway = r.leeway.map(|d| d.0).unwrap_or(Duration::from_secs(30));
        if leeway > Duration::from_secs(300) {
            return Err(self.err(format!("{key}.leeway"), "must be at most 5m"));
        }
        let algorithms = match r.algorithms {
            None => vec![
                Alg::RS256,
                Alg::RS384,
                Alg::RS512,
                Alg::PS256,
                Alg::ES256,
                Alg::ES384,
                Alg::EdDSA,
            ],
            Some(list) => {
                if list.is_empty() {
                    return Err(self.err(format!("{key}.algorithms"), "must not be empty"));
                }
                let mut out = Vec::new();
                for (j, a) in list.iter().enumerate() {
                    out.push(Alg::parse(a).ok_or_else(|| {
                        self.err(format!("{key}.algorithms[{j}]"), format!("{a:?} is not accepted (asymmetric algorithms only: RS256/384/512, PS256/384/512, ES256, ES384, EdDSA)"))
                    })?);
                }
                out
            }
        };
        let jwks_refresh = r
            .jwks_refresh
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(300));
        let jwks_cooldown = r
            .jwks_cooldown
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(30));
        let jwks_max_staleness = r
            .jwks_max_staleness
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(24 * 3600));
        if jwks_refresh < Duration::from_secs(1) {
            return Err(self.err(format!("{key}.jwks_refresh"), "must be at least 1s"));
        }
        if jwks_max_staleness < jwks_refresh {
            return Err(self.err(
                format!("{key}.jwks_max_staleness"),
                "must be at least jwks_refresh",
            ));
        }
        let jwks_max_bytes = r.jwks_max_bytes.unwrap_or(256 * 1024);
        if !(1024..=16 * 1024 * 1024).contains(&jwks_max_bytes) {
            return Err(self.err(
                format!("{key}.jwks_max_bytes"),
                "must be between 1024 and 16777216 (16 MiB)",
            ));
        }
        let jwks_max_keys = r.jwks_max_keys.unwrap_or(100);
        if !(1..=10_000).contains(&jwks_max_keys) {
            return Err(self.err(
                format!("{key}.jwks_max_keys"),
                "must be between 1 and 10000",
            ));
        }
        Ok(IssuerConfig {
            name: r.name,
            preset,
            issuer: r.issuer,
            audiences: r.audiences,
            jwks_url,
            leeway,
            max_token_age: r.max_token_age.map(|d| d.0),
            algorithms,
            jwks_refresh,
            jwks_cooldown,
            jwks_max_staleness,
            jwks_max_bytes,
            jwks_max_keys,
            ca_file,
            key_environment: r.identity_key_environment.unwrap_or(true),
            max_mints_per_token: match r.max_mints_per_token {
                Some(0) => {
                    return Err(self.err(
                        format!("{key}.max_mints_per_token"),
                        "must be at least 1 (leave it out for no limit)",
                    ))
                }
                n => n,
            },
        })
    }

    fn name(&self, key: &str, name: &str) -> Result<(), ConfigError> {
        crate::policy::check_name(name).map_err(|r| self.err(key, r))
    }

    fn target(&self, key: &str, r: RawTarget) -> Result<TargetConfig, ConfigError> {
        self.name(&format!("{key}.name"), &r.name)?;
        let max_ttl = r.max_ttl.map(|d| d.0).unwrap_or(Duration::from_secs(3600));
        let default_ttl = r
            .default_ttl
            .map(|d| d.0)
            .unwrap_or(max_ttl.min(Duration::from_secs(900)));
        if max_ttl < Duration::from_secs(1) || max_ttl > MAX_TTL_CEILING {
            return Err(self.err(format!("{key}.max_ttl"), "must be between 1s and 24h"));
        }
        if default_ttl < Duration::from_secs(1) || default_ttl > max_ttl {
            return Err(self.err(
                format!("{key}.default_ttl"),
                "must be at least 1s and at most max_ttl",
            ));
        }
        let max_lifetime = r.max_lifetime.map(|d| d.0).unwrap_or(max_ttl);
        if max_lifetime < max_ttl || max_lifetime > MAX_LIFETIME_CEILING {
            return Err(self.err(
                format!("{key}.max_lifetime"),
                "must be at least max_ttl and at most 30d",
            ));
        }
        if r.max_live_leases == Some(0) {
            return Err(self.err(
                format!("{key}.max_live_leases"),
                "must be at least 1 (leave it out for no limit)",
            ));
        }
        let kind = self.target_kind(key, &r.kind, r.settings)?;
        let rotation = self.schedule(&format!("{key}.rotation"), r.rotation, r.rotation_window)?;
        let root_rotation = self.schedule(
            &format!("{key}.root_rotation"),
            r.root_rotation,
            r.root_rotation_window,
        )?;
        let rotates_root = match &kind {
            TargetKind::Vercel(_) => true,
            TargetKind::Postgres(p) => p.password.is_some(),
            _ => false,
        };
        if root_rotation.is_some() && !rotates_root {
            let why = match &kind {
                TargetKind::Postgres(_) => "the admin logs in without a password (set password_file or password_env to rotate it)".to_string(),
                k if k.signing_alg().is_some() => format!("kind {} has no upstream root credential; rotate its signing key with `rotation`", k.name()),
                k => format!("kind {} cannot rotate its upstream credential through the target's API", k.name()),
            };
            return Err(self.err(format!("{key}.root_rotation"), why));
        }
        if rotation.is_some() && matches!(kind, TargetKind::Pulsar(_)) {
            return Err(self.err(
                format!("{key}.rotation"),
                "Pulsar trusts exactly one public key (tokenPublicKey) and cannot follow a JWKS: \
                 a scheduled rotation would break every Pulsar client; rotate by hand \
                 (latchkey rotate --target … --now, then re-export the key to Pulsar)",
            ));
        }
        let own_issuer = match r.token_issuer.as_deref() {
            None | Some("broker") => false,
            Some("target") => true,
            Some(other) => {
                return Err(self.err(
                    format!("{key}.token_issuer"),
                    format!("{other:?} is not a token issuer; use \"broker\" or \"target\""),
                ))
            }
        };
        if own_issuer && kind.signing_alg().is_none() {
            return Err(self.err(
                format!("{key}.token_issuer"),
                format!(
                    "kind {} does not sign with a broker key here; token_issuer does not apply",
                    kind.name()
                ),
            ));
        }
        if rotation.is_some() && kind.signing_alg().is_none() {
            return Err(self.err(
                format!("{key}.rotation"),
                format!(
                    "kind {} does not sign with a broker key here; nothing to rotate",
                    kind.name()
                ),
            ));
        }
        Ok(TargetConfig {
            name: r.name,
            default_ttl,
            max_ttl,
            max_lifetime,
            max_live_leases: r.max_live_leases,
            rotation,
            root_rotation,
            own_issuer,
            kind,
        })
    }
}

/// The audience two targets' tokens share while both publish their keys in the shared
/// JWKS under the broker's issuer: a verifier of that JWKS, checking `iss` and `aud` as
/// our docs say, could not tell their tokens apart.
/// Two targets whose signed tokens only the broker itself presents (the assertions of a
/// Databricks federation or an OAuth2 token exchange) are no risk to each other: no
/// caller ever holds one.
fn shared_audience(a: &TargetConfig, b: &TargetConfig) -> Option<String> {
    if a.own_issuer || b.own_issuer {
        return None;
    }
    if !a.kind.credential_is_signed() && !b.kind.credential_is_signed() {
        return None;
    }
    let theirs = b.kind.token_audiences();
    a.kind
        .token_audiences()
        .into_iter()
        .find(|x| theirs.contains(x))
        .map(str::to_string)
}

/// Whether two `postgres` targets make roles under one prefix on one server (the URL's
/// host and port): their names could not be told apart by a person reading `pg_roles`,
/// so such a configuration is refused. (The reconciler goes by each role's ownership
/// comment, not its name; see `mint::postgres`.)
fn same_role_space(a: &TargetConfig, b: &TargetConfig) -> bool {
    let (TargetKind::Postgres(a), TargetKind::Postgres(b)) = (&a.kind, &b.kind) else {
        return false;
    };
    let server = |url: &str| {
        reqwest::Url::parse(url).ok().map(|u| {
            (
                u.host_str().unwrap_or("").to_ascii_lowercase(),
                u.port().unwrap_or(5432),
            )
        })
    };
    a.role_prefix == b.role_prefix && server(&a.url) == server(&b.url)
}

#[cfg(test)]
mod tests;
