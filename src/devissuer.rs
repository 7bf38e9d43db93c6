//! A development OIDC issuer: discovery, JWKS and token issuance on a local port.
//!
//! `latchkey dev` runs one so the whole flow works on a laptop without Bitbucket; the
//! test suite runs one per test (keys generated at test time) and uses its controls to
//! rotate keys, publish keys late, and simulate an outage. Tokens it issues have the
//! shape of Bitbucket Pipelines OIDC tokens.

use crate::jose::{Alg, SigningKey};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;

/// Development workspace UUID used in issued tokens.
pub const DEV_WORKSPACE: &str = "{00000000-0000-4000-8000-00000000c0de}";
/// Development repository UUID used in issued tokens.
pub const DEV_REPOSITORY: &str = "{11111111-1111-4111-8111-111111111111}";

struct DevState {
    issuer: String,
    signing: RwLock<Arc<SigningKey>>,
    published: RwLock<Vec<Arc<SigningKey>>>,
    down: AtomicBool,
    jwks_fetches: AtomicU64,
}

/// A running development issuer.
pub struct DevIssuer {
    state: Arc<DevState>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl std::fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIssuer")
            .field("issuer", &self.state.issuer)
            .finish()
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl DevIssuer {
    /// Binds `addr` (use port 0 for any) and serves discovery at
    /// `/.well-known/openid-configuration`, keys at `/keys.json` and fresh tokens at
    /// `POST /token`. Fails when the address cannot be bound.
    pub async fn spawn(addr: SocketAddr, alg: Alg) -> std::io::Result<DevIssuer> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (key, _) =
            SigningKey::generate(alg).map_err(|e| std::io::Error::other(e.to_string()))?;
        let key = Arc::new(key);
        let state = Arc::new(DevState {
            issuer: format!("http://{addr}"),
            signing: RwLock::new(key.clone()),
            published: RwLock::new(vec![key]),
            down: AtomicBool::new(false),
            jwks_fetches: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/keys.json", get(jwks))
            .route("/token", post(token))
            .with_state(state.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(DevIssuer {
            state,
            addr,
            stop: Some(stop),
        })
    }

    /// The issuer URL (`iss` of its tokens).
    pub fn issuer_url(&self) -> &str {
        &self.state.issuer
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The audience its Bitbucket-shaped tokens carry.
    pub fn audience(&self) -> String {
        dev_audience()
    }

    /// Signs `claims` with the current key.
    pub fn sign(&self, claims: &Value) -> String {
        let key = self
            .state
            .signing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        sign_with(&key, claims)
    }

    /// Claims of a Bitbucket Pipelines step token for the dev repository on `branch`,
    /// valid for an hour from now.
    pub fn bitbucket_claims(&self, branch: &str) -> Value {
        bitbucket_claims(&self.state.issuer, &self.audience(), branch)
    }

    /// Makes a new key current. With `publish`, it appears in the JWKS at once; without,
    /// only after [`DevIssuer::publish_all`] (to test unknown-`kid` refresh).
    pub fn rotate(&self, alg: Alg, publish: bool) -> Arc<SigningKey> {
        let (key, _) = SigningKey::generate(alg).expect("key generation");
        let key = Arc::new(key);
        *self
            .state
            .signing
            .write()
            .unwrap_or_else(|e| e.into_inner()) = key.clone();
        if publish {
            self.state
                .published
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .push(key.clone());
        }
        key
    }

    /// Publishes the current signing key if it is not yet in the JWKS.
    pub fn publish_all(&self) {
        let cur = self
            .state
            .signing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut p = self
            .state
            .published
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if !p.iter().any(|k| k.kid() == cur.kid()) {
            p.push(cur);
        }
    }

    /// Simulates an outage: every endpoint answers 503 while `down`.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// How many times the JWKS was served.
    pub fn jwks_fetches(&self) -> u64 {
        self.state.jwks_fetches.load(Ordering::SeqCst)
    }

    /// Stops serving.
    pub fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl Drop for DevIssuer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The default Bitbucket audience of the development workspace.
fn dev_audience() -> String {
    format!(
        "ari:cloud:bitbucket::workspace/{}",
        DEV_WORKSPACE.trim_matches(|c| c == '{' || c == '}')
    )
}

/// Signs `claims` with `key` as a JWT.
pub fn sign_with(key: &SigningKey, claims: &Value) -> String {
    key.sign_jwt(claims, None)
        .expect("signing with a freshly generated key")
}

/// Bitbucket Pipelines-shaped claims (see TARGETS.md) for the dev repository.
pub fn bitbucket_claims(issuer: &str, audience: &str, branch: &str) -> Value {
    let t = now();
    let step = format!("{{{}}}", uuid::Uuid::new_v4());
    json!({
        "iss": issuer,
        "aud": audience,
        "sub": format!("{DEV_REPOSITORY}:{step}"),
        "iat": t,
        "nbf": t,
        "exp": t + 3600,
        "jti": uuid::Uuid::new_v4().to_string(),
        "workspaceUuid": DEV_WORKSPACE,
        "repositoryUuid": DEV_REPOSITORY,
        "pipelineUuid": format!("{{{}}}", uuid::Uuid::new_v4()),
        "stepUuid": step,
        "branchName": branch,
    })
}

fn unavailable() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "issuer down").into_response()
}

async fn discovery(State(s): State<Arc<DevState>>) -> Response {
    if s.down.load(Ordering::SeqCst) {
        return unavailable();
    }
    Json(json!({
        "issuer": s.issuer,
        "jwks_uri": format!("{}/keys.json", s.issuer),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
        "claims_supported": ["sub", "aud", "iss", "iat", "exp", "repositoryUuid", "workspaceUuid", "branchName"],
    }))
    .into_response()
}

async fn jwks(State(s): State<Arc<DevState>>) -> Response {
    if s.down.load(Ordering::SeqCst) {
        return unavailable();
    }
    s.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    let keys: Vec<Value> = s
        .published
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|k| k.public_jwk())
        .collect();
    Json(json!({ "keys": keys })).into_response()
}

/// `POST /token` with an optional JSON object of claim overrides (e.g.
/// `{"branchName": "release/1.0"}`): a fresh dev token.
async fn token(State(s): State<Arc<DevState>>, body: Option<Json<Value>>) -> Response {
    if s.down.load(Ordering::SeqCst) {
        return unavailable();
    }
    let mut claims = bitbucket_claims(&s.issuer, &dev_audience(), "main");
    if let (Some(Json(Value::Object(over))), Value::Object(c)) = (body, &mut claims) {
        for (k, v) in over {
            if k != "iss" {
                c.insert(k, v);
            }
        }
    }
    let key = s.signing.read().unwrap_or_else(|e| e.into_inner()).clone();
    (StatusCode::OK, sign_with(&key, &claims)).into_response()
}
