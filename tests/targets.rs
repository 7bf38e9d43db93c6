//! Target kinds through the real server over gRPC: Pulsar and Airflow tokens verified
//! the way those systems verify them (with an independent JWT library), and the SaaS
//! kinds (Databricks, Vercel, Prefect, Bitbucket, generic OAuth2) against strict local
//! fakes of their documented APIs, including their failures (401, 429, 500, timeouts,
//! a garbled success), which must surface as clear codes, leave nothing half-made
//! upstream, and be audited.

mod common;

use common::fakes::{verify_jwt, Fake, Fault, Service};
use common::{all_bytes_under, authed, contains, Env};
use latchkey::clock::{Clock, SystemClock};
use latchkey::devissuer::DEV_REPOSITORY;
use latchkey::transport::pb::RevokeRequest;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use tonic::Code;

const ISSUER_URL: &str = "http://127.0.0.1:9/latchkey";

fn allow(name: &str, target: &str, scopes: &[&str]) -> String {
    format!(
        "\n[[rules]]\nname = \"{name}\"\nissuer = \"bb\"\nclaims = {{ repositoryUuid = \"{DEV_REPOSITORY}\" }}\ngrants = [{{ target = \"{target}\", scopes = {scopes:?} }}]\n"
    )
}

fn secret_file(dir: &Path, name: &str, value: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, value).unwrap();
    p.display().to_string()
}

async fn start(extra: &str) -> Env {
    Env::start_full(
        "jwks_cooldown = \"0s\"",
        "busy_timeout = \"300ms\"",
        extra,
        Arc::new(SystemClock),
    )
    .await
}

async fn revoke(env: &Env, token: &str, lease_id: &str) {
    env.client
        .clone()
        .revoke(authed(
            RevokeRequest {
                lease_id: lease_id.into(),
                lease_secret: String::new(),
            },
            token,
        ))
        .await
        .unwrap();
}

fn pem_of_pulsar_key(data_url: &str) -> String {
    let b64 = data_url.strip_prefix("data:;base64,").unwrap();
    let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
    for c in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(c).unwrap());
        pem.push('\n');
    }
    pem + "-----END PUBLIC KEY-----\n"
}

