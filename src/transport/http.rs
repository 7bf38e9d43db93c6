//! HTTP routes beside gRPC: OIDC discovery and JWKS for the tokens Latchkey signs, so
//! any JWT library verifies them by URL; and liveness.

use crate::broker::Broker;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;

/// The router. Discovery and JWKS live beneath the path of `server.issuer_url`, as OIDC
/// discovery requires.
pub fn router(broker: Arc<Broker>) -> Router {
    let prefix = reqwest::Url::parse(broker.issuer_url())
        .map(|u| u.path().trim_end_matches('/').to_string())
        .unwrap_or_default();
    Router::new()
        .route(
            &format!("{prefix}/.well-known/openid-configuration"),
            get(discovery),
        )
        .route(&format!("{prefix}/.well-known/jwks.json"), get(jwks))
        .route("/healthz", get(healthz))
        .with_state(broker)
}

async fn discovery(State(b): State<Arc<Broker>>) -> impl IntoResponse {
    let iss = b.issuer_url();
    (
        [(header::CACHE_CONTROL, "public, max-age=300")],
        Json(json!({
            "issuer": iss,
            "jwks_uri": format!("{iss}/.well-known/jwks.json"),
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": b.keys().algorithms(),
            "grant_types_supported": ["urn:ietf:params:oauth:grant-type:token-exchange"],
            "claims_supported": ["iss", "sub", "aud", "exp", "nbf", "iat", "jti", "scope", "act"],
        })),
    )
}

async fn jwks(State(b): State<Arc<Broker>>) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        b.keys().jwks_json().as_ref().clone(),
    )
}

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}
