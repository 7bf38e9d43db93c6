//! OAuth2 token endpoints: client credentials and RFC 8693 exchange of a broker-signed
//! JWT. Used by the `bitbucket` and generic `oauth2` kinds, and by Databricks' m2m and
//! federation modes. Tokens from these endpoints cannot be revoked through a standard
//! API; their lifetime is the upstream's, and the lease records that true expiry.

use super::check::{Check, CheckError};
use super::upstream::Http;
use super::Federation;
use super::*;
use super::{sign_with_ring, subject, Credential, Deps, MintContext, MintError, Minter};
use crate::jose::Alg;
use crate::keys::KeyRing;
use crate::secret::{Secret, SecretString};
use async_trait::async_trait;
use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;

/// RFC 8693 grant type.
pub(crate) const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 8693 token type of a JWT.
pub(crate) const JWT_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";

/// A token endpoint's answer. No `Debug`: it holds the token.
#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<i64>,
    #[serde(default)]
    scope: Option<String>,
    /// Bitbucket answers `scopes`.
    #[serde(default)]
    scopes: Option<String>,
}

/// How the client authenticates at the token endpoint.
pub(crate) struct Client<'a> {
    pub(crate) id: Option<&'a str>,
    pub(crate) secret: Option<&'a SecretString>,
    pub(crate) auth: ClientAuth,
}

/// Posts `form` to `url` with the client's authentication and turns the answer into a
/// credential of `kind`. The lease's expiry is the token's own (`expires_in`), or the
/// granted TTL when the server does not say.
pub(crate) async fn token_request(
    http: &Http,
    kind: &'static str,
    url: &str,
    client: &Client<'_>,
    mut form: Vec<(&str, String)>,
    ctx: &MintContext<'_>,
) -> Result<Credential, MintError> {
    let mut req = http.client().post(url);
    match (client.auth, client.id, client.secret) {
        (ClientAuth::Basic, Some(id), Some(secret)) => {
            req = req.basic_auth(id, Some(secret.expose()));
        }
        (ClientAuth::Post, Some(id), Some(secret)) => {
            form.push(("client_id", id.to_string()));
            form.push(("client_secret", secret.expose().clone()));
        }
        (_, Some(id), None) => form.push(("client_id", id.to_string())),
        (_, None, _) => {}
    }
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form.iter().map(|(k, v)| (*k, v.as_str())))
        .finish();
    let req = req
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .header(reqwest::header::ACCEPT, "application/json")
        .body(body);
    let a: TokenAnswer = http.json("token request", req).await?;
    if a.access_token.is_empty() {
        return Err(http.fail("token request: answer has no access_token"));
    }
    if let Some(t) = &a.token_type {
        if !t.eq_ignore_ascii_case("bearer") && !t.eq_ignore_ascii_case("n_a") {
            return Err(http.fail(format!("token request: unexpected token_type {t:?}")));
        }
    }
    let lifetime = match a.expires_in {
        Some(s) if s > 0 => s,
        Some(_) => return Err(http.fail("token request: expires_in is not positive")),
        None => ctx.ttl.as_secs() as i64,
    };
    let mut fields = BTreeMap::new();
    if let Some(s) = a.scope.or(a.scopes) {
        fields.insert("scope".to_string(), s);
    }
    Ok(Credential {
        kind,
        token: Some(Secret::new(a.access_token)),
        username: None,
        password: None,
        fields,
        expires_at: ctx.now + lifetime,
        id: ctx.lease_id.to_string(),
        upstream: None,
    })
}

/// The broker-signed JWT presented as the subject token of an exchange: short-lived
/// (at most 5 minutes: it is used once, at once).
pub(crate) fn subject_token(
    f: &Federation,
    keys: &KeyRing,
    target: &str,
    issuer_url: &str,
    ctx: &MintContext<'_>,
) -> Result<SecretString, MintError> {
    let sub = subject(&f.subject, ctx.identity)?;
    let claims = json!({
        "iss": issuer_url,
        "sub": sub,
        "aud": f.audience,
        "iat": ctx.now,
        "nbf": ctx.now,
        "exp": ctx.now + (ctx.ttl.as_secs() as i64).min(300),
        "jti": ctx.lease_id,
    });
    sign_with_ring(keys, target, &claims).map(|(t, _)| t)
}

/// Mints Bitbucket Cloud access tokens from an OAuth consumer.
#[derive(Debug)]
pub struct BitbucketMinter {
    cfg: OAuthClientConfig,
    http: Http,
    secret: SecretString,
}

impl BitbucketMinter {
    /// Reads the consumer secret. Fails when it cannot be read.
    pub fn new(target: &str, cfg: OAuthClientConfig) -> Result<BitbucketMinter, String> {
        Ok(BitbucketMinter {
            http: Http::new(target, cfg.timeout)?,
            secret: cfg.client_secret.load()?,
            cfg,
        })
    }
}

#[async_trait]
impl Minter for BitbucketMinter {
    fn kind(&self) -> &'static str {
        "bitbucket"
    }

    async fn mint(&self, ctx: &MintContext<'_>) -> Result<Credential, MintError> {
        let client = Client {
            id: Some(&self.cfg.client_id),
            secret: Some(&self.secret),
            auth: ClientAuth::Basic,
        };
        token_request(
            &self.http,
            "bitbucket",
            &self.cfg.token_url,
            &client,
            vec![("grant_type", "client_credentials".into())],
            ctx,
        )
        .await
    }
}

