//! Per-issuer signing-key cache.
//!
//! Keys come from the issuer's JWKS (URL configured, or found by OIDC discovery) through
//! `openidconnect`'s JWKS types. The cache refreshes in the background, refreshes at once
//! when a token names an unknown `kid` (at most once per cooldown), and keeps serving the
//! last good set while the issuer is unreachable, up to a maximum staleness. With no
//! usable keys it fails closed.

use super::IdentityError;
use super::IssuerConfig;
use crate::clock::SharedClock;
use crate::jose::{b64_decode, Alg, KeyFamily};
use openidconnect::core::CoreJsonWebKeySet;
use ring::signature;
use serde_json::Value;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// A public verification key from an issuer's JWKS.
#[derive(Debug, Clone)]
pub struct VerifyKey {
    /// `kid`, if the JWK has one.
    pub kid: Option<String>,
    /// `alg`, if the JWK pins one.
    pub alg: Option<Alg>,
    /// Key family, from `kty`/`crv`.
    pub family: KeyFamily,
    public: PublicKey,
}

#[derive(Debug, Clone)]
enum PublicKey {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// Uncompressed point (0x04 || x || y) or Ed25519 bytes.
    Raw(Vec<u8>),
}

impl VerifyKey {
    /// Builds a key from a JWK's JSON members. `None` for keys that are not for
    /// signatures or not of a supported type.
    pub fn from_jwk(jwk: &Value) -> Option<VerifyKey> {
        let s = |k: &str| jwk.get(k).and_then(Value::as_str);
        if let Some(u) = s("use") {
            if u != "sig" {
                return None;
            }
        }
        let alg = match s("alg") {
            Some(a) => Some(Alg::parse(a)?),
            None => None,
        };
        let (family, public) = match (s("kty")?, s("crv")) {
            ("RSA", _) => {
                let n = b64_decode(s("n")?)?;
                let e = b64_decode(s("e")?)?;
                (KeyFamily::Rsa, PublicKey::Rsa { n, e })
            }
            ("EC", Some(crv @ ("P-256" | "P-384"))) => {
                let (x, y) = (b64_decode(s("x")?)?, b64_decode(s("y")?)?);
                let len = if crv == "P-256" { 32 } else { 48 };
                if x.len() != len || y.len() != len {
                    return None;
                }
                let mut point = Vec::with_capacity(1 + 2 * len);
                point.push(4);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                (
                    if crv == "P-256" {
                        KeyFamily::P256
                    } else {
                        KeyFamily::P384
                    },
                    PublicKey::Raw(point),
                )
            }
            ("OKP", Some("Ed25519")) => (KeyFamily::Ed25519, PublicKey::Raw(b64_decode(s("x")?)?)),
            _ => return None,
        };
        if let Some(a) = alg {
            if a.family() != family {
                return None;
            }
        }
        Some(VerifyKey {
            kid: s("kid").map(str::to_string),
            alg,
            family,
            public,
        })
    }

    /// Verifies `sig` over `msg` with `alg` (which the caller has already checked fits
    /// this key).
    pub fn verify(&self, alg: Alg, msg: &[u8], sig: &[u8]) -> bool {
        match &self.public {
            PublicKey::Rsa { n, e } => match alg.rsa_params() {
                Some(params) => signature::RsaPublicKeyComponents { n, e }
                    .verify(params, msg, sig)
                    .is_ok(),
                None => false,
            },
            PublicKey::Raw(bytes) => signature::UnparsedPublicKey::new(alg.verification(), bytes)
                .verify(msg, sig)
                .is_ok(),
        }
    }
}

/// One fetched key set.
#[derive(Debug)]
pub struct KeySet {
    /// The usable keys.
    pub keys: Vec<VerifyKey>,
    /// When it was fetched (seconds since the epoch).
    pub fetched_at: i64,
}

impl KeySet {
    /// The key a token with this `kid` and algorithm should verify with.
    pub fn find(&self, kid: Option<&str>, family: KeyFamily) -> Option<&VerifyKey> {
        match kid {
            Some(k) => self.keys.iter().find(|key| key.kid.as_deref() == Some(k)),
            None => {
                let mut fitting = self.keys.iter().filter(|key| key.family == family);
                let first = fitting.next()?;
                // Without a kid, only an unambiguous key is acceptable.
                fitting.next().is_none().then_some(first)
            }
        }
    }
}

/// What the cache knows about its issuer, for readiness and metrics.
#[derive(Debug, Clone, Default)]
pub struct KeyStatus {
    /// Number of usable keys currently served.
    pub keys: usize,
    /// When the served set was fetched.
    pub fetched_at: Option<i64>,
    /// The last refresh error, if the last attempt failed.
    pub last_error: Option<String>,
    /// Successful fetches so far.
    pub fetches: u64,
    /// Failed fetches so far.
    pub failures: u64,
    /// Whether a key set young enough to use (within `jwks_max_staleness`) is held.
    pub usable: bool,
}

