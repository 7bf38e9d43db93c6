//! Operability through the real server: health (HTTP and grpc.health.v1), server
//! reflection, metrics, limits.

mod common;

use common::Env;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn health(env: &Env, service: &str) -> i32 {
    HealthClient::new(env.channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

async fn wait_health(env: &Env, service: &str, want: ServingStatus) {
    for _ in 0..100 {
        if health(env, service).await == want as i32 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{service:?} never became {want:?}");
}

#[tokio::test]
async fn grpc_health_follows_readiness() {
    let env = Env::start().await;
    env.mint(&env.token("main"), "orders-api", &[], None)
        .await
        .unwrap();
    wait_health(&env, "", ServingStatus::Serving).await;
    wait_health(&env, "latchkey.v1.CredentialBroker", ServingStatus::Serving).await;
    let unknown = HealthClient::new(env.channel.clone())
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // A store that cannot commit makes the broker unready on both faces, and it
    // recovers without a restart.
    env.sqlite.set_read_only(true).await.unwrap();
    wait_health(&env, "", ServingStatus::NotServing).await;
    let r = reqwest::get(format!("{}/readyz", env.http)).await.unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["checks"]["store"]["ok"], false, "{body}");
    assert_eq!(body["checks"]["issuers"]["bb"]["ok"], true, "{body}");
    assert_eq!(body["checks"]["signing_keys"]["ok"], true, "{body}");
    env.sqlite.set_read_only(false).await.unwrap();
    wait_health(&env, "", ServingStatus::Serving).await;
    assert_eq!(
        reqwest::get(format!("{}/readyz", env.http))
            .await
            .unwrap()
            .status(),
        200
    );
    env.stop().await;
}

#[tokio::test]
async fn readyz_names_an_issuer_that_never_answered() {
    let env = Env::start().await;
    env.mint(&env.token("main"), "orders-api", &[], None)
        .await
        .unwrap();
    let body: serde_json::Value = reqwest::get(format!("{}/readyz", env.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["status"], "ready", "{body}");
    assert!(body["checks"]["issuers"]["bb"]["keys"].as_u64().unwrap() >= 1);

    // A broker whose only issuer is unreachable from the start is not ready, and says why.
    let mut down = Env::start().await;
    down.issuer.shutdown();
    let late = latchkey::server::start(
        &{
            let mut c = down.config.clone();
            c.store.location = latchkey::store::Location::Sqlite(down.dir.path().join("other.db"));
            c
        },
        &latchkey::keys::MasterKey::generate(),
        std::sync::Arc::new(latchkey::clock::SystemClock),
    )
    .await
    .unwrap();
    let r = reqwest::get(format!("http://{}/readyz", late.http_addr))
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["checks"]["issuers"]["bb"]["ok"], false, "{body}");
    assert!(
        body["checks"]["issuers"]["bb"]["reason"].is_string(),
        "{body}"
    );
    late.shutdown().await;
    down.stop().await;
    env.stop().await;
}

#[tokio::test]
async fn reflection_lists_every_service() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let env = Env::start().await;
    let mut client = ServerReflectionClient::new(env.channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "latchkey.v1.CredentialBroker",
        "latchkey.v1.Leases",
        "latchkey.v1.Audit",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }

    // The descriptors resolve, so a tool can build requests without the .proto files.
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "latchkey.v1.CredentialBroker".into(),
        )),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    assert!(matches!(
        resp.message_response,
        Some(MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty()
    ));
    env.stop().await;
}

