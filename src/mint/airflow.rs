//! The `airflow` kind: an Airflow 3 API token signed with the broker's key, which
//! Airflow verifies through `trusted_jwks_url`. Claims: `sub` (user name, or the numeric
//! user id under the FAB auth manager), `role` (simple auth manager), `aud`, `iss`,
//! `iat`, `nbf`, `exp`, `jti`; header `kid`; the algorithm set explicitly.
//!
//! `jti` is the lease id without its hyphens: Airflow keeps revoked ids in a
//! `VARCHAR(32)` column, which a 36-character UUID overflows on PostgreSQL and MySQL.
//!
//! With `api_url`, revocation reaches Airflow: the broker signs the lease's claims again
//! (same `jti`, `exp` no earlier than the lease's) and sends them to
//! `GET /api/v2/auth/logout`, which records the `jti` as revoked; Airflow then refuses
//! every token of the lease with 403. The logout endpoint answers the same whether or not
//! it recorded anything, so the broker then presents the token once more and counts the
//! revocation done only when Airflow refuses it.

use super::check::{Check, CheckError};
use super::upstream::Http;
use super::*;
use super::{
    one_mapped, sign_with_ring, subject, Credential, Deps, MintContext, MintError, Minter,
};
use crate::jose::Alg;

use crate::keys::KeyRing;
use crate::secret::SecretString;
use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Mints Airflow API tokens for one target.
#[derive(Debug)]
pub struct AirflowMinter {
    target: String,
    cfg: AirflowConfig,
    issuer_url: String,
    keys: Arc<KeyRing>,
    clock: crate::clock::SharedClock,
    http: Option<Http>,
}

/// The `jti` of an Airflow token of lease `lease_id`: the UUID's 32 hex digits (Airflow's
/// revoked-token table holds at most 32 characters).
pub fn airflow_jti(lease_id: &str) -> String {
    lease_id.replace('-', "")
}

/// How long past its `exp` a token may still pass Airflow (its `jwt_leeway`, 10 s by
/// default, with room for clock skew): until then a revocation is still sent.
const AIRFLOW_LEEWAY_SECS: i64 = 120;

impl AirflowMinter {
    /// A minter signing with the ring's key for `target`. Fails only when the HTTP
    /// client for `api_url` cannot be built.
    pub fn new(target: &str, cfg: AirflowConfig, deps: &Deps) -> Result<AirflowMinter, String> {
        let http = match &cfg.api_url {
            Some(_) => Some(Http::new(target, cfg.timeout)?),
            None => None,
        };
        Ok(AirflowMinter {
            target: target.to_string(),
            cfg,
            issuer_url: deps.issuer_url.clone(),
            keys: deps.keys.clone(),
            clock: deps.clock.clone(),
            http,
        })
    }

    fn claims(&self, ctx: &MintContext<'_>) -> Result<(Value, Option<String>), MintError> {
        let sub = subject(&self.cfg.subject, ctx.identity)?;
        if self.cfg.auth_manager == AirflowAuthManager::Fab
            && (sub.is_empty() || !sub.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(MintError::Invalid(
                "the FAB auth manager needs a numeric user id as sub; the subject template gave something else".into(),
            ));
        }
        let role = match self.cfg.auth_manager {
            AirflowAuthManager::Fab => None,
            AirflowAuthManager::Simple if !self.cfg.roles.is_empty() => {
                Some(one_mapped(&self.cfg.roles, ctx.scopes, "Airflow role")?.to_string())
            }
            AirflowAuthManager::Simple => self.cfg.role.clone(),
        };
        let mut c = json!({
            "iss": self.issuer_url,
            "sub": sub,
            "aud": self.cfg.audience,
            "iat": ctx.now,
            "nbf": ctx.now,
            "exp": ctx.now + ctx.ttl.as_secs() as i64,
            "jti": airflow_jti(ctx.lease_id),
        });
        if let (Some(r), Value::Object(m)) = (&role, &mut c) {
            m.insert("role".into(), json!(r));
        }
        Ok((c, role))
    }
}