/// The key cache of one issuer.
#[derive(Debug)]
pub struct IssuerKeys {
    cfg: Arc<IssuerConfig>,
    http: reqwest::Client,
    clock: SharedClock,
    current: RwLock<Option<Arc<KeySet>>>,
    jwks_url: Mutex<Option<String>>,
    last_attempt: Mutex<Option<i64>>,
    status: Mutex<KeyStatus>,
    single_flight: tokio::sync::Mutex<()>,
    attempts: AtomicU64,
}

impl IssuerKeys {
    /// A cache with nothing fetched yet.
    pub fn new(cfg: Arc<IssuerConfig>, http: reqwest::Client, clock: SharedClock) -> IssuerKeys {
        IssuerKeys {
            jwks_url: Mutex::new(cfg.jwks_url.clone()),
            cfg,
            http,
            clock,
            current: RwLock::new(None),
            last_attempt: Mutex::new(None),
            status: Mutex::new(KeyStatus::default()),
            single_flight: tokio::sync::Mutex::new(()),
            attempts: AtomicU64::new(0),
        }
    }

    /// The current status.
    pub fn status(&self) -> KeyStatus {
        let mut s = lock(&self.status).clone();
        s.usable = self.fresh().is_some();
        s
    }

    fn fresh(&self) -> Option<Arc<KeySet>> {
        let cur = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        let age = self.clock.now() - cur.fetched_at;
        (age <= self.cfg.jwks_max_staleness.as_secs() as i64).then_some(cur)
    }

    /// The key for a token, refreshing once (subject to the cooldown) when the `kid` is
    /// unknown or nothing usable is cached. Fails with `KeysUnavailable` when no usable
    /// key set can be had, `UnknownKey` when the set has no such key.
    pub async fn key_for(
        &self,
        kid: Option<&str>,
        family: KeyFamily,
    ) -> Result<VerifyKey, IdentityError> {
        if let Some(set) = self.fresh() {
            if let Some(k) = set.find(kid, family) {
                return Ok(k.clone());
            }
        }
        // Unknown kid, or nothing usable: refresh if the cooldown allows.
        let _ = self.refresh(false).await;
        match self.fresh() {
            None => Err(IdentityError::KeysUnavailable(self.cfg.name.clone())),
            Some(set) => set
                .find(kid, family)
                .cloned()
                .ok_or(IdentityError::UnknownKey),
        }
    }

