//! OAuth 2.0 over HTTP, for callers that have only curl or an OAuth library:
//! `POST /v1/token` (RFC 8693 token exchange) and `POST /v1/introspect` (RFC 7662).
//! Both run exactly [`Broker::mint`] and [`Broker::introspect`], the use cases gRPC
//! calls; this module only parses forms and shapes answers.

use super::grpc::request_id;
use super::status;
use crate::broker::{Broker, BrokerError, MintRequest, Minted};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// `grant_type` of RFC 8693.
pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// Subject token types accepted: every CI platform issues a JWT (an OIDC ID token).
const SUBJECT_TYPES: [&str; 2] = [
    "urn:ietf:params:oauth:token-type:jwt",
    "urn:ietf:params:oauth:token-type:id_token",
];
/// `issued_token_type` of a broker-signed JWT.
const JWT_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
/// `issued_token_type` of an opaque bearer token from a target's API.
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// `issued_token_type` of a login (username and password): `access_token` holds the
/// password, `latchkey_credential` the whole login.
const PASSWORD_TYPE: &str = "urn:latchkey:params:oauth:token-type:password";

/// An OAuth error answer (RFC 6749 section 5.2).
#[derive(Debug)]
pub struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: String,
    request_id: String,
    retry_after: Option<u64>,
}

impl OAuthError {
    fn invalid_request(description: impl Into<String>, request_id: &str) -> OAuthError {
        OAuthError {
            status: StatusCode::BAD_REQUEST,
            error: "invalid_request",
            description: description.into(),
            request_id: request_id.to_string(),
            retry_after: None,
        }
    }

    fn from_broker(e: &BrokerError, request_id: &str) -> OAuthError {
        let (code, error) = status::oauth(e);
        OAuthError {
            status: StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            error,
            description: status::description(e, request_id),
            request_id: request_id.to_string(),
            retry_after: match e {
                BrokerError::RateLimited(x) => Some(x.retry_after_secs()),
                _ => None,
            },
        }
    }
}

/// The answer to a caller over its source address's rate limit.
pub fn too_many_requests(retry_after_secs: u64) -> Response {
    OAuthError {
        status: StatusCode::TOO_MANY_REQUESTS,
        error: "temporarily_unavailable",
        description: format!("rate limit exceeded for this address; retry in {retry_after_secs}s"),
        request_id: String::new(),
        retry_after: Some(retry_after_secs),
    }
    .into_response()
}

/// The answer to a request whose body did not arrive in time, or was too large.
pub fn bad_body(too_slow: bool) -> Response {
    OAuthError {
        status: if too_slow {
            StatusCode::REQUEST_TIMEOUT
        } else {
            StatusCode::PAYLOAD_TOO_LARGE
        },
        error: "invalid_request",
        description: if too_slow {
            "request body not received in time".into()
        } else {
            "request body too large".into()
        },
        request_id: String::new(),
        retry_after: None,
    }
    .into_response()
}

/// The answer to a request that ran past the request timeout.
pub fn timed_out() -> Response {
    OAuthError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        error: "temporarily_unavailable",
        description: "request timed out".into(),
        request_id: String::new(),
        retry_after: None,
    }
    .into_response()
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(json!({"error": self.error, "error_description": self.description})),
        )
            .into_response();
        no_store(r.headers_mut(), &self.request_id);
        if let Some(secs) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"latchkey\""),
            );
        }
        r
    }
}

fn no_store(h: &mut HeaderMap, request_id: &str) {
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    if !request_id.is_empty() {
        if let Ok(v) = HeaderValue::from_str(request_id) {
            h.insert("x-request-id", v);
        }
    }
}

/// A parsed `application/x-www-form-urlencoded` body. Parameters may appear once
/// (RFC 6749 section 3.2); unknown ones are ignored, as the RFC requires.
struct Form(BTreeMap<String, String>);

/// Names only: a form carries the subject token.
impl std::fmt::Debug for Form {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl Form {
    fn parse(
        headers: &HeaderMap,
        body: Result<Bytes, BytesRejection>,
        request_id: &str,
    ) -> Result<Form, OAuthError> {
        let body = body.map_err(|e| OAuthError {
            status: e.status(),
            error: "invalid_request",
            description: if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                "request body too large".into()
            } else {
                "request body could not be read".into()
            },
            request_id: request_id.to_string(),
            retry_after: None,
        })?;
        let form_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| {
                v.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
            .unwrap_or(false);
        if !form_type {
            return Err(OAuthError::invalid_request(
                "content type must be application/x-www-form-urlencoded",
                request_id,
            ));
        }
        let mut out = BTreeMap::new();
        for (k, v) in form_urlencoded::parse(&body) {
            if out.insert(k.to_string(), v.to_string()).is_some() {
                return Err(OAuthError::invalid_request(
                    format!("parameter {k} given more than once"),
                    request_id,
                ));
            }
        }
        Ok(Form(out))
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str).filter(|v| !v.is_empty())
    }
}