#[async_trait]
impl Minter for AirflowMinter {
    fn kind(&self) -> &'static str {
        "airflow"
    }

    fn renewable(&self) -> bool {
        true
    }

    async fn renew(
        &self,
        ctx: &MintContext<'_>,
        _upstream: Option<&SecretString>,
    ) -> Result<Option<Credential>, MintError> {
        self.mint(ctx).await.map(Some)
    }

    async fn mint(&self, ctx: &MintContext<'_>) -> Result<Credential, MintError> {
        let (claims, role) = self.claims(ctx)?;
        let (token, kid) = sign_with_ring(&self.keys, &self.target, &claims)?;
        let mut fields = BTreeMap::from([("kid".to_string(), kid)]);
        if let Some(r) = role {
            fields.insert("role".into(), r);
        }
        let mut c = super::bearer_credential("airflow", token, fields, ctx);
        c.id = airflow_jti(ctx.lease_id);
        if self.http.is_some() {
            // What revocation needs to sign the lease's claims again: no secret, but
            // stored sealed like every upstream handle.
            c.upstream = Some(crate::secret::Secret::new(claims.to_string()));
        }
        Ok(c)
    }

    async fn revoke(
        &self,
        lease_id: &str,
        upstream: Option<&SecretString>,
        expires_at: i64,
    ) -> Result<(), MintError> {
        let (Some(http), Some(api), Some(handle)) = (&self.http, &self.cfg.api_url, upstream)
        else {
            return Ok(());
        };
        let now = self.clock.now();
        if expires_at.saturating_add(AIRFLOW_LEEWAY_SECS) <= now {
            // Every token of the lease has expired past Airflow's leeway.
            return Ok(());
        }
        let bad = || http.fail(format!("lease {lease_id}: unreadable revocation handle"));
        let mut claims: Value = serde_json::from_str(handle.expose()).map_err(|_| bad())?;
        let Value::Object(m) = &mut claims else {
            return Err(bad());
        };
        // The revocation token carries the lease's jti and the least role: Airflow records
        // the jti until this token's exp, which is no earlier than any token of the lease
        // and far enough ahead that Airflow still accepts it.
        m.insert("iat".into(), json!(now));
        m.insert("nbf".into(), json!(now));
        m.insert("exp".into(), json!(expires_at.max(now + 60)));
        m.insert("jti".into(), json!(airflow_jti(lease_id)));
        if m.contains_key("role") {
            m.insert("role".into(), json!("VIEWER"));
        }
        // First make sure Airflow accepts what the broker signs now (it may still cache a
        // JWKS from before a key change): a token with a fresh jti must pass. Otherwise a
        // refusal below would prove nothing, and the lease's token could still be good.
        let mut fresh = claims.clone();
        fresh["jti"] = json!(airflow_jti(&crate::clock::new_id()));
        fresh["exp"] = json!(now + 60);
        let (fresh, _) = sign_with_ring(&self.keys, &self.target, &fresh)?;
        let dags = format!("{api}/api/v2/dags?limit=1");
        let probe = |t: &SecretString| http.client().get(&dags).bearer_auth(t.expose());
        match http.send("revocation check", probe(&fresh), &[]).await {
            Ok(_) => {}
            Err(MintError::Refused { .. }) => {
                return Err(http.fail(
                    "Airflow does not accept tokens signed by the broker's current key yet (it caches the JWKS for up to an hour); will retry",
                ))
            }
            Err(e) => return Err(e),
        }
        let (token, _) = sign_with_ring(&self.keys, &self.target, &claims)?;
        let logout = http
            .client()
            .get(format!("{api}/api/v2/auth/logout"))
            .bearer_auth(token.expose());
        // Airflow answers a redirect to its login page, recorded or not.
        http.send("logout", logout, &[302, 303, 307]).await?;
        match http.send("revocation check", probe(&token), &[]).await {
            Err(MintError::Refused { .. }) => Ok(()),
            Err(e) => Err(e),
            Ok(_) => Err(http.fail("Airflow still accepts the lease's token after logout")),
        }
    }
}

// ---- settings: what the minter is built from --------------------------------------

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
    /// Airflow's base URL: revocation records the lease's `jti` there.
    pub api_url: Option<String>,
    /// Upstream call timeout.
    pub timeout: Duration,
}

// ---- configuration: the raw form and its checks ----------------------------------

const AIRFLOW_ROLES: &[&str] = &["VIEWER", "USER", "OP", "ADMIN"];

/// The `[[targets]]` keys of this kind, as written (unknown keys are refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAirflow {
    algorithm: Option<String>,
    audience: Option<String>,
    subject: Option<String>,
    auth_manager: Option<String>,
    role: Option<String>,
    #[serde(default)]
    roles: BTreeMap<String, String>,
    api_url: Option<String>,
    timeout: Option<crate::clock::Dur>,
}

impl Check {
    pub(super) fn airflow(&self, key: &str, r: RawAirflow) -> Result<AirflowConfig, CheckError> {
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
        let role_ok = |k: String, v: &str| -> Result<String, CheckError> {
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
        let api_url = r
            .api_url
            .map(|u| self.url(&format!("{key}.api_url"), &u, true))
            .transpose()?;
        Ok(AirflowConfig {
            algorithm,
            audience,
            subject: self.template(&format!("{key}.subject"), r.subject)?,
            auth_manager,
            role,
            roles,
            api_url,
            timeout: self.timeout(key, r.timeout)?,
        })
    }
}
