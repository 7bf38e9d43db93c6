//! The `jwt` target kind: a token signed by the broker's key ring, verifiable by anyone
//! through the broker's JWKS.

use super::check::RESERVED_CLAIMS;
use super::check::{Check, CheckError};
use super::*;
use super::{Credential, MintContext, MintError, Minter};
use crate::jose::Alg;
use crate::keys::KeyRing;
use crate::secret::SecretString;
use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Mints JWTs for one target.
#[derive(Debug)]
pub struct JwtMinter {
    target: String,
    cfg: JwtTargetConfig,
    issuer_url: String,
    keys: Arc<KeyRing>,
}

impl JwtMinter {
    /// A minter for `target`, signing with the ring's key for that target.
    pub fn new(
        target: &str,
        cfg: JwtTargetConfig,
        issuer_url: &str,
        keys: Arc<KeyRing>,
    ) -> JwtMinter {
        JwtMinter {
            target: target.to_string(),
            cfg,
            issuer_url: issuer_url.to_string(),
            keys,
        }
    }

    /// The claims a token for this request carries.
    pub fn claims(&self, ctx: &MintContext<'_>) -> Result<Value, MintError> {
        let id = ctx.identity;
        let sub = match &self.cfg.subject {
            Some(t) => t.render(&id.claims).map_err(MintError::MissingClaim)?,
            None => id.key.clone(),
        };
        let mut claims = Map::new();
        for (name, t) in &self.cfg.claims {
            claims.insert(
                name.clone(),
                Value::String(t.render(&id.claims).map_err(MintError::MissingClaim)?),
            );
        }
        let exp = ctx.now + ctx.ttl.as_secs() as i64;
        for (k, v) in [
            ("iss", json!(self.issuer_url)),
            ("sub", json!(sub)),
            ("aud", json!(self.cfg.audience)),
            ("iat", json!(ctx.now)),
            ("nbf", json!(ctx.now)),
            ("exp", json!(exp)),
            ("jti", json!(ctx.lease_id)),
            ("scope", json!(ctx.scopes.join(" "))),
            ("act", json!({"iss": id.issuer, "sub": id.subject})),
        ] {
            claims.insert(k.to_string(), v);
        }
        Ok(Value::Object(claims))
    }
}

#[async_trait]
impl Minter for JwtMinter {
    fn kind(&self) -> &'static str {
        "jwt"
    }

    /// A JWT cannot be extended; renewal issues a fresh one for the same lease (same
    /// `jti`), so revoking the lease covers every token it was given.
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
        let claims = self.claims(ctx)?;
        let (token, kid) = super::sign_with_ring(&self.keys, &self.target, &claims)?;
        Ok(super::bearer_credential(
            "jwt",
            token,
            BTreeMap::from([("kid".to_string(), kid)]),
            ctx,
        ))
    }
}

// ---- settings: what the minter is built from --------------------------------------

/// Settings of a `jwt` target.
#[derive(Debug, Clone)]
pub struct JwtTargetConfig {
    /// `aud` of minted tokens.
    pub audience: String,
    /// Signing algorithm.
    pub algorithm: Alg,
    /// `sub` template; `None` means the caller's stable identity key.
    pub subject: Option<Template>,
    /// Extra claims, templated.
    pub claims: Vec<(String, Template)>,
}

// ---- configuration: the raw form and its checks ----------------------------------

/// The `[[targets]]` keys of this kind, as written (unknown keys are refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJwt {
    audience: Option<String>,
    algorithm: Option<String>,
    subject: Option<String>,
    #[serde(default)]
    claims: BTreeMap<String, String>,
}

impl Check {
    pub(super) fn jwt(&self, key: &str, r: RawJwt) -> Result<JwtTargetConfig, CheckError> {
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
}