/// Mints tokens from any OAuth2 server.
#[derive(Debug)]
pub struct OAuth2Minter {
    target: String,
    cfg: OAuth2Config,
    http: Http,
    secret: Option<SecretString>,
    issuer_url: String,
    keys: Arc<KeyRing>,
}

impl OAuth2Minter {
    /// Reads the client secret (when configured). Fails when it cannot be read.
    pub fn new(target: &str, cfg: OAuth2Config, deps: &Deps) -> Result<OAuth2Minter, String> {
        Ok(OAuth2Minter {
            target: target.to_string(),
            http: Http::new(target, cfg.timeout)?,
            secret: cfg.client_secret.as_ref().map(|s| s.load()).transpose()?,
            cfg,
            issuer_url: deps.issuer_url.clone(),
            keys: deps.keys.clone(),
        })
    }
}

#[async_trait]
impl Minter for OAuth2Minter {
    fn kind(&self) -> &'static str {
        "oauth2"
    }

    async fn mint(&self, ctx: &MintContext<'_>) -> Result<Credential, MintError> {
        let mut form: Vec<(&str, String)> = Vec::new();
        match &self.cfg.grant {
            OAuth2Grant::ClientCredentials => {
                form.push(("grant_type", "client_credentials".into()))
            }
            OAuth2Grant::TokenExchange(f) => {
                let st = subject_token(f, &self.keys, &self.target, &self.issuer_url, ctx)?;
                form.push(("grant_type", TOKEN_EXCHANGE.into()));
                form.push(("subject_token", st.expose().clone()));
                form.push(("subject_token_type", JWT_TYPE.into()));
            }
        }
        let scopes: Vec<&str> = if self.cfg.scopes.is_empty() {
            ctx.scopes.iter().map(String::as_str).collect()
        } else {
            ctx.scopes
                .iter()
                .filter_map(|s| self.cfg.scopes.get(s).map(String::as_str))
                .collect()
        };
        if !scopes.is_empty() {
            form.push(("scope", scopes.join(" ")));
        }
        if let Some(a) = &self.cfg.audience {
            form.push(("audience", a.clone()));
        }
        if let Some(r) = &self.cfg.resource {
            form.push(("resource", r.clone()));
        }
        let client = Client {
            id: self.cfg.client_id.as_deref(),
            secret: self.secret.as_ref(),
            auth: self.cfg.client_auth,
        };
        token_request(
            &self.http,
            "oauth2",
            &self.cfg.token_url,
            &client,
            form,
            ctx,
        )
        .await
    }
}

// ---- settings: what the minter is built from --------------------------------------

/// OAuth client credentials (`bitbucket`).
#[derive(Debug, Clone)]
pub struct OAuthClientConfig {
    /// Token endpoint.
    pub token_url: String,
    /// Client id (the consumer key).
    pub client_id: String,
    /// Client secret.
    pub client_secret: SecretRef,
    /// Upstream call timeout.
    pub timeout: Duration,
}

/// How a generic OAuth2 client authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// HTTP Basic (`client_secret_basic`).
    Basic,
    /// Form fields (`client_secret_post`).
    Post,
}

/// The grant a generic `oauth2` target uses.
#[derive(Debug, Clone)]
pub enum OAuth2Grant {
    /// `client_credentials`.
    ClientCredentials,
    /// RFC 8693 exchange of a broker-signed JWT.
    TokenExchange(Federation),
}

/// Settings of an `oauth2` target.
#[derive(Debug, Clone)]
pub struct OAuth2Config {
    /// Token endpoint.
    pub token_url: String,
    /// Grant.
    pub grant: OAuth2Grant,
    /// Client id.
    pub client_id: Option<String>,
    /// Client secret (required for client credentials).
    pub client_secret: Option<SecretRef>,
    /// How the client authenticates.
    pub client_auth: ClientAuth,
    /// `audience` parameter.
    pub audience: Option<String>,
    /// `resource` parameter.
    pub resource: Option<String>,
    /// Scope → upstream scope string; empty passes scopes through.
    pub scopes: BTreeMap<String, String>,
    /// Upstream call timeout.
    pub timeout: Duration,
}

// ---- configuration: the raw form and its checks ----------------------------------

/// The `[[targets]]` keys of this kind, as written (unknown keys are refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBitbucket {
    token_url: Option<String>,
    client_id: String,
    client_secret_file: Option<String>,
    client_secret_env: Option<String>,
    timeout: Option<crate::clock::Dur>,
}

/// The `[[targets]]` keys of this kind, as written (unknown keys are refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOAuth2 {
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
    timeout: Option<crate::clock::Dur>,
}

impl Check {
    pub(super) fn oauth2(&self, key: &str, r: RawOAuth2) -> Result<OAuth2Config, CheckError> {
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

    /// Checks a `bitbucket` target's keys.
    pub(super) fn bitbucket(
        &self,
        key: &str,
        r: RawBitbucket,
    ) -> Result<OAuthClientConfig, CheckError> {
        Ok(OAuthClientConfig {
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
}
