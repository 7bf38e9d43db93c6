//! The HTTP face through the real server: RFC 8693 token exchange exactly as curl sends
//! it, and RFC 7662 introspection before and after revocation.

mod common;

use common::{authed, Env};
use latchkey::clock::SystemClock;
use latchkey::transport::pb::RevokeRequest;
use serde_json::Value;
use std::sync::Arc;

const EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";

/// Lets `ops/introspect` branches introspect orders-api tokens, and only those.
const INTROSPECTOR: &str = r#"
[[rules]]
name = "orders-introspector"
issuer = "bb"
claims = { branchName = "ops/introspect" }
roles = ["introspect"]
role_targets = ["orders-api"]
"#;

async fn start() -> Env {
    Env::start_full(
        "jwks_cooldown = \"0s\"",
        "busy_timeout = \"300ms\"",
        INTROSPECTOR,
        Arc::new(SystemClock),
    )
    .await
}

async fn post(
    env: &Env,
    path: &str,
    bearer: Option<&str>,
    form: &[(&str, &str)],
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut req = reqwest::Client::new()
        .post(format!("{}{path}", env.http))
        .form(form);
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.json().await.unwrap_or(Value::Null);
    (status, body, headers)
}

async fn exchange(env: &Env, token: &str, extra: &[(&str, &str)]) -> (u16, Value) {
    let mut form = vec![
        ("grant_type", EXCHANGE),
        ("subject_token", token),
        ("subject_token_type", JWT),
    ];
    form.extend_from_slice(extra);
    let (s, b, _) = post(env, "/v1/token", None, &form).await;
    (s, b)
}

