//! Local fakes of the SaaS APIs Latchkey calls, each following the documented contract
//! (TARGETS.md): exact paths and methods, the auth header, form or JSON bodies with
//! exactly the documented fields. Anything else is a contract violation: answered 400
//! and recorded, and every test asserts there were none. Faults (401, 429 with
//! Retry-After, 500, a hang, a garbled success) are switched on per test.
#![allow(clippy::result_large_err)]

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the fake does instead of answering normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer this status with an error body (401, 403, 500, ...).
    Status(u16),
    /// 429 with `Retry-After: n`.
    RateLimited(u64),
    /// Never answer in time.
    Hang,
    /// Create what was asked, then answer 200 without the secret.
    Garbled,
}

/// Which API the fake speaks, with the credentials it accepts.
#[derive(Debug, Clone)]
pub enum Service {
    /// Databricks workspace: OIDC token endpoint and token APIs.
    Databricks {
        admin_token: String,
        client_id: String,
        client_secret: String,
        application_id: String,
        /// Federation policy: issuer, audience, subject of accepted JWTs.
        federation: (String, String, String),
    },
    /// Vercel REST API.
    Vercel { root_token: String },
    /// Prefect Cloud API.
    Prefect { account: String, token: String },
    /// Bitbucket Cloud OAuth token endpoint.
    Bitbucket {
        client_id: String,
        client_secret: String,
    },
    /// A generic OAuth2 server (client credentials and token exchange).
    OAuth2 {
        client_id: String,
        client_secret: String,
    },
    /// Pulsar admin REST API (permissions).
    PulsarAdmin { token: String },
}

/// What the fake saw and holds.
#[derive(Debug, Default)]
pub struct FakeState {
    pub fault: Option<Fault>,
    /// Live upstream credentials: id -> secret (or description).
    pub live: BTreeMap<String, String>,
    /// Valid root tokens (Vercel): token -> id.
    pub roots: BTreeMap<String, String>,
    pub calls: Vec<String>,
    pub violations: Vec<String>,
    pub seq: u64,
    /// The last JSON or form body, for assertions.
    pub last_body: Value,
    /// The broker's JWKS URL (federation checks).
    pub jwks_url: Option<String>,
}

struct App {
    service: Service,
    state: Arc<Mutex<FakeState>>,
}

/// A running fake.
pub struct Fake {
    pub url: String,
    pub state: Arc<Mutex<FakeState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Fake {
    pub async fn spawn(service: Service) -> Fake {
        let state = Arc::new(Mutex::new(FakeState::default()));
        if let Service::Vercel { root_token } = &service {
            state
                .lock()
                .unwrap()
                .roots
                .insert(root_token.clone(), "root-0".into());
        }
        let app = Arc::new(App {
            service,
            state: state.clone(),
        });
        let router = axum::Router::new().fallback(handle).with_state(app);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Fake { url, state, task }
    }

    pub fn set_fault(&self, f: Option<Fault>) {
        self.state.lock().unwrap().fault = f;
    }

    pub fn live(&self) -> BTreeMap<String, String> {
        self.state.lock().unwrap().live.clone()
    }

    pub fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn last_body(&self) -> Value {
        self.state.lock().unwrap().last_body.clone()
    }

    pub fn set_jwks(&self, url: String) {
        self.state.lock().unwrap().jwks_url = Some(url);
    }

    pub fn assert_no_violations(&self) {
        let v = self.state.lock().unwrap().violations.clone();
        assert!(v.is_empty(), "contract violations: {v:#?}");
    }
}

fn violation(app: &App, msg: String) -> Response {
    app.state.lock().unwrap().violations.push(msg);
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({"error": "contract violation"})),
    )
        .into_response()
}

/// The token of an `Authorization: Bearer …` header.
pub fn bearer(h: &HeaderMap) -> Option<String> {
    h.get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::to_string)
}

