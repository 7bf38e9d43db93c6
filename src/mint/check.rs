//! Checking a target's kind-specific settings from the configuration file. Each kind's
//! raw form (unknown keys refused) and its checks live beside its minter (`jwt.rs`,
//! `pulsar.rs`, …); this file holds what they share and the dispatch by kind. The
//! configuration assembler (`config`) calls [`Check::target_kind`] and adds the file name
//! to a [`CheckError`].

use super::*;
use crate::jose::Alg;
use serde::de::DeserializeOwned;
use std::path::PathBuf;
use std::time::Duration;

/// Why a target's settings were refused: the key (`targets[2].audience`) and a reason
/// safe to show (never a secret's value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckError {
    /// The offending key.
    pub key: String,
    /// Why.
    pub reason: String,
}

/// Checks target settings (stateless: the errors carry their key; `config` adds the
/// file).
#[derive(Debug, Clone, Copy, Default)]
pub struct Check;

pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Claims the broker sets itself, which templates and role claims may not name.
pub(crate) const RESERVED_CLAIMS: &[&str] = &[
    "iss", "sub", "aud", "exp", "nbf", "iat", "jti", "scope", "act",
];

/// Checks an upstream or issuer URL: https, or http to a loopback host; no credentials,
/// query or fragment; a path only where `allow_path`. Answers it without a trailing
/// slash, or the reason it is refused.
pub fn check_url(s: &str, allow_path: bool) -> Result<String, String> {
    let u = reqwest::Url::parse(s).map_err(|e| format!("{s:?} is not a URL ({e})"))?;
    let loopback = u.host_str().is_some_and(crate::net::is_loopback_host);
    match u.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => {
            return Err(format!(
                "{s:?} must use https (plain http is allowed only for loopback hosts)"
            ))
        }
        other => return Err(format!("scheme {other:?} is not http(s)")),
    }
    if u.query().is_some()
        || u.fragment().is_some()
        || !u.username().is_empty()
        || u.password().is_some()
    {
        return Err("must not carry credentials, a query or a fragment".into());
    }
    if !allow_path && u.path() != "/" {
        return Err("must not have a path".into());
    }
    Ok(s.trim_end_matches('/').to_string())
}

impl Check {
    /// An error at `key`.
    pub(crate) fn err(&self, key: impl Into<String>, reason: impl Into<String>) -> CheckError {
        CheckError {
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// [`check_url`] at `key`.
    pub(crate) fn url(&self, key: &str, s: &str, allow_path: bool) -> Result<String, CheckError> {
        check_url(s, allow_path).map_err(|r| self.err(key, r))
    }

    /// Checks the kind-specific keys of target `key` (everything but the common ones).
    pub fn target_kind(
        &self,
        key: &str,
        kind: &str,
        rest: toml::Table,
    ) -> Result<TargetKind, CheckError> {
        Ok(match kind {
            "jwt" => TargetKind::Jwt(self.jwt(key, self.raw(key, rest)?)?),
            "pulsar" => TargetKind::Pulsar(self.pulsar(key, self.raw(key, rest)?)?),
            "airflow" => TargetKind::Airflow(self.airflow(key, self.raw(key, rest)?)?),
            "databricks" => TargetKind::Databricks(self.databricks(key, self.raw(key, rest)?)?),
            "vercel" => TargetKind::Vercel(self.vercel(key, self.raw(key, rest)?)?),
            "prefect" => TargetKind::Prefect(self.prefect(key, self.raw(key, rest)?)?),
            "bitbucket" => TargetKind::Bitbucket(self.bitbucket(key, self.raw(key, rest)?)?),
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

    pub(crate) fn raw<T: DeserializeOwned>(
        &self,
        key: &str,
        rest: toml::Table,
    ) -> Result<T, CheckError> {
        toml::Value::Table(rest)
            .try_into()
            .map_err(|e: toml::de::Error| self.err(key, e.message().trim().to_string()))
    }

    pub(crate) fn secret_ref(
        &self,
        key: &str,
        name: &str,
        file: Option<String>,
        env: Option<String>,
    ) -> Result<SecretRef, CheckError> {
        self.secret_ref_opt(key, name, file, env)?.ok_or_else(|| {
            self.err(
                format!("{key}.{name}_file"),
                format!("set {name}_file or {name}_env (secrets are never written in the config)"),
            )
        })
    }

    pub(crate) fn secret_ref_opt(
        &self,
        key: &str,
        name: &str,
        file: Option<String>,
        env: Option<String>,
    ) -> Result<Option<SecretRef>, CheckError> {
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

    pub(crate) fn nonempty(
        &self,
        key: &str,
        name: &str,
        v: Option<String>,
    ) -> Result<String, CheckError> {
        match v {
            Some(s) if !s.trim().is_empty() => Ok(s),
            _ => Err(self.err(format!("{key}.{name}"), "required")),
        }
    }

    pub(crate) fn timeout(
        &self,
        key: &str,
        t: Option<crate::clock::Dur>,
    ) -> Result<Duration, CheckError> {
        let t = t.map(|d| d.0).unwrap_or(DEFAULT_TIMEOUT);
        if t < Duration::from_millis(100) || t > Duration::from_secs(120) {
            return Err(self.err(format!("{key}.timeout"), "must be between 100ms and 2m"));
        }
        Ok(t)
    }

    pub(crate) fn template(
        &self,
        key: &str,
        s: Option<String>,
    ) -> Result<Option<Template>, CheckError> {
        s.map(|s| Template::parse(&s).map_err(|e| self.err(key, e)))
            .transpose()
    }

    pub(crate) fn alg(
        &self,
        key: &str,
        v: Option<&str>,
        default: Option<Alg>,
        allowed: &[&str],
        why: &str,
    ) -> Result<Alg, CheckError> {
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
}
