//! HTTP routes beside gRPC: OIDC discovery and JWKS for the tokens Latchkey signs, so
//! any JWT library verifies them by URL; and liveness.

use crate::broker::Broker;
use axum::extract::State;
use axum::http::{header, StatusCode};
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
        .route("/v1/audit/keys", get(audit_keys))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
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

/// The Ed25519 keys audit checkpoints verify with (public; pin them for offline audits).
async fn audit_keys(State(b): State<Arc<Broker>>) -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "public, max-age=300")],
        Json(b.audit_keys_jwks()),
    )
}

/// Ready when the store can commit (no credential can be issued otherwise). Witness
/// delivery is reported but never makes the broker unready: a hung witness must not stop
/// Mint.
async fn readyz(State(b): State<Arc<Broker>>) -> impl IntoResponse {
    use std::sync::atomic::Ordering;
    let store = b.store().check_writable().await;
    let status = b.audit_status();
    let witness = json!({
        "lag": status.witness_lag(),
        "consecutive_failures": status.witness_failures.load(Ordering::SeqCst),
        "last_checkpoint": status.last_checkpoint.load(Ordering::SeqCst),
    });
    let (code, store_check) = match &store {
        Ok(()) => (StatusCode::OK, json!({"ok": true})),
        Err(e) => {
            tracing::warn!(error = %e, "not ready: store cannot commit");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"ok": false, "reason": e.to_string()}),
            )
        }
    };
    (
        code,
        Json(json!({
            "status": if store.is_ok() { "ready" } else { "unready" },
            "checks": {"store": store_check, "audit_witness": witness},
        })),
    )
}