fn basic(h: &HeaderMap) -> Option<(String, String)> {
    let v = h
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Basic ")?;
    let raw = base64::engine::general_purpose::STANDARD.decode(v).ok()?;
    let s = String::from_utf8(raw).ok()?;
    let (a, b) = s.split_once(':')?;
    Some((a.to_string(), b.to_string()))
}

fn content_type(h: &HeaderMap) -> String {
    h.get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// A JSON object body with exactly `required` keys plus any of `optional`.
fn json_body(
    app: &App,
    h: &HeaderMap,
    body: &[u8],
    required: &[&str],
    optional: &[&str],
) -> Result<Map<String, Value>, Response> {
    if !content_type(h).starts_with("application/json") {
        return Err(violation(
            app,
            format!("content-type {:?}", content_type(h)),
        ));
    }
    let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(body) else {
        return Err(violation(app, "body is not a JSON object".into()));
    };
    for k in required {
        if !m.contains_key(*k) {
            return Err(violation(app, format!("missing field {k}")));
        }
    }
    for k in m.keys() {
        if !required.contains(&k.as_str()) && !optional.contains(&k.as_str()) {
            return Err(violation(app, format!("unknown field {k}")));
        }
    }
    app.state.lock().unwrap().last_body = Value::Object(m.clone());
    Ok(m)
}

/// A form body with exactly `required` keys plus any of `optional`.
fn form_body(
    app: &App,
    h: &HeaderMap,
    body: &[u8],
    required: &[&str],
    optional: &[&str],
) -> Result<BTreeMap<String, String>, Response> {
    if !content_type(h).starts_with("application/x-www-form-urlencoded") {
        return Err(violation(
            app,
            format!("content-type {:?}", content_type(h)),
        ));
    }
    let mut m = BTreeMap::new();
    for (k, v) in form_urlencoded::parse(body) {
        if m.insert(k.to_string(), v.to_string()).is_some() {
            return Err(violation(app, format!("repeated field {k}")));
        }
    }
    for k in required {
        if !m.contains_key(*k) {
            return Err(violation(app, format!("missing field {k}")));
        }
    }
    for k in m.keys() {
        if !required.contains(&k.as_str()) && !optional.contains(&k.as_str()) {
            return Err(violation(app, format!("unknown field {k}")));
        }
    }
    app.state.lock().unwrap().last_body = json!(m.clone());
    Ok(m)
}

fn next_id(app: &App, prefix: &str) -> String {
    let mut s = app.state.lock().unwrap();
    s.seq += 1;
    format!("{prefix}{}", s.seq)
}

fn ok(v: Value) -> Response {
    (StatusCode::OK, axum::Json(v)).into_response()
}

async fn handle(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let fault = {
        let mut s = app.state.lock().unwrap();
        s.calls.push(format!("{method} {}", uri.path()));
        s.fault
    };
    match fault {
        Some(Fault::Status(code)) => {
            return (
                StatusCode::from_u16(code).unwrap(),
                axum::Json(json!({"error": "injected", "detail": "secret-looking upstream body must not leak"})),
            )
                .into_response()
        }
        Some(Fault::RateLimited(n)) => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", n.to_string())],
                "slow down",
            )
                .into_response()
        }
        Some(Fault::Hang) => {
            tokio::time::sleep(Duration::from_secs(20)).await;
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
        Some(Fault::Garbled) | None => {}
    }
    let garbled = fault == Some(Fault::Garbled);
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or("").to_string();
    match app.service.clone() {
        Service::Databricks {
            admin_token,
            client_id,
            client_secret,
            application_id,
            federation,
        } => {
            databricks(
                &app,
                &method,
                &path,
                &headers,
                &body,
                garbled,
                (&admin_token, &client_id, &client_secret, &application_id),
                &federation,
            )
            .await
        }
        Service::Vercel { .. } => vercel(&app, &method, &path, &query, &headers, &body, garbled),
        Service::Prefect { account, token } => prefect(
            &app, &method, &path, &headers, &body, garbled, &account, &token,
        ),
        Service::Bitbucket {
            client_id,
            client_secret,
        } => {
            if method != Method::POST || path != "/site/oauth2/access_token" {
                return violation(&app, format!("unexpected {method} {path}"));
            }
            if basic(&headers) != Some((client_id, client_secret)) {
                return violation(
                    &app,
                    "token request without the consumer's basic auth".into(),
                );
            }
            let f = match form_body(&app, &headers, &body, &["grant_type"], &[]) {
                Ok(f) => f,
                Err(r) => return r,
            };
            if f["grant_type"] != "client_credentials" {
                return violation(&app, format!("grant_type {}", f["grant_type"]));
            }
            let id = next_id(&app, "bb-access-");
            ok(
                json!({"access_token": id, "scopes": "repository pullrequest", "expires_in": 7200, "refresh_token": "bb-refresh", "token_type": "bearer"}),
            )
        }
        Service::OAuth2 {
            client_id,
            client_secret,
        } => {
            oauth2(
                &app,
                &method,
                &path,
                &headers,
                &body,
                &client_id,
                &client_secret,
            )
            .await
        }
        Service::PulsarAdmin { token } => {
            if bearer(&headers).as_deref() != Some(token.as_str()) {
                return violation(&app, "admin call without the admin token".into());
            }
            let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
            let ok_path = matches!(
                segs.as_slice(),
                ["admin", "v2", "namespaces", _, _, "permissions", _]
            ) || matches!(
                segs.as_slice(),
                ["admin", "v2", "persistent", _, _, _, "permissions", _]
            );
            if !ok_path {
                return violation(&app, format!("unexpected path {path}"));
            }
            match method {
                Method::POST => {
                    if !content_type(&headers).starts_with("application/json") {
                        return violation(&app, "permissions body is not JSON".into());
                    }
                    let Ok(Value::Array(actions)) = serde_json::from_slice::<Value>(&body) else {
                        return violation(&app, "permissions body is not a JSON array".into());
                    };
                    let known = [
                        "produce",
                        "consume",
                        "functions",
                        "sources",
                        "sinks",
                        "packages",
                    ];
                    if actions.is_empty()
                        || actions
                            .iter()
                            .any(|a| !a.as_str().is_some_and(|a| known.contains(&a)))
                    {
                        return violation(&app, format!("bad actions {actions:?}"));
                    }
                    app.state
                        .lock()
                        .unwrap()
                        .live
                        .insert(path.clone(), Value::Array(actions).to_string());
                    StatusCode::NO_CONTENT.into_response()
                }
                Method::DELETE => {
                    if app.state.lock().unwrap().live.remove(&path).is_some() {
                        StatusCode::NO_CONTENT.into_response()
                    } else {
                        StatusCode::NOT_FOUND.into_response()
                    }
                }
                m => violation(&app, format!("unexpected method {m}")),
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn databricks(
    app: &App,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
    garbled: bool,
    (admin, client_id, client_secret, application_id): (&str, &str, &str, &str),
    (fed_iss, fed_aud, fed_sub): &(String, String, String),
) -> Response {
    match (method.clone(), path) {
        (Method::POST, "/oidc/v1/token") => {
            if let Some((id, secret)) = basic(headers) {
                if (id.as_str(), secret.as_str()) != (client_id, client_secret) {
                    return (
                        StatusCode::UNAUTHORIZED,
                        axum::Json(json!({"error": "invalid_client"})),
                    )
                        .into_response();
                }
                let f = match form_body(app, headers, body, &["grant_type", "scope"], &[]) {
                    Ok(f) => f,
                    Err(r) => return r,
                };
                if f["grant_type"] != "client_credentials" || f["scope"] != "all-apis" {
                    return violation(app, format!("m2m form {f:?}"));
                }
            } else {
                let f = match form_body(
                    app,
                    headers,
                    body,
                    &[
                        "grant_type",
                        "subject_token",
                        "subject_token_type",
                        "scope",
                        "client_id",
                    ],
                    &[],
                ) {
                    Ok(f) => f,
                    Err(r) => return r,
                };
                if f["grant_type"] != "urn:ietf:params:oauth:grant-type:token-exchange"
                    || f["subject_token_type"] != "urn:ietf:params:oauth:token-type:jwt"
                    || f["scope"] != "all-apis"
                    || f["client_id"] != client_id
                {
                    return violation(app, format!("federation form fields {:?}", f.keys()));
                }
                // The federation policy: the broker's JWT, by its JWKS, with iss/aud/sub.
                let jwks_url = app.state.lock().unwrap().jwks_url.clone();
                let Some(jwks_url) = jwks_url else {
                    return violation(app, "federation used before the JWKS was known".into());
                };
                if let Err(why) = verify_jwt(
                    &jwks_url,
                    &f["subject_token"],
                    fed_iss,
                    fed_aud,
                    Some(fed_sub),
                )
                .await
                {
                    return (
                        StatusCode::UNAUTHORIZED,
                        axum::Json(json!({"error": "invalid_grant", "why": why})),
                    )
                        .into_response();
                }
            }
            let id = next_id(app, "dbx-oauth-");
            ok(
                json!({"access_token": id, "token_type": "Bearer", "expires_in": 3600, "scope": "all-apis"}),
            )
        }
        (Method::POST, "/api/2.0/token/create")
        | (Method::POST, "/api/2.0/token-management/on-behalf-of/tokens") => {
            if bearer(headers).as_deref() != Some(admin) {
                return violation(app, "token API call without the admin token".into());
            }
            let obo = path.contains("on-behalf-of");
            let required: &[&str] = if obo {
                &["application_id", "lifetime_seconds", "comment"]
            } else {
                &["lifetime_seconds", "comment"]
            };
            let m = match json_body(app, headers, body, required, &[]) {
                Ok(m) => m,
                Err(r) => return r,
            };
            let Some(lifetime) = m["lifetime_seconds"].as_i64().filter(|l| *l > 0) else {
                return violation(
                    app,
                    "lifetime_seconds missing or not positive: a PAT must expire".into(),
                );
            };
            if obo && m["application_id"] != application_id {
                return violation(app, "wrong application_id".into());
            }
            let id = next_id(app, "dbx-token-");
            let value = format!("dapi-{id}-secret");
            let key = if obo { format!("obo:{id}") } else { id.clone() };
            app.state.lock().unwrap().live.insert(key, value.clone());
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64;
            let mut answer = json!({"token_info": {"token_id": id, "creation_time": now_ms, "expiry_time": now_ms + lifetime * 1000, "comment": m["comment"]}});
            if !garbled {
                answer["token_value"] = json!(value);
            }
            ok(answer)
        }
        (Method::POST, "/api/2.0/token/delete") => {
            if bearer(headers).as_deref() != Some(admin) {
                return violation(app, "delete without the admin token".into());
            }
            let m = match json_body(app, headers, body, &["token_id"], &[]) {
                Ok(m) => m,
                Err(r) => return r,
            };
            let id = m["token_id"].as_str().unwrap_or_default().to_string();
            if app.state.lock().unwrap().live.remove(&id).is_some() {
                ok(json!({}))
            } else {
                (
                    StatusCode::NOT_FOUND,
                    axum::Json(json!({"error_code": "RESOURCE_DOES_NOT_EXIST"})),
                )
                    .into_response()
            }
        }
        (Method::DELETE, p) if p.starts_with("/api/2.0/token-management/tokens/") => {
            if bearer(headers).as_deref() != Some(admin) {
                return violation(app, "delete without the admin token".into());
            }
            let id = p.trim_start_matches("/api/2.0/token-management/tokens/");
            if app
                .state
                .lock()
                .unwrap()
                .live
                .remove(&format!("obo:{id}"))
                .is_some()
            {
                ok(json!({}))
            } else {
                (
                    StatusCode::NOT_FOUND,
                    axum::Json(json!({"error_code": "RESOURCE_DOES_NOT_EXIST"})),
                )
                    .into_response()
            }
        }
        (m, p) => violation(app, format!("unexpected {m} {p}")),
    }
}

/// Verifies a JWT as a relying party does: key by `kid` from the JWKS, the algorithm the
/// JWK names, then `iss`, `aud`, `exp` (and `sub` when given).
pub async fn verify_jwt(
    jwks_url: &str,
    token: &str,
    iss: &str,
    aud: &str,
    sub: Option<&str>,
) -> Result<Value, String> {
    let body = reqwest::get(jwks_url)
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    let jwks: Value = serde_json::from_str(&body)
        .map_err(|e| format!("jwks {e}: {}", body.chars().take(300).collect::<String>()))?;
    let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
    let kid = header.kid.ok_or("no kid")?;
    let raw = jwks["keys"]
        .as_array()
        .and_then(|ks| ks.iter().find(|k| k["kid"] == kid.as_str()))
        .ok_or("unknown kid")?;
    let jwk: jsonwebtoken::jwk::Jwk =
        serde_json::from_value(raw.clone()).map_err(|e| format!("jwk: {e}"))?;
    let jwk = &jwk;
    let alg = jwk
        .common
        .key_algorithm
        .ok_or("jwk without alg")?
        .to_string();
    let alg: jsonwebtoken::Algorithm = alg.parse().map_err(|_| "alg")?;
    if alg != header.alg {
        return Err("token alg differs from the jwk's".into());
    }
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    let mut v = jsonwebtoken::Validation::new(alg);
    v.set_audience(&[aud]);
    v.set_issuer(&[iss]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    let data = jsonwebtoken::decode::<Value>(token, &key, &v).map_err(|e| e.to_string())?;
    if let Some(s) = sub {
        if data.claims["sub"] != s {
            return Err(format!("sub {} is not {s}", data.claims["sub"]));
        }
    }
    Ok(data.claims)
}

fn vercel(
    app: &App,
    method: &Method,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    body: &[u8],
    garbled: bool,
) -> Response {
    let caller = bearer(headers).and_then(|t| app.state.lock().unwrap().roots.get(&t).cloned());
    let Some(caller_id) = caller else {
        return violation(
            app,
            format!("{method} {path} without a valid full-account token"),
        );
    };
    match (method.clone(), path) {
        (Method::POST, "/v3/user/tokens") => {
            if !(query.is_empty() || query.starts_with("teamId=")) {
                return violation(app, format!("query {query}"));
            }
            let m = match json_body(app, headers, body, &["name"], &["expiresAt"]) {
                Ok(m) => m,
                Err(r) => return r,
            };
            if !m["name"].is_string() {
                return violation(app, "name is not a string".into());
            }
            let expires = m.get("expiresAt").cloned();
            if let Some(e) = &expires {
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as i64;
                if e.as_i64().is_none_or(|e| e <= now_ms) {
                    return violation(
                        app,
                        "expiresAt is not epoch milliseconds in the future".into(),
                    );
                }
            }
            let id = next_id(app, "tok_");
            let bearer_token = format!("vercel-{id}-bearer");
            {
                let mut s = app.state.lock().unwrap();
                s.live.insert(id.clone(), bearer_token.clone());
                // A token without expiresAt is a full-account token (root rotation).
                if expires.is_none() {
                    s.roots.insert(bearer_token.clone(), id.clone());
                }
            }
            let mut answer = json!({"token": {"id": id, "name": m["name"], "type": "oauth2-token", "origin": "manual", "expiresAt": expires, "activeAt": 0, "createdAt": 0}});
            if !garbled {
                answer["bearerToken"] = json!(bearer_token);
            }
            ok(answer)
        }
        (Method::GET, "/v5/user/tokens/current") => {
            ok(json!({"token": {"id": caller_id, "name": "current", "type": "oauth2-token"}}))
        }
        (Method::DELETE, p) if p.starts_with("/v3/user/tokens/") => {
            let id = p.trim_start_matches("/v3/user/tokens/").to_string();
            let mut s = app.state.lock().unwrap();
            let removed = s.live.remove(&id).is_some() | {
                let before = s.roots.len();
                s.roots.retain(|_, v| *v != id);
                before != s.roots.len()
            };
            if removed {
                ok(json!({"tokenId": id}))
            } else {
                (
                    StatusCode::NOT_FOUND,
                    axum::Json(json!({"error": {"code": "not_found"}})),
                )
                    .into_response()
            }
        }
        (m, p) => violation(app, format!("unexpected {m} {p}")),
    }
}

#[allow(clippy::too_many_arguments)]
fn prefect(
    app: &App,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
    garbled: bool,
    account: &str,
    token: &str,
) -> Response {
    if bearer(headers).as_deref() != Some(token) {
        return violation(app, format!("{method} {path} without the API key"));
    }
    let bots = format!("/api/accounts/{account}/bots/");
    match method.clone() {
        Method::POST if path == bots => {
            let m = match json_body(
                app,
                headers,
                body,
                &["name", "api_key_expiration", "account_role_id"],
                &[],
            ) {
                Ok(m) => m,
                Err(r) => return r,
            };
            let exp = m["api_key_expiration"].as_str().unwrap_or_default();
            if humantime::parse_rfc3339(exp).is_err() {
                return violation(app, format!("api_key_expiration {exp:?} is not RFC 3339"));
            }
            let id = next_id(app, "bot-");
            let key = format!("pnu_{id}secret");
            app.state
                .lock()
                .unwrap()
                .live
                .insert(id.clone(), key.clone());
            let mut api_key = json!({"id": format!("key-{id}"), "name": m["name"], "created": "2026-01-01T00:00:00Z", "expiration": exp});
            if !garbled {
                api_key["key"] = json!(key);
            }
            ok(
                json!({"id": id, "name": m["name"], "account_role_id": m["account_role_id"], "api_key": api_key}),
            )
        }
        Method::DELETE if path.starts_with(&bots) => {
            let id = path.trim_start_matches(&bots).to_string();
            if app.state.lock().unwrap().live.remove(&id).is_some() {
                StatusCode::NO_CONTENT.into_response()
            } else {
                (
                    StatusCode::NOT_FOUND,
                    axum::Json(json!({"detail": "Not found"})),
                )
                    .into_response()
            }
        }
        m => violation(app, format!("unexpected {m} {path}")),
    }
}

async fn oauth2(
    app: &App,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
    client_id: &str,
    client_secret: &str,
) -> Response {
    if *method != Method::POST || path != "/token" {
        return violation(app, format!("unexpected {method} {path}"));
    }
    let f = match form_body(
        app,
        headers,
        body,
        &["grant_type"],
        &[
            "scope",
            "audience",
            "resource",
            "subject_token",
            "subject_token_type",
            "client_id",
            "client_secret",
        ],
    ) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let creds = basic(headers)
        .or_else(|| Some((f.get("client_id")?.clone(), f.get("client_secret")?.clone())));
    if creds != Some((client_id.to_string(), client_secret.to_string())) {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "invalid_client"})),
        )
            .into_response();
    }
    match f["grant_type"].as_str() {
        "client_credentials" => {
            if f.contains_key("subject_token") {
                return violation(app, "subject_token in client_credentials".into());
            }
        }
        "urn:ietf:params:oauth:grant-type:token-exchange" => {
            if f.get("subject_token_type").map(String::as_str)
                != Some("urn:ietf:params:oauth:token-type:jwt")
                || !f.contains_key("subject_token")
            {
                return violation(app, "token exchange without a JWT subject_token".into());
            }
        }
        g => return violation(app, format!("grant_type {g}")),
    }
    let id = next_id(app, "oauth-");
    ok(
        json!({"access_token": id, "token_type": "Bearer", "expires_in": 600, "scope": f.get("scope").cloned().unwrap_or_default(), "issued_token_type": "urn:ietf:params:oauth:token-type:access_token"}),
    )
}