/// Parses an RFC 8693 token exchange body as `/v1/token` does: the subject token and the
/// request in domain form, or the `error_description` refusing it. For fuzzing and
/// property tests; the handler runs the same two steps.
pub fn parse_exchange(content_type: &str, body: &[u8]) -> Result<(String, MintRequest), String> {
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(content_type) {
        headers.insert(header::CONTENT_TYPE, v);
    }
    let form = Form::parse(&headers, Ok(Bytes::copy_from_slice(body)), "fuzz")
        .map_err(|e| e.description)?;
    exchange_request(&form, "fuzz").map_err(|e| e.description)
}

/// The token exchange request in domain form, or the reason it is malformed.
fn exchange_request(f: &Form, request_id: &str) -> Result<(String, MintRequest), OAuthError> {
    let bad = |m: &str| OAuthError::invalid_request(m, request_id);
    match f.get("grant_type") {
        Some(TOKEN_EXCHANGE) => {}
        Some(_) => {
            return Err(OAuthError {
                status: StatusCode::BAD_REQUEST,
                error: "unsupported_grant_type",
                description: format!("grant_type must be {TOKEN_EXCHANGE}"),
                request_id: request_id.to_string(),
                retry_after: None,
            })
        }
        None => return Err(bad("grant_type is required")),
    }
    let subject = f
        .get("subject_token")
        .ok_or_else(|| bad("subject_token is required"))?;
    match f.get("subject_token_type") {
        Some(t) if SUBJECT_TYPES.contains(&t) => {}
        Some(_) => {
            return Err(bad(
                "subject_token_type must be urn:ietf:params:oauth:token-type:jwt",
            ))
        }
        None => return Err(bad("subject_token_type is required")),
    }
    if f.get("actor_token").is_some() || f.get("actor_token_type").is_some() {
        return Err(bad("actor_token is not supported"));
    }
    if let Some(t) = f.get("requested_token_type") {
        if t != JWT_TYPE && t != ACCESS_TOKEN_TYPE {
            return Err(bad(
                "requested_token_type must be a jwt or access_token type",
            ));
        }
    }
    let target = match (f.get("audience"), f.get("resource")) {
        (Some(a), Some(r)) if a != r => {
            return Err(OAuthError {
                status: StatusCode::BAD_REQUEST,
                error: "invalid_target",
                description: "audience and resource name different targets".into(),
                request_id: request_id.to_string(),
                retry_after: None,
            })
        }
        (Some(t), _) | (None, Some(t)) => t.to_string(),
        (None, None) => return Err(bad("audience (or resource) naming the target is required")),
    };
    let ttl = match f.get("ttl") {
        None => None,
        Some(s) => match s.parse::<u64>() {
            Ok(n) if n > 0 => Some(Duration::from_secs(n)),
            _ => return Err(bad("ttl must be a positive number of seconds")),
        },
    };
    let scopes = f
        .get("scope")
        .map(|s| {
            s.split(' ')
                .filter(|x| !x.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    Ok((
        subject.to_string(),
        MintRequest {
            target,
            scopes,
            ttl,
            context: BTreeMap::from([(
                "transport".to_string(),
                "oauth-token-exchange".to_string(),
            )]),
        },
    ))
}

/// The RFC 8693 answer. The one place an HTTP answer carries a secret.
fn exchange_response(m: &Minted, now: i64) -> Value {
    let c = &m.credential;
    let (access_token, issued_type, token_type) = match (&c.token, &c.password) {
        (Some(t), _) => (
            t.expose().as_str(),
            if c.kind == "jwt" {
                JWT_TYPE
            } else {
                ACCESS_TOKEN_TYPE
            },
            "Bearer",
        ),
        (None, Some(p)) => (p.expose().as_str(), PASSWORD_TYPE, "N_A"),
        (None, None) => ("", ACCESS_TOKEN_TYPE, "N_A"),
    };
    let mut cred = Map::new();
    cred.insert("kind".into(), c.kind.into());
    if let Some(u) = &c.username {
        cred.insert("username".into(), u.clone().into());
    }
    if let Some(p) = &c.password {
        cred.insert("password".into(), p.expose().clone().into());
    }
    if !c.fields.is_empty() {
        cred.insert("fields".into(), json!(c.fields));
    }
    json!({
        "access_token": access_token,
        "issued_token_type": issued_type,
        "token_type": token_type,
        "expires_in": (c.expires_at - now).max(0),
        "scope": m.lease.scopes.join(" "),
        "lease_id": m.lease.id,
        "lease_secret": m.lease_secret.expose(),
        "latchkey_credential": cred,
    })
}

/// A JSON answer that must not be cached, or the OAuth error.
fn respond(id: &str, r: Result<Value, OAuthError>) -> Response {
    match r {
        Ok(v) => {
            let mut r = Json(v).into_response();
            no_store(r.headers_mut(), id);
            r
        }
        Err(e) => e.into_response(),
    }
}

fn new_request_id() -> String {
    let id = request_id();
    tracing::Span::current().record("request_id", id.as_str());
    id
}

/// `POST /v1/token`.
#[tracing::instrument(skip_all, fields(request_id))]
pub async fn token(
    State(b): State<Arc<Broker>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let id = new_request_id();
    let r = async {
        let form = Form::parse(&headers, body, &id)?;
        let (subject, req) = exchange_request(&form, &id)?;
        let m = b
            .mint(Some(&subject), req, &id)
            .await
            .map_err(|e| OAuthError::from_broker(&e, &id))?;
        Ok(exchange_response(&m, b.now()))
    }
    .await;
    respond(&id, r)
}

/// `POST /v1/introspect`: the caller authenticates with its own workload token
/// (`Authorization: Bearer`), whose rule grants `introspect` for the token's target.
#[tracing::instrument(skip_all, fields(request_id))]
pub async fn introspect(
    State(b): State<Arc<Broker>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let id = new_request_id();
    let caller = super::bearer(
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    )
    .map(str::to_string);
    let r = async {
        let form = Form::parse(&headers, body, &id)?;
        let checked = form
            .get("token")
            .ok_or_else(|| OAuthError::invalid_request("token is required", &id))?;
        let i = b
            .introspect(caller.as_deref(), checked, &id)
            .await
            .map_err(|e| {
                let mut err = OAuthError::from_broker(&e, &id);
                if matches!(e, BrokerError::Identity(_)) && err.status == StatusCode::BAD_REQUEST {
                    // The caller's own credential is missing or bad: RFC 7662 answers 401.
                    err.description = format!(
                        "{}; authenticate with your workload token: Authorization: Bearer <token>",
                        err.description
                    );
                    err.status = StatusCode::UNAUTHORIZED;
                    err.error = "invalid_client";
                }
                err
            })?;
        Ok(match (i.active, &i.lease) {
            (true, Some(l)) => json!({
                "active": true,
                "scope": l.scopes.join(" "),
                "token_type": "Bearer",
                "exp": l.expires_at,
                "iat": l.issued_at,
                "sub": i.subject,
                "aud": i.audience,
                "iss": b
                    .target_issuer(&l.target)
                    .map(|(iss, _)| iss)
                    .unwrap_or_else(|| b.issuer_url().to_string()),
                "jti": l.id,
                "latchkey_target": l.target,
                "latchkey_lease_state": l.state,
            }),
            _ => json!({"active": false}),
        })
    }
    .await;
    respond(&id, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> Form {
        Form(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn good() -> Vec<(&'static str, &'static str)> {
        vec![
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", "t.o.k"),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("audience", "orders-api"),
            ("scope", "read  write"),
            ("ttl", "300"),
        ]
    }

    #[test]
    fn exchange_parses_the_rfc_8693_form() {
        let (subject, r) = exchange_request(&form(&good()), "id").unwrap();
        assert_eq!(subject, "t.o.k");
        assert_eq!(r.target, "orders-api");
        assert_eq!(r.scopes, vec!["read", "write"]);
        assert_eq!(r.ttl, Some(Duration::from_secs(300)));
    }

    #[test]
    fn exchange_rejects_each_malformed_field() {
        let cases: Vec<(&str, Option<&str>, &str)> = vec![
            (
                "grant_type",
                Some("client_credentials"),
                "unsupported_grant_type",
            ),
            ("grant_type", None, "invalid_request"),
            ("subject_token", None, "invalid_request"),
            ("subject_token_type", Some("urn:x"), "invalid_request"),
            ("subject_token_type", None, "invalid_request"),
            ("audience", None, "invalid_request"),
            ("ttl", Some("-5"), "invalid_request"),
            ("ttl", Some("0"), "invalid_request"),
            ("ttl", Some("ten"), "invalid_request"),
        ];
        for (key, value, want) in cases {
            let mut pairs: Vec<_> = good().into_iter().filter(|(k, _)| *k != key).collect();
            if let Some(v) = value {
                pairs.push((key, v));
            }
            let err = exchange_request(&form(&pairs), "id").unwrap_err();
            assert_eq!(err.error, want, "{key}={value:?}: {}", err.description);
        }
        let mut pairs = good();
        pairs.push(("resource", "billing"));
        assert_eq!(
            exchange_request(&form(&pairs), "id").unwrap_err().error,
            "invalid_target"
        );
        let mut pairs = good();
        pairs.push(("actor_token", "x"));
        assert_eq!(
            exchange_request(&form(&pairs), "id").unwrap_err().error,
            "invalid_request"
        );
    }

    #[test]
    fn form_refuses_repeats_and_other_content_types() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded; charset=utf-8"),
        );
        let f = Form::parse(
            &h,
            Ok(Bytes::from_static(b"a=1&b=%20x&subject_token=s3cret")),
            "id",
        )
        .unwrap();
        assert_eq!(f.get("b"), Some(" x"));
        assert!(
            !format!("{f:?}").contains("s3cret"),
            "Debug shows names only"
        );
        let e = Form::parse(&h, Ok(Bytes::from_static(b"a=1&a=2")), "id").unwrap_err();
        assert!(e.description.contains("more than once"));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let e = Form::parse(&h, Ok(Bytes::from_static(b"{}")), "id").unwrap_err();
        assert_eq!(e.error, "invalid_request");
    }
}
