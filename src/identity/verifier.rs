//! The verifier: token in, [`WorkloadIdentity`] out, or a precise [`IdentityError`].

use super::jwks::{IssuerKeys, KeyStatus};
use super::jwt::{self, sanitize};
use super::IssuerConfig;
use super::{IdentityError, WorkloadIdentity};
use crate::clock::SharedClock;
use crate::jose::{sha256_hex, Alg};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

struct Issuer {
    cfg: Arc<IssuerConfig>,
    keys: Arc<IssuerKeys>,
}

/// Verifies workload identity tokens from the configured issuers.
pub struct Verifier {
    by_iss: HashMap<String, Issuer>,
    clock: SharedClock,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("issuers", &self.by_iss.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The HTTP client used for discovery and JWKS: bounded timeouts, no redirects (a
/// redirect could send the broker to an address the issuer does not own).
pub fn http_client() -> reqwest::Client {
    client_builder().build().unwrap_or_default()
}

fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("latchkey/", env!("CARGO_PKG_VERSION")))
}

/// The client for one issuer: [`http_client`], also trusting the issuer's `ca_file`.
/// Fails (naming the file, never its bytes) when the file cannot be read or holds no
/// certificate; the server checks this before it starts.
pub fn issuer_http_client(cfg: &IssuerConfig) -> Result<reqwest::Client, String> {
    let Some(path) = &cfg.ca_file else {
        return Ok(http_client());
    };
    let pem = std::fs::read(path)
        .map_err(|e| format!("ca_file {}: cannot read: {}", path.display(), e.kind()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|_| format!("ca_file {}: not PEM certificates", path.display()))?;
    if certs.is_empty() {
        return Err(format!("ca_file {}: no certificate in it", path.display()));
    }
    certs
        .into_iter()
        .fold(client_builder(), |b, c| b.add_root_certificate(c))
        .build()
        .map_err(|e| format!("ca_file {}: {e}", path.display()))
}

impl Verifier {
    /// A verifier for these issuers. Nothing is fetched until [`Verifier::spawn_refreshers`]
    /// or the first token.
    pub fn new(issuers: &[IssuerConfig], clock: SharedClock) -> Verifier {
        let http = http_client();
        let by_iss = issuers
            .iter()
            .map(|c| {
                let cfg = Arc::new(c.clone());
                // A ca_file that went bad after the start check: the issuer's fetches fail
                // (it reports unready) rather than trusting less than configured silently.
                let client = match &c.ca_file {
                    None => http.clone(),
                    Some(_) => issuer_http_client(c).unwrap_or_else(|e| {
                        tracing::error!(issuer = %c.name, error = %e, "issuer CA file unusable");
                        http.clone()
                    }),
                };
                let keys = Arc::new(IssuerKeys::new(cfg.clone(), client, clock.clone()));
                (c.issuer.clone(), Issuer { cfg, keys })
            })
            .collect();
        Verifier { by_iss, clock }
    }

    /// Starts one background refresher per issuer (the first run fetches at once).
    pub fn spawn_refreshers(&self) -> Vec<tokio::task::JoinHandle<()>> {
        self.by_iss
            .values()
            .map(|i| tokio::spawn(i.keys.clone().run()))
            .collect()
    }

    /// Key-cache status per issuer name.
    pub fn status(&self) -> Vec<(String, KeyStatus)> {
        let mut v: Vec<_> = self
            .by_iss
            .values()
            .map(|i| (i.cfg.name.clone(), i.keys.status()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The identity recorded claims describe, normalised by the preset of the issuer named
    /// `issuer_name` (renewals re-decide policy on the claims verified at mint time).
    pub fn identity_from_claims(
        &self,
        issuer_name: &str,
        claims: Map<String, Value>,
    ) -> Result<WorkloadIdentity, IdentityError> {
        let issuer = self
            .by_iss
            .values()
            .find(|i| i.cfg.name == issuer_name)
            .ok_or(IdentityError::UnknownIssuer)?;
        issuer.cfg.preset.normalise(
            &issuer.cfg.name,
            claims,
            String::new(),
            issuer.cfg.key_environment,
        )
    }

    /// Verifies a token: size, structure, header, issuer, key, algorithm, signature, then
    /// `exp`/`nbf`/`iat`/`aud`, then the preset's required claims. Fails with the first
    /// check that does not hold.
    pub async fn verify(&self, token: &str) -> Result<WorkloadIdentity, IdentityError> {
        let parsed = jwt::parse(token)?;
        let iss = match parsed.claims.get("iss") {
            Some(Value::String(s)) => s.as_str(),
            _ => return Err(IdentityError::Claim("iss")),
        };
        let issuer = self.by_iss.get(iss).ok_or(IdentityError::UnknownIssuer)?;
        let cfg = &issuer.cfg;
        let alg = allowed_alg(&parsed, cfg)?;
        let key = issuer
            .keys
            .key_for(parsed.kid.as_deref(), alg.family())
            .await?;
        verified(token, parsed, cfg, alg, &key, self.clock.now())
    }
}

/// The token's algorithm, when it is one this issuer may use.
fn allowed_alg(parsed: &jwt::Parsed<'_>, cfg: &IssuerConfig) -> Result<Alg, IdentityError> {
    let alg = Alg::parse(&parsed.alg).ok_or_else(|| {
        IdentityError::Algorithm(format!("{} not supported", sanitize(&parsed.alg)))
    })?;
    if !cfg.algorithms.contains(&alg) {
        return Err(IdentityError::Algorithm(format!(
            "{alg} not allowed for this issuer"
        )));
    }
    Ok(alg)
}

/// Everything [`Verifier::verify`] checks once the issuer's key is found: the key fits
/// the algorithm, the signature, the claims at `now`; then the identity.
fn verified(
    token: &str,
    parsed: jwt::Parsed<'_>,
    cfg: &IssuerConfig,
    alg: Alg,
    key: &super::jwks::VerifyKey,
    now: i64,
) -> Result<WorkloadIdentity, IdentityError> {
    match key.alg {
        Some(pinned) if pinned != alg => {
            return Err(IdentityError::Algorithm(format!(
                "{alg} does not match the key's {pinned}"
            )));
        }
        None if key.family != alg.family() => {
            return Err(IdentityError::Algorithm(format!(
                "{alg} does not fit the key type"
            )));
        }
        _ => {}
    }
    if !key.verify(alg, parsed.signing_input, &parsed.signature) {
        return Err(IdentityError::BadSignature);
    }
    check_claims(&parsed.claims, cfg, now)?;
    // Only the replay guard needs it (for tokens without `jti`): not hashed otherwise.
    let content = if cfg.max_mints_per_token.is_some() {
        sha256_hex(parsed.signing_input)
    } else {
        String::new()
    };
    let mut id = cfg.preset.normalise(
        &cfg.name,
        parsed.claims,
        sha256_hex(token),
        cfg.key_environment,
    )?;
    id.content_fingerprint = content;
    Ok(id)
}

/// Verifies `token` as [`Verifier::verify`] does, against one key of the issuer `cfg`
/// instead of its fetched key set: the whole path from bytes to identity without the
/// network, for fuzzing and property tests.
pub fn verify_with_key(
    token: &str,
    cfg: &IssuerConfig,
    key: &super::jwks::VerifyKey,
    now: i64,
) -> Result<WorkloadIdentity, IdentityError> {
    let parsed = jwt::parse(token)?;
    match parsed.claims.get("iss") {
        Some(Value::String(s)) if *s == cfg.issuer => {}
        Some(Value::String(_)) => return Err(IdentityError::UnknownIssuer),
        _ => return Err(IdentityError::Claim("iss")),
    }
    let alg = allowed_alg(&parsed, cfg)?;
    verified(token, parsed, cfg, alg, key, now)
}

/// A NumericDate claim (RFC 7519: seconds, possibly fractional) as whole seconds,
/// truncated; `None` when it is not a finite number.
pub(crate) fn numeric_date(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64)),
        _ => None,
    }
}

fn num(claims: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, IdentityError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => numeric_date(v).map(Some).ok_or(IdentityError::Claim(name)),
    }
}

fn check_claims(
    claims: &Map<String, Value>,
    cfg: &IssuerConfig,
    now: i64,
) -> Result<(), IdentityError> {
    let leeway = cfg.leeway.as_secs() as i64;
    let exp = num(claims, "exp")?.ok_or(IdentityError::Claim("exp"))?;
    if now >= exp.saturating_add(leeway) {
        return Err(IdentityError::Expired);
    }
    if let Some(nbf) = num(claims, "nbf")? {
        if now.saturating_add(leeway) < nbf {
            return Err(IdentityError::NotYetValid);
        }
    }
    let iat = num(claims, "iat")?;
    if let Some(iat) = iat {
        if now.saturating_add(leeway) < iat {
            return Err(IdentityError::NotYetValid);
        }
    }
    if let Some(max_age) = cfg.max_token_age {
        let iat = iat.ok_or(IdentityError::Claim("iat"))?;
        if now - iat > max_age.as_secs() as i64 + leeway {
            return Err(IdentityError::TooOld);
        }
    }
    let accepted = |a: &str| cfg.audiences.iter().any(|x| x == a);
    let ok = match claims.get("aud") {
        Some(Value::String(a)) => accepted(a),
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).any(accepted),
        _ => false,
    };
    if !ok {
        return Err(IdentityError::Audience);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Preset;
    use serde_json::json;

    #[test]
    fn issuer_ca_file_is_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg();
        assert!(issuer_http_client(&c).is_ok(), "no ca_file: public roots");
        c.ca_file = Some(dir.path().join("missing.pem"));
        let e = issuer_http_client(&c).unwrap_err();
        assert!(
            e.contains("missing.pem") && e.contains("cannot read"),
            "{e}"
        );
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        c.ca_file = Some(junk);
        let e = issuer_http_client(&c).unwrap_err();
        assert!(e.contains("junk.pem"), "{e}");
        let good = dir.path().join("ca.pem");
        let ca = rcgen::generate_simple_self_signed(vec!["kubernetes.default.svc".into()]).unwrap();
        std::fs::write(&good, ca.cert.pem()).unwrap();
        c.ca_file = Some(good);
        assert!(issuer_http_client(&c).is_ok());
    }