#[tokio::test]
async fn token_exchange_mints_like_grpc_and_audits() {
    let env = start().await;
    let token = env.token("main");
    let (status, body, headers) = post(
        &env,
        "/v1/token",
        None,
        &[
            ("grant_type", EXCHANGE),
            ("subject_token", &token),
            ("subject_token_type", JWT),
            ("audience", "orders-api"),
            ("scope", "orders:read"),
            ("ttl", "120"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["issued_token_type"], JWT);
    assert_eq!(body["scope"], "orders:read");
    let expires_in = body["expires_in"].as_i64().unwrap();
    assert!((118..=120).contains(&expires_in), "{expires_in}");
    assert_eq!(body["latchkey_credential"]["kind"], "jwt");
    let lease_id = body["lease_id"].as_str().unwrap();
    assert!(!body["lease_secret"].as_str().unwrap().is_empty());

    // The access token verifies against the published JWKS with an independent library.
    let access = body["access_token"].as_str().unwrap();
    let header = jsonwebtoken::decode_header(access).unwrap();
    let jwks: jsonwebtoken::jwk::JwkSet =
        reqwest::get(format!("{}/latchkey/.well-known/jwks.json", env.http))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let jwk = jwks.find(header.kid.as_deref().unwrap()).unwrap();
    let mut v = jsonwebtoken::Validation::new(header.alg);
    v.set_audience(&["https://orders.example.com"]);
    let claims = jsonwebtoken::decode::<Value>(
        access,
        &jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap(),
        &v,
    )
    .unwrap()
    .claims;
    assert_eq!(claims["jti"], lease_id);
    assert_eq!(claims["scope"], "orders:read");

    // Same use case as gRPC: one audit record, marked with its transport, never the token.
    let recs = env.records().await;
    let mint = recs
        .iter()
        .find(|r| r.entry.lease_id.as_deref() == Some(lease_id))
        .expect("audited");
    assert_eq!(mint.entry.outcome, "allowed");
    assert_eq!(mint.entry.context["transport"], "oauth-token-exchange");
    let db = common::all_bytes_under(env.dir.path());
    assert!(!common::contains(&db, access), "token not stored");
    env.stop().await;
}

#[tokio::test]
async fn token_exchange_errors_follow_rfc_6749() {
    let env = start().await;
    let good = env.token("main");
    type Case<'a> = (&'a str, String, Vec<(&'a str, &'a str)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "unknown target",
            good.clone(),
            vec![("audience", "nope")],
            400,
            "invalid_target",
        ),
        (
            "scope not granted",
            good.clone(),
            vec![("audience", "orders-api"), ("scope", "orders:admin")],
            400,
            "invalid_scope",
        ),
        (
            "denied branch",
            env.token("experimental/x"),
            vec![("audience", "orders-api")],
            403,
            "access_denied",
        ),
        (
            "garbage token",
            "not-a-jwt".into(),
            vec![("audience", "orders-api")],
            400,
            "invalid_grant",
        ),
        ("no target", good.clone(), vec![], 400, "invalid_request"),
        (
            "bad ttl",
            good.clone(),
            vec![("audience", "orders-api"), ("ttl", "x")],
            400,
            "invalid_request",
        ),
    ];
    for (what, token, extra, status, error) in cases {
        let (s, body) = exchange(&env, &token, &extra).await;
        assert_eq!(
            (s, body["error"].as_str().unwrap_or("")),
            (status, error),
            "{what}: {body}"
        );
        assert!(
            body["error_description"]
                .as_str()
                .is_some_and(|d| !d.is_empty()),
            "{what}"
        );
        assert!(!body.to_string().contains(&good), "{what}: token echoed");
    }

    // Wrong grant type, missing subject token, wrong content type, oversized body.
    let (s, body, _) = post(
        &env,
        "/v1/token",
        None,
        &[("grant_type", "client_credentials")],
    )
    .await;
    assert_eq!(
        (s, body["error"].as_str().unwrap()),
        (400, "unsupported_grant_type")
    );
    let (s, body, _) = post(&env, "/v1/token", None, &[("grant_type", EXCHANGE)]).await;
    assert_eq!(
        (s, body["error"].as_str().unwrap()),
        (400, "invalid_request")
    );
    let r = reqwest::Client::new()
        .post(format!("{}/v1/token", env.http))
        .json(&serde_json::json!({"grant_type": EXCHANGE}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let big = "a".repeat(200 * 1024);
    let (s, body) = exchange(&env, &big, &[("audience", "orders-api")]).await;
    assert_eq!(
        (s, body["error"].as_str().unwrap()),
        (413, "invalid_request")
    );

    // Request heads over 64 KiB are refused by the HTTP server itself.
    let r = reqwest::Client::new()
        .post(format!("{}/v1/token", env.http))
        .header("x-padding", "p".repeat(100 * 1024))
        .form(&[("grant_type", EXCHANGE)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);

    // The store cannot commit: nothing is issued, and the caller is told to retry.
    env.sqlite.set_read_only(true).await.unwrap();
    let (s, body) = exchange(&env, &good, &[("audience", "orders-api")]).await;
    assert_eq!(
        (s, body["error"].as_str().unwrap()),
        (503, "temporarily_unavailable"),
        "{body}"
    );
    assert!(body.get("access_token").is_none());
    env.sqlite.set_read_only(false).await.unwrap();

    // The service kept running through all of it.
    let (s, body) = exchange(&env, &good, &[("resource", "orders-api")]).await;
    assert_eq!(s, 200, "{body}");
    env.stop().await;
}

#[tokio::test]
async fn introspection_reports_active_until_revoked() {
    let env = start().await;
    let (s, minted) = exchange(&env, &env.token("main"), &[("audience", "orders-api")]).await;
    assert_eq!(s, 200);
    let access = minted["access_token"].as_str().unwrap();
    let ops = env.token("ops/introspect");

    let (s, body, headers) = post(&env, "/v1/introspect", Some(&ops), &[("token", access)]).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(body["active"], true);
    assert_eq!(body["jti"], minted["lease_id"]);
    assert_eq!(body["aud"][0], "https://orders.example.com");
    assert_eq!(body["latchkey_target"], "orders-api");
    assert_eq!(body["iss"], "http://127.0.0.1:9/latchkey");

    // No caller credential: 401 with a challenge. A caller without the role: 403.
    let (s, body, headers) = post(&env, "/v1/introspect", None, &[("token", access)]).await;
    assert_eq!(
        (s, body["error"].as_str().unwrap()),
        (401, "invalid_client")
    );
    assert!(headers.contains_key("www-authenticate"));
    let (s, body, _) = post(
        &env,
        "/v1/introspect",
        Some("garbage"),
        &[("token", access)],
    )
    .await;
    assert_eq!(
        (s, body["error"].as_str().unwrap()),
        (401, "invalid_client")
    );
    let (s, body, _) = post(
        &env,
        "/v1/introspect",
        Some(&env.token("main")),
        &[("token", access)],
    )
    .await;
    assert_eq!((s, body["error"].as_str().unwrap()), (403, "access_denied"));

    // The role covers orders-api only: a reports token is inactive to this caller.
    let (_, reports) = exchange(&env, &env.token("main"), &[("audience", "reports")]).await;
    let (s, body, _) = post(
        &env,
        "/v1/introspect",
        Some(&ops),
        &[("token", reports["access_token"].as_str().unwrap())],
    )
    .await;
    assert_eq!(
        (s, body.clone()),
        (200, serde_json::json!({"active": false}))
    );

    // Revoke the lease: the same token is now inactive, with nothing else said.
    env.client
        .clone()
        .revoke(authed(
            RevokeRequest {
                lease_id: minted["lease_id"].as_str().unwrap().into(),
                lease_secret: minted["lease_secret"].as_str().unwrap().into(),
            },
            "",
        ))
        .await
        .unwrap();
    let (s, body, _) = post(&env, "/v1/introspect", Some(&ops), &[("token", access)]).await;
    assert_eq!((s, body), (200, serde_json::json!({"active": false})));
    let (s, body, _) = post(&env, "/v1/introspect", Some(&ops), &[("token", "x.y.z")]).await;
    assert_eq!((s, body), (200, serde_json::json!({"active": false})));

    // Every introspection is audited with the checked token's fingerprint, never the token.
    let recs = env.records().await;
    let intro: Vec<_> = recs
        .iter()
        .filter(|r| r.entry.action == "introspect")
        .collect();
    assert_eq!(intro.len(), 7, "{intro:#?}");
    assert!(intro.iter().any(|r| r.entry.outcome == "denied"
        && r.entry.target.as_deref() == Some("reports")
        && r.entry.reason.as_deref() == Some("role introspect not granted")));
    let db = common::all_bytes_under(env.dir.path());
    assert!(!common::contains(&db, access));
    env.stop().await;
}

#[tokio::test]
async fn a_body_sent_a_byte_at_a_time_is_cut_off_at_the_body_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = Env::start_full(
        "",
        "",
        "[limits]\nbody_timeout = \"500ms\"\nrequest_timeout = \"30s\"\n",
        Arc::new(SystemClock),
    )
    .await;
    let addr = env.http.trim_start_matches("http://").to_string();
    let started = std::time::Instant::now();
    let mut slow = Vec::new();
    for _ in 0..10 {
        let addr = addr.clone();
        slow.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            s.write_all(
                b"POST /v1/token HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: 400\r\n\r\n",
            )
            .await
            .unwrap();
            // One byte every 100 ms: the body would take 40 s.
            for _ in 0..400 {
                if s.write_all(b"a").await.is_err() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                let mut buf = [0u8; 512];
                if let Ok(Ok(n)) =
                    tokio::time::timeout(std::time::Duration::from_millis(1), s.read(&mut buf))
                        .await
                {
                    if n > 0 {
                        return String::from_utf8_lossy(&buf[..n]).into_owned();
                    }
                }
            }
            String::new()
        }));
    }
    // Meanwhile an ordinary exchange is served.
    let (s, _) = exchange(&env, &env.token("main"), &[("audience", "orders-api")]).await;
    assert_eq!(s, 200);
    for t in slow {
        let answer = t.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(
            answer.contains("request body not received in time"),
            "{answer}"
        );
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "cut off at the body timeout, not the request timeout: {:?}",
        started.elapsed()
    );
    env.stop().await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_budget() {
    let env = Env::start_full(
        "",
        "",
        "[limits]\ntrusted_proxies = [\"127.0.0.0/8\"]\nunidentified_rate = 0.01\nunidentified_burst = 2\n",
        Arc::new(SystemClock),
    )
    .await;
    let junk = |client: &'static str| {
        let url = format!("{}/v1/token", env.http);
        async move {
            reqwest::Client::new()
                .post(url)
                .header("x-forwarded-for", client)
                .form(&[
                    ("grant_type", EXCHANGE),
                    ("subject_token", "junk"),
                    ("subject_token_type", JWT),
                    ("audience", "orders-api"),
                ])
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // 198.51.100.1 spends its allowance (2, and the one that spends it) and is refused.
    let statuses = [
        junk("198.51.100.1").await,
        junk("198.51.100.1").await,
        junk("198.51.100.1").await,
        junk("198.51.100.1").await,
    ];
    assert_eq!(statuses[3], 429, "{statuses:?}");
    assert!(statuses[..3].iter().all(|s| *s != 429), "{statuses:?}");
    // Another client behind the same proxy is not.
    assert_ne!(junk("198.51.100.2").await, 429);
    // A client cannot pick its address by writing one further left: the proxy's hop
    // (the rightmost untrusted one) is what counts.
    assert_eq!(junk("203.0.113.9, 198.51.100.1").await, 429);
    // The same on gRPC.
    let grpc = |client: &'static str| {
        let mut c = env.client.clone();
        async move {
            let mut req = authed(
                latchkey::transport::pb::MintRequest {
                    target: "orders-api".into(),
                    ..Default::default()
                },
                "junk",
            );
            req.metadata_mut()
                .insert("x-forwarded-for", client.parse().unwrap());
            c.mint(req).await.unwrap_err().code()
        }
    };
    for _ in 0..3 {
        assert_eq!(grpc("198.51.100.3").await, tonic::Code::Unauthenticated);
    }
    assert_eq!(grpc("198.51.100.3").await, tonic::Code::ResourceExhausted);
    assert_eq!(grpc("198.51.100.4").await, tonic::Code::Unauthenticated);
    env.stop().await;
}
