//! The `databricks` kind, three modes:
//! - `federation`: a broker-signed JWT exchanged (RFC 8693) at the workspace's
//!   `/oidc/v1/token` under a service principal's federation policy;
//! - `m2m`: client credentials with the service principal's OAuth secret;
//! - `pat`: a personal access token with `lifetime_seconds` (never without), created for
//!   the token's owner or on behalf of a service principal, deleted on revoke.

use super::check::{Check, CheckError};
use super::oauth::{self, token_request, Client};
use super::upstream::Http;
use super::ClientAuth;
use super::*;
use super::{Credential, Deps, MintContext, MintError, Minter};
use crate::jose::Alg;
use crate::keys::KeyRing;
use crate::secret::{Secret, SecretString};
use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Mints Databricks tokens for one target.
#[derive(Debug)]
pub struct DatabricksMinter {
    target: String,
    cfg: DatabricksConfig,
    http: Http,
    /// The m2m client secret, or the PAT-creating token.
    secret: Option<SecretString>,
    issuer_url: String,
    keys: Arc<KeyRing>,
}

impl DatabricksMinter {
    /// Reads the mode's secret. Fails when it cannot be read.
    pub fn new(
        target: &str,
        cfg: DatabricksConfig,
        deps: &Deps,
    ) -> Result<DatabricksMinter, String> {
        let secret = match &cfg.mode {
            DatabricksMode::Federation(_) => None,
            DatabricksMode::M2m { client_secret, .. } => Some(client_secret.load()?),
            DatabricksMode::Pat { token, .. } => Some(token.load()?),
        };
        Ok(DatabricksMinter {
            target: target.to_string(),
            http: Http::new(target, cfg.timeout)?,
            cfg,
            secret,
            issuer_url: deps.issuer_url.clone(),
            keys: deps.keys.clone(),
        })
    }

    fn token_url(&self) -> String {
        format!("{}/oidc/v1/token", self.cfg.workspace_url)
    }

    fn admin(&self) -> Result<&SecretString, MintError> {
        self.secret
            .as_ref()
            .ok_or_else(|| MintError::Signing(self.target.clone()))
    }

    async fn create_pat(
        &self,
        ctx: &MintContext<'_>,
        application_id: Option<&str>,
    ) -> Result<Credential, MintError> {
        let lifetime = ctx.ttl.as_secs().max(1);
        let comment = format!("latchkey lease {} for {}", ctx.lease_id, ctx.identity.key);
        let ws = &self.cfg.workspace_url;
        let req = match application_id {
            Some(app) => self
                .http
                .client()
                .post(format!("{ws}/api/2.0/token-management/on-behalf-of/tokens"))
                .json(&json!({"application_id": app, "lifetime_seconds": lifetime, "comment": comment})),
            None => self
                .http
                .client()
                .post(format!("{ws}/api/2.0/token/create"))
                .json(&json!({"lifetime_seconds": lifetime, "comment": comment})),
        };
        let (_, body) = self
            .http
            .send("create token", req.bearer_auth(self.admin()?.expose()), &[])
            .await?;
        let body = Secret::new(body);
        let v: Value = self.http.parse("create token", body.expose())?;
        let Some(id) = v
            .pointer("/token_info/token_id")
            .and_then(Value::as_str)
            .map(str::to_string)
        else {
            return Err(self.http.fail("create token: answer has no token_id"));
        };
        let token = match v.get("token_value").and_then(Value::as_str) {
            Some(t) if !t.is_empty() => Secret::new(t.to_string()),
            _ => {
                // Created but unusable: delete it rather than leave it behind.
                let _ = self.delete_pat(&id).await;
                return Err(self.http.fail("create token: answer has no token_value"));
            }
        };
        let expires_at = match v.pointer("/token_info/expiry_time").and_then(Value::as_i64) {
            Some(ms) if ms > 0 => ms / 1000,
            _ => ctx.now + lifetime as i64,
        };
        Ok(Credential {
            kind: "databricks",
            token: Some(token),
            username: None,
            password: None,
            fields: BTreeMap::from([("token_id".to_string(), id.clone())]),
            expires_at,
            id: id.clone(),
            upstream: Some(Secret::new(id)),
        })
    }

    async fn delete_pat(&self, id: &str) -> Result<(), MintError> {
        let ws = &self.cfg.workspace_url;
        let req = match &self.cfg.mode {
            DatabricksMode::Pat {
                application_id: Some(_),
                ..
            } => self.http.client().delete(format!(
                "{ws}/api/2.0/token-management/tokens/{}",
                encode(id)
            )),
            _ => self
                .http
                .client()
                .post(format!("{ws}/api/2.0/token/delete"))
                .json(&json!({"token_id": id})),
        };
        self.http
            .send(
                "delete token",
                req.bearer_auth(self.admin()?.expose()),
                &[404],
            )
            .await
            .map(|_| ())
    }
}

fn encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[async_trait]
impl Minter for DatabricksMinter {
    fn kind(&self) -> &'static str {
        "databricks"
    }

    async fn mint(&self, ctx: &MintContext<'_>) -> Result<Credential, MintError> {
        match &self.cfg.mode {
            DatabricksMode::Federation(f) => {
                let st = oauth::subject_token(f, &self.keys, &self.target, &self.issuer_url, ctx)?;
                let form = vec![
                    ("grant_type", oauth::TOKEN_EXCHANGE.to_string()),
                    ("subject_token", st.expose().clone()),
                    ("subject_token_type", oauth::JWT_TYPE.to_string()),
                    ("scope", "all-apis".to_string()),
                ];
                let client = Client {
                    id: f.client_id.as_deref(),
                    secret: None,
                    auth: ClientAuth::Post,
                };
                token_request(
                    &self.http,
                    "databricks",
                    &self.token_url(),
                    &client,
                    form,
                    ctx,
                )
                .await
            }
            DatabricksMode::M2m { client_id, .. } => {
                let client = Client {
                    id: Some(client_id),
                    secret: Some(self.admin()?),
                    auth: ClientAuth::Basic,
                };
                let form = vec![
                    ("grant_type", "client_credentials".to_string()),
                    ("scope", "all-apis".to_string()),
                ];
                token_request(
                    &self.http,
                    "databricks",
                    &self.token_url(),
                    &client,
                    form,
                    ctx,
                )
                .await
            }
            DatabricksMode::Pat { application_id, .. } => {
                self.create_pat(ctx, application_id.as_deref()).await
            }
        }
    }

    async fn revoke(
        &self,
        _lease_id: &str,
        upstream: Option<&SecretString>,
        _expires_at: i64,
    ) -> Result<(), MintError> {
        match upstream {
            Some(id) => self.delete_pat(id.expose()).await,
            None => Ok(()),
        }
    }
}

// ---- settings: what the minter is built from --------------------------------------

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

// ---- configuration: the raw form and its checks ----------------------------------

/// The `[[targets]]` keys of this kind, as written (unknown keys are refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDatabricks {
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
    timeout: Option<crate::clock::Dur>,
}

impl Check {
    pub(super) fn databricks(
        &self,
        key: &str,
        r: RawDatabricks,
    ) -> Result<DatabricksConfig, CheckError> {
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
        let only = |mode: &str, takes: &[&str]| -> Result<(), CheckError> {
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
}