#[tokio::test(flavor = "multi_thread")]
async fn pulsar_tokens_verify_as_pulsar_does_with_the_exported_public_key() {
    let mut extra = String::from(
        r#"
[[targets]]
name = "pulsar-rs"
kind = "pulsar"
audience_claim = "aud"
audience = "pulsar-cluster-1"
roles = { "orders-producer" = "orders-writer", "orders-consumer" = "orders-reader" }

[[targets]]
name = "pulsar-ec"
kind = "pulsar"
algorithm = "ES256"
role = "bb-{repositoryUuid}"
"#,
    );
    extra += &allow(
        "pulsar-rs",
        "pulsar-rs",
        &["orders-producer", "orders-consumer"],
    );
    extra += &allow("pulsar-ec", "pulsar-ec", &["any"]);
    let env = start(&extra).await;
    let caller = env.token("main");

    // What Pulsar does with tokenPublicKey + tokenPublicAlg=RS256, tokenAudienceClaim=aud,
    // tokenAudience=pulsar-cluster-1: check signature, exp and audience, take the role
    // from `sub`.
    let cfg_path = env.dir.path().join("latchkey.toml");
    std::fs::write(&cfg_path, &env.text).unwrap();
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
            .args(["keys", "export", "--config"])
            .arg(&cfg_path)
            .args(["--target", "pulsar-rs", "--format", "pulsar"])
            .env("LATCHKEY_MASTER_KEY", &env.master_b64)
            .output()
            .unwrap()
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exported = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let signer = env.broker().keys().signer("pulsar-rs").unwrap();
    assert_eq!(
        exported,
        latchkey::mint::pulsar_public_key(&signer).unwrap()
    );

    let m = env
        .mint(&caller, "pulsar-rs", &["orders-producer"], Some(600))
        .await
        .unwrap();
    let cred = m.credential.unwrap();
    assert_eq!(cred.kind, "pulsar");
    assert_eq!(cred.fields["role"], "orders-writer");
    let key =
        jsonwebtoken::DecodingKey::from_rsa_pem(pem_of_pulsar_key(&exported).as_bytes()).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.set_audience(&["pulsar-cluster-1"]);
    v.set_required_spec_claims(&["exp", "sub"]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(&cred.token, &key, &v)
        .unwrap()
        .claims;
    assert_eq!(claims["sub"], "orders-writer");
    let exp = claims["exp"].as_i64().unwrap();
    let now = SystemClock.now();
    assert!(exp > now + 590 && exp <= now + 601, "exp {exp}");
    // The wrong audience is refused as Pulsar would.
    v.set_audience(&["another-cluster"]);
    assert!(jsonwebtoken::decode::<serde_json::Value>(&cred.token, &key, &v).is_err());

    // A token carries one role: two scopes naming two roles is a clear refusal.
    let e = env
        .mint(
            &caller,
            "pulsar-rs",
            &["orders-producer", "orders-consumer"],
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("ask for one scope"), "{}", e.message());

    // ES256 with a role from the caller's claims.
    let ec = env.broker().keys().signer("pulsar-ec").unwrap();
    let pem = pem_of_pulsar_key(&latchkey::mint::pulsar_public_key(&ec).unwrap());
    let m = env
        .mint(&caller, "pulsar-ec", &["any"], None)
        .await
        .unwrap();
    let key = jsonwebtoken::DecodingKey::from_ec_pem(pem.as_bytes()).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.validate_aud = false;
    let claims = jsonwebtoken::decode::<serde_json::Value>(&m.credential.unwrap().token, &key, &v)
        .unwrap()
        .claims;
    assert_eq!(claims["sub"], format!("bb-{DEV_REPOSITORY}"));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pulsar_hs256_shared_secret_and_a_custom_role_claim() {
    let secrets = tempfile::tempdir().unwrap();
    let key: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    let path = secret_file(secrets.path(), "pulsar.key", &key);
    let mut extra = format!(
        r#"
[[targets]]
name = "pulsar-hs"
kind = "pulsar"
algorithm = "HS256"
secret_key_file = "{path}"
role_claim = "role"
role = "ci"
"#
    );
    extra += &allow("pulsar-hs", "pulsar-hs", &["p"]);
    let env = start(&extra).await;
    let m = env
        .mint(&env.token("main"), "pulsar-hs", &["p"], None)
        .await
        .unwrap();
    let token = m.credential.unwrap().token;
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.validate_aud = false;
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(&key),
        &v,
    )
    .unwrap()
    .claims;
    assert_eq!(claims["role"], "ci");
    assert!(
        claims["exp"].as_i64().is_some(),
        "Pulsar tokens always expire"
    );
    // The shared secret is nowhere in the store.
    let hay = all_bytes_under(env.dir.path());
    assert!(!hay.windows(key.len()).any(|w| w == key.as_slice()));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pulsar_per_lease_permissions_are_granted_and_revoked() {
    let fake = Fake::spawn(Service::PulsarAdmin {
        token: "pulsar-admin-token-xyz".into(),
    })
    .await;
    let secrets = tempfile::tempdir().unwrap();
    let path = secret_file(secrets.path(), "admin", b"pulsar-admin-token-xyz\n");
    let mut extra = format!(
        r#"
[[targets]]
name = "pulsar-lease"
kind = "pulsar"
admin_url = "{url}"
admin_token_file = "{path}"
timeout = "500ms"
permissions = {{ "produce-orders" = {{ resource = "persistent://acme/orders/created", actions = ["produce"] }}, "read-ns" = {{ resource = "acme/orders", actions = ["consume"] }} }}
"#,
        url = fake.url
    );
    extra += &allow(
        "pulsar-lease",
        "pulsar-lease",
        &["produce-orders", "read-ns"],
    );
    let env = start(&extra).await;
    let caller = env.token("main");
    let m = env
        .mint(
            &caller,
            "pulsar-lease",
            &["produce-orders", "read-ns"],
            None,
        )
        .await
        .unwrap();
    let lease = m.lease.unwrap();
    let role = format!("latchkey-{}", lease.id);
    assert_eq!(m.credential.unwrap().fields["role"], role);
    let live = fake.live();
    assert_eq!(live.len(), 2, "{live:?}");
    assert_eq!(
        live[&format!("/admin/v2/persistent/acme/orders/created/permissions/{role}")],
        "[\"produce\"]"
    );
    assert_eq!(
        live[&format!("/admin/v2/namespaces/acme/orders/permissions/{role}")],
        "[\"consume\"]"
    );
    revoke(&env, &caller, &lease.id).await;
    assert!(
        fake.live().is_empty(),
        "revoke removes the lease's permissions"
    );

    // The admin API failing: UNAVAILABLE, nothing granted.
    fake.set_fault(Some(Fault::Status(500)));
    let e = env
        .mint(&caller, "pulsar-lease", &["produce-orders"], None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(fake.live().is_empty());
    fake.assert_no_violations();
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn airflow_tokens_verify_as_airflow_does_through_the_jwks() {
    let mut extra = String::from(
        r#"
[[targets]]
name = "airflow"
kind = "airflow"
algorithm = "ES256"
subject = "ci-{repositoryUuid}"
roles = { "dags-read" = "viewer", "dags-run" = "Op" }
"#,
    );
    extra += &allow("airflow", "airflow", &["dags-read", "dags-run"]);
    let env = start(&extra).await;
    let m = env
        .mint(&env.token("main"), "airflow", &["dags-run"], Some(300))
        .await
        .unwrap();
    let lease_id = m.lease.as_ref().unwrap().id.clone();
    let token = m.credential.unwrap().token;
    // Airflow with trusted_jwks_url, jwt_algorithm=ES256, jwt_audience=apache-airflow,
    // jwt_issuer set: kid required, alg equal to the JWK's, sub/aud/exp/iat/nbf required.
    let jwks = format!("{}/latchkey/.well-known/jwks.json", env.http);
    let claims = verify_jwt(&jwks, &token, ISSUER_URL, "apache-airflow", None)
        .await
        .unwrap();
    for c in ["sub", "aud", "exp", "iat", "nbf", "jti"] {
        assert!(claims.get(c).is_some(), "{c} missing: {claims}");
    }
    assert_eq!(claims["role"], "OP");
    // Airflow keeps revoked ids in 32 characters: the lease id without its hyphens.
    assert_eq!(claims["jti"], lease_id.replace('-', ""));
    assert_eq!(claims["jti"].as_str().unwrap().len(), 32);
    assert_eq!(claims["sub"], format!("ci-{DEV_REPOSITORY}"));
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    assert!(header.kid.is_some());
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_target_with_its_own_issuer_is_trusted_only_through_its_own_documents() {
    // Two airflow targets with one audience: `airflow-a` signs under the broker's issuer
    // and shared JWKS, `airflow-b` under its own (what the config demands of them).
    let mut extra = String::from(
        r#"
[[targets]]
name = "airflow-a"
kind = "airflow"
algorithm = "ES256"
role = "viewer"

[[targets]]
name = "airflow-b"
kind = "airflow"
algorithm = "RS256"
role = "admin"
token_issuer = "target"

[[rules]]
name = "introspectors"
issuer = "bb"
claims = { branchName = "ops/introspect" }
roles = ["introspect"]
"#,
    );
    extra += &allow("airflow-a", "airflow-a", &[]);
    extra += &allow("airflow-b", "airflow-b", &[]);
    let env = start(&extra).await;
    let mint = |t: &'static str| {
        let env = &env;
        async move {
            env.mint(&env.token("main"), t, &[], Some(300))
                .await
                .unwrap()
                .credential
                .unwrap()
                .token
        }
    };
    let (a, b) = (mint("airflow-a").await, mint("airflow-b").await);
    let b_iss = format!("{ISSUER_URL}/targets/airflow-b");
    let shared = format!("{}/latchkey/.well-known/jwks.json", env.http);
    let jwks = |t: &str| format!("{}/latchkey/targets/{t}/.well-known/jwks.json", env.http);

    // Each verifies through its own documents, with its own iss ...
    let claims = verify_jwt(&jwks("airflow-b"), &b, &b_iss, "apache-airflow", None)
        .await
        .unwrap();
    assert_eq!(claims["role"], "ADMIN");
    verify_jwt(&jwks("airflow-a"), &a, ISSUER_URL, "apache-airflow", None)
        .await
        .unwrap();
    verify_jwt(&shared, &a, ISSUER_URL, "apache-airflow", None)
        .await
        .unwrap();
    // ... and nowhere else: b's keys are not in the shared JWKS nor in a's, a's not in b's.
    let unknown = |r: Result<Value, String>| assert_eq!(r.unwrap_err(), "unknown kid");
    unknown(verify_jwt(&shared, &b, &b_iss, "apache-airflow", None).await);
    unknown(verify_jwt(&jwks("airflow-a"), &b, &b_iss, "apache-airflow", None).await);
    unknown(verify_jwt(&jwks("airflow-b"), &a, ISSUER_URL, "apache-airflow", None).await);

    // b's discovery document names its own issuer and JWKS, as OIDC discovery requires;
    // a target without its own issuer has none, and unknown targets are 404.
    let get = |path: String| async move {
        let r = reqwest::get(path).await.unwrap();
        let status = r.status().as_u16();
        (status, r.json::<Value>().await.unwrap_or(Value::Null))
    };
    let (status, doc) = get(format!(
        "{}/latchkey/targets/airflow-b/.well-known/openid-configuration",
        env.http
    ))
    .await;
    assert_eq!(status, 200);
    assert_eq!(doc["issuer"], b_iss.as_str());
    assert_eq!(doc["jwks_uri"], format!("{b_iss}/.well-known/jwks.json"));
    assert_eq!(
        doc["id_token_signing_alg_values_supported"],
        json!(["RS256"])
    );
    for path in [
        "airflow-a/.well-known/openid-configuration",
        "nope/.well-known/openid-configuration",
        "nope/.well-known/jwks.json",
    ] {
        let (status, _) = get(format!("{}/latchkey/targets/{path}", env.http)).await;
        assert_eq!(status, 404, "{path}");
    }
    // Introspection knows both issuers.
    let introspector = env.token("ops/introspect");
    for t in [&a, &b] {
        let i = env
            .broker()
            .introspect(Some(&introspector), t, "r")
            .await
            .unwrap();
        assert!(i.active, "{}", i.reason);
    }
    env.stop().await;
}

fn databricks_fake() -> Service {
    Service::Databricks {
        admin_token: "dapi-admin-very-secret".into(),
        client_id: "sp-app-123".into(),
        client_secret: "dose-m2m-very-secret".into(),
        application_id: "sp-app-123".into(),
        federation: (
            ISSUER_URL.into(),
            "databricks-federation".into(),
            format!("bb:{DEV_REPOSITORY}"),
        ),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn databricks_federation_m2m_and_pat_against_the_workspace_contract() {
    let secrets = tempfile::tempdir().unwrap();
    let fake = Fake::spawn(databricks_fake()).await;
    let ws = fake.url.clone();
    let m2m = secret_file(secrets.path(), "m2m", b"dose-m2m-very-secret");
    let pat = secret_file(secrets.path(), "pat", b"dapi-admin-very-secret\n");
    let mut extra = format!(
        r#"
[[targets]]
name = "dbx-fed"
kind = "databricks"
mode = "federation"
workspace_url = "{ws}"
client_id = "sp-app-123"
audience = "databricks-federation"
subject = "bb:{{repositoryUuid}}"

[[targets]]
name = "dbx-fed-other"
kind = "databricks"
mode = "federation"
workspace_url = "{ws}"
client_id = "sp-app-123"
audience = "databricks-federation"
subject = "another-principal"

[[targets]]
name = "dbx-m2m"
kind = "databricks"
mode = "m2m"
workspace_url = "{ws}"
client_id = "sp-app-123"
client_secret_file = "{m2m}"

[[targets]]
name = "dbx-pat"
kind = "databricks"
mode = "pat"
workspace_url = "{ws}"
token_file = "{pat}"
timeout = "500ms"

[[targets]]
name = "dbx-obo"
kind = "databricks"
mode = "pat"
workspace_url = "{ws}"
token_file = "{pat}"
application_id = "sp-app-123"
"#
    );
    for t in ["dbx-fed", "dbx-fed-other", "dbx-m2m", "dbx-pat", "dbx-obo"] {
        extra += &allow(t, t, &["all"]);
    }
    let env = start(&extra).await;
    fake.set_jwks(format!("{}/latchkey/.well-known/jwks.json", env.http));
    let caller = env.token("main");
    let now = SystemClock.now();

    // Federation: our JWT, exchanged under the service principal's federation policy.
    let m = env.mint(&caller, "dbx-fed", &["all"], None).await.unwrap();
    let cred = m.credential.unwrap();
    assert!(cred.token.starts_with("dbx-oauth-"), "{}", cred.token);
    // The lease carries the token's real lifetime (Databricks: 1 h).
    let exp = m.lease.unwrap().expires_at.unwrap().seconds;
    assert!((now + 3590..=now + 3610).contains(&exp), "{exp} vs {now}");
    // A JWT the policy does not match (wrong subject) is refused by the workspace.
    let e = env
        .mint(&caller, "dbx-fed-other", &["all"], None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("refused the broker"),
        "{}",
        e.message()
    );

    // M2M with the stored service-principal secret.
    let m = env.mint(&caller, "dbx-m2m", &["all"], None).await.unwrap();
    assert!(m.credential.unwrap().token.starts_with("dbx-oauth-"));

    // PAT: always with a lifetime; revoke deletes it.
    let m = env
        .mint(&caller, "dbx-pat", &["all"], Some(600))
        .await
        .unwrap();
    let lease = m.lease.unwrap();
    let cred = m.credential.unwrap();
    assert_eq!(fake.last_body()["lifetime_seconds"], 600);
    let id = cred.fields["token_id"].clone();
    assert_eq!(fake.live()[&id], cred.token);
    revoke(&env, &caller, &lease.id).await;
    assert!(fake.live().is_empty());
    // On behalf of a service principal.
    let m = env.mint(&caller, "dbx-obo", &["all"], None).await.unwrap();
    let id = m.credential.unwrap().fields["token_id"].clone();
    assert!(fake.live().contains_key(&format!("obo:{id}")));
    revoke(&env, &caller, &m.lease.unwrap().id).await;
    assert!(fake.live().is_empty());

    // A created token whose answer is unusable is deleted again.
    fake.set_fault(Some(Fault::Garbled));
    let e = env
        .mint(&caller, "dbx-pat", &["all"], None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(fake.live().is_empty(), "{:?}", fake.live());
    fake.set_fault(None);
    fake.assert_no_violations();
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn vercel_tokens_expire_revoke_and_the_root_token_rotates() {
    let fake = Fake::spawn(Service::Vercel {
        root_token: "vercel-root-0-very-secret".into(),
    })
    .await;
    let secrets = tempfile::tempdir().unwrap();
    let root = secret_file(secrets.path(), "root", b"vercel-root-0-very-secret\n");
    let mut extra = format!(
        r#"
[[targets]]
name = "vercel"
kind = "vercel"
api_url = "{url}"
team_id = "team_abc"
token_file = "{root}"
root_rotation = "720h"
"#,
        url = fake.url
    );
    extra += &allow("vercel", "vercel", &["deploy"]);
    // This test drives the root rotation itself: the broker's own scheduler would rotate a
    // never-rotated root at its first pass, racing the mint below on a loaded machine.
    extra += "\n[rotation]\nscheduler = false\n";
    let env = start(&extra).await;
    let caller = env.token("main");
    let now = SystemClock.now();
    let m = env
        .mint(&caller, "vercel", &["deploy"], Some(900))
        .await
        .unwrap();
    let cred = m.credential.unwrap();
    let lease = m.lease.unwrap();
    let id = cred.fields["token_id"].clone();
    assert_eq!(fake.live()[&id], cred.token);
    let ms = fake.last_body()["expiresAt"].as_i64().unwrap();
    assert!((ms / 1000 - (now + 900)).abs() <= 2, "expiresAt {ms}");
    assert!(fake.calls().iter().any(|c| c == "POST /v3/user/tokens"));
    revoke(&env, &caller, &lease.id).await;
    assert!(!fake.live().contains_key(&id));

    // Root rotation: create, verify, switch, delete the old one.
    let r = env
        .broker()
        .rotate_now(
            latchkey::broker::RotationCaller::Scheduler,
            "vercel",
            latchkey::broker::Force {
                root: true,
                drop_old: false,
            },
            "req-rotate",
        )
        .await
        .unwrap();
    assert_eq!(r.outcome, latchkey::rotation::Outcome::Rotated, "{r:?}");
    let roots = fake.state.lock().unwrap().roots.clone();
    assert_eq!(roots.len(), 1, "old root deleted: {roots:?}");
    let new_root = roots.keys().next().unwrap().clone();
    assert_ne!(new_root, "vercel-root-0-very-secret");
    let phases: Vec<String> = env
        .records()
        .await
        .iter()
        .filter(|r| r.entry.action == "rotation" && r.entry.target.as_deref() == Some("vercel"))
        .filter_map(|r| r.entry.context.get("phase").cloned())
        .collect();
    for p in ["create", "verify", "switch", "delete"] {
        assert!(phases.iter().any(|x| x == p), "{p} not audited: {phases:?}");
    }
    // Minting goes on with the new root (the fake refuses the old one).
    let m = env
        .mint(&caller, "vercel", &["deploy"], None)
        .await
        .unwrap();
    assert!(m.credential.is_some());
    // The new root is sealed in the store, never in plain text; no minted token is kept.
    let hay = all_bytes_under(env.dir.path());
    assert!(!contains(&hay, &new_root));
    assert!(!contains(&hay, "vercel-root-0-very-secret"));
    assert!(!contains(&hay, &cred.token));
    fake.assert_no_violations();
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn prefect_service_accounts_per_lease_bitbucket_and_generic_oauth2() {
    let prefect = Fake::spawn(Service::Prefect {
        account: "acct-1".into(),
        token: "pnu_admin_very_secret".into(),
    })
    .await;
    let bitbucket = Fake::spawn(Service::Bitbucket {
        client_id: "consumer-key".into(),
        client_secret: "consumer-very-secret".into(),
    })
    .await;
    let oauth = Fake::spawn(Service::OAuth2 {
        client_id: "latchkey".into(),
        client_secret: "oauth-very-secret".into(),
    })
    .await;
    let secrets = tempfile::tempdir().unwrap();
    let pt = secret_file(secrets.path(), "prefect", b"pnu_admin_very_secret");
    let bb = secret_file(secrets.path(), "bb", b"consumer-very-secret");
    let os = secret_file(secrets.path(), "oauth", b"oauth-very-secret");
    let mut extra = format!(
        r#"
[[targets]]
name = "prefect"
kind = "prefect"
api_url = "{p}/api"
account_id = "acct-1"
account_role_id = "role-developer"
roles = {{ "run-flows" = "role-developer", "admin" = "role-admin" }}
token_file = "{pt}"

[[targets]]
name = "bitbucket-code"
kind = "bitbucket"
token_url = "{b}/site/oauth2/access_token"
client_id = "consumer-key"
client_secret_file = "{bb}"
max_ttl = "2h"

[[targets]]
name = "okta"
kind = "oauth2"
grant = "client_credentials"
token_url = "{o}/token"
client_id = "latchkey"
client_secret_file = "{os}"
client_auth = "post"
audience = "api://orders"
scopes = {{ "read" = "orders.read", "write" = "orders.write" }}

[[targets]]
name = "keycloak-exchange"
kind = "oauth2"
grant = "token_exchange"
token_url = "{o}/token"
client_id = "latchkey"
client_secret_file = "{os}"
subject_audience = "keycloak"
"#,
        p = prefect.url,
        b = bitbucket.url,
        o = oauth.url
    );
    extra += &allow("prefect", "prefect", &["run-flows", "admin"]);
    extra += &allow("bitbucket-code", "bitbucket-code", &["pull"]);
    extra += &allow("okta", "okta", &["read", "write"]);
    extra += &allow("keycloak-exchange", "keycloak-exchange", &["x"]);
    let env = start(&extra).await;
    let caller = env.token("main");
    let now = SystemClock.now();

    let m = env
        .mint(&caller, "prefect", &["run-flows"], Some(600))
        .await
        .unwrap();
    let cred = m.credential.unwrap();
    assert!(cred.token.starts_with("pnu_bot-"));
    let body = prefect.last_body();
    assert_eq!(body["account_role_id"], "role-developer");
    let exp = humantime::parse_rfc3339(body["api_key_expiration"].as_str().unwrap()).unwrap();
    let exp = exp.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((exp - (now + 600)).abs() <= 2);
    revoke(&env, &caller, &m.lease.unwrap().id).await;
    assert!(prefect.live().is_empty());
    prefect.set_fault(Some(Fault::Garbled));
    let e = env
        .mint(&caller, "prefect", &["admin"], None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(prefect.live().is_empty(), "no half-made service account");
    prefect.set_fault(None);

    let m = env
        .mint(&caller, "bitbucket-code", &["pull"], None)
        .await
        .unwrap();
    let exp = m.lease.unwrap().expires_at.unwrap().seconds;
    assert!(
        (now + 7190..=now + 7210).contains(&exp),
        "Bitbucket tokens live 2 h"
    );
    assert_eq!(
        m.credential.unwrap().fields["scope"],
        "repository pullrequest"
    );

    let m = env.mint(&caller, "okta", &["read"], None).await.unwrap();
    assert!(m.credential.unwrap().token.starts_with("oauth-"));
    let body = oauth.last_body();
    assert_eq!(body["scope"], "orders.read");
    assert_eq!(body["audience"], "api://orders");
    assert_eq!(body["client_secret"], "oauth-very-secret");
    let m = env
        .mint(&caller, "keycloak-exchange", &["x"], None)
        .await
        .unwrap();
    assert!(m.credential.is_some());
    let st = oauth.last_body()["subject_token"]
        .as_str()
        .unwrap()
        .to_string();
    let jwks = format!("{}/latchkey/.well-known/jwks.json", env.http);
    let claims = verify_jwt(&jwks, &st, ISSUER_URL, "keycloak", None)
        .await
        .unwrap();
    // Without a subject template, `sub` is the caller's stable identity key.
    let sub = claims["sub"].as_str().unwrap();
    assert!(
        sub.starts_with("bb:") && sub.ends_with(DEV_REPOSITORY),
        "{sub}"
    );

    for f in [&prefect, &bitbucket, &oauth] {
        f.assert_no_violations();
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_failures_are_clear_audited_and_leave_nothing_behind() {
    let vercel = Fake::spawn(Service::Vercel {
        root_token: "vercel-root-secret-1".into(),
    })
    .await;
    let dbx = Fake::spawn(databricks_fake()).await;
    let prefect = Fake::spawn(Service::Prefect {
        account: "a".into(),
        token: "pnu-root-secret-2".into(),
    })
    .await;
    let bitbucket = Fake::spawn(Service::Bitbucket {
        client_id: "k".into(),
        client_secret: "bb-root-secret-3".into(),
    })
    .await;
    let secrets = tempfile::tempdir().unwrap();
    let f = |n: &str, v: &str| secret_file(secrets.path(), n, v.as_bytes());
    let mut extra = format!(
        r#"
[[targets]]
name = "vercel"
kind = "vercel"
api_url = "{v}"
token_file = "{vt}"
timeout = "300ms"

[[targets]]
name = "dbx"
kind = "databricks"
mode = "pat"
workspace_url = "{d}"
token_file = "{dt}"
timeout = "300ms"

[[targets]]
name = "prefect"
kind = "prefect"
api_url = "{p}/api"
account_id = "a"
account_role_id = "r"
token_file = "{pt}"
timeout = "300ms"

[[targets]]
name = "bitbucket"
kind = "bitbucket"
token_url = "{b}/site/oauth2/access_token"
client_id = "k"
client_secret_file = "{bt}"
timeout = "300ms"
"#,
        v = vercel.url,
        vt = f("v", "vercel-root-secret-1"),
        d = dbx.url,
        dt = f("d", "dapi-admin-very-secret"),
        p = prefect.url,
        pt = f("p", "pnu-root-secret-2"),
        b = bitbucket.url,
        bt = f("b", "bb-root-secret-3"),
    );
    for t in ["vercel", "dbx", "prefect", "bitbucket"] {
        extra += &allow(t, t, &["s"]);
    }
    let env = start(&extra).await;
    let caller = env.token("main");
    let fakes = [
        ("vercel", &vercel),
        ("dbx", &dbx),
        ("prefect", &prefect),
        ("bitbucket", &bitbucket),
    ];
    let cases = [
        (Fault::Status(401), Code::PermissionDenied, "HTTP 401"),
        (Fault::Status(403), Code::PermissionDenied, "HTTP 403"),
        (Fault::RateLimited(7), Code::Unavailable, "retry after 7s"),
        (Fault::Status(500), Code::Unavailable, "HTTP 500"),
        (Fault::Status(503), Code::Unavailable, "HTTP 503"),
        (Fault::Hang, Code::Unavailable, "timed out"),
    ];
    for (target, fake) in fakes {
        for (fault, code, text) in cases {
            fake.set_fault(Some(fault));
            let e = env.mint(&caller, target, &["s"], None).await.unwrap_err();
            assert_eq!(e.code(), code, "{target} {fault:?}: {e:?}");
            assert!(
                e.message().contains(text),
                "{target} {fault:?}: {}",
                e.message()
            );
            assert!(!e.message().contains("secret"), "{}", e.message());
            assert!(
                fake.live().is_empty(),
                "{target} {fault:?} left {:?}",
                fake.live()
            );
        }
        fake.set_fault(None);
        // And the broker keeps serving: the next mint works.
        env.mint(&caller, target, &["s"], None).await.unwrap();
        fake.assert_no_violations();
    }
    // Every failure is in the audit log with its reason.
    let failures: Vec<_> = env
        .records()
        .await
        .into_iter()
        .filter(|r| r.entry.action == "mint" && r.entry.outcome != "allowed")
        .collect();
    assert_eq!(failures.len(), 4 * cases.len(), "{failures:#?}");
    assert!(failures
        .iter()
        .all(|r| r.entry.reason.as_deref().unwrap_or("").contains("upstream")));

    // The audit log cannot commit: the credential made upstream is revoked again.
    env.sqlite.set_read_only(true).await.unwrap();
    let e = env.mint(&caller, "vercel", &["s"], None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("no credential issued"),
        "{}",
        e.message()
    );
    env.sqlite.set_read_only(false).await.unwrap();
    let live_after: Vec<_> = vercel.live().into_iter().collect();
    assert_eq!(
        live_after.len(),
        1,
        "only the one good mint above: {live_after:?}"
    );

    // No upstream secret, and no body the upstream sent, anywhere in the store.
    let hay = all_bytes_under(env.dir.path());
    for s in [
        "vercel-root-secret-1",
        "dapi-admin-very-secret",
        "pnu-root-secret-2",
        "bb-root-secret-3",
        "secret-looking",
    ] {
        assert!(!contains(&hay, s), "{s} found in the store");
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_binary_keeps_upstream_secrets_and_minted_credentials_out_of_its_debug_logs() {
    use latchkey::devissuer::DevIssuer;
    let vercel = Fake::spawn(Service::Vercel {
        root_token: "vercel-root-in-a-file-5f3a".into(),
    })
    .await;
    let dbx = Fake::spawn(databricks_fake()).await;
    let issuer = DevIssuer::spawn("127.0.0.1:0".parse().unwrap(), latchkey::jose::Alg::RS256)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (grpc, http) = (common::free_port(), common::free_port());
    let db = dir.path().join("latchkey.db").display().to_string();
    let root = secret_file(dir.path(), "vercel-root", b"vercel-root-in-a-file-5f3a\n");
    let mut text = common::config_text(issuer.issuer_url(), &issuer.audience(), &db, "", "")
        .replace(
            "grpc_addr = \"127.0.0.1:0\"",
            &format!("grpc_addr = \"127.0.0.1:{grpc}\""),
        )
        .replace(
            "http_addr = \"127.0.0.1:0\"",
            &format!("http_addr = \"127.0.0.1:{http}\""),
        );
    text += &format!(
        r#"
[[targets]]
name = "vercel"
kind = "vercel"
api_url = "{v}"
token_file = "{root}"

[[targets]]
name = "dbx"
kind = "databricks"
mode = "pat"
workspace_url = "{d}"
token_env = "LATCHKEY_TEST_DBX_ADMIN"
"#,
        v = vercel.url,
        d = dbx.url
    );
    text += &allow("vercel", "vercel", &["s"]);
    text += &allow("dbx", "dbx", &["s"]);
    let cfg = dir.path().join("latchkey.toml");
    std::fs::write(&cfg, text).unwrap();
    let master = latchkey::keys::MasterKey::generate().to_base64();
    let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&cfg)
        .env("LATCHKEY_MASTER_KEY", master.expose())
        .env("LATCHKEY_TEST_DBX_ADMIN", "dapi-admin-very-secret")
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    tokio::task::block_in_place(|| common::wait_for_port(grpc));
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client =
        latchkey::transport::pb::credential_broker_client::CredentialBrokerClient::new(channel);
    let caller = issuer.sign(&issuer.bitbucket_claims("main"));
    let mut minted = Vec::new();
    for target in ["vercel", "dbx", "vercel"] {
        let r = client
            .mint(authed(
                latchkey::transport::pb::MintRequest {
                    target: target.into(),
                    scopes: vec!["s".into()],
                    ttl: None,
                    context: Default::default(),
                },
                &caller,
            ))
            .await
            .unwrap()
            .into_inner();
        minted.push(r.credential.unwrap().token);
    }
    // Failures log too: they must not carry upstream bodies.
    vercel.set_fault(Some(Fault::Status(401)));
    let e = client
        .mint(authed(
            latchkey::transport::pb::MintRequest {
                target: "vercel".into(),
                scopes: vec!["s".into()],
                ttl: None,
                context: Default::default(),
            },
            &caller,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = tokio::task::block_in_place(|| child.wait());
    let logs = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    assert!(logs.contains("\"level\":\"DEBUG\""), "debug logging was on");
    assert!(logs.contains("vercel"), "the logs talk about the target");
    let mut secrets = vec![
        "vercel-root-in-a-file-5f3a".to_string(),
        "dapi-admin-very-secret".to_string(),
        "secret-looking".to_string(),
        caller.clone(),
    ];
    secrets.extend(minted);
    for s in &secrets {
        assert!(!logs.contains(s.as_str()), "{s} in the logs");
    }
    // The root token's own file is in this directory: look at the store's files only.
    for f in ["latchkey.db", "latchkey.db-wal"] {
        let p = dir.path().join(f);
        if let Ok(b) = std::fs::read(&p) {
            for s in &secrets {
                assert!(!contains(&b, s), "{s} in {f}");
            }
        }
    }
    vercel.assert_no_violations();
    dbx.assert_no_violations();
}
