//! The `prefect` kind: a Prefect Cloud service account ("bot") per lease, whose API key
//! expires with the lease; revoke deletes the service account (and with it the key).
//! Self-hosted Prefect servers are refused at config time: they have one shared
//! credential and nothing to scope.

use super::upstream::Http;
use super::PrefectConfig;
use super::{one_mapped, rfc3339, Credential, MintContext, MintError, Minter};
use crate::secret::{Secret, SecretString};
use async_trait::async_trait;
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
    ) -> Result<(), MintError> {
        match upstream {
            Some(id) => self.delete(id.expose()).await,
            None => Ok(()),
        }
    }
}
