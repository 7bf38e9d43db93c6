//! The `pulsar` kind: a Pulsar token (role in the configured claim, `exp` always set),
//! signed with the broker's RS256/ES256 key (Pulsar holds the public key as
//! `tokenPublicKey`) or an HS256 secret shared with Pulsar (`tokenSecretKey`). With
//! admin REST credentials configured, each lease gets its own role and mint grants it
//! the scopes' actions on their namespaces or topics; revoke takes them away again.

use super::check::RESERVED_CLAIMS;
use super::check::{Check, CheckError};
use super::upstream::Http;
use super::*;
use super::{one_mapped, sign_with_ring, Credential, Deps, MintContext, MintError, Minter};

use crate::jose::{b64, Alg, SigningKey};
use crate::keys::KeyRing;
use crate::secret::{Secret, SecretBytes, SecretString};
use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Mints Pulsar tokens for one target.
#[derive(Debug)]
pub struct PulsarMinter {
    target: String,
    cfg: PulsarConfig,
    issuer_url: String,
    keys: Arc<KeyRing>,
    shared: Option<SecretBytes>,
    admin: Option<(Http, SecretString)>,
}

/// What revoking a lease's permissions needs (stored sealed as its upstream handle).
#[derive(serde::Serialize, serde::Deserialize)]
struct Grants {
    role: String,
    paths: Vec<String>,
}

impl PulsarMinter {
    /// Reads the shared secret and admin token (when configured). Fails when either
    /// cannot be read.
    pub fn new(target: &str, cfg: PulsarConfig, deps: &Deps) -> Result<PulsarMinter, String> {
        let shared = match &cfg.key {
            PulsarKey::Shared(r) => {
                let k = r.load_bytes()?;
                if k.expose().len() < 32 {
                    return Err(format!(
                        "the HS256 secret from {} is shorter than 32 bytes",
                        r.describe()
                    ));
                }
                Some(k)
            }
            PulsarKey::Broker(_) => None,
        };
        let admin = match &cfg.admin {
            Some(a) => Some((Http::new(target, a.timeout)?, a.token.load()?)),
            None => None,
        };
        Ok(PulsarMinter {
            target: target.to_string(),
            cfg,
            issuer_url: deps.issuer_url.clone(),
            keys: deps.keys.clone(),
            shared,
            admin,
        })
    }

    fn role(&self, ctx: &MintContext<'_>) -> Result<String, MintError> {
        if self.cfg.admin.is_some() {
            return Ok(format!("latchkey-{}", ctx.lease_id));
        }
        if !self.cfg.roles.is_empty() {
            return one_mapped(&self.cfg.roles, ctx.scopes, "Pulsar role").map(str::to_string);
        }
        super::subject(&self.cfg.role, ctx.identity)
    }

    /// The token's claims for `role`.
    fn claims(&self, ctx: &MintContext<'_>, role: &str) -> Value {
        let mut c = Map::new();
        c.insert("iss".into(), json!(self.issuer_url));
        c.insert("sub".into(), json!(ctx.identity.key));
        c.insert("iat".into(), json!(ctx.now));
        c.insert("exp".into(), json!(ctx.now + ctx.ttl.as_secs() as i64));
        c.insert("jti".into(), json!(ctx.lease_id));
        c.insert(self.cfg.role_claim.clone(), json!(role));
        if let (Some(claim), Some(aud)) = (&self.cfg.audience_claim, &self.cfg.audience) {
            c.insert(claim.clone(), json!(aud));
        }
        Value::Object(c)
    }