async fn scrape(env: &Env) -> String {
    let r = reqwest::get(format!("{}/metrics", env.http)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    r.text().await.unwrap()
}

/// The value of the sample `name` (with its labels, exactly as exposed), or 0.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_move_with_traffic() {
    let env = Env::start().await;
    let before = scrape(&env).await;
    let allowed = "latchkey_mints_total{target=\"orders-api\",outcome=\"allowed\"}";
    assert_eq!(sample(&before, allowed), 0.0);

    let token = env.token("main");
    env.mint(&token, "orders-api", &[], None).await.unwrap();
    env.mint(&token, "orders-api", &[], None).await.unwrap();
    env.mint(&token, "made-up-target", &[], None)
        .await
        .unwrap_err();
    env.mint(&env.token("experimental/x"), "orders-api", &[], None)
        .await
        .unwrap_err();

    let after = scrape(&env).await;
    assert_eq!(sample(&after, allowed), 2.0, "{after}");
    assert_eq!(
        sample(
            &after,
            "latchkey_mints_total{target=\"(unknown)\",outcome=\"denied\"}"
        ),
        1.0,
        "made-up targets do not become labels"
    );
    assert!(!after.contains("made-up-target"));
    assert_eq!(
        sample(&after, "latchkey_denials_total{reason=\"unknown_target\"}"),
        1.0
    );
    assert_eq!(
        sample(&after, "latchkey_denials_total{reason=\"deny_rule\"}"),
        1.0
    );
    for stage in ["verify", "decide", "mint", "audit_commit", "total"] {
        let n = sample(
            &after,
            &format!("latchkey_mint_stage_duration_seconds_count{{stage=\"{stage}\"}}"),
        );
        assert!(n >= 2.0, "stage {stage}: {n}");
    }
    assert!(sample(&after, "latchkey_audit_batch_size_count") >= 4.0);
    assert!(sample(&after, "latchkey_audit_commit_duration_seconds_count") >= 4.0);
    assert_eq!(
        sample(&after, "latchkey_live_leases{target=\"orders-api\"}"),
        2.0
    );
    assert_eq!(
        sample(&after, "latchkey_live_leases{target=\"reports\"}"),
        0.0
    );
    assert!(sample(&after, "latchkey_jwks_refreshes_total{issuer=\"bb\"}") >= 1.0);
    assert!(sample(&after, "latchkey_jwks_keys{issuer=\"bb\"}") >= 1.0);
    assert!(sample(&after, "latchkey_audit_head_seq") >= 4.0);
    // No secrets in the exposition.
    assert!(!after.contains(&token));
    env.stop().await;
}

const TIGHT_IDENTITY: &str = "\n[limits]\nidentity_rate = 1\nidentity_burst = 2\n";

