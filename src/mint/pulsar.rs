//! The `pulsar` kind: a Pulsar token (role in the configured claim, `exp` always set),
//! signed with the broker's RS256/ES256 key (Pulsar holds the public key as
//! `tokenPublicKey`) or an HS256 secret shared with Pulsar (`tokenSecretKey`). With
//! admin REST credentials configured, each lease gets its own role and mint grants it
//! the scopes' actions on their namespaces or topics; revoke takes them away again.

use super::upstream::Http;
use super::{one_mapped, sign_with_ring, Credential, Deps, MintContext, MintError, Minter};
use super::{PulsarConfig, PulsarKey};
use crate::jose::{b64, Alg, SigningKey};
use crate::keys::KeyRing;
use crate::secret::{Secret, SecretBytes, SecretString};
use async_trait::async_trait;
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
