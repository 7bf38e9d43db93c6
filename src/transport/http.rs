//! HTTP routes beside gRPC: OIDC discovery and JWKS for the tokens Latchkey signs, so
//! any JWT library verifies them by URL; and liveness.

use crate::broker::Broker;
use axum::extract::State;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Request};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;

/// The router. Discovery and JWKS live beneath the path of `server.issuer_url`, as OIDC
/// discovery requires. A request body must arrive whole within `body_timeout`.
pub fn router(
    broker: Arc<Broker>,
    request_timeout: std::time::Duration,
    body_timeout: std::time::Duration,
    trusted_proxies: Vec<ipnet::IpNet>,
) -> Router {
    let sources = Sources {
        broker: broker.clone(),
        trusted: Arc::new(trusted_proxies),
    };
    let prefix = reqwest::Url::parse(broker.issuer_url())
        .map(|u| u.path().trim_end_matches('/').to_string())
        .unwrap_or_default();
    Router::new()
        .route(
            &format!("{prefix}/.well-known/openid-configuration"),
            get(discovery),
        )
        .route(&format!("{prefix}/.well-known/jwks.json"), get(jwks))
        .route(
            &format!("{prefix}/targets/{{target}}/.well-known/openid-configuration"),
            get(target_discovery),
        )
        .route(
            &format!("{prefix}/targets/{{target}}/.well-known/jwks.json"),
            get(target_jwks),
        )
        .route("/v1/audit/keys", get(audit_keys))
        .merge(
            Router::new()
                .route("/v1/token", post(super::oauth::token))
                .route("/v1/introspect", post(super::oauth::introspect))
                .route_layer(middleware::from_fn_with_state(body_timeout, read_body))
                .route_layer(middleware::from_fn_with_state(sources, limit_source)),
        )
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(request_timeout, timeout))
        .with_state(broker)
}

/// What the source check needs.
#[derive(Clone)]
struct Sources {
    broker: Arc<Broker>,
    trusted: Arc<Vec<ipnet::IpNet>>,
}

/// Refuses a source address over its rate limit before the request is looked at. The
/// source is the client: behind a trusted proxy, the forwarded address.
async fn limit_source(
    State(s): State<Sources>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let b = &s.broker;
    let forwarded = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok());
    let client = crate::net::client_address(peer.ip(), forwarded, &s.trusted);
    let limits = b.rate_limits();
    let checked = limits
        .check_source(client)
        .map_err(|e| (e, "source_ip"))
        .and_then(|()| {
            limits
                .check_unidentified(client)
                .map_err(|e| (e, "unidentified"))
        });
    match checked {
        Ok(()) => crate::net::with_source(client, next.run(req)).await,
        Err((e, scope)) => {
            b.metrics()
                .rate_limited
                .get_or_create(&crate::metrics::LimitScope { scope })
                .inc();
            tracing::info!(%client, %peer, "rate limited by source address");
            super::oauth::too_many_requests(e.retry_after_secs())
        }
    }
}

/// Reads the whole body within `limit` before the handler sees it: a client that sends
/// its body a byte at a time holds a connection for `limit`, not the request timeout.
async fn read_body(State(limit): State<std::time::Duration>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(limit, axum::body::to_bytes(body, MAX_BODY_BYTES)).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
        Ok(Err(_)) => super::oauth::bad_body(false),
        Err(_) => super::oauth::bad_body(true),
    }
}

/// Ends a request that runs past the request timeout.
async fn timeout(State(limit): State<std::time::Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => super::oauth::timed_out(),
    }
}

/// Largest HTTP request body accepted (a form carrying a 16 KiB token fits easily).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

fn discovery_doc(iss: &str, algorithms: Vec<String>) -> Response {
    (
        [(header::CACHE_CONTROL, "public, max-age=300")],
        Json(json!({
            "issuer": iss,
            "jwks_uri": format!("{iss}/.well-known/jwks.json"),
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": algorithms,
            "grant_types_supported": ["urn:ietf:params:oauth:grant-type:token-exchange"],
            "claims_supported": ["iss", "sub", "aud", "exp", "nbf", "iat", "jti", "scope", "act"],
        })),
    )
        .into_response()
}

fn jwks_doc(b: &Broker, doc: &[u8]) -> Response {
    // Rotation publishes a next key at least this long before it signs.
    let cache = format!("public, max-age={}", b.jwks_max_age());
    (
        [
            (header::CONTENT_TYPE, "application/json".to_string()),
            (header::CACHE_CONTROL, cache),
        ],
        doc.to_vec(),
    )
        .into_response()
}

async fn discovery(State(b): State<Arc<Broker>>) -> Response {
    discovery_doc(b.issuer_url(), b.keys().algorithms(None))
}

async fn jwks(State(b): State<Arc<Broker>>) -> Response {
    jwks_doc(&b, &b.keys().jwks_json())
}

fn no_such_target() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": "no target of that name signs with a broker key"})),
    )
        .into_response()
}

/// A target's own discovery document. Only a target with its own issuer has one: its
/// `issuer` must be the URL it is served under.
async fn target_discovery(State(b): State<Arc<Broker>>, Path(target): Path<String>) -> Response {
    match b.target_issuer(&target) {
        Some((iss, true)) => discovery_doc(&iss, b.keys().algorithms(Some(&target))),
        _ => no_such_target(),
    }
}

/// A target's own JWKS: its keys only, so a verifier can trust exactly this target.
async fn target_jwks(State(b): State<Arc<Broker>>, Path(target): Path<String>) -> Response {
    match (b.target_issuer(&target), b.keys().target_jwks_json(&target)) {
        (Some(_), Some(doc)) => jwks_doc(&b, &doc),
        _ => no_such_target(),
    }
}

async fn metrics(State(b): State<Arc<Broker>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        b.render_metrics().await,
    )
}

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// The Ed25519 keys audit checkpoints verify with (public; pin them for offline audits).
async fn audit_keys(State(b): State<Arc<Broker>>) -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "public, max-age=300")],
        Json(b.audit_keys_jwks()),
    )
}

/// `GET /readyz`: 200 when ready, 503 otherwise, with every check in the body.
async fn readyz(State(b): State<Arc<Broker>>) -> impl IntoResponse {
    let r = b.readiness().await;
    let code = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(json!({
            "status": if r.ready { "ready" } else { "unready" },
            "checks": r.checks,
        })),
    )
}