#[tokio::test]
async fn identity_rate_limit_is_hit_audited_and_recovered() {
    let env = Env::start_full(
        "jwks_cooldown = \"0s\"",
        "",
        TIGHT_IDENTITY,
        std::sync::Arc::new(latchkey::clock::SystemClock),
    )
    .await;
    let token = env.token("main");
    env.mint(&token, "orders-api", &[], None).await.unwrap();
    env.mint(&token, "orders-api", &[], None).await.unwrap();
    let e = env.mint(&token, "orders-api", &[], None).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(e.message().contains("rate limit"), "{}", e.message());
    assert_eq!(e.metadata().get("retry-after").unwrap(), "1");

    // The same identity over HTTP shares the allowance: 429 with Retry-After.
    let r = common::exchange(&env.http, &token, "orders-api", &[]).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");

    // Another identity is unaffected (its request is decided, and policy refuses it);
    // the first recovers after the wait.
    let mut other = env.claims("main");
    other["repositoryUuid"] = serde_json::json!("{other-repo}");
    let e = env
        .mint(&env.issuer.sign(&other), "orders-api", &[], None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    env.mint(&token, "orders-api", &[], None)
        .await
        .expect("allowed again after the wait");

    let recs = env.records().await;
    let limited: Vec<_> = recs
        .iter()
        .filter(|r| {
            r.entry
                .reason
                .as_deref()
                .is_some_and(|x| x.contains("rate limit"))
        })
        .collect();
    assert_eq!(limited.len(), 2, "each refusal audited");
    assert!(limited
        .iter()
        .all(|r| r.entry.outcome == "denied" && r.entry.identity_key.is_some()));
    let m = scrape(&env).await;
    assert_eq!(
        sample(&m, "latchkey_rate_limited_total{scope=\"identity\"}"),
        2.0
    );
    env.stop().await;
}

#[tokio::test]
async fn source_address_rate_limit_applies_before_anything_else() {
    let env = Env::start_full(
        "jwks_cooldown = \"0s\"",
        "",
        "\n[limits]\nsource_ip_rate = 1\nsource_ip_burst = 3\n",
        std::sync::Arc::new(latchkey::clock::SystemClock),
    )
    .await;
    // The burst passes to the handler (which refuses the garbage token); then the
    // address is refused before its token is looked at.
    let mut codes = Vec::new();
    let mut refused = None;
    for _ in 0..20 {
        match env.mint("garbage", "orders-api", &[], None).await {
            Ok(_) => panic!("garbage token minted"),
            Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                refused = Some(e);
                break;
            }
            Err(e) => codes.push(e.code()),
        }
    }
    assert!(codes.len() >= 3, "{codes:?}");
    assert!(codes.iter().all(|c| *c == tonic::Code::Unauthenticated));
    let refused = refused.expect("the address was limited");
    assert!(refused.message().contains("this address"));
    assert!(refused.metadata().contains_key("retry-after"));
    let r = reqwest::Client::new()
        .post(format!("{}/v1/token", env.http))
        .form(&[("grant_type", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    // Health, metrics and JWKS are not limited: probes and verifiers keep working.
    assert_eq!(
        reqwest::get(format!("{}/healthz", env.http))
            .await
            .unwrap()
            .status(),
        200
    );
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let e = env
        .mint("garbage", "orders-api", &[], None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "recovered");
    env.stop().await;
}

#[tokio::test]
async fn reload_applies_rules_and_refuses_bad_or_fixed_changes() {
    let env = Env::start().await;
    let path = env.dir.path().join("latchkey.toml");
    let original = common::config_text(
        env.issuer.issuer_url(),
        &env.issuer.audience(),
        &env.db.display().to_string(),
        "jwks_cooldown = \"0s\"",
        "busy_timeout = \"300ms\"",
    );
    let applied: toml::Value = toml::from_str(&original).unwrap();
    let running = env.running.as_ref().unwrap();
    let wip = env.token("wip/x");
    let e = env.mint(&wip, "team-api", &[], None).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    // A new rule: applied, and the next request is decided by it.
    let more = format!(
        "{original}\n[[rules]]\nname = \"wip-team\"\nissuer = \"bb\"\nclaims = {{ branchName = {{ glob = \"wip/*\" }} }}\ngrants = [{{ target = \"team-api\" }}]\n"
    );
    std::fs::write(&path, &more).unwrap();
    let applied = running.reload(&path, &applied).await.unwrap();
    env.mint(&wip, "team-api", &[], None).await.unwrap();

    // Invalid: refused, the rule above keeps working.
    std::fs::write(
        &path,
        more.replace(
            "grants = [{ target = \"team-api\" }]",
            "grants = [{ target = \"nope\" }]",
        ),
    )
    .unwrap();
    let e = running.reload(&path, &applied).await.unwrap_err();
    assert!(e.to_string().contains("no target named"), "{e}");
    env.mint(&wip, "team-api", &[], None).await.unwrap();

    // A section that cannot change while serving: refused, naming it.
    std::fs::write(
        &path,
        more.replace("max_ttl = \"30m\"", "max_ttl = \"31m\""),
    )
    .unwrap();
    let e = running.reload(&path, &applied).await.unwrap_err();
    assert!(e.to_string().contains("[targets] changed"), "{e}");

    let reloads: Vec<_> = env
        .records()
        .await
        .into_iter()
        .filter(|r| r.entry.action == "config_reload")
        .collect();
    assert_eq!(reloads.len(), 3);
    assert_eq!(reloads[0].entry.outcome, "allowed");
    assert!(reloads[0].entry.context.contains_key("rules_sha256"));
    assert_eq!(reloads[1].entry.outcome, "denied");
    assert!(reloads[2]
        .entry
        .reason
        .as_deref()
        .unwrap()
        .contains("restart"));
    env.stop().await;
}

/// A minter that takes its time, so requests are in flight when shutdown begins.
#[derive(Debug)]
struct Slow(std::time::Duration);

#[async_trait::async_trait]
impl latchkey::mint::Minter for Slow {
    fn kind(&self) -> &'static str {
        "slow"
    }
    async fn mint(
        &self,
        ctx: &latchkey::mint::MintContext<'_>,
    ) -> Result<latchkey::mint::Credential, latchkey::mint::MintError> {
        tokio::time::sleep(self.0).await;
        Ok(latchkey::mint::Credential {
            kind: "slow",
            token: Some(latchkey::secret::SecretString::new(format!(
                "slow-{}",
                ctx.lease_id
            ))),
            username: None,
            password: None,
            fields: Default::default(),
            expires_at: ctx.now + ctx.ttl.as_secs() as i64,
            id: ctx.lease_id.to_string(),
            upstream: None,
        })
    }
}

fn slow(d: std::time::Duration) -> Vec<(String, std::sync::Arc<dyn latchkey::mint::Minter>)> {
    vec![("reports".into(), std::sync::Arc::new(Slow(d)))]
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests_on_both_ports() {
    let mut env = Env::start_with_minters(
        "",
        "",
        "\n[limits]\nidentity_rate = 0\nsource_ip_rate = 0\n",
        std::sync::Arc::new(latchkey::clock::SystemClock),
        slow(std::time::Duration::from_millis(700)),
    )
    .await;
    let token = env.token("main");
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (token, http, mut client) = (token.clone(), env.http.clone(), env.client.clone());
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                let r = client
                    .mint(common::authed(
                        latchkey::transport::pb::MintRequest {
                            target: "reports".into(),
                            ..Default::default()
                        },
                        &token,
                    ))
                    .await
                    .expect("in-flight gRPC mint completes");
                r.into_inner().lease.unwrap().id
            } else {
                let r = common::exchange(&http, &token, "reports", &[]).await;
                assert_eq!(r.status(), 200, "in-flight HTTP exchange completes");
                let body: serde_json::Value = r.json().await.unwrap();
                body["lease_id"].as_str().unwrap().to_string()
            }
        }));
    }
    // Every request is inside the slow minter when shutdown begins.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let shutdown = tokio::spawn(env.running.take().unwrap().shutdown());
    let mut leases = Vec::new();
    for t in tasks {
        leases.push(t.await.unwrap());
    }
    shutdown.await.unwrap();
    // After shutdown nothing is accepted.
    assert!(reqwest::get(format!("{}/healthz", env.http)).await.is_err());

    // Every credential handed out has its committed record, and the chain is whole.
    let recs = latchkey::store::sqlite::audit::query_file(
        &env.db,
        &latchkey::audit::AuditQuery {
            action: Some("mint".into()),
            ..Default::default()
        },
        1000,
    )
    .unwrap();
    for l in &leases {
        assert!(
            recs.iter()
                .any(|r| r.entry.lease_id.as_deref() == Some(l.as_str())
                    && r.entry.outcome == "allowed"),
            "lease {l} has no audit record"
        );
    }
    assert_eq!(recs.len(), 16);
    let report = latchkey::store::sqlite::audit::verify_file(&env.db, &Default::default()).unwrap();
    assert!(report.intact(), "{report}");
}

