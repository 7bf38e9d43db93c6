//! End-to-end: a real broker on a real socket, a real issuer serving discovery and JWKS
//! over HTTP, the generated gRPC client, and an independent JWT library verifying what
//! the broker mints.

mod common;

use common::*;
use jsonwebtoken::{jwk::JwkSet, Algorithm, DecodingKey, Validation};
use latchkey::audit::{verify_chain, GENESIS_HASH};
use latchkey::devissuer::DEV_REPOSITORY;
use latchkey::jose::{b64, Alg, SigningKey};
use serde_json::{json, Value};
use tonic::Code;

async fn broker_jwks(env: &Env) -> JwkSet {
    let doc: Value = reqwest::get(format!(
        "{}/latchkey/.well-known/openid-configuration",
        env.http
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(doc["issuer"], "http://127.0.0.1:9/latchkey");
    assert_eq!(
        doc["jwks_uri"],
        "http://127.0.0.1:9/latchkey/.well-known/jwks.json"
    );
    reqwest::get(format!("{}/latchkey/.well-known/jwks.json", env.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn verify_independently(token: &str, jwks: &JwkSet, alg: Algorithm, aud: &str) -> Value {
    let header = jsonwebtoken::decode_header(token).unwrap();
    assert_eq!(header.alg, alg);
    let kid = header.kid.expect("kid header");
    let jwk = jwks.find(&kid).expect("kid published in the broker's JWKS");
    let mut v = Validation::new(alg);
    v.set_audience(&[aud]);
    v.set_issuer(&["http://127.0.0.1:9/latchkey"]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub", "nbf"]);
    v.leeway = 0;
    jsonwebtoken::decode::<Value>(token, &DecodingKey::from_jwk(jwk).unwrap(), &v)
        .unwrap()
        .claims
}

#[tokio::test]
async fn happy_path_mints_a_jwt_any_library_verifies() {
    let env = Env::start().await;
    let caller = env.claims("main");
    let token = env.issuer.sign(&caller);
    let resp = env.mint(&token, "orders-api", &[], None).await.unwrap();
    let cred = resp.credential.clone().unwrap();
    let lease = resp.lease.unwrap();
    assert_eq!(cred.kind, "jwt");
    let jwks = broker_jwks(&env).await;
    let claims = verify_independently(
        &cred.token,
        &jwks,
        Algorithm::ES256,
        "https://orders.example.com",
    );
    assert_eq!(claims["iss"], "http://127.0.0.1:9/latchkey");
    assert_eq!(claims["sub"], format!("bb:{DEV_REPOSITORY}"));
    assert_eq!(claims["aud"], "https://orders.example.com");
    assert_eq!(claims["scope"], "orders:read orders:write");
    assert_eq!(claims["branch"], "main");
    assert_eq!(claims["jti"], lease.id);
    assert_eq!(
        claims["act"],
        json!({"iss": caller["iss"], "sub": caller["sub"]})
    );
    let (iat, nbf, exp) = (
        claims["iat"].as_i64().unwrap(),
        claims["nbf"].as_i64().unwrap(),
        claims["exp"].as_i64().unwrap(),
    );
    assert_eq!(nbf, iat);
    assert_eq!(
        exp - iat,
        300,
        "target default 5m (below the 10m cap of the write grant)"
    );
    assert_eq!(lease.expires_at.unwrap().seconds, exp);
    assert_eq!(cred.expires_at.unwrap().seconds, exp);
    assert_eq!(lease.scopes, vec!["orders:read", "orders:write"]);
    assert!(lease.renewable, "a jwt lease renews by re-issue");
    assert_eq!(lease.state, "live");
    assert!(!resp.lease_secret.is_empty());

    // The other signing algorithms verify the same way.
    for (target, alg, aud) in [
        ("ed-api", Algorithm::EdDSA, "ed"),
        ("rsa-api", Algorithm::RS256, "rsa"),
    ] {
        let r = env.mint(&token, target, &[], None).await.unwrap();
        let jwks = broker_jwks(&env).await;
        let c = verify_independently(&r.credential.unwrap().token, &jwks, alg, aud);
        assert_eq!(
            c["sub"],
            format!(
                "bb:{}/{}",
                latchkey::devissuer::DEV_WORKSPACE,
                DEV_REPOSITORY
            )
        );
    }
    env.stop().await;
}

#[tokio::test]
async fn default_subject_is_the_stable_identity_key() {
    let env = Env::start().await;
    let r = env
        .mint(&env.token("main"), "ed-api", &[], None)
        .await
        .unwrap();
    let jwks = broker_jwks(&env).await;
    let c = verify_independently(&r.credential.unwrap().token, &jwks, Algorithm::EdDSA, "ed");
    assert_eq!(
        c["sub"],
        format!(
            "bb:{}/{}",
            latchkey::devissuer::DEV_WORKSPACE,
            DEV_REPOSITORY
        )
    );
    env.stop().await;
}

async fn expect(env: &Env, token: &str, code: Code, msg: &str) {
    let e = env.mint(token, "orders-api", &[], None).await.unwrap_err();
    assert_eq!(e.code(), code, "{e:?}");
    assert!(
        e.message().contains(msg),
        "expected {msg:?} in {:?}",
        e.message()
    );
}

fn forge(header: Value, claims: &Value, sig: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64(serde_json::to_vec(&header).unwrap()),
        b64(serde_json::to_vec(claims).unwrap()),
        b64(sig)
    )
}

#[tokio::test]
async fn every_token_rejection_is_unauthenticated_with_the_failed_check() {
    let env = Env::start().await;
    let now = latchkey::transport::grpc::unix_now();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = env.claims("main");
        f(&mut c);
        env.issuer.sign(&c)
    };
    expect(
        &env,
        &with(&|c| c["exp"] = json!(now - 120)),
        Code::Unauthenticated,
        "token expired",
    )
    .await;
    expect(
        &env,
        &with(&|c| c["nbf"] = json!(now + 600)),
        Code::Unauthenticated,
        "not yet valid",
    )
    .await;
    expect(
        &env,
        &with(&|c| c["iss"] = json!("https://evil.example.com")),
        Code::Unauthenticated,
        "unknown issuer",
    )
    .await;
    expect(
        &env,
        &with(&|c| c["aud"] = json!("someone-else")),
        Code::Unauthenticated,
        "audience",
    )
    .await;
    env.mint(
        &with(&|c| c["aud"] = json!(["x", "second-audience"])),
        "orders-api",
        &[],
        None,
    )
    .await
    .expect("aud array with one accepted audience");
    expect(
        &env,
        &with(&|c| {
            c.as_object_mut().unwrap().remove("exp");
        }),
        Code::Unauthenticated,
        "claim exp",
    )
    .await;
    expect(
        &env,
        &with(&|c| {
            c.as_object_mut().unwrap().remove("repositoryUuid");
        }),
        Code::Unauthenticated,
        "claim repositoryUuid",
    )
    .await;

    let claims = env.claims("main");
    let good = env.issuer.sign(&claims);
    let (h, p, s) = {
        let mut it = good.split('.');
        (
            it.next().unwrap().to_string(),
            it.next().unwrap().to_string(),
            it.next().unwrap().to_string(),
        )
    };
    let header: Value = serde_json::from_slice(&latchkey::jose::b64_decode(&h).unwrap()).unwrap();

    // alg none
    expect(
        &env,
        &format!("{}.{p}.", b64(br#"{"alg":"none","typ":"JWT"}"#)),
        Code::Unauthenticated,
        "algorithm refused: none",
    )
    .await;
    // HS256 "signed" with the issuer's public key (the classic key-confusion attack).
    let jwks: Value = reqwest::get(format!("{}/keys.json", env.issuer.issuer_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let public = serde_json::to_vec(&jwks["keys"][0]).unwrap();
    let hs_input = format!("{}.{p}", b64(br#"{"alg":"HS256","typ":"JWT"}"#));
    let mac = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &public),
        hs_input.as_bytes(),
    );
    expect(
        &env,
        &format!("{hs_input}.{}", b64(mac.as_ref())),
        Code::Unauthenticated,
        "HMAC",
    )
    .await;
    // jku header pointing elsewhere
    let mut jku = header.clone();
    jku["jku"] = json!("http://127.0.0.1:1/evil.json");
    expect(
        &env,
        &forge(jku, &claims, b"sig"),
        Code::Unauthenticated,
        "header parameter jku refused",
    )
    .await;
    // Tampered payload (signature no longer covers it)
    let mut tampered = claims.clone();
    tampered["branchName"] = json!("release/evil");
    expect(
        &env,
        &format!("{h}.{}.{s}", b64(serde_json::to_vec(&tampered).unwrap())),
        Code::Unauthenticated,
        "bad signature",
    )
    .await;
    // Truncated
    expect(
        &env,
        &good[..good.len() - 10],
        Code::Unauthenticated,
        "bad signature",
    )
    .await;
    expect(
        &env,
        &format!("{h}.{p}"),
        Code::Unauthenticated,
        "malformed token",
    )
    .await;
    // Not base64url
    expect(
        &env,
        &format!("{h}.{p}!!.{s}"),
        Code::Unauthenticated,
        "payload is not base64url",
    )
    .await;
    // Oversized
    let mut big = claims.clone();
    big["padding"] = json!("x".repeat(20_000));
    expect(
        &env,
        &env.issuer.sign(&big),
        Code::Unauthenticated,
        "token larger than 16384 bytes",
    )
    .await;
    // Algorithm not matching the key (RS key, ES header)
    let mut es = header.clone();
    es["alg"] = json!("ES256");
    expect(
        &env,
        &forge(es, &claims, &[0u8; 64]),
        Code::Unauthenticated,
        "does not match the key",
    )
    .await;
    // A token signed by a key the issuer never published
    let (rogue, _) = SigningKey::generate(Alg::RS256).unwrap();
    expect(
        &env,
        &latchkey::devissuer::sign_with(&rogue, &claims),
        Code::Unauthenticated,
        "unknown signing key",
    )
    .await;
    // Missing token entirely
    expect(&env, "", Code::Unauthenticated, "missing bearer token").await;

    // The broker still serves after all of that.
    env.mint(&good, "orders-api", &[], None).await.unwrap();
    env.stop().await;
}

#[tokio::test]
async fn unknown_kid_triggers_a_refresh_that_picks_up_the_new_key() {
    let env = Env::start().await;
    env.mint(&env.token("main"), "orders-api", &[], None)
        .await
        .unwrap();
    let fetches = env.issuer.jwks_fetches();
    env.issuer.rotate(Alg::ES256, false); // new signing key, not yet published
    let t = env.token("main");
    expect(&env, &t, Code::Unauthenticated, "unknown signing key").await;
    assert!(
        env.issuer.jwks_fetches() > fetches,
        "an unknown kid caused a refetch"
    );
    env.issuer.publish_all();
    env.mint(&t, "orders-api", &[], None).await.unwrap();
    env.stop().await;
}

#[tokio::test]
async fn unknown_kid_refreshes_are_rate_limited_by_the_cooldown() {
    let env = Env::start_with("jwks_cooldown = \"1h\"", "").await;
    env.mint(&env.token("main"), "orders-api", &[], None)
        .await
        .unwrap();
    let before = env.issuer.jwks_fetches();
    let (rogue, _) = SigningKey::generate(Alg::RS256).unwrap();
    let forged = latchkey::devissuer::sign_with(&rogue, &env.claims("main"));
    for _ in 0..20 {
        expect(&env, &forged, Code::Unauthenticated, "unknown signing key").await;
    }
    assert_eq!(
        env.issuer.jwks_fetches(),
        before,
        "garbage kids cannot make the broker hammer the issuer"
    );
    env.stop().await;
}

#[tokio::test]
async fn issuer_outage_without_cached_keys_is_unavailable_with_keys_still_works() {
    // No cached keys: the issuer's JWKS cannot be reached at all.
    let down = Env::start_with(
        "jwks_cooldown = \"0s\"\njwks_url = \"http://127.0.0.1:1/keys.json\"",
        "",
    )
    .await;
    expect(
        &down,
        &down.token("main"),
        Code::Unavailable,
        "keys for issuer bb unavailable",
    )
    .await;
    down.stop().await;

    // Cached keys: fetched while the issuer was up, then the issuer goes down.
    let env = Env::start().await;
    env.mint(&env.token("main"), "orders-api", &[], None)
        .await
        .unwrap();
    env.issuer.set_down(true);
    env.mint(&env.token("main"), "orders-api", &[], None)
        .await
        .expect("last good keys keep serving");
    // An unknown kid during the outage cannot be resolved, and says so.
    env.issuer.rotate(Alg::RS256, true);
    expect(
        &env,
        &env.token("main"),
        Code::Unauthenticated,
        "unknown signing key",
    )
    .await;
    env.stop().await;
}

#[tokio::test]
async fn policy_through_the_server() {
    let env = Env::start().await;
    let main = env.token("main");
    // glob
    env.mint(&env.token("release/2.1"), "orders-api", &[], None)
        .await
        .unwrap();
    // no rule grants this branch
    let e = env
        .mint(&env.token("feature/x"), "orders-api", &[], None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("no rule grants target orders-api"),
        "{}",
        e.message()
    );
    assert!(
        e.message().contains("branchName"),
        "names the failing clause: {}",
        e.message()
    );
    // deny beats allow: reports is allowed on any branch, but experimental/* is denied
    env.mint(&env.token("feature/x"), "reports", &[], None)
        .await
        .unwrap();
    let e = env
        .mint(&env.token("experimental/y"), "reports", &[], None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(e.message(), "denied by rule no-experimental");
    // scope narrowing, and a scope not granted
    let r = env
        .mint(&main, "orders-api", &["orders:read"], Some(3600))
        .await
        .unwrap();
    assert_eq!(r.lease.as_ref().unwrap().scopes, vec!["orders:read"]);
    let l = r.lease.unwrap();
    assert_eq!(
        l.expires_at.unwrap().seconds - l.issued_at.unwrap().seconds,
        3600,
        "read grant caps at the target max"
    );
    let r = env
        .mint(&main, "orders-api", &["orders:write"], Some(3600))
        .await
        .unwrap();
    let l = r.lease.unwrap();
    assert_eq!(
        l.expires_at.unwrap().seconds - l.issued_at.unwrap().seconds,
        600,
        "clamped to the write grant's 10m"
    );
    let e = env
        .mint(&main, "orders-api", &["orders:admin"], None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(
        e.message(),
        "scope orders:admin not granted on target orders-api"
    );
    // unknown target
    let e = env.mint(&main, "payroll", &[], None).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // malformed requests
    assert_eq!(
        env.mint(&main, "", &[], None).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        env.mint(&main, "orders-api", &["a b"], None)
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        env.mint(&main, "orders-api", &[], Some(-5))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    // JSON pointer + anchored regex + not
    let with_team = |team: &str, branch: &str| {
        let mut c = env.claims(branch);
        c["ci"] = json!({"team": team});
        env.issuer.sign(&c)
    };
    env.mint(&with_team("payments", "main"), "team-api", &[], None)
        .await
        .unwrap();
    env.mint(&with_team("pay", "main"), "team-api", &[], None)
        .await
        .unwrap();
    assert!(
        env.mint(&with_team("payments-evil", "main"), "team-api", &[], None)
            .await
            .is_err(),
        "regex is anchored"
    );
    assert!(
        env.mint(&with_team("payments", "wip/1"), "team-api", &[], None)
            .await
            .is_err(),
        "not(glob)"
    );
    assert!(
        env.mint(&env.token("main"), "team-api", &[], None)
            .await
            .is_err(),
        "absent nested claim never matches"
    );
    env.stop().await;
}

#[tokio::test]
async fn explain_says_which_rule_and_clause() {
    // The whole trace is for callers with the explain (or auditor, admin) role, or for
    // everyone with denial_detail = "full" (a deny rule refuses roles too, so the
    // experimental branch below could hold none).
    let env = Env::start_full(
        "",
        "",
        "[policy]\ndenial_detail = \"full\"\n",
        std::sync::Arc::new(latchkey::clock::SystemClock),
    )
    .await;
    let ok = env
        .explain(&env.token("release/1"), "orders-api", &["orders:read"])
        .await
        .unwrap();
    assert!(ok.allowed);
    assert_eq!(ok.rule, "orders-main-and-release");
    assert_eq!(ok.scopes, vec!["orders:read"]);
    assert_eq!(ok.max_ttl.unwrap().seconds, 3600);
    assert_eq!(ok.identity["repository"], DEV_REPOSITORY);
    assert_eq!(ok.identity["ref"], "release/1");
    assert!(
        ok.trace
            .iter()
            .any(|l| l.starts_with("rule orders-main-and-release (allow): matched")),
        "{:?}",
        ok.trace
    );
    let no = env
        .explain(&env.token("experimental/1"), "reports", &[])
        .await
        .unwrap();
    assert!(!no.allowed);
    assert_eq!(no.rule, "no-experimental");
    assert!(
        no.trace
            .iter()
            .any(|l| l.contains("no-experimental (deny): matched")),
        "{:?}",
        no.trace
    );
    let e = env.explain("garbage", "reports", &[]).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    env.stop().await;
}

#[tokio::test]
async fn callers_without_the_explain_role_learn_names_not_values() {
    let env = Env::start().await;
    // A caller on feature/x is refused orders-api because of its branch; the values the
    // rule wants (main, release/*) would let it guess its way in, clause by clause.
    let caller = env.token("feature/x");
    let no = env.explain(&caller, "orders-api", &[]).await.unwrap();
    assert!(!no.allowed);
    assert!(no.trace.is_empty() && no.trace_withheld, "{:?}", no.trace);
    assert_eq!(
        no.reason,
        "no rule grants target orders-api (rule orders-main-and-release: claim branchName did not match)"
    );
    let e = env
        .mint(&caller, "orders-api", &[], None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message()
            .contains("rule orders-main-and-release: claim branchName did not match"),
        "{}",
        e.message()
    );
    let resp = exchange(&env.http, &caller, "orders-api", &[]).await;
    assert_eq!(resp.status().as_u16(), 403);
    let form: Value = resp.json().await.unwrap();
    for said in [no.reason.as_str(), e.message(), &form.to_string()] {
        assert!(
            !said.contains("release/*")
                && !said.contains("\"main\"")
                && !said.contains("feature/x"),
            "a value leaked: {said}"
        );
    }
    // The decision itself, and a deny rule's name, are still said.
    let denied = env
        .explain(&env.token("experimental/1"), "reports", &[])
        .await
        .unwrap();
    assert_eq!(denied.rule, "no-experimental");
    assert!(denied.trace.is_empty());
    // The audit records keep the whole reason, values included, for the security team.
    let recs = env.records().await;
    let full = recs
        .iter()
        .filter_map(|r| r.entry.reason.as_deref())
        .filter(|r| r.contains("does not match"))
        .count();
    assert_eq!(
        full, 3,
        "explain, mint and token exchange each audited in full"
    );
    env.stop().await;

    // denial_detail = "none": not even the names; the explain role still sees it all.
    let env = Env::start_full(
        "",
        "",
        "[policy]\ndenial_detail = \"none\"\n\n[[rules]]\nname = \"policy-owners\"\nissuer = \"bb\"\nclaims = { branchName = \"ops/policy\" }\nroles = [\"explain\"]\n",
        std::sync::Arc::new(latchkey::clock::SystemClock),
    )
    .await;
    let no = env
        .explain(&env.token("feature/x"), "orders-api", &[])
        .await
        .unwrap();
    assert_eq!(no.reason, "no rule grants target orders-api");
    assert!(no.trace_withheld);
    let owner = env
        .explain(&env.token("ops/policy"), "orders-api", &[])
        .await
        .unwrap();
    assert!(!owner.trace_withheld);
    assert!(
        owner.reason.contains("does not match") && owner.reason.contains("release/*"),
        "{}",
        owner.reason
    );
    assert!(
        owner.trace.iter().any(|l| l
            .starts_with("rule orders-main-and-release (allow): not matched: claim branchName")),
        "{:?}",
        owner.trace
    );
    env.stop().await;
}

#[tokio::test]
async fn a_deny_on_a_branch_name_is_not_escaped_by_case_width_or_invisible_characters() {
    let env = Env::start().await;
    // reports-any-branch grants reports to every branch; no-experimental denies
    // experimental/*. The caller names its branch.
    for branch in [
        "experimental/1",
        "Experimental/1",
        "EXPERIMENTAL/1",
        "experimental\u{200b}/1",
        "exp\u{00ad}erimental/1",
        "ｅｘｐｅｒｉｍｅｎｔａｌ/1",
    ] {
        let e = env
            .mint(&env.token(branch), "reports", &[], None)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{branch:?}");
        assert!(
            e.message().contains("no-experimental"),
            "{branch:?}: {}",
            e.message()
        );
    }
    env.mint(&env.token("main"), "reports", &[], None)
        .await
        .unwrap();
    env.stop().await;

    // fold = false compares the raw value, as it is written.
    let env = Env::start_full(
        "",
        "",
        "[[rules]]\nname = \"no-wip\"\nissuer = \"bb\"\neffect = \"deny\"\nfold = false\nclaims = { branchName = { glob = \"wip/*\" } }\n",
        std::sync::Arc::new(latchkey::clock::SystemClock),
    )
    .await;
    assert!(env
        .mint(&env.token("wip/1"), "reports", &[], None)
        .await
        .is_err());
    env.mint(&env.token("WIP/1"), "reports", &[], None)
        .await
        .unwrap();
    env.stop().await;
}

#[tokio::test]
async fn every_decision_is_audited_in_an_intact_chain_without_secrets() {
    let mut env = Env::start().await;
    let caller = env.token("main");
    let minted = env
        .mint(&caller, "orders-api", &[], None)
        .await
        .unwrap()
        .credential
        .unwrap()
        .token;
    let denied_caller = env.token("experimental/x");
    env.mint(&denied_caller, "reports", &[], None)
        .await
        .unwrap_err();
    env.mint("not-a-token", "orders-api", &[], None)
        .await
        .unwrap_err();
    env.explain(&caller, "orders-api", &[]).await.unwrap();

    let recs = env.records().await;
    assert_eq!(recs.len(), 4);
    assert_eq!(verify_chain(&recs, (0, GENESIS_HASH)).unwrap().0, 4);
    let ok = &recs[0].entry;
    assert_eq!(
        (ok.action.as_str(), ok.outcome.as_str()),
        ("mint", "allowed")
    );
    assert_eq!(ok.issuer.as_deref(), Some("bb"));
    assert_eq!(ok.repository.as_deref(), Some(DEV_REPOSITORY));
    assert_eq!(ok.rule.as_deref(), Some("orders-main-and-release"));
    assert_eq!(ok.granted_scopes, vec!["orders:read", "orders:write"]);
    assert_eq!(ok.ttl_secs, Some(300));
    assert_eq!(ok.context["commit"], "abc123");
    assert_eq!(
        ok.token_fingerprint.as_deref(),
        Some(latchkey::jose::sha256_hex(&caller).as_str())
    );
    assert_eq!(
        ok.credential_fingerprint.as_deref(),
        Some(latchkey::jose::sha256_hex(&minted).as_str())
    );
    assert!(ok.credential_jti.is_some() && ok.credential_jti == ok.lease_id);
    assert_eq!(recs[1].entry.outcome, "denied");
    assert_eq!(
        recs[1].entry.reason.as_deref(),
        Some("denied by rule no-experimental")
    );
    assert_eq!(
        recs[2].entry.reason.as_deref(),
        Some("malformed token: not a compact JWS")
    );
    assert_eq!(recs[2].entry.identity_key, None);
    assert_eq!(recs[3].entry.action, "explain");

    // The database never holds a token: grep every byte of the files (db, WAL).
    env.stop_checkpointless().await;
    let bytes = all_bytes_under(env.dir.path());
    for secret in [&caller, &minted, &denied_caller] {
        assert!(
            !contains(&bytes, secret),
            "a token string reached the database files"
        );
        // Not even the signature part alone.
        assert!(!contains(&bytes, secret.rsplit('.').next().unwrap()));
    }

    // UPDATE and DELETE are refused by the store itself.
    let c = rusqlite::Connection::open(&env.db).unwrap();
    let e = c
        .execute("UPDATE audit SET outcome = 'allowed' WHERE seq = 2", [])
        .unwrap_err();
    assert!(e.to_string().contains("append-only"));
    assert!(c.execute("DELETE FROM audit WHERE seq = 1", []).is_err());
}

#[tokio::test]
async fn audit_store_down_means_unavailable_and_no_credential_then_recovers() {
    let env = Env::start().await;
    let t = env.token("main");
    env.mint(&t, "orders-api", &[], None).await.unwrap();
    let lock = rusqlite::Connection::open(&env.db).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let e = env.mint(&t, "orders-api", &[], None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert_eq!(e.message(), "audit store unavailable; no credential issued");
    lock.execute_batch("COMMIT").unwrap();
    env.mint(&t, "orders-api", &[], None)
        .await
        .expect("recovers without a restart");
    let recs = env.records().await;
    assert_eq!(recs.len(), 2, "the refused mint left no record and no gap");
    assert!(verify_chain(&recs, (0, GENESIS_HASH)).is_ok());
    env.stop().await;
}

#[tokio::test]
async fn oversized_requests_are_refused_and_the_server_keeps_serving() {
    let env = Env::start().await;
    let t = env.token("main");
    let mut c = env.client.clone();
    let req = latchkey::transport::pb::MintRequest {
        target: "orders-api".into(),
        context: [("blob".to_string(), "x".repeat(100_000))].into(),
        ..Default::default()
    };
    let e = c.mint(authed(req, &t)).await.unwrap_err();
    assert_ne!(e.code(), Code::Ok);
    let req = latchkey::transport::pb::MintRequest {
        target: "orders-api".into(),
        context: [("blob".to_string(), "x".repeat(5_000))].into(),
        ..Default::default()
    };
    let e = c.mint(authed(req, &t)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    env.mint(&t, "orders-api", &[], None).await.unwrap();
    env.stop().await;
}

#[tokio::test]
async fn unidentified_callers_cannot_fill_the_audit_log() {
    let env = Env::start_full(
        "",
        "",
        "[limits]\nunidentified_rate = 2\nunidentified_burst = 5\n",
        std::sync::Arc::new(latchkey::clock::SystemClock),
    )
    .await;
    let mut c = env.client.clone();
    // The largest request that passes validation, with a junk token.
    let junk = || latchkey::transport::pb::MintRequest {
        target: "t".repeat(128),
        scopes: (0..64)
            .map(|i| format!("{i:03}{}", "s".repeat(253)))
            .collect(),
        context: (0..32)
            .map(|i| (format!("k{i:02}"), "v".repeat(250)))
            .collect(),
        ..Default::default()
    };
    let mut refused_early = 0;
    for _ in 0..20 {
        let e = c.mint(authed(junk(), "junk.junk.junk")).await.unwrap_err();
        match e.code() {
            Code::Unauthenticated => {}
            Code::ResourceExhausted => {
                refused_early += 1;
                assert!(e.message().contains("retry in"), "{}", e.message());
                assert!(e.metadata().get("retry-after").is_some());
            }
            other => panic!("{other:?}: {}", e.message()),
        }
    }
    let recs = env.records().await;
    // The allowance, and the one that spent it; then refused before anything is recorded.
    assert_eq!(recs.len(), 6);
    assert_eq!(refused_early, 14);
    for r in &recs {
        let size = serde_json::to_string(&r.entry).unwrap().len();
        assert!(
            size < 1500,
            "an unidentified caller's record is bounded: {size} bytes"
        );
        let e = &r.entry;
        assert_eq!(e.requested_scopes.len(), 4);
        assert!(e.requested_scopes.iter().all(|s| s.len() <= 64));
        assert_eq!(e.context["scopes_count"], "64");
        assert_eq!(e.context["context_entries"], "32");
        assert_eq!(e.context["context_bytes"], (32 * 253).to_string());
        assert_eq!(e.context["context_sha256"].len(), 64);
        assert_eq!(e.target.as_deref().map(str::len), Some(64));
    }
    // A known caller is refused too while its address is over the allowance (it shares
    // the address), and served once the allowance returns.
    let e = env
        .mint(&env.token("main"), "orders-api", &[], None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    env.mint(&env.token("main"), "orders-api", &[], None)
        .await
        .unwrap();
    // The refusals are counted.
    let metrics = reqwest::get(format!("{}/metrics", env.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("latchkey_rate_limited_total{scope=\"unidentified\"} 15"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("rate_limited"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    env.stop().await;
}

/// The order of P-256: for a valid ECDSA signature (r, s), (r, n − s) is valid too.
const P256_N: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];

#[tokio::test]
async fn a_malleated_es256_signature_is_the_same_token_to_the_replay_guard() {
    let env = Env::start_with("jwks_cooldown = \"0s\"\nmax_mints_per_token = 1", "").await;
    env.issuer.rotate(Alg::ES256, true);
    let mut claims = env.claims("main");
    claims.as_object_mut().unwrap().remove("jti");
    let token = env.issuer.sign(&claims);
    env.mint(&token, "orders-api", &[], None).await.unwrap();
    // Re-sign the same content with s' = n - s: a different token, equally valid.
    let (content, sig) = token.rsplit_once('.').unwrap();
    let mut sig = latchkey::jose::b64_decode(sig).unwrap();
    assert_eq!(sig.len(), 64, "JOSE ECDSA signature r || s");
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let d = P256_N[i] as i16 - sig[32 + i] as i16 - borrow;
        borrow = i16::from(d < 0);
        sig[32 + i] = d.rem_euclid(256) as u8;
    }
    let malleated = format!("{content}.{}", b64(&sig));
    assert_ne!(malleated, token);
    let e = env
        .mint(&malleated, "orders-api", &[], None)
        .await
        .unwrap_err();
    assert!(e.message().contains("already used"), "{e:?}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_that_trickles_its_keys_does_not_slow_other_callers() {
    use latchkey::clock::Clock;
    use tokio::io::AsyncWriteExt;
    // A hostile issuer: accepts, then sends its answer one byte every 200 ms, forever.
    let slow = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = slow.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = slow.accept().await else {
                return;
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                for b in b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    .iter()
                    .cycle()
                {
                    if s.write_all(&[*b]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            });
        }
    });
    let extra = format!(
        "[[issuers]]\nname = \"slow\"\npreset = \"generic\"\nissuer = \"http://127.0.0.1:{port}\"\naudiences = [\"x\"]\njwks_url = \"http://127.0.0.1:{port}/keys\"\njwks_cooldown = \"0s\"\n"
    );
    let env = Env::start_full(
        "",
        "",
        &extra,
        std::sync::Arc::new(latchkey::clock::SystemClock),
    )
    .await;
    let (bad_key, _) = SigningKey::generate(Alg::ES256).unwrap();
    let bad_token = latchkey::devissuer::sign_with(
        &bad_key,
        &json!({"iss": format!("http://127.0.0.1:{port}"), "sub": "s", "aud": "x",
                "iat": latchkey::clock::SystemClock.now(), "exp": latchkey::clock::SystemClock.now() + 300}),
    );
    // Ten callers of the hostile issuer wait on it ...
    let started = std::time::Instant::now();
    let mut bad = Vec::new();
    for _ in 0..10 {
        let (mut c, t) = (env.client.clone(), bad_token.clone());
        bad.push(tokio::spawn(async move {
            let req = authed(
                latchkey::transport::pb::MintRequest {
                    target: "orders-api".into(),
                    ..Default::default()
                },
                &t,
            );
            c.mint(req).await.unwrap_err().code()
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // ... while a good caller's mints keep their pace.
    let good = env.token("main");
    let mut slowest = std::time::Duration::ZERO;
    for _ in 0..20 {
        let t = std::time::Instant::now();
        env.mint(&good, "orders-api", &[], None).await.unwrap();
        slowest = slowest.max(t.elapsed());
    }
    assert!(
        slowest < std::time::Duration::from_millis(1000),
        "a good caller's slowest mint took {slowest:?} while an issuer misbehaved"
    );
    // The hostile issuer's callers are answered, not held, once its total deadline (10 s)
    // runs out; the issuer was asked once, not once per caller.
    for b in bad {
        let code = b.await.unwrap();
        assert!(
            matches!(code, Code::Unavailable | Code::Unauthenticated),
            "{code:?}"
        );
    }
    // At most two deadlines: a refresh already in flight when they came, then their own.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(25),
        "{:?}",
        started.elapsed()
    );
    assert!(
        accepted.load(std::sync::atomic::Ordering::SeqCst) <= 2,
        "{} fetches",
        accepted.load(std::sync::atomic::Ordering::SeqCst)
    );
    env.stop().await;
}
