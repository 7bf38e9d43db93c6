//! Kind-specific target settings: one raw mirror per kind (unknown keys refused), checked
//! into the [`TargetKind`] the minters are built from (defined in `mint`). Upstream
//! secrets are never in the file: each is a [`SecretRef`] naming a file or an
//! environment variable.

use super::{Checker, ConfigError, RESERVED_CLAIMS};
use crate::jose::Alg;
use crate::mint::Template;
use crate::mint::*;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

// ---- raw mirrors -------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    audience: Option<String>,
    algorithm: Option<String>,
    subject: Option<String>,
    #[serde(default)]
    claims: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPulsar {
    algorithm: Option<String>,
    secret_key_file: Option<String>,
    secret_key_env: Option<String>,
    role_claim: Option<String>,
    audience_claim: Option<String>,
    audience: Option<String>,
    role: Option<String>,
    #[serde(default)]
    roles: BTreeMap<String, String>,
    admin_url: Option<String>,
    admin_token_file: Option<String>,
    admin_token_env: Option<String>,
    #[serde(default)]
    permissions: BTreeMap<String, RawPulsarPermission>,
    timeout: Option<super::raw::Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPulsarPermission {
    resource: String,
    actions: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAirflow {
    algorithm: Option<String>,
    audience: Option<String>,
    subject: Option<String>,
    auth_manager: Option<String>,
    role: Option<String>,
    #[serde(default)]
    roles: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabricks {
    workspace_url: String,
    mode: String,
    client_id: Option<String>,
    client_secret_file: Option<String>,
    client_secret_env: Option<String>,
    audience: Option<String>,
    subject: Option<String>,
    algorithm: Option<String>,
    token_file: Option<String>,
    token_env: Option<String>,
    application_id: Option<String>,
    timeout: Option<super::raw::Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVercel {
    api_url: Option<String>,
    team_id: Option<String>,
    token_file: Option<String>,
    token_env: Option<String>,
    timeout: Option<super::raw::Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrefect {
    api_url: Option<String>,
    account_id: Option<String>,
    account_role_id: Option<String>,
    #[serde(default)]
    roles: BTreeMap<String, String>,
    token_file: Option<String>,
    token_env: Option<String>,
    /// Self-hosted server settings, accepted only to be refused with the reason.
    auth_string_file: Option<String>,
    auth_string_env: Option<String>,
    timeout: Option<super::raw::Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBitbucket {
    token_url: Option<String>,
    client_id: String,
    client_secret_file: Option<String>,
    client_secret_env: Option<String>,
    timeout: Option<super::raw::Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPostgres {
    url: String,
    password_file: Option<String>,
    password_env: Option<String>,
    role_prefix: Option<String>,
    roles: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    databases: Vec<String>,
    timeout: Option<super::raw::Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOAuth2 {
    token_url: String,
    grant: String,
    client_id: Option<String>,
    client_secret_file: Option<String>,
    client_secret_env: Option<String>,
    client_auth: Option<String>,
    audience: Option<String>,
    resource: Option<String>,
    #[serde(default)]
    scopes: BTreeMap<String, String>,
    subject_audience: Option<String>,
    subject: Option<String>,
    algorithm: Option<String>,
    timeout: Option<super::raw::Dur>,
}

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const AIRFLOW_ROLES: &[&str] = &["VIEWER", "USER", "OP", "ADMIN"];
const PULSAR_ACTIONS: &[&str] = &[
    "produce",
    "consume",
    "functions",
    "sources",
    "sinks",
    "packages",
];

impl Checker<'_> {
    /// Checks the kind-specific keys of target `key` (everything but the common ones).
    pub(super) fn target_kind(
        &self,
        key: &str,
        kind: &str,
        rest: toml::Table,
    ) -> Result<TargetKind, ConfigError> {
        Ok(match kind {
            "jwt" => TargetKind::Jwt(self.jwt(key, self.raw(key, rest)?)?),
            "pulsar" => TargetKind::Pulsar(self.pulsar(key, self.raw(key, rest)?)?),
            "airflow" => TargetKind::Airflow(self.airflow(key, self.raw(key, rest)?)?),
            "databricks" => TargetKind::Databricks(self.databricks(key, self.raw(key, rest)?)?),
            "vercel" => {
                let r: RawVercel = self.raw(key, rest)?;
                TargetKind::Vercel(VercelConfig {
                    api_url: self.url(
                        &format!("{key}.api_url"),
                        r.api_url.as_deref().unwrap_or("https://api.vercel.com"),
                        true,
                    )?,
                    team_id: r.team_id,
                    token: self.secret_ref(key, "token", r.token_file, r.token_env)?,
                    timeout: self.timeout(key, r.timeout)?,
                })
            }
            "prefect" => TargetKind::Prefect(self.prefect(key, self.raw(key, rest)?)?),
            "bitbucket" => {
                let r: RawBitbucket = self.raw(key, rest)?;
                TargetKind::Bitbucket(OAuthClientConfig {
                    token_url: self.url(
                        &format!("{key}.token_url"),
                        r.token_url
                            .as_deref()
                            .unwrap_or("https://bitbucket.org/site/oauth2/access_token"),
                        true,
                    )?,
                    client_id: self.nonempty(key, "client_id", Some(r.client_id))?,
                    client_secret: self.secret_ref(
                        key,
                        "client_secret",
                        r.client_secret_file,
                        r.client_secret_env,
                    )?,
                    timeout: self.timeout(key, r.timeout)?,
                })
            }
            "postgres" => TargetKind::Postgres(self.postgres(key, self.raw(key, rest)?)?),
            "oauth2" => TargetKind::OAuth2(self.oauth2(key, self.raw(key, rest)?)?),
            other => {
                return Err(self.err(
                    format!("{key}.kind"),
                    format!(
                        "unknown kind {other:?}; supported: jwt, pulsar, airflow, databricks, vercel, prefect, bitbucket, postgres, oauth2"
                    ),
                ))
            }
        })
    }

    fn raw<T: DeserializeOwned>(&self, key: &str, rest: toml::Table) -> Result<T, ConfigError> {
        toml::Value::Table(rest)
            .try_into()
            .map_err(|e: toml::de::Error| self.err(key, e.message().trim().to_string()))
    }

    fn secret_ref(
        &self,
        key: &str,
        name: &str,
        file: Option<String>,
        env: Option<String>,
    ) -> Result<SecretRef, ConfigError> {
        self.secret_ref_opt(key, name, file, env)?.ok_or_else(|| {
            self.err(
                format!("{key}.{name}_file"),
                format!("set {name}_file or {name}_env (secrets are never written in the config)"),
            )
        })
    }

    fn secret_ref_opt(
        &self,
        key: &str,
        name: &str,
        file: Option<String>,
        env: Option<String>,
    ) -> Result<Option<SecretRef>, ConfigError> {
        match (file, env) {
            (Some(_), Some(_)) => Err(self.err(
                format!("{key}.{name}_env"),
                format!("set only one of {name}_file and {name}_env"),
            )),
            (Some(f), None) if f.trim().is_empty() => {
                Err(self.err(format!("{key}.{name}_file"), "must not be empty"))
            }
            (None, Some(v)) if v.trim().is_empty() || v.contains('=') => Err(self.err(
                format!("{key}.{name}_env"),
                "must name an environment variable",
            )),
            (Some(f), None) => Ok(Some(SecretRef::File(PathBuf::from(f)))),
            (None, Some(v)) => Ok(Some(SecretRef::Env(v))),
            (None, None) => Ok(None),
        }
    }

    fn nonempty(&self, key: &str, name: &str, v: Option<String>) -> Result<String, ConfigError> {
        match v {
            Some(s) if !s.trim().is_empty() => Ok(s),
            _ => Err(self.err(format!("{key}.{name}"), "required")),
        }
    }

    fn timeout(&self, key: &str, t: Option<super::raw::Dur>) -> Result<Duration, ConfigError> {
        let t = t.map(|d| d.0).unwrap_or(DEFAULT_TIMEOUT);
        if t < Duration::from_millis(100) || t > Duration::from_secs(120) {
            return Err(self.err(format!("{key}.timeout"), "must be between 100ms and 2m"));
        }
        Ok(t)
    }

    fn template(&self, key: &str, s: Option<String>) -> Result<Option<Template>, ConfigError> {
        s.map(|s| Template::parse(&s).map_err(|e| self.err(key, e)))
            .transpose()
    }

    fn alg(
        &self,
        key: &str,
        v: Option<&str>,
        default: Option<Alg>,
        allowed: &[&str],
        why: &str,
    ) -> Result<Alg, ConfigError> {
        match v {
            None => default.ok_or_else(|| self.err(key, format!("required: {why}"))),
            Some(a) if allowed.contains(&a) => {
                Alg::parse(a).ok_or_else(|| self.err(key, format!("{a:?} is not supported")))
            }
            Some(other) => Err(self.err(
                key,
                format!("{other:?} is not supported; use {}", allowed.join(" or ")),
            )),
        }
    }

    fn jwt(&self, key: &str, r: RawJwt) -> Result<JwtTargetConfig, ConfigError> {
        let audience = match r.audience {
            Some(a) if !a.trim().is_empty() => a,
            _ => return Err(self.err(format!("{key}.audience"), "required for kind \"jwt\"")),
        };
        let algorithm = self.alg(
            &format!("{key}.algorithm"),
            r.algorithm.as_deref(),
            Some(Alg::ES256),
            &["ES256", "EdDSA", "RS256"],
            "",
        )?;
        let subject = self.template(&format!("{key}.subject"), r.subject)?;
        let mut claims = Vec::new();
        for (name, tpl) in r.claims {
            if RESERVED_CLAIMS.contains(&name.as_str()) {
                return Err(self.err(
                    format!("{key}.claims.{name}"),
                    "is set by the broker and cannot be overridden",
                ));
            }
            let t =
                Template::parse(&tpl).map_err(|e| self.err(format!("{key}.claims.{name}"), e))?;
            claims.push((name, t));
        }
        Ok(JwtTargetConfig {
            audience,
            algorithm,
            subject,
            claims,
        })
    }

    fn pulsar(&self, key: &str, r: RawPulsar) -> Result<PulsarConfig, ConfigError> {
        let shared = self.secret_ref_opt(key, "secret_key", r.secret_key_file, r.secret_key_env)?;
        let key_cfg = match (r.algorithm.as_deref(), shared) {
            (Some("HS256"), Some(s)) => PulsarKey::Shared(s),
            (Some("HS256"), None) => {
                return Err(self.err(
                    format!("{key}.secret_key_file"),
                    "HS256 needs the secret Pulsar has as tokenSecretKey: set secret_key_file or secret_key_env",
                ))
            }
            (a, None) => PulsarKey::Broker(self.alg(
                &format!("{key}.algorithm"),
                a,
                Some(Alg::RS256),
                &["RS256", "ES256", "HS256"],
                "",
            )?),
            (_, Some(_)) => {
                return Err(self.err(
                    format!("{key}.secret_key_file"),
                    "a shared secret is used only with algorithm = \"HS256\"",
                ))
            }
        };
        let claim_name = |k: &str, v: Option<String>, default: Option<&str>| match v
            .or(default.map(str::to_string))
        {
            Some(c) if RESERVED_CLAIMS.contains(&c.as_str()) && c != "sub" && c != "aud" => {
                Err(self.err(format!("{key}.{k}"), format!("{c:?} is set by the broker")))
            }
            Some(c) if c.trim().is_empty() => {
                Err(self.err(format!("{key}.{k}"), "must not be empty"))
            }
            other => Ok(other),
        };
        let role_claim = claim_name("role_claim", r.role_claim, Some("sub"))?.unwrap_or_default();
        let audience_claim = claim_name("audience_claim", r.audience_claim, None)?;
        if audience_claim.is_some() != r.audience.is_some() {
            return Err(self.err(
                format!("{key}.audience"),
                "audience_claim and audience go together (Pulsar's tokenAudienceClaim and tokenAudience)",
            ));
        }
        if audience_claim.as_deref() == Some(role_claim.as_str()) {
            return Err(self.err(
                format!("{key}.audience_claim"),
                "must differ from role_claim",
            ));
        }
        for (scope, role) in &r.roles {
            if role.trim().is_empty() {
                return Err(self.err(format!("{key}.roles.{scope}"), "must not be empty"));
            }
        }
        let admin_token =
            self.secret_ref_opt(key, "admin_token", r.admin_token_file, r.admin_token_env)?;
        let admin = match (r.admin_url, admin_token) {
            (None, None) if r.permissions.is_empty() => None,
            (Some(url), Some(token)) => {
                if r.permissions.is_empty() {
                    return Err(self.err(
                        format!("{key}.permissions"),
                        "admin_url is for per-lease permissions: map at least one scope to a resource and actions",
                    ));
                }
                if !r.roles.is_empty() || r.role.is_some() {
                    return Err(self.err(
                        format!("{key}.roles"),
                        "with per-lease permissions each lease gets its own role; roles and role do not apply",
                    ));
                }
                let mut permissions = BTreeMap::new();
                for (scope, p) in r.permissions {
                    let pk = format!("{key}.permissions.{scope}");
                    let resource = self.pulsar_resource(&format!("{pk}.resource"), &p.resource)?;
                    if p.actions.is_empty() {
                        return Err(self.err(format!("{pk}.actions"), "must list at least one action"));
                    }
                    for a in &p.actions {
                        if !PULSAR_ACTIONS.contains(&a.as_str()) {
                            return Err(self.err(
                                format!("{pk}.actions"),
                                format!("unknown action {a:?}; Pulsar knows {}", PULSAR_ACTIONS.join(", ")),
                            ));
                        }
                    }
                    permissions.insert(
                        scope,
                        PulsarPermission {
                            resource,
                            actions: p.actions,
                        },
                    );
                }
                Some(PulsarAdmin {
                    url: self.url(&format!("{key}.admin_url"), &url, true)?,
                    token,
                    permissions,
                    timeout: self.timeout(key, r.timeout)?,
                })
            }
            _ => {
                return Err(self.err(
                    format!("{key}.admin_url"),
                    "per-lease permissions need admin_url, admin_token_file or admin_token_env, and permissions",
                ))
            }
        };
        Ok(PulsarConfig {
            key: key_cfg,
            role_claim,
            audience_claim,
            audience: r.audience,
            role: self.template(&format!("{key}.role"), r.role)?,
            roles: r.roles,
            admin,
        })
    }

    fn pulsar_resource(&self, key: &str, s: &str) -> Result<PulsarResource, ConfigError> {
        let ok = |p: &str| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '='))
        };
        let bad = || {
            self.err(
                key,
                format!("{s:?} must be tenant/namespace or persistent://tenant/namespace/topic"),
            )
        };
        if let Some(t) = s.strip_prefix("persistent://") {
            let parts: Vec<&str> = t.split('/').collect();
            match parts.as_slice() {
                [tenant, ns, topic] if ok(tenant) && ok(ns) && ok(topic) => {
                    Ok(PulsarResource::Topic {
                        tenant: tenant.to_string(),
                        namespace: ns.to_string(),
                        topic: topic.to_string(),
                    })
                }
                _ => Err(bad()),
            }
        } else {
            match s.split('/').collect::<Vec<_>>().as_slice() {
                [tenant, ns] if ok(tenant) && ok(ns) => Ok(PulsarResource::Namespace {
                    tenant: tenant.to_string(),
                    namespace: ns.to_string(),
                }),
                _ => Err(bad()),
            }
        }
    }

    fn airflow(&self, key: &str, r: RawAirflow) -> Result<AirflowConfig, ConfigError> {
        let algorithm = self.alg(
            &format!("{key}.algorithm"),
            r.algorithm.as_deref(),
            None,
            &["RS256", "ES256"],
            "Airflow's jwt_algorithm must name it explicitly (left to guess, Airflow picks RS512 for RSA keys); use RS256 or ES256",
        )?;
        let auth_manager = match r.auth_manager.as_deref() {
            None | Some("simple") => AirflowAuthManager::Simple,
            Some("fab") => AirflowAuthManager::Fab,
            Some(other) => {
                return Err(self.err(
                    format!("{key}.auth_manager"),
                    format!("{other:?} is not an auth manager; use simple or fab"),
                ))
            }
        };
        let role_ok = |k: String, v: &str| -> Result<String, ConfigError> {
            let up = v.to_ascii_uppercase();
            if AIRFLOW_ROLES.contains(&up.as_str()) {
                Ok(up)
            } else {
                Err(self.err(
                    k,
                    format!(
                        "{v:?} is not an Airflow role (Airflow answers 500 for unknown roles); use one of {}",
                        AIRFLOW_ROLES.join(", ")
                    ),
                ))
            }
        };
        let role = r
            .role
            .as_deref()
            .map(|v| role_ok(format!("{key}.role"), v))
            .transpose()?;
        let mut roles = BTreeMap::new();
        for (scope, v) in &r.roles {
            roles.insert(scope.clone(), role_ok(format!("{key}.roles.{scope}"), v)?);
        }
        match auth_manager {
            AirflowAuthManager::Simple if role.is_none() && roles.is_empty() => {
                return Err(self.err(
                    format!("{key}.role"),
                    "the simple auth manager needs a role: set role or map scopes in roles",
                ))
            }
            AirflowAuthManager::Fab if role.is_some() || !roles.is_empty() => {
                return Err(self.err(
                    format!("{key}.role"),
                    "the FAB auth manager takes roles from its own user database; role and roles do not apply",
                ))
            }
            AirflowAuthManager::Fab if r.subject.is_none() => {
                return Err(self.err(
                    format!("{key}.subject"),
                    "the FAB auth manager needs sub to be the numeric user id: set a subject template",
                ))
            }
            _ => {}
        }
        let audience = match r.audience {
            Some(a) if a.trim().is_empty() => {
                return Err(self.err(format!("{key}.audience"), "must not be empty"))
            }
            Some(a) => a,
            None => "apache-airflow".into(),
        };
        Ok(AirflowConfig {
            algorithm,
            audience,
            subject: self.template(&format!("{key}.subject"), r.subject)?,
            auth_manager,
            role,
            roles,
        })
    }

    fn databricks(&self, key: &str, r: RawDatabricks) -> Result<DatabricksConfig, ConfigError> {
        let workspace_url = self.url(&format!("{key}.workspace_url"), &r.workspace_url, false)?;
        // Keys that belong to one mode or another; each mode names those it takes.
        let set = [
            ("client_id", r.client_id.is_some()),
            ("client_secret_file", r.client_secret_file.is_some()),
            ("client_secret_env", r.client_secret_env.is_some()),
            ("audience", r.audience.is_some()),
            ("subject", r.subject.is_some()),
            ("algorithm", r.algorithm.is_some()),
            ("token_file", r.token_file.is_some()),
            ("token_env", r.token_env.is_some()),
            ("application_id", r.application_id.is_some()),
        ];
        let only = |mode: &str, takes: &[&str]| -> Result<(), ConfigError> {
            match set.iter().find(|(name, on)| *on && !takes.contains(name)) {
                Some((name, _)) => Err(self.err(
                    format!("{key}.{name}"),
                    format!("does not apply to mode {mode:?}"),
                )),
                None => Ok(()),
            }
        };
        let mode = match r.mode.as_str() {
            "federation" => {
                only(
                    "federation",
                    &["client_id", "audience", "subject", "algorithm"],
                )?;
                DatabricksMode::Federation(Federation {
                    client_id: Some(self.nonempty(key, "client_id", r.client_id)?),
                    audience: r
                        .audience
                        .unwrap_or_else(|| format!("{workspace_url}/oidc/v1/token")),
                    subject: self.template(&format!("{key}.subject"), r.subject)?,
                    algorithm: self.alg(
                        &format!("{key}.algorithm"),
                        r.algorithm.as_deref(),
                        Some(Alg::RS256),
                        &["RS256", "ES256"],
                        "",
                    )?,
                })
            }
            "m2m" => {
                only(
                    "m2m",
                    &["client_id", "client_secret_file", "client_secret_env"],
                )?;
                DatabricksMode::M2m {
                    client_id: self.nonempty(key, "client_id", r.client_id)?,
                    client_secret: self.secret_ref(
                        key,
                        "client_secret",
                        r.client_secret_file,
                        r.client_secret_env,
                    )?,
                }
            }
            "pat" => {
                only("pat", &["token_file", "token_env", "application_id"])?;
                DatabricksMode::Pat {
                    token: self.secret_ref(key, "token", r.token_file, r.token_env)?,
                    application_id: r.application_id,
                }
            }
            other => {
                return Err(self.err(
                    format!("{key}.mode"),
                    format!("{other:?} is not a mode; use federation, m2m or pat"),
                ))
            }
        };
        Ok(DatabricksConfig {
            workspace_url,
            mode,
            timeout: self.timeout(key, r.timeout)?,
        })
    }

    fn prefect(&self, key: &str, r: RawPrefect) -> Result<PrefectConfig, ConfigError> {
        let self_hosted = "a self-hosted Prefect server has one shared basic-auth credential \
            (PREFECT_SERVER_API_AUTH_STRING) and cannot mint scoped, expiring keys; point this \
            target at Prefect Cloud, or do not broker that server";
        if r.auth_string_file.is_some() || r.auth_string_env.is_some() {
            return Err(self.err(format!("{key}.auth_string_file"), self_hosted));
        }
        let api = r
            .api_url
            .as_deref()
            .unwrap_or("https://api.prefect.cloud/api");
        let api_url = self.url(&format!("{key}.api_url"), api, true)?;
        let host = reqwest::Url::parse(&api_url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_default();
        let loopback = host == "localhost" || host.starts_with("127.") || host == "[::1]";
        if host != "api.prefect.cloud" && !loopback {
            return Err(self.err(format!("{key}.api_url"), self_hosted));
        }
        Ok(PrefectConfig {
            api_url,
            account_id: self.nonempty(key, "account_id", r.account_id)?,
            account_role_id: self.nonempty(key, "account_role_id", r.account_role_id)?,
            roles: r.roles,
            token: self.secret_ref(key, "token", r.token_file, r.token_env)?,
            timeout: self.timeout(key, r.timeout)?,
        })
    }

    fn postgres(&self, key: &str, r: RawPostgres) -> Result<PostgresConfig, ConfigError> {
        let u = reqwest::Url::parse(&r.url)
            .map_err(|e| self.err(format!("{key}.url"), format!("not a URL ({e})")))?;
        if !matches!(u.scheme(), "postgres" | "postgresql") {
            return Err(self.err(format!("{key}.url"), "must be a postgres:// URL"));
        }
        if u.password().is_some() || r.url.contains("password=") {
            return Err(self.err(
                format!("{key}.url"),
                "must not carry the password: set password_file or password_env",
            ));
        }
        if u.username().is_empty() {
            return Err(self.err(format!("{key}.url"), "must name the admin user"));
        }
        let role_prefix = r.role_prefix.unwrap_or_else(|| "lk_".into());
        if role_prefix.len() < 2
            || role_prefix.len() > 20
            || !role_prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            || role_prefix.starts_with("pg_")
        {
            return Err(self.err(
                format!("{key}.role_prefix"),
                "must be 2-20 characters of a-z, 0-9 and '_', not starting with pg_",
            ));
        }
        if r.roles.is_empty() {
            return Err(self.err(
                format!("{key}.roles"),
                "map at least one scope to the group roles it grants",
            ));
        }
        for (scope, groups) in &r.roles {
            for g in groups {
                if g.is_empty()
                    || g.len() > 63
                    || g.starts_with("pg_")
                    || g.starts_with(&role_prefix)
                {
                    return Err(self.err(
                        format!("{key}.roles.{scope}"),
                        format!("{g:?} must be an existing group role (1-63 bytes, not pg_*, not under role_prefix)"),
                    ));
                }
            }
        }
        for d in &r.databases {
            if d.is_empty() || d.len() > 63 {
                return Err(self.err(format!("{key}.databases"), "names must be 1-63 bytes"));
            }
        }
        Ok(PostgresConfig {
            url: r.url,
            password: self.secret_ref_opt(key, "password", r.password_file, r.password_env)?,
            role_prefix,
            roles: r.roles,
            databases: r.databases,
            timeout: self.timeout(key, r.timeout)?,
        })
    }

    fn oauth2(&self, key: &str, r: RawOAuth2) -> Result<OAuth2Config, ConfigError> {
        let client_secret = self.secret_ref_opt(
            key,
            "client_secret",
            r.client_secret_file,
            r.client_secret_env,
        )?;
        let grant = match r.grant.as_str() {
            "client_credentials" => {
                for (name, set) in [
                    ("subject_audience", r.subject_audience.is_some()),
                    ("subject", r.subject.is_some()),
                    ("algorithm", r.algorithm.is_some()),
                ] {
                    if set {
                        return Err(self.err(
                            format!("{key}.{name}"),
                            "applies to grant = \"token_exchange\" only",
                        ));
                    }
                }
                if r.client_id.is_none() || client_secret.is_none() {
                    return Err(self.err(
                        format!("{key}.client_id"),
                        "client_credentials needs client_id and client_secret_file or client_secret_env",
                    ));
                }
                OAuth2Grant::ClientCredentials
            }
            "token_exchange" => OAuth2Grant::TokenExchange(Federation {
                client_id: r.client_id.clone(),
                audience: self.nonempty(key, "subject_audience", r.subject_audience)?,
                subject: self.template(&format!("{key}.subject"), r.subject)?,
                algorithm: self.alg(
                    &format!("{key}.algorithm"),
                    r.algorithm.as_deref(),
                    Some(Alg::RS256),
                    &["RS256", "ES256"],
                    "",
                )?,
            }),
            other => {
                return Err(self.err(
                    format!("{key}.grant"),
                    format!("{other:?} is not supported; use client_credentials or token_exchange"),
                ))
            }
        };
        let client_auth = match r.client_auth.as_deref() {
            None | Some("basic") => ClientAuth::Basic,
            Some("post") => ClientAuth::Post,
            Some(other) => {
                return Err(self.err(
                    format!("{key}.client_auth"),
                    format!("{other:?} is not supported; use basic or post"),
                ))
            }
        };
        if client_secret.is_some() && r.client_id.is_none() {
            return Err(self.err(
                format!("{key}.client_id"),
                "a client secret needs a client_id",
            ));
        }
        Ok(OAuth2Config {
            token_url: self.url(&format!("{key}.token_url"), &r.token_url, true)?,
            grant,
            client_id: r.client_id,
            client_secret,
            client_auth,
            audience: r.audience,
            resource: r.resource,
            scopes: r.scopes,
            timeout: self.timeout(key, r.timeout)?,
        })
    }
}
