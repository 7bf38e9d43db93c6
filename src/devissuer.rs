//! A development OIDC issuer: discovery, JWKS and token issuance on a local port.
//!
//! `latchkey dev` runs one so the whole flow works on a laptop without Bitbucket; the
//! test suite runs one per test (keys generated at test time) and uses its controls to
//! rotate keys, publish keys late, and simulate an outage.
//!
//! It imitates four platforms, each as its own issuer URL beneath the listener (one key
//! signs for all): Bitbucket Pipelines at the root, GitHub Actions at `/github`, GitLab CI at
//! `/gitlab` and Kubernetes projected service-account tokens at `/kubernetes`. Each has
//! discovery, `keys.json` and `POST token` (a fresh token of that platform's shape, claims
//! overridable by a JSON body); `GET /github/token?audience=…` answers like GitHub's
//! `ACTIONS_ID_TOKEN_REQUEST_URL`, so a workflow's own request commands run unchanged.

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
/// The GitHub repository (`owner/name`) of the dev issuer's GitHub Actions tokens.
pub const DEV_GITHUB_REPOSITORY: &str = "latchkey-dev/orders";
/// Its `repository_id` (policy should match ids, not names).
pub const DEV_GITHUB_REPOSITORY_ID: &str = "700000001";
/// The GitLab project path of the dev issuer's GitLab CI tokens.
pub const DEV_GITLAB_PROJECT: &str = "latchkey-dev/orders";
/// Its `project_id`.
pub const DEV_GITLAB_PROJECT_ID: &str = "4242";
/// Namespace and service account of the dev issuer's Kubernetes tokens.
pub const DEV_K8S_NAMESPACE: &str = "orders";
/// See [`DEV_K8S_NAMESPACE`].
pub const DEV_K8S_SERVICE_ACCOUNT: &str = "orders-etl";

/// A platform whose tokens the development issuer imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// Bitbucket Pipelines (issuer at the root).
    Bitbucket,
    /// GitHub Actions (`/github`).
    Github,
    /// GitLab CI (`/gitlab`).
    Gitlab,
    /// Kubernetes projected service-account tokens (`/kubernetes`).
    Kubernetes,
}

impl Platform {
    /// Every platform.
    pub const ALL: [Platform; 4] = [
        Platform::Bitbucket,
        Platform::Github,
        Platform::Gitlab,
        Platform::Kubernetes,
    ];