    fn sign(&self, claims: &Value) -> Result<(SecretString, Option<String>), MintError> {
        match &self.shared {
            Some(key) => {
                let header = json!({"alg": "HS256", "typ": "JWT"});
                let input = format!(
                    "{}.{}",
                    b64(header.to_string()),
                    b64(serde_json::to_vec(claims)
                        .map_err(|_| MintError::Signing(self.target.clone()))?)
                );
                let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.expose());
                let sig = ring::hmac::sign(&k, input.as_bytes());
                Ok((Secret::new(format!("{input}.{}", b64(sig.as_ref()))), None))
            }
            None => sign_with_ring(&self.keys, &self.target, claims).map(|(t, k)| (t, Some(k))),
        }
    }

    fn credential(
        &self,
        ctx: &MintContext<'_>,
        role: &str,
        upstream: Option<SecretString>,
    ) -> Result<Credential, MintError> {
        let (token, kid) = self.sign(&self.claims(ctx, role))?;
        let mut fields = BTreeMap::from([("role".to_string(), role.to_string())]);
        if let Some(kid) = kid {
            fields.insert("kid".into(), kid);
        }
        let mut c = super::bearer_credential("pulsar", token, fields, ctx);
        c.upstream = upstream;
        Ok(c)
    }

    async fn remove(
        &self,
        base: &str,
        http: &Http,
        admin: &SecretString,
        paths: &[String],
    ) -> Result<(), MintError> {
        let mut failed = None;
        for p in paths {
            let req = http
                .client()
                .delete(format!("{base}{p}"))
                .bearer_auth(admin.expose());
            if let Err(e) = http.send("revoke permission", req, &[404]).await {
                failed = Some(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

#[async_trait]
impl Minter for PulsarMinter {
    fn kind(&self) -> &'static str {
        "pulsar"
    }

    /// A fresh token for the same role (and the same permissions, when per-lease).
    fn renewable(&self) -> bool {
        true
    }

    async fn renew(
        &self,
        ctx: &MintContext<'_>,
        upstream: Option<&SecretString>,
    ) -> Result<Option<Credential>, MintError> {
        let role = match upstream {
            Some(h) => {
                let g: Grants = serde_json::from_str(h.expose()).map_err(|_| {
                    MintError::Invalid("lease's Pulsar grants are unreadable".into())
                })?;
                g.role
            }
            None => self.role(ctx)?,
        };
        self.credential(ctx, &role, upstream.cloned()).map(Some)
    }

    async fn mint(&self, ctx: &MintContext<'_>) -> Result<Credential, MintError> {
        let role = self.role(ctx)?;
        let (Some(cfg), Some((http, admin))) = (&self.cfg.admin, &self.admin) else {
            return self.credential(ctx, &role, None);
        };
        let mut done: Vec<String> = Vec::new();
        for scope in ctx.scopes {
            let Some(p) = cfg.permissions.get(scope) else {
                continue;
            };
            let path = p.resource.permission_path(&role);
            let req = http
                .client()
                .post(format!("{}{path}", cfg.url))
                .bearer_auth(admin.expose())
                .json(&p.actions);
            if let Err(e) = http.send("grant permission", req, &[]).await {
                // Leave nothing half-made behind.
                if let Err(undo) = self.remove(&cfg.url, http, admin, &done).await {
                    tracing::warn!(target = %self.target, error = %undo, "could not undo a partial Pulsar grant; the reaper will not see it");
                }
                return Err(e);
            }
            done.push(path);
        }
        let handle = serde_json::to_string(&Grants {
            role: role.clone(),
            paths: done,
        })
        .map_err(|_| MintError::Signing(self.target.clone()))?;
        self.credential(ctx, &role, Some(Secret::new(handle)))
    }

    async fn revoke(
        &self,
        _lease_id: &str,
        upstream: Option<&SecretString>,
        _expires_at: i64,
    ) -> Result<(), MintError> {
        let (Some(h), Some(cfg), Some((http, admin))) = (upstream, &self.cfg.admin, &self.admin)
        else {
            return Ok(());
        };
        let g: Grants = serde_json::from_str(h.expose())
            .map_err(|_| MintError::Invalid("lease's Pulsar grants are unreadable".into()))?;
        self.remove(&cfg.url, http, admin, &g.paths).await
    }
}

/// The public key of a signing key in the form Pulsar's `tokenPublicKey` takes:
/// `data:;base64,` and the DER SubjectPublicKeyInfo. Fails for key types Pulsar cannot
/// use (Ed25519).
pub fn pulsar_public_key(key: &SigningKey) -> Result<String, String> {
    Ok(format!("data:;base64,{}", {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(spki_der(key)?)
    }))
}

/// DER SubjectPublicKeyInfo of an RSA or P-256 key. Fails for other key types.
pub fn spki_der(key: &SigningKey) -> Result<Vec<u8>, String> {
    match key.alg() {
        Alg::ES256 => {
            // SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING point }
            let mut der = hex_bytes("3059301306072a8648ce3d020106082a8648ce3d030107034200");
            der.extend_from_slice(&key.public_key_raw());
            Ok(der)
        }
        Alg::RS256 | Alg::RS384 | Alg::RS512 | Alg::PS256 | Alg::PS384 | Alg::PS512 => {
            use rsa::pkcs1::DecodeRsaPublicKey;
            use rsa::pkcs8::EncodePublicKey;
            let k = rsa::RsaPublicKey::from_pkcs1_der(&key.public_key_raw())
                .map_err(|e| format!("cannot encode the RSA key: {e}"))?;
            k.to_public_key_der()
                .map(|d| d.as_bytes().to_vec())
                .map_err(|e| format!("cannot encode the RSA key: {e}"))
        }
        other => Err(format!(
            "Pulsar cannot verify {other} keys; use RS256 or ES256"
        )),
    }
}

fn hex_bytes(h: &str) -> Vec<u8> {
    (0..h.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(&h[i..i + 2], 16).ok())
        .collect()
}

// ---- settings: what the minter is built from --------------------------------------

/// How Pulsar tokens are signed.
#[derive(Debug, Clone)]
pub enum PulsarKey {
    /// The broker's own key (RS256 or ES256); Pulsar gets the public key
    /// (`latchkey keys export --format pulsar`).
    Broker(Alg),
    /// An HS256 secret shared with Pulsar (`tokenSecretKey`).
    Shared(SecretRef),
}

/// Settings of a `pulsar` target.
#[derive(Debug, Clone)]
pub struct PulsarConfig {
    /// Signing key.
    pub key: PulsarKey,
    /// Claim carrying the role (`tokenAuthClaim`), default `sub`.
    pub role_claim: String,
    /// Claim carrying the audience (`tokenAudienceClaim`), if Pulsar checks one.
    pub audience_claim: Option<String>,
    /// The audience value (`tokenAudience`).
    pub audience: Option<String>,
    /// Role template when no `roles` map applies; default the caller's identity key.
    pub role: Option<Template>,
    /// Scope → role.
    pub roles: BTreeMap<String, String>,
    /// Per-lease permissions through the admin REST API.
    pub admin: Option<PulsarAdmin>,
}

/// Pulsar admin REST settings for per-lease permissions.
#[derive(Debug, Clone)]
pub struct PulsarAdmin {
    /// Admin REST base URL (`http://pulsar:8080`).
    pub url: String,
    /// Admin token.
    pub token: SecretRef,
    /// Scope → what it grants.
    pub permissions: BTreeMap<String, PulsarPermission>,
    /// Upstream call timeout.
    pub timeout: Duration,
}

/// One scope's Pulsar permission grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulsarPermission {
    /// `tenant/namespace` or `persistent://tenant/namespace/topic`.
    pub resource: PulsarResource,
    /// Actions granted.
    pub actions: Vec<String>,
}

/// A namespace or a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PulsarResource {
    /// `tenant/namespace`.
    Namespace {
        /// Tenant.
        tenant: String,
        /// Namespace.
        namespace: String,
    },
    /// `persistent://tenant/namespace/topic`.
    Topic {
        /// Tenant.
        tenant: String,
        /// Namespace.
        namespace: String,
        /// Topic.
        topic: String,
    },
}

impl PulsarResource {
    /// The admin REST path of its permission for `role` (segments percent-encoded).
    pub fn permission_path(&self, role: &str) -> String {
        let enc = |s: &str| -> String {
            form_urlencoded::byte_serialize(s.as_bytes())
                .collect::<String>()
                .replace('+', "%20")
        };
        match self {
            PulsarResource::Namespace { tenant, namespace } => format!(
                "/admin/v2/namespaces/{}/{}/permissions/{}",
                enc(tenant),
                enc(namespace),
                enc(role)
            ),
            PulsarResource::Topic {
                tenant,
                namespace,
                topic,
            } => format!(
                "/admin/v2/persistent/{}/{}/{}/permissions/{}",
                enc(tenant),
                enc(namespace),
                enc(topic),
                enc(role)
            ),
        }
    }
}

// ---- configuration: the raw form and its checks ----------------------------------

const PULSAR_ACTIONS: &[&str] = &[
    "produce",
    "consume",
    "functions",
    "sources",
    "sinks",
    "packages",
];

/// The `[[targets]]` keys of this kind, as written (unknown keys are refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPulsar {
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
    timeout: Option<crate::clock::Dur>,
}

/// The `[[targets]]` keys of this kind, as written (unknown keys are refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPulsarPermission {
    resource: String,
    actions: Vec<String>,
}

impl Check {
    pub(super) fn pulsar(&self, key: &str, r: RawPulsar) -> Result<PulsarConfig, CheckError> {
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

    pub(super) fn pulsar_resource(&self, key: &str, s: &str) -> Result<PulsarResource, CheckError> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spki_of_p256_and_rsa_parse_back() {
        let (ec, _) = SigningKey::generate(Alg::ES256).unwrap();
        let der = spki_der(&ec).unwrap();
        assert_eq!(der.len(), 91);
        let pem = pulsar_public_key(&ec).unwrap();
        assert!(pem.starts_with("data:;base64,MFkw"), "{pem}");
        let (ed, _) = SigningKey::generate(Alg::EdDSA).unwrap();
        assert!(spki_der(&ed).unwrap_err().contains("RS256 or ES256"));
    }
}