#[tokio::test]
async fn a_request_past_the_timeout_is_cut_off_cleanly_on_both_ports() {
    let env = Env::start_with_minters(
        "",
        "",
        "\n[limits]\nrequest_timeout = \"1s\"\n",
        std::sync::Arc::new(latchkey::clock::SystemClock),
        slow(std::time::Duration::from_secs(3)),
    )
    .await;
    let token = env.token("main");
    let r = common::exchange(&env.http, &token, "reports", &[]).await;
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error_description"], "request timed out");
    let e = env.mint(&token, "reports", &[], None).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Cancelled, "{e:?}");
    // The broker is still serving.
    assert_eq!(
        reqwest::get(format!("{}/healthz", env.http))
            .await
            .unwrap()
            .status(),
        200
    );
    env.stop().await;
}

/// A TCP connection to the broker's gRPC port from the loopback address `from`, which
/// sends nothing (an attacker holding a slot).
async fn silent_socket(env: &Env, from: &str) -> tokio::net::TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(format!("{from}:0").parse().unwrap()).unwrap();
    s.connect(env.running.as_ref().unwrap().grpc_addr)
        .await
        .unwrap()
}

/// Whether the server closes `s` within `within` (a read ends or fails).
async fn closed_within(s: &mut tokio::net::TcpStream, within: std::time::Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(within, s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// A Mint over a new connection from 127.0.0.1, which must answer within `within`.
async fn fresh_mint(env: &Env, within: std::time::Duration) -> Result<(), String> {
    let addr = env.running.as_ref().unwrap().grpc_addr;
    let attempt = async {
        let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut c =
            latchkey::transport::pb::credential_broker_client::CredentialBrokerClient::new(ch);
        let req = latchkey::transport::pb::MintRequest {
            target: "orders-api".into(),
            scopes: vec!["orders:read".into()],
            ..Default::default()
        };
        c.mint(common::authed(req, &env.token("main")))
            .await
            .map(|_| ())
            .map_err(|e| format!("mint: {e}"))
    };
    tokio::time::timeout(within, attempt)
        .await
        .map_err(|_| format!("no answer within {within:?}"))?
}

#[tokio::test]
async fn silent_sockets_from_one_source_cannot_take_every_grpc_slot() {
    let env = Env::start_full(
        "jwks_cooldown = \"0s\"",
        "",
        "\n[limits]\nmax_connections = 20\nmax_connections_per_source = 5\nhandshake_timeout = \"30s\"\n",
        std::sync::Arc::new(latchkey::clock::SystemClock),
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(silent_socket(&env, "127.0.0.2").await);
    }
    // The source's budget is 5: the other 15 are closed at once.
    let mut closed = 0;
    for s in held.iter_mut() {
        if closed_within(s, std::time::Duration::from_millis(300)).await {
            closed += 1;
        }
    }
    assert_eq!(
        closed, 15,
        "connections past the source's budget are closed"
    );
    // Another client still gets a connection and an answer well inside the deadline.
    fresh_mint(&env, std::time::Duration::from_secs(5))
        .await
        .unwrap();
    drop(held);
    env.stop().await;
}

#[tokio::test]
async fn a_socket_without_the_http2_preface_is_closed_at_the_handshake_deadline() {
    use tokio::io::AsyncWriteExt;
    let env = Env::start_full(
        "jwks_cooldown = \"0s\"",
        "",
        "\n[limits]\nmax_connections = 20\nmax_connections_per_source = 100\nhandshake_timeout = \"500ms\"\n",
        std::sync::Arc::new(latchkey::clock::SystemClock),
    )
    .await;
    // Every slot but the test client's own is taken by a socket that sends nothing.
    let mut held = Vec::new();
    for _ in 0..19 {
        held.push(silent_socket(&env, "127.0.0.3").await);
    }
    // Something that is not HTTP/2 is closed as soon as its first bytes are read.
    let mut junk = silent_socket(&env, "127.0.0.4").await;
    junk.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let t = std::time::Instant::now();
    for s in held.iter_mut() {
        assert!(
            closed_within(s, std::time::Duration::from_secs(5)).await,
            "a silent socket outlived the handshake deadline"
        );
    }
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
    assert!(closed_within(&mut junk, std::time::Duration::from_secs(2)).await);
    // The slots are free again, and the connection that did speak HTTP/2 kept working.
    fresh_mint(&env, std::time::Duration::from_secs(5))
        .await
        .unwrap();
    env.mint(&env.token("main"), "orders-api", &["orders:read"], None)
        .await
        .unwrap();
    env.stop().await;
}

#[tokio::test]
async fn readyz_shows_an_issuer_whose_refreshes_fail_while_its_last_keys_serve() {
    let env = Env::start().await;
    env.mint(&env.token("main"), "orders-api", &["orders:read"], None)
        .await
        .unwrap();
    let issuer = |env: &Env| {
        let url = format!("{}/readyz", env.http);
        async move {
            let r = reqwest::get(url).await.unwrap();
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap();
            (status, body["checks"]["issuers"]["bb"].clone())
        }
    };
    let (status, bb) = issuer(&env).await;
    assert_eq!(
        (status, &bb["ok"], &bb["serving"]),
        (200, &true.into(), &true.into()),
        "{bb}"
    );
    assert!(bb.get("reason").is_none(), "{bb}");

    // The issuer goes down; a token with a key it never published makes the broker try.
    env.issuer.set_down(true);
    env.issuer.rotate(latchkey::jose::Alg::RS256, true);
    assert!(env
        .mint(&env.token("main"), "orders-api", &["orders:read"], None)
        .await
        .is_err());
    let (status, bb) = issuer(&env).await;
    assert_eq!(status, 200, "the last good keys still serve: {bb}");
    assert_eq!(bb["ok"], false, "{bb}");
    assert_eq!(bb["serving"], true, "{bb}");
    assert!(bb["reason"].as_str().unwrap().contains("jwks"), "{bb}");
    assert!(bb["failures"].as_u64().unwrap() >= 1, "{bb}");

    // Back up: the next refresh clears it.
    env.issuer.set_down(false);
    env.mint(&env.token("main"), "orders-api", &["orders:read"], None)
        .await
        .unwrap();
    let (_, bb) = issuer(&env).await;
    assert_eq!(bb["ok"], true, "{bb}");
    assert!(bb.get("reason").is_none(), "{bb}");
    env.stop().await;
}

#[tokio::test]
async fn grpc_health_is_serving_as_soon_as_the_broker_is_ready() {
    let env = Env::start().await;
    let started = std::time::Instant::now();
    wait_health(&env, "", ServingStatus::Serving).await;
    // Readiness is checked every 100 ms until the first time it holds (it was every 2 s,
    // so probes saw NOT_SERVING for 2 s after a start while Mint already worked).
    assert!(
        started.elapsed() < std::time::Duration::from_millis(1500),
        "SERVING after {:?}",
        started.elapsed()
    );
    env.mint(&env.token("main"), "orders-api", &["orders:read"], None)
        .await
        .unwrap();
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_held_by_another_process_keeps_probes_scrapes_and_reads_answering() {
    let env = Env::start_with("", "busy_timeout = \"2s\"").await;
    let caller = env.token("main");
    let minted = env.mint(&caller, "orders-api", &[], None).await.unwrap();
    let token = minted.credential.unwrap().token;
    let lease_id = minted.lease.unwrap().id;
    let within = |d: u64| std::time::Duration::from_millis(d);
    let ready = |env: &Env| {
        let url = format!("{}/readyz", env.http);
        async move {
            let r = reqwest::get(url).await.unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    assert_eq!(ready(&env).await.0, 200);

    // Another process takes the write lock and keeps it.
    let db = env.dir.path().join("latchkey.db");
    let (release, hold) = std::sync::mpsc::channel::<()>();
    let (held, is_held) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch("BEGIN EXCLUSIVE; INSERT INTO meta(key, value) VALUES ('held', '1')")
            .unwrap();
        held.send(()).unwrap();
        let _ = hold.recv();
        c.execute_batch("ROLLBACK").unwrap();
    });
    is_held.recv().unwrap();
    // Writes arrive and wait on the lock in the store's writer (each batch up to the
    // busy timeout): what probes, scrapes and reads must not queue behind.
    let mut writes = Vec::new();
    for _ in 0..3 {
        let (client, caller) = (env.client.clone(), caller.clone());
        writes.push(tokio::spawn(async move {
            let mut c = client;
            let req = common::authed(
                latchkey::transport::pb::MintRequest {
                    target: "orders-api".into(),
                    ..Default::default()
                },
                &caller,
            );
            c.mint(req).await.map(|_| ()).map_err(|e| e.code())
        }));
    }
    tokio::time::sleep(within(200)).await;

    // Probes answer within a second, and say why.
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let (status, body) = ready(&env).await;
        assert!(started.elapsed() < within(1500), "{:?}", started.elapsed());
        assert_eq!(status, 503, "{body}");
        let reason = body["checks"]["store"]["reason"].as_str().unwrap_or("");
        assert!(
            reason.starts_with("store busy") || reason.contains("locked"),
            "{body}"
        );
    }
    // Scrapes answer too, from what the broker holds.
    let started = std::time::Instant::now();
    let metrics = reqwest::get(format!("{}/metrics", env.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(started.elapsed() < within(1500), "{:?}", started.elapsed());
    assert!(metrics.contains("latchkey_audit_head_seq"), "{metrics}");
    // Reads do not queue behind the stuck writer.
    let started = std::time::Instant::now();
    let lease = env.broker().store().lease(&lease_id).await.unwrap();
    assert!(lease.is_some());
    assert!(started.elapsed() < within(1000), "{:?}", started.elapsed());
    // A mint fails closed, UNAVAILABLE, within one busy timeout (2 s here): queued behind
    // a batch that timed out on the lock, it fails with it instead of waiting again.
    let started = std::time::Instant::now();
    let e = env
        .mint(&caller, "orders-api", &[], None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    // (Two timeouts, what a queued write waited before, measured 5.25 s here.)
    assert!(started.elapsed() < within(4000), "{:?}", started.elapsed());
    let _ = token;

    for w in writes {
        assert_eq!(
            w.await.unwrap(),
            Err(tonic::Code::Unavailable),
            "failed closed"
        );
    }

    // Released: ready again, without a restart.
    release.send(()).unwrap();
    holder.join().unwrap();
    let start = std::time::Instant::now();
    loop {
        if ready(&env).await.0 == 200 {
            break;
        }
        assert!(start.elapsed() < within(5000), "not ready again");
        tokio::time::sleep(within(100)).await;
    }
    env.mint(&caller, "orders-api", &[], None).await.unwrap();
    env.stop().await;
}