    fn cfg() -> IssuerConfig {
        IssuerConfig {
            name: "i".into(),
            preset: Preset::Generic,
            issuer: "https://i".into(),
            audiences: vec!["a1".into(), "a2".into()],
            jwks_url: None,
            leeway: Duration::from_secs(30),
            max_token_age: Some(Duration::from_secs(3600)),
            algorithms: vec![Alg::RS256],
            jwks_refresh: Duration::from_secs(300),
            jwks_cooldown: Duration::from_secs(30),
            jwks_max_staleness: Duration::from_secs(3600),
            jwks_max_bytes: 256 * 1024,
            jwks_max_keys: 100,
            max_mints_per_token: None,
            key_environment: true,
            ca_file: None,
        }
    }

    fn check(v: Value, now: i64) -> Result<(), IdentityError> {
        check_claims(v.as_object().unwrap(), &cfg(), now)
    }

    #[test]
    fn time_claims_with_leeway() {
        let now = 10_000;
        assert!(check(json!({"exp": now + 10, "iat": now, "aud": "a1"}), now).is_ok());
        assert!(
            check(json!({"exp": now - 10, "iat": now - 100, "aud": "a1"}), now).is_ok(),
            "within leeway"
        );
        assert_eq!(
            check(json!({"exp": now - 30, "iat": now - 100, "aud": "a1"}), now),
            Err(IdentityError::Expired)
        );
        assert_eq!(
            check(json!({"iat": now, "aud": "a1"}), now),
            Err(IdentityError::Claim("exp"))
        );
        assert_eq!(
            check(json!({"exp": "soon", "iat": now, "aud": "a1"}), now),
            Err(IdentityError::Claim("exp"))
        );
        assert_eq!(
            check(
                json!({"exp": now + 100, "nbf": now + 31, "iat": now, "aud": "a1"}),
                now
            ),
            Err(IdentityError::NotYetValid)
        );
        assert!(check(
            json!({"exp": now + 100, "nbf": now + 29, "iat": now, "aud": "a1"}),
            now
        )
        .is_ok());
        assert_eq!(
            check(json!({"exp": now + 100, "iat": now + 60, "aud": "a1"}), now),
            Err(IdentityError::NotYetValid)
        );
        assert_eq!(
            check(
                json!({"exp": now + 100, "iat": now - 4000, "aud": "a1"}),
                now
            ),
            Err(IdentityError::TooOld)
        );
        assert_eq!(
            check(json!({"exp": now + 100, "aud": "a1"}), now),
            Err(IdentityError::Claim("iat")),
            "max_token_age needs iat"
        );
    }

    #[test]
    fn audience_string_or_array() {
        let now = 10_000;
        let base = |aud: Value| json!({"exp": now + 10, "iat": now, "aud": aud});
        assert!(check(base(json!("a2")), now).is_ok());
        assert!(check(base(json!(["x", "a1"])), now).is_ok());
        assert_eq!(check(base(json!("x")), now), Err(IdentityError::Audience));
        assert_eq!(check(base(json!([])), now), Err(IdentityError::Audience));
        assert_eq!(check(base(json!(null)), now), Err(IdentityError::Audience));
        assert_eq!(
            check(json!({"exp": now + 10, "iat": now}), now),
            Err(IdentityError::Audience)
        );
    }
}