    /// Fetches the key set. Unless `force`, does nothing when the last attempt was within
    /// the cooldown. Concurrent callers share one fetch. On failure the previous set
    /// stays in service.
    pub async fn refresh(&self, force: bool) -> Result<(), String> {
        let seen = self.attempts.load(Ordering::SeqCst);
        let _guard = self.single_flight.lock().await;
        if !force && self.attempts.load(Ordering::SeqCst) != seen {
            // Someone refreshed while we waited for the lock: their result stands.
            return Ok(());
        }
        {
            let mut last = lock(&self.last_attempt);
            if let Some(t) = *last {
                if !force && self.clock.now() - t < self.cfg.jwks_cooldown.as_secs() as i64 {
                    return Err("refresh cooldown".into());
                }
            }
            *last = Some(self.clock.now());
            self.attempts.fetch_add(1, Ordering::SeqCst);
        }
        match self.fetch().await {
            Ok(keys) => {
                let now = self.clock.now();
                let n = keys.len();
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(KeySet {
                    keys,
                    fetched_at: now,
                }));
                let mut st = lock(&self.status);
                st.keys = n;
                st.fetched_at = Some(now);
                st.last_error = None;
                st.fetches += 1;
                tracing::debug!(issuer = %self.cfg.name, keys = n, "jwks refreshed");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(issuer = %self.cfg.name, error = %e, "jwks refresh failed; keeping last good keys");
                let mut st = lock(&self.status);
                st.last_error = Some(e.clone());
                st.failures += 1;
                Err(e)
            }
        }
    }

    async fn fetch(&self) -> Result<Vec<VerifyKey>, String> {
        let known = lock(&self.jwks_url).clone();
        let url = match known {
            Some(u) => u,
            None => {
                let u = self.discover().await?;
                *lock(&self.jwks_url) = Some(u.clone());
                u
            }
        };
        let body = get_bounded(&self.http, &url, self.cfg.jwks_max_bytes, "jwks").await?;
        let set: CoreJsonWebKeySet =
            serde_json::from_slice(&body).map_err(|_| "jwks: not a JWK set".to_string())?;
        if set.keys().len() > self.cfg.jwks_max_keys {
            return Err(format!(
                "jwks: {} keys; at most {} are accepted (jwks_max_keys)",
                set.keys().len(),
                self.cfg.jwks_max_keys
            ));
        }
        let keys: Vec<VerifyKey> = set
            .keys()
            .iter()
            .filter_map(|k| serde_json::to_value(k).ok())
            .filter_map(|v| VerifyKey::from_jwk(&v))
            .collect();
        if keys.is_empty() {
            return Err("jwks has no usable signing keys".into());
        }
        Ok(keys)
    }

    /// OIDC discovery. `openidconnect`'s `ProviderMetadata` requires an
    /// `authorization_endpoint`, which workload issuers (GitHub Actions, Kubernetes) do not
    /// publish, so only the two members that matter are read here.
    async fn discover(&self) -> Result<String, String> {
        #[derive(serde::Deserialize)]
        struct Doc {
            issuer: String,
            jwks_uri: String,
        }
        let url = format!(
            "{}/.well-known/openid-configuration",
            self.cfg.issuer.trim_end_matches('/')
        );
        let body = get_bounded(&self.http, &url, self.cfg.jwks_max_bytes, "discovery").await?;
        let doc: Doc = serde_json::from_slice(&body)
            .map_err(|_| "discovery: not an OIDC configuration document".to_string())?;
        if doc.issuer != self.cfg.issuer {
            return Err("discovery: document names a different issuer".into());
        }
        let u = reqwest::Url::parse(&doc.jwks_uri)
            .map_err(|_| "discovery: jwks_uri is not a URL".to_string())?;
        let local = u
            .host_str()
            .map(crate::net::is_loopback_host)
            .unwrap_or(false);
        if u.scheme() != "https" && !(u.scheme() == "http" && local) {
            return Err("discovery: jwks_uri must be https".into());
        }
        Ok(doc.jwks_uri)
    }

    /// Refreshes every `jwks_refresh` until the task is aborted.
    pub async fn run(self: Arc<Self>) {
        loop {
            let _ = self.refresh(true).await;
            tokio::time::sleep(self.cfg.jwks_refresh.max(Duration::from_secs(1))).await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An error's message without nested sources that may carry response bodies.
fn short_error(e: &dyn std::error::Error) -> String {
    let s = e.to_string();
    s.chars().take(200).collect()
}

/// GETs `url` and reads at most `max` bytes of its body: refused at once when its
/// Content-Length says more, and as soon as more arrives otherwise, so a hostile issuer
/// cannot make the broker hold a large document. The client's timeout bounds the whole
/// exchange. Errors name `what` and the reason, never the body.
async fn get_bounded(
    http: &reqwest::Client,
    url: &str,
    max: usize,
    what: &str,
) -> Result<Vec<u8>, String> {
    let too_big = || format!("{what}: document larger than {max} bytes (jwks_max_bytes)");
    let mut resp = http
        .get(url)
        .send()
        .await
        .map_err(|e| format!("{what}: {}", short_error(&e)))?;
    if !resp.status().is_success() {
        return Err(format!("{what}: HTTP {}", resp.status().as_u16()));
    }
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(too_big());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| format!("{what}: {}", short_error(&e)))?
    {
        if body.len() + chunk.len() > max {
            return Err(too_big());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jose::SigningKey;

    #[test]
    fn keys_from_our_own_jwks_verify_our_signatures() {
        for alg in [Alg::ES256, Alg::EdDSA, Alg::RS256] {
            let (sk, _) = SigningKey::generate(alg).unwrap();
            let vk = VerifyKey::from_jwk(&sk.public_jwk()).expect("usable");
            assert_eq!(vk.alg, Some(alg));
            assert_eq!(vk.kid.as_deref(), Some(sk.kid()));
            let sig = sk.sign(b"m").unwrap();
            assert!(vk.verify(alg, b"m", &sig));
            assert!(!vk.verify(alg, b"n", &sig));
        }
    }

    #[test]
    fn unusable_jwks_entries_are_skipped() {
        let (sk, _) = SigningKey::generate(Alg::ES256).unwrap();
        let mut enc = sk.public_jwk();
        enc["use"] = "enc".into();
        assert!(VerifyKey::from_jwk(&enc).is_none());
        let mut mismatched = sk.public_jwk();
        mismatched["alg"] = "RS256".into();
        assert!(VerifyKey::from_jwk(&mismatched).is_none());
        let mut hmac = sk.public_jwk();
        hmac["alg"] = "HS256".into();
        assert!(VerifyKey::from_jwk(&hmac).is_none());
        assert!(VerifyKey::from_jwk(&serde_json::json!({"kty": "oct", "k": "AAAA"})).is_none());
        let mut short = sk.public_jwk();
        short["x"] = "AAAA".into();
        assert!(VerifyKey::from_jwk(&short).is_none());
    }

    #[test]
    fn find_without_kid_needs_an_unambiguous_key() {
        let k = |kid: &str| {
            VerifyKey::from_jwk(&{
                let (sk, _) = SigningKey::generate(Alg::ES256).unwrap();
                let mut j = sk.public_jwk();
                j["kid"] = kid.into();
                j
            })
            .unwrap()
        };
        let one = KeySet {
            keys: vec![k("a")],
            fetched_at: 0,
        };
        assert!(one.find(None, KeyFamily::P256).is_some());
        assert!(one.find(None, KeyFamily::Rsa).is_none());
        let two = KeySet {
            keys: vec![k("a"), k("b")],
            fetched_at: 0,
        };
        assert!(two.find(None, KeyFamily::P256).is_none());
        assert_eq!(
            two.find(Some("b"), KeyFamily::P256).unwrap().kid.as_deref(),
            Some("b")
        );
        assert!(two.find(Some("c"), KeyFamily::P256).is_none());
    }

    /// A local issuer whose JWKS answer changes with `mode`: 0 a good set, 1 a 2 MiB
    /// document with its Content-Length, 2 the same streamed without one, 3 a set of 200
    /// keys that fits the byte cap, 4 a discovery document of 2 MiB.
    async fn hostile_issuer(good: String, mode: Arc<AtomicU64>) -> std::net::SocketAddr {
        use axum::body::Body;
        let app = axum::Router::new()
            .route(
                "/keys",
                axum::routing::get({
                    let mode = mode.clone();
                    move || {
                        let (mode, good) = (mode.clone(), good.clone());
                        async move {
                            match mode.load(Ordering::SeqCst) {
                                1 => Body::from(vec![b' '; 2 << 20]),
                                2 => Body::from_stream(tokio_stream::iter(
                                    (0..32).map(|_| Ok::<_, std::io::Error>(vec![b' '; 64 << 10])),
                                )),
                                3 => {
                                    let one: Value = serde_json::from_str::<Value>(&good).unwrap()
                                        ["keys"][0]
                                        .clone();
                                    Body::from(
                                        serde_json::json!({ "keys": vec![one; 200] }).to_string(),
                                    )
                                }
                                _ => Body::from(good),
                            }
                        }
                    }
                }),
            )
            .route(
                "/.well-known/openid-configuration",
                axum::routing::get(|| async { Body::from(vec![b' '; 2 << 20]) }),
            );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await });
        addr
    }

    #[tokio::test]
    async fn oversized_documents_and_key_floods_are_refused_and_the_last_good_keys_serve() {
        let (sk, _) = SigningKey::generate(Alg::ES256).unwrap();
        let good = serde_json::json!({ "keys": [sk.public_jwk()] }).to_string();
        let mode = Arc::new(AtomicU64::new(0));
        let addr = hostile_issuer(good, mode.clone()).await;
        let cfg = |jwks_url: Option<String>| {
            Arc::new(IssuerConfig {
                name: "hostile".into(),
                preset: super::super::Preset::Generic,
                issuer: format!("http://{addr}"),
                audiences: vec!["a".into()],
                jwks_url,
                leeway: Duration::from_secs(30),
                max_token_age: None,
                algorithms: vec![Alg::ES256],
                jwks_refresh: Duration::from_secs(300),
                jwks_cooldown: Duration::ZERO,
                jwks_max_staleness: Duration::from_secs(3600),
                jwks_max_bytes: 64 * 1024,
                jwks_max_keys: 100,
                max_mints_per_token: None,
                key_environment: true,
                ca_file: None,
            })
        };
        let clock: SharedClock = Arc::new(crate::clock::SystemClock);
        let http = super::super::verifier::issuer_http_client(&cfg(None)).unwrap();
        let keys = IssuerKeys::new(
            cfg(Some(format!("http://{addr}/keys"))),
            http.clone(),
            clock.clone(),
        );
        keys.refresh(true).await.unwrap();
        assert_eq!(keys.status().keys, 1);
        for (m, want) in [
            (1, "jwks: document larger than 65536 bytes"),
            (2, "jwks: document larger than 65536 bytes"),
            (3, "jwks: 200 keys; at most 100 are accepted"),
        ] {
            mode.store(m, Ordering::SeqCst);
            let e = keys.refresh(true).await.unwrap_err();
            assert!(e.starts_with(want), "mode {m}: {e}");
            let st = keys.status();
            assert_eq!(
                (st.keys, st.usable),
                (1, true),
                "mode {m}: the last good set serves"
            );
            assert!(keys.key_for(Some(sk.kid()), KeyFamily::P256).await.is_ok());
        }
        // Discovery documents are bounded the same way.
        let discovering = IssuerKeys::new(cfg(None), http, clock);
        let e = discovering.refresh(true).await.unwrap_err();
        assert!(
            e.starts_with("discovery: document larger than 65536 bytes"),
            "{e}"
        );
    }
}
