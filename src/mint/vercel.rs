//! The `vercel` kind: a Vercel access token with `expiresAt`, created through the API
//! with a stored full-account token, handed out once, deleted on revoke. Root rotation
//! creates a new full-account token, checks it works, switches to it and deletes the
//! old one.

use super::check::{Check, CheckError};
use super::root::RootCredential;
use super::upstream::Http;
use super::*;
use super::{Credential, Deps, MintContext, MintError, Minter, RootStep};
use crate::secret::{Secret, SecretString};
use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Mints Vercel tokens for one target.
#[derive(Debug)]
pub struct VercelMinter {
    target: String,
    cfg: VercelConfig,
    http: Http,
    root: RootCredential,
}

impl VercelMinter {
    /// Loads the root token (the rotated one from the store, else the configured one).
    /// Fails when it cannot be read.
    pub(crate) async fn new(
        target: &str,
        cfg: VercelConfig,
        deps: &Deps,
    ) -> Result<VercelMinter, String> {
        let (root, pending) = RootCredential::load(target, &cfg.token, deps).await?;
        if pending.is_some() {
            // Vercel tokens are switched in one step; a staged one was never in service.
            let _ = root.discard().await;
        }
        Ok(VercelMinter {
            target: target.to_string(),
            http: Http::new(target, cfg.timeout)?,
            cfg,
            root,
        })
    }

    fn tokens_url(&self) -> String {
        match &self.cfg.team_id {
            Some(t) => format!(
                "{}/v3/user/tokens?teamId={}",
                self.cfg.api_url,
                form_urlencoded::byte_serialize(t.as_bytes()).collect::<String>()
            ),
            None => format!("{}/v3/user/tokens", self.cfg.api_url),
        }
    }

    /// Creates a token; answers its id and bearer token.
    async fn create(
        &self,
        auth: &SecretString,
        name: &str,
        expires_ms: Option<i64>,
    ) -> Result<(String, SecretString), MintError> {
        let mut body = json!({"name": name});
        if let (Some(ms), Value::Object(m)) = (expires_ms, &mut body) {
            m.insert("expiresAt".into(), json!(ms));
        }
        let req = self
            .http
            .client()
            .post(self.tokens_url())
            .bearer_auth(auth.expose())
            .json(&body);
        let (_, raw) = self.http.send("create token", req, &[]).await?;
        let raw = Secret::new(raw);
        let v: Value = self.http.parse("create token", raw.expose())?;
        let id = v
            .pointer("/token/id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| self.http.fail("create token: answer has no token id"))?;
        match v.get("bearerToken").and_then(Value::as_str) {
            Some(t) if !t.is_empty() => Ok((id, Secret::new(t.to_string()))),
            _ => {
                let _ = self.delete(auth, &id).await;
                Err(self.http.fail("create token: answer has no bearerToken"))
            }
        }
    }

    async fn delete(&self, auth: &SecretString, id: &str) -> Result<(), MintError> {
        let req = self
            .http
            .client()
            .delete(format!(
                "{}/v3/user/tokens/{}",
                self.cfg.api_url,
                form_urlencoded::byte_serialize(id.as_bytes()).collect::<String>()
            ))
            .bearer_auth(auth.expose());
        self.http
            .send("delete token", req, &[404])
            .await
            .map(|_| ())
    }

    /// The id of the token `auth` is.
    async fn current_id(&self, auth: &SecretString) -> Result<String, MintError> {
        let req = self
            .http
            .client()
            .get(format!("{}/v5/user/tokens/current", self.cfg.api_url))
            .bearer_auth(auth.expose());
        let v: Value = self.http.json("read token", req).await?;
        v.pointer("/token/id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| self.http.fail("read token: answer has no token id"))
    }
}

#[async_trait]
impl Minter for VercelMinter {
    fn kind(&self) -> &'static str {
        "vercel"
    }

    async fn mint(&self, ctx: &MintContext<'_>) -> Result<Credential, MintError> {
        let expires_at = ctx.now + ctx.ttl.as_secs() as i64;
        let name = format!("latchkey {} {}", ctx.lease_id, ctx.identity.key);
        let name: String = name.chars().take(100).collect();
        let (id, token) = self
            .create(&self.root.get(), &name, Some(expires_at * 1000))
            .await?;
        Ok(Credential {
            kind: "vercel",
            token: Some(token),
            username: None,
            password: None,
            fields: BTreeMap::from([("token_id".to_string(), id.clone())]),
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
            Some(id) => self.delete(&self.root.get(), id.expose()).await,
            None => Ok(()),
        }
    }

    fn rotates_root(&self) -> bool {
        true
    }

    async fn rotate_root(&self, journal: &mut Vec<RootStep>) -> Result<String, MintError> {
        let old = self.root.get();
        let old_id = self.current_id(&old).await?;
        let name = format!("latchkey root {}", self.target);
        let (new_id, new) = self.create(&old, &name, None).await?;
        journal.push(RootStep {
            phase: "create",
            detail: format!("created root token {new_id}"),
        });
        let undo = |journal: &mut Vec<RootStep>, why: String| {
            journal.push(RootStep {
                phase: "cleanup",
                detail: format!("deleting new root token {new_id}: {why}"),
            });
        };
        match self.current_id(&new).await {
            Ok(id) if id == new_id => journal.push(RootStep {
                phase: "verify",
                detail: format!("root token {new_id} authenticates"),
            }),
            _ => {
                undo(journal, "it did not authenticate as itself".into());
                let _ = self.delete(&old, &new_id).await;
                return Err(self
                    .http
                    .fail("new root token did not verify; old one kept"));
            }
        }
        if let Err(e) = self.root.commit(new).await {
            undo(journal, "it could not be stored".into());
            let _ = self.delete(&old, &new_id).await;
            return Err(e);
        }
        journal.push(RootStep {
            phase: "switch",
            detail: format!("root token {new_id} in service (sealed in the store)"),
        });
        match self.delete(&self.root.get(), &old_id).await {
            Ok(()) => {
                journal.push(RootStep {
                    phase: "delete",
                    detail: format!("old root token {old_id} deleted"),
                });
                Ok(format!("root token {new_id} replaced {old_id}"))
            }
            Err(e) => {
                journal.push(RootStep {
                    phase: "delete",
                    detail: format!("old root token {old_id} NOT deleted ({e}); delete it by hand"),
                });
                Ok(format!(
                    "root token {new_id} replaced {old_id}; deleting {old_id} failed: delete it by hand"
                ))
            }
        }
    }
}

// ---- settings: what the minter is built from --------------------------------------

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

// ---- configuration: the raw form and its checks ----------------------------------

/// The `[[targets]]` keys of this kind, as written (unknown keys are refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVercel {
    api_url: Option<String>,
    team_id: Option<String>,
    token_file: Option<String>,
    token_env: Option<String>,
    timeout: Option<crate::clock::Dur>,
}

impl Check {
    /// Checks a `vercel` target's keys.
    pub(super) fn vercel(&self, key: &str, r: RawVercel) -> Result<VercelConfig, CheckError> {
        Ok(VercelConfig {
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
}
