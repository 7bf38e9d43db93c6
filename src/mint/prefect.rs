//! The `prefect` kind: a Prefect Cloud service account ("bot") per lease, whose API key
//! expires with the lease; revoke deletes the service account (and with it the key).
//! Self-hosted Prefect servers are refused at config time: they have one shared
//! credential and nothing to scope.

use super::check::{Check, CheckError};
use super::upstream::Http;
use super::*;
use super::{one_mapped, rfc3339, Credential, MintContext, MintError, Minter};
use crate::secret::{Secret, SecretString};
use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Mints Prefect Cloud API keys for one target.
#[derive(Debug)]
pub struct PrefectMinter {
    cfg: PrefectConfig,
    http: Http,
    token: SecretString,
}

impl PrefectMinter {
    /// Reads the managing API key. Fails when it cannot be read.
    pub fn new(target: &str, cfg: PrefectConfig) -> Result<PrefectMinter, String> {
        Ok(PrefectMinter {
            http: Http::new(target, cfg.timeout)?,
            token: cfg.token.load()?,
            cfg,
        })
    }

    fn bots_url(&self) -> String {
        format!(
            "{}/accounts/{}/bots/",
            self.cfg.api_url,
            form_urlencoded::byte_serialize(self.cfg.account_id.as_bytes()).collect::<String>()
        )
    }

    async fn delete(&self, id: &str) -> Result<(), MintError> {
        let url = format!(
            "{}{}",
            self.bots_url(),
            form_urlencoded::byte_serialize(id.as_bytes()).collect::<String>()
        );
        let req = self
            .http
            .client()
            .delete(url)
            .bearer_auth(self.token.expose());
        self.http
            .send("delete service account", req, &[404])
            .await
            .map(|_| ())
    }
}

#[async_trait]
impl Minter for PrefectMinter {
    fn kind(&self) -> &'static str {
        "prefect"
    }

    async fn mint(&self, ctx: &MintContext<'_>) -> Result<Credential, MintError> {
        let role = if self.cfg.roles.is_empty() {
            self.cfg.account_role_id.as_str()
        } else {
            one_mapped(&self.cfg.roles, ctx.scopes, "Prefect account role")?
        };
        let expires_at = ctx.now + ctx.ttl.as_secs() as i64;
        let body = json!({
            "name": format!("latchkey-{}", ctx.lease_id),
            "api_key_expiration": rfc3339(expires_at),
            "account_role_id": role,
        });
        let req = self
            .http
            .client()
            .post(self.bots_url())
            .bearer_auth(self.token.expose())
            .json(&body);
        let (_, raw) = self.http.send("create service account", req, &[]).await?;
        let raw = Secret::new(raw);
        let v: Value = self.http.parse("create service account", raw.expose())?;
        let id = v
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| self.http.fail("create service account: answer has no id"))?;
        let key = v
            .pointer("/api_key/key")
            .and_then(Value::as_str)
            .filter(|k| !k.is_empty());
        let Some(key) = key else {
            let _ = self.delete(&id).await;
            return Err(self
                .http
                .fail("create service account: answer has no api_key"));
        };
        Ok(Credential {
            kind: "prefect",
            token: Some(Secret::new(key.to_string())),
            username: None,
            password: None,
            fields: BTreeMap::from([
                ("service_account_id".to_string(), id.clone()),
                ("account_role_id".to_string(), role.to_string()),
            ]),
            expires_at,
            id: id.clone(),
            upstream: Some(Secret::new(id)),
        })
    }

    async fn revoke(
        &self,
        _lease_id: &str,
        upstream: Option<&SecretString>,
        _expires_at: i64,
    ) -> Result<(), MintError> {
        match upstream {
            Some(id) => self.delete(id.expose()).await,
            None => Ok(()),
        }
    }
}

// ---- settings: what the minter is built from --------------------------------------

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

// ---- configuration: the raw form and its checks ----------------------------------

/// The `[[targets]]` keys of this kind, as written (unknown keys are refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPrefect {
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
    timeout: Option<crate::clock::Dur>,
}

impl Check {
    pub(super) fn prefect(&self, key: &str, r: RawPrefect) -> Result<PrefectConfig, CheckError> {
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
        let loopback = crate::net::is_loopback_host(&host);
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
}