    /// The path of this platform's issuer beneath the listener ("" for Bitbucket).
    pub fn path(self) -> &'static str {
        match self {
            Platform::Bitbucket => "",
            Platform::Github => "/github",
            Platform::Gitlab => "/gitlab",
            Platform::Kubernetes => "/kubernetes",
        }
    }
}

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
        let mut app = Router::new().route("/github/token", get(github_request));
        for p in Platform::ALL {
            let base = p.path();
            app = app
                .route(
                    &format!("{base}/.well-known/openid-configuration"),
                    get(move |s: State<Arc<DevState>>| discovery(s, p)),
                )
                .route(&format!("{base}/keys.json"), get(jwks))
                .route(
                    &format!("{base}/token"),
                    post(move |s: State<Arc<DevState>>, body: Option<Json<Value>>| {
                        token(s, p, body)
                    }),
                );
        }
        let app = app.with_state(state.clone());
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

    /// The issuer URL of one platform's tokens.
    pub fn platform_issuer(&self, p: Platform) -> String {
        format!("{}{}", self.state.issuer, p.path())
    }

    /// Claims of a token of platform `p` (valid from now), with `aud` as given.
    pub fn platform_claims(&self, p: Platform, aud: &str) -> Value {
        platform_claims(&self.state.issuer, p, aud)
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

/// Claims shaped as platform `p` issues them (TARGETS.md), for the dev repository,
/// project or service account on its main branch. `base` is the listener's URL.
pub fn platform_claims(base: &str, p: Platform, aud: &str) -> Value {
    let t = now();
    let iss = format!("{base}{}", p.path());
    let id = || uuid::Uuid::new_v4().to_string();
    let sha = "0123456789abcdef0123456789abcdef01234567";
    match p {
        Platform::Bitbucket => bitbucket_claims(&iss, aud, "main"),
        Platform::Github => json!({
            "iss": iss,
            "aud": aud,
            "sub": format!("repo:{DEV_GITHUB_REPOSITORY}:ref:refs/heads/main"),
            "iat": t,
            "nbf": t,
            "exp": t + 300,
            "jti": id(),
            "repository": DEV_GITHUB_REPOSITORY,
            "repository_id": DEV_GITHUB_REPOSITORY_ID,
            "repository_owner": "latchkey-dev",
            "repository_owner_id": "700000000",
            "ref": "refs/heads/main",
            "ref_type": "branch",
            "sha": sha,
            "event_name": "push",
            "workflow_ref": format!("{DEV_GITHUB_REPOSITORY}/.github/workflows/orders.yml@refs/heads/main"),
            "job_workflow_ref": format!("{DEV_GITHUB_REPOSITORY}/.github/workflows/orders.yml@refs/heads/main"),
            "run_id": "9000000001",
            "run_attempt": "1",
            "actor": "dev",
            "runner_environment": "github-hosted",
        }),
        Platform::Gitlab => json!({
            "iss": iss,
            "aud": aud,
            "sub": format!("project_path:{DEV_GITLAB_PROJECT}:ref_type:branch:ref:main"),
            "iat": t,
            "nbf": t,
            "exp": t + 3600,
            "jti": id(),
            "project_id": DEV_GITLAB_PROJECT_ID,
            "project_path": DEV_GITLAB_PROJECT,
            "namespace_id": "4200",
            "namespace_path": "latchkey-dev",
            "ref": "main",
            "ref_type": "branch",
            "ref_protected": "true",
            "sha": sha,
            "pipeline_id": "880001",
            "job_id": "990001",
            "user_login": "dev",
        }),
        Platform::Kubernetes => json!({
            "iss": iss,
            "aud": [aud],
            "sub": format!("system:serviceaccount:{DEV_K8S_NAMESPACE}:{DEV_K8S_SERVICE_ACCOUNT}"),
            "iat": t,
            "nbf": t,
            "exp": t + 600,
            "jti": id(),
            "kubernetes.io": {
                "namespace": DEV_K8S_NAMESPACE,
                "serviceaccount": { "name": DEV_K8S_SERVICE_ACCOUNT, "uid": id() },
                "pod": { "name": "orders-etl-0", "uid": id() },
            },
        }),
    }
}

/// The audience a platform's tokens carry unless the request names one.
fn default_audience(p: Platform) -> String {
    match p {
        Platform::Bitbucket => dev_audience(),
        Platform::Github => "https://github.com/latchkey-dev".into(),
        Platform::Gitlab | Platform::Kubernetes => "latchkey".into(),
    }
}

fn unavailable() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "issuer down").into_response()
}

async fn discovery(State(s): State<Arc<DevState>>, p: Platform) -> Response {
    if s.down.load(Ordering::SeqCst) {
        return unavailable();
    }
    let issuer = format!("{}{}", s.issuer, p.path());
    Json(json!({
        "jwks_uri": format!("{issuer}/keys.json"),
        "issuer": issuer,
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

/// `POST {platform}/token` with an optional JSON object of claim overrides (e.g.
/// `{"branchName": "release/1.0"}`, `{"aud": "latchkey"}`): a fresh dev token.
async fn token(State(s): State<Arc<DevState>>, p: Platform, body: Option<Json<Value>>) -> Response {
    if s.down.load(Ordering::SeqCst) {
        return unavailable();
    }
    let mut claims = platform_claims(&s.issuer, p, &default_audience(p));
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

/// `GET /github/token?audience=…` with `Authorization: bearer …`: what a GitHub Actions job
/// gets from `$ACTIONS_ID_TOKEN_REQUEST_URL&audience=…` (a JSON object with `value`). The
/// request token is required, as on GitHub, but any value is accepted: this is a dev issuer.
async fn github_request(
    State(s): State<Arc<DevState>>,
    headers: axum::http::HeaderMap,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    if s.down.load(Ordering::SeqCst) {
        return unavailable();
    }
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.get(..7)
                .filter(|p| p.eq_ignore_ascii_case("bearer "))
                .map(|_| &v[7..])
        })
        .filter(|t| !t.trim().is_empty());
    if bearer.is_none() {
        return (StatusCode::UNAUTHORIZED, "bearer request token required").into_response();
    }
    let aud = q
        .get("audience")
        .cloned()
        .unwrap_or_else(|| default_audience(Platform::Github));
    let claims = platform_claims(&s.issuer, Platform::Github, &aud);
    let key = s.signing.read().unwrap_or_else(|e| e.into_inner()).clone();
    Json(json!({ "count": 1, "value": sign_with(&key, &claims) })).into_response()
}
