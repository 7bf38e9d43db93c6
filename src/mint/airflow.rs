//! The `airflow` kind: an Airflow 3 API token signed with the broker's key, which
//! Airflow verifies through `trusted_jwks_url`. Claims: `sub` (user name, or the numeric
//! user id under the FAB auth manager), `role` (simple auth manager), `aud`, `iss`,
//! `iat`, `nbf`, `exp`, `jti`; header `kid`; the algorithm set explicitly.

use super::{
    one_mapped, sign_with_ring, subject, Credential, Deps, MintContext, MintError, Minter,
};
use super::{AirflowAuthManager, AirflowConfig};
use crate::keys::KeyRing;
use crate::secret::SecretString;
use async_trait::async_trait;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Mints Airflow API tokens for one target.
#[derive(Debug)]
pub struct AirflowMinter {
    target: String,
    cfg: AirflowConfig,
    issuer_url: String,
    keys: Arc<KeyRing>,
}

impl AirflowMinter {
    /// A minter signing with the ring's key for `target`.
    pub fn new(target: &str, cfg: AirflowConfig, deps: &Deps) -> AirflowMinter {
        AirflowMinter {
            target: target.to_string(),
            cfg,
            issuer_url: deps.issuer_url.clone(),
            keys: deps.keys.clone(),
        }
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
            "jti": ctx.lease_id,
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
        Ok(super::bearer_credential("airflow", token, fields, ctx))
    }
}
