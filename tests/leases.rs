//! Leases through the real gRPC server: renew within the lifetime, revoke (own, someone
//! else's, idempotent), bulk revoke by repository, list, introspect, quotas, the replay
//! guard, audit of every action, and a property test over random operation sequences.

mod common;

use common::{authed, Env};
use latchkey::clock::{Clock, ManualClock, SystemClock};
use latchkey::devissuer::DEV_REPOSITORY;
use latchkey::transport::pb::{
    self, IntrospectRequest, LeaseFilter, ListLeasesRequest, RenewRequest, RevokeMatchingRequest,
    RevokeRequest,
};
use proptest::prelude::*;
use serde_json::{json, Value};
use std::sync::Arc;
use tonic::Code;

const OTHER_REPOSITORY: &str = "{00000000-0000-4000-8000-00000000beef}";

fn extra() -> String {
    format!(
        r#"
[[targets]]
name = "lease-api"
kind = "jwt"
audience = "lease"
default_ttl = "10m"
max_ttl = "30m"
max_lifetime = "1h"
max_live_leases = 3

[[rules]]
name = "lease-users"
issuer = "bb"
claims = {{ repositoryUuid = ["{DEV_REPOSITORY}", "{OTHER_REPOSITORY}"] }}
grants = [{{ target = "lease-api", scopes = ["l"] }}, {{ target = "reports", scopes = ["reports:read"] }}]

[[rules]]
name = "admins"
issuer = "bb"
claims = {{ branchName = "ops/admin" }}
roles = ["admin"]

[[rules]]
name = "auditors"
issuer = "bb"
claims = {{ branchName = "ops/audit" }}
roles = ["auditor", "introspect"]

[[rules]]
name = "report-introspectors"
issuer = "bb"
claims = {{ branchName = "ops/reports" }}
roles = ["introspect"]
role_targets = ["reports"]

# The property tests mint far faster than any one CI identity would.
[limits]
identity_rate = 0
"#
    )
}

async fn start(clock: Arc<dyn Clock>, issuer_extra: &str) -> Env {
    Env::start_full(issuer_extra, "busy_timeout = \"2s\"", &extra(), clock).await
}

/// A token valid at `now` (the broker's clock, which tests move).
fn token_at(env: &Env, branch: &str, repo: &str, now: i64) -> String {
    let mut c = env.claims(branch);
    c["repositoryUuid"] = json!(repo);
    c["iat"] = json!(now);
    c["exp"] = json!(now + 3600);
    if c.get("nbf").is_some() {
        c["nbf"] = json!(now);
    }
    env.issuer.sign(&c)
}

fn payload(jwt: &str) -> Value {
    let p = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(&latchkey::jose::b64_decode(p).unwrap()).unwrap()
}

async fn mint(env: &Env, token: &str, target: &str, ttl: Option<i64>) -> pb::MintResponse {
    env.mint(token, target, &[], ttl).await.unwrap()
}

async fn renew(
    env: &Env,
    token: &str,
    lease_id: &str,
    secret: &str,
    ttl: Option<i64>,
) -> Result<pb::RenewResponse, tonic::Status> {
    let req = RenewRequest {
        lease_id: lease_id.into(),
        ttl: ttl.map(|s| prost_types::Duration {
            seconds: s,
            nanos: 0,
        }),
        lease_secret: secret.into(),
    };
    env.client
        .clone()
        .renew(authed(req, token))
        .await
        .map(|r| r.into_inner())
}

async fn revoke(
    env: &Env,
    token: &str,
    lease_id: &str,
    secret: &str,
) -> Result<pb::RevokeResponse, tonic::Status> {
    let req = RevokeRequest {
        lease_id: lease_id.into(),
        lease_secret: secret.into(),
    };
    env.client
        .clone()
        .revoke(authed(req, token))
        .await
        .map(|r| r.into_inner())
}

async fn introspect(env: &Env, caller: &str, token: &str) -> pb::IntrospectResponse {
    env.leases()
        .introspect(authed(
            IntrospectRequest {
                token: token.into(),
            },
            caller,
        ))
        .await
        .unwrap()
        .into_inner()
}

async fn list(
    env: &Env,
    caller: &str,
    filter: LeaseFilter,
) -> Result<Vec<pb::Lease>, tonic::Status> {
    let mut s = env
        .leases()
        .list(authed(
            ListLeasesRequest {
                filter: Some(filter),
                limit: 0,
            },
            caller,
        ))
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(l) = s.message().await? {
        out.push(l);
    }
    Ok(out)
}

#[tokio::test]
async fn renewal_extends_up_to_the_max_lifetime_without_a_new_ci_token() {
    let t0 = SystemClock.now();
    let clock = ManualClock::new(t0);
    let env = start(Arc::new(clock.clone()), "").await;
    let token = token_at(&env, "main", DEV_REPOSITORY, t0);
    let m = mint(&env, &token, "lease-api", Some(600)).await;
    let lease = m.lease.unwrap();
    assert_eq!(lease.expires_at.unwrap().seconds, t0 + 600);
    assert_eq!(lease.max_expires_at.unwrap().seconds, t0 + 3600);
    let first = payload(&m.credential.unwrap().token);

    // Renew with the lease secret alone: the CI token is not presented at all.
    clock.advance(500);
    let r = renew(&env, "", &lease.id, &m.lease_secret, Some(1800))
        .await
        .unwrap();
    let l = r.lease.unwrap();
    assert_eq!(l.expires_at.unwrap().seconds, t0 + 500 + 1800);
    assert_eq!(l.renew_count, 1);
    let fresh = payload(&r.credential.unwrap().token);
    assert_eq!(fresh["jti"], first["jti"], "same lease, same jti");
    assert_eq!(fresh["exp"], json!(t0 + 2300));
    assert_eq!(fresh["sub"], first["sub"]);

    // The TTL cap (30m) still applies to each renewal; the lifetime caps the total.
    clock.advance(1000);
    let l = renew(&env, "", &lease.id, &m.lease_secret, Some(7200))
        .await
        .unwrap()
        .lease
        .unwrap();
    assert_eq!(l.expires_at.unwrap().seconds, t0 + 1500 + 1800);
    clock.advance(1500);
    let l = renew(&env, "", &lease.id, &m.lease_secret, Some(1800))
        .await
        .unwrap()
        .lease
        .unwrap();
    assert_eq!(
        l.expires_at.unwrap().seconds,
        t0 + 3600,
        "clamped to the max lifetime"
    );
    // Past the end, renewal is refused and says why.
    clock.advance(601);
    let e = renew(&env, "", &lease.id, &m.lease_secret, None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("lease is expired"), "{}", e.message());

    // Proof is required: no secret and no token, or a wrong secret.
    let m2 = mint(
        &env,
        &token_at(&env, "main", DEV_REPOSITORY, t0 + 3601),
        "lease-api",
        None,
    )
    .await;
    let id2 = m2.lease.unwrap().id;
    let e = renew(&env, "", &id2, "", None).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = renew(&env, "", &id2, "lks_wrong", None).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // The holder's own identity token is proof too.
    let own = token_at(&env, "feature/x", DEV_REPOSITORY, t0 + 3601);
    renew(&env, &own, &id2, "", None).await.unwrap();

    let recs = env.records().await;
    let renewals: Vec<_> = recs.iter().filter(|r| r.entry.action == "renew").collect();
    assert_eq!(
        renewals
            .iter()
            .map(|r| r.entry.outcome.as_str())
            .collect::<Vec<_>>(),
        vec!["allowed", "allowed", "allowed", "denied", "denied", "denied", "allowed"]
    );
    assert_eq!(
        renewals[0].entry.lease_id.as_deref(),
        Some(lease.id.as_str())
    );
    assert_eq!(renewals[0].entry.ttl_secs, Some(1800));
    assert_eq!(renewals[0].entry.context["proof"], "lease_secret");
    assert_eq!(
        renewals[0].entry.repository.as_deref(),
        Some(DEV_REPOSITORY)
    );
    env.stop().await;
}

#[tokio::test]
async fn renewal_stops_when_the_granting_rule_is_removed() {
    let t0 = SystemClock.now();
    let env = start(Arc::new(SystemClock), "").await;
    let m = mint(
        &env,
        &token_at(&env, "main", DEV_REPOSITORY, t0),
        "lease-api",
        None,
    )
    .await;
    let lease = m.lease.unwrap();
    let broker = env.broker().clone();
    // A second broker over the same store with the rule removed: a policy change.
    let mut cfg = env.config.clone();
    let rules: Vec<_> = cfg
        .policy
        .rules()
        .iter()
        .filter(|r| r.name != "lease-users")
        .cloned()
        .collect();
    cfg.policy = latchkey::policy::Policy::new(rules);
    let changed = latchkey::broker::Broker::build(
        &cfg.broker_settings(),
        broker.store().clone(),
        broker.keys().clone(),
        Arc::new(latchkey::keys::MasterKey::generate()),
        Arc::new(SystemClock),
    )
    .await
    .expect("broker");
    let e = changed
        .renew(
            None,
            latchkey::broker::RenewRequest {
                lease_id: lease.id.clone(),
                ttl: None,
                lease_secret: Some(latchkey::secret::Secret::new(m.lease_secret.clone())),
            },
            "r1",
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), "no_rule", "{e}");
    // Under the unchanged policy it still renews.
    renew(&env, "", &lease.id, &m.lease_secret, None)
        .await
        .unwrap();
    env.stop().await;
}

#[tokio::test]
async fn revoke_own_lease_not_someone_elses_and_introspection_reports_it() {
    let now = SystemClock.now();
    let env = start(Arc::new(SystemClock), "").await;
    let mine = token_at(&env, "main", DEV_REPOSITORY, now);
    let theirs = token_at(&env, "main", OTHER_REPOSITORY, now);
    let auditor = token_at(&env, "ops/audit", DEV_REPOSITORY, now);
    let a = mint(&env, &mine, "lease-api", None).await;
    let b = mint(&env, &mine, "lease-api", None).await;
    let a_id = a.lease.clone().unwrap().id;
    let b_id = b.lease.clone().unwrap().id;
    let a_token = a.credential.clone().unwrap().token;

    let r = introspect(&env, &auditor, &a_token).await;
    assert!(r.active, "{}", r.reason);
    assert_eq!(
        r.lease.unwrap().identity_key,
        format!(
            "bb:{}/{}",
            payload(&mine)["workspaceUuid"].as_str().unwrap(),
            DEV_REPOSITORY
        )
    );

    // Someone else's identity, or a wrong secret: refused, lease untouched.
    let e = revoke(&env, &theirs, &a_id, "").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("another identity"));
    let e = revoke(&env, "", &a_id, &b.lease_secret).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(introspect(&env, &auditor, &a_token).await.active);

    // The holder revokes with its identity token; again is fine (idempotent).
    let r = revoke(&env, &mine, &a_id, "").await.unwrap();
    assert!(r.revoked && !r.upstream_pending);
    assert!(revoke(&env, &mine, &a_id, "").await.unwrap().revoked);
    let r = introspect(&env, &auditor, &a_token).await;
    assert!(!r.active);
    assert_eq!(r.reason, "lease revoked");
    assert_eq!(r.lease.unwrap().state, "revoked");
    let e = renew(&env, "", &a_id, &a.lease_secret, None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("lease is revoked"));

    // Revoke with the lease secret alone.
    assert!(
        revoke(&env, "", &b_id, &b.lease_secret)
            .await
            .unwrap()
            .revoked
    );

    // Bad ids and bad introspection input.
    let e = revoke(&env, &mine, "nope", "").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = revoke(&env, &mine, &uuid::Uuid::new_v4().to_string(), "")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let r = introspect(&env, &auditor, &mine).await;
    assert!(!r.active);
    assert_eq!(r.reason, "not issued by this broker");
    let mut forged = a_token.clone();
    forged.push('A');
    assert_eq!(
        introspect(&env, &auditor, &forged).await.reason,
        "bad signature"
    );
    // Introspection needs the role.
    let e = env
        .leases()
        .introspect(authed(
            IntrospectRequest {
                token: a_token.clone(),
            },
            &mine,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // Every action is in the chain; no lease secret ever reached the store.
    let recs = env.records().await;
    let actions: Vec<(&str, &str)> = recs
        .iter()
        .map(|r| (r.entry.action.as_str(), r.entry.outcome.as_str()))
        .filter(|(a, _)| *a != "mint")
        .collect();
    assert_eq!(
        actions,
        vec![
            ("introspect", "allowed"),
            ("revoke", "denied"),
            ("revoke", "denied"),
            ("introspect", "allowed"),
            ("revoke", "allowed"),
            ("revoke", "allowed"),
            ("introspect", "allowed"),
            ("renew", "denied"),
            ("revoke", "allowed"),
            ("revoke", "denied"),
            ("revoke", "denied"),
            ("introspect", "allowed"),
            ("introspect", "allowed"),
            ("introspect", "denied"),
        ]
    );
    assert_eq!(
        recs.iter()
            .filter(|r| r.entry.reason.as_deref() == Some("already revoked"))
            .count(),
        1
    );
    let mut env = env;
    env.stop_checkpointless().await;
    let bytes = common::all_bytes_under(env.dir.path());
    for s in [&a.lease_secret, &b.lease_secret, &a_token] {
        assert!(
            !common::contains(&bytes, s),
            "a secret reached the database files"
        );
    }
}

#[tokio::test]
async fn bulk_revoke_by_repository_is_admin_only_and_audited_per_lease() {
    let now = SystemClock.now();
    let env = start(Arc::new(SystemClock), "").await;
    let mine = token_at(&env, "main", DEV_REPOSITORY, now);
    let theirs = token_at(&env, "main", OTHER_REPOSITORY, now);
    let admin = token_at(&env, "ops/admin", DEV_REPOSITORY, now);
    let auditor = token_at(&env, "ops/audit", DEV_REPOSITORY, now);
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(mint(&env, &mine, "reports", None).await.lease.unwrap().id);
    }
    let survivor = mint(&env, &theirs, "reports", None).await;

    let by_repo = LeaseFilter {
        repository: DEV_REPOSITORY.into(),
        ..Default::default()
    };
    let req = |filter: LeaseFilter, dry_run: bool, all: bool| RevokeMatchingRequest {
        filter: Some(filter),
        reason: "incident 42".into(),
        dry_run,
        all,
    };
    let mut leases = env.leases();
    let e = leases
        .revoke_matching(authed(req(by_repo.clone(), false, false), &mine))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = leases
        .revoke_matching(authed(req(LeaseFilter::default(), false, false), &admin))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("name a filter"));
    let dry = leases
        .revoke_matching(authed(req(by_repo.clone(), true, false), &admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((dry.matched, dry.revoked), (5, 0));

    // Listing: auditors may, callers without the role may not.
    assert_eq!(
        list(&env, &auditor, by_repo.clone()).await.unwrap().len(),
        5
    );
    assert_eq!(
        list(&env, &mine, by_repo.clone()).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    let done = leases
        .revoke_matching(authed(req(by_repo.clone(), false, false), &admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((done.matched, done.revoked), (5, 5));
    assert!(done.failed.is_empty());
    assert!(list(&env, &auditor, by_repo.clone())
        .await
        .unwrap()
        .is_empty());
    let all = list(
        &env,
        &auditor,
        LeaseFilter {
            include_inactive: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(all.len(), 6);
    for l in &all {
        let expect = if l.repository == DEV_REPOSITORY {
            "revoked"
        } else {
            "live"
        };
        assert_eq!(l.state, expect, "{l:?}");
    }
    let s = survivor.lease.unwrap();
    assert!(all.iter().any(|l| l.id == s.id && l.state == "live"));
    // Again: nothing left to revoke.
    let again = leases
        .revoke_matching(authed(req(by_repo, false, false), &admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.matched, again.revoked), (0, 0));

    let recs = env.records().await;
    let revokes: Vec<_> = recs.iter().filter(|r| r.entry.action == "revoke").collect();
    assert_eq!(revokes.len(), 5, "one record per lease");
    let mut revoked_ids: Vec<_> = revokes
        .iter()
        .map(|r| r.entry.lease_id.clone().unwrap())
        .collect();
    revoked_ids.sort();
    ids.sort();
    assert_eq!(revoked_ids, ids);
    for r in &revokes {
        assert_eq!(r.entry.context["reason"], "incident 42");
        assert!(r.entry.context["actor"].contains(DEV_REPOSITORY));
        assert_eq!(r.entry.repository.as_deref(), Some(DEV_REPOSITORY));
    }
    let summary: Vec<_> = recs
        .iter()
        .filter(|r| r.entry.action == "revoke_matching")
        .map(|r| {
            (
                r.entry.outcome.clone(),
                r.entry.context.get("revoked").cloned(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("denied".into(), None),
            ("denied".into(), None),
            ("allowed".into(), Some("0".into())),
            ("allowed".into(), Some("5".into())),
            ("allowed".into(), Some("0".into())),
        ]
    );
    env.stop().await;
}

#[tokio::test]
async fn live_lease_quota_per_identity_and_target() {
    let now = SystemClock.now();
    let env = start(Arc::new(SystemClock), "").await;
    let mine = token_at(&env, "main", DEV_REPOSITORY, now);
    let theirs = token_at(&env, "main", OTHER_REPOSITORY, now);
    let mut first = None;
    for _ in 0..3 {
        first.get_or_insert(mint(&env, &mine, "lease-api", None).await);
    }
    let e = env.mint(&mine, "lease-api", &[], None).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("at most 3 live leases"),
        "{}",
        e.message()
    );
    // Another identity has its own quota; another target is not counted.
    mint(&env, &theirs, "lease-api", None).await;
    mint(&env, &mine, "reports", None).await;
    // Revoking one frees a slot.
    let f = first.unwrap();
    revoke(&env, "", &f.lease.unwrap().id, &f.lease_secret)
        .await
        .unwrap();
    mint(&env, &mine, "lease-api", None).await;
    let recs = env.records().await;
    let denied = recs
        .iter()
        .find(|r| r.entry.outcome == "denied" && r.entry.action == "mint")
        .unwrap();
    assert!(denied
        .entry
        .reason
        .as_deref()
        .unwrap()
        .contains("quota exceeded"));
    assert_eq!(denied.entry.lease_id, None);
    env.stop().await;
}

#[tokio::test]
async fn replay_guard_bounds_mints_per_ci_token() {
    let now = SystemClock.now();
    let env = start(Arc::new(SystemClock), "max_mints_per_token = 2").await;
    let token = token_at(&env, "main", DEV_REPOSITORY, now);
    mint(&env, &token, "reports", None).await;
    mint(&env, &token, "lease-api", None).await;
    let e = env.mint(&token, "reports", &[], None).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("already used 2 times"),
        "{}",
        e.message()
    );
    // A fresh token (new jti) from the same job is fine.
    mint(
        &env,
        &token_at(&env, "main", DEV_REPOSITORY, now),
        "reports",
        None,
    )
    .await;
    // Denied requests do not consume uses.
    let t2 = token_at(&env, "main", DEV_REPOSITORY, now);
    env.mint(&t2, "orders-api", &["nope"], None)
        .await
        .unwrap_err();
    mint(&env, &t2, "reports", None).await;
    mint(&env, &t2, "reports", None).await;
    env.stop().await;
}

#[derive(Debug, Clone)]
enum Op {
    Mint(i64),
    Renew(usize, i64),
    Revoke(usize),
    Advance(i64),
    Reap,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1i64..4000).prop_map(Op::Mint),
        (0usize..8, 1i64..4000).prop_map(|(i, t)| Op::Renew(i, t)),
        (0usize..8).prop_map(Op::Revoke),
        (1i64..2000).prop_map(Op::Advance),
        Just(Op::Reap),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// No sequence of mint, renew, revoke, expiry and reaping leaves a lease live past
    /// its maximum lifetime, or a revoked lease's token active.
    #[test]
    fn prop_no_lease_outlives_its_max_lifetime(ops in proptest::collection::vec(op(), 1..25)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let t0 = SystemClock.now();
            let clock = ManualClock::new(t0);
            let env = start(Arc::new(clock.clone()), "").await;
            let auditor_claims = |now| token_at(&env, "ops/audit", DEV_REPOSITORY, now);
            let mut held: Vec<(String, String, String)> = Vec::new(); // id, secret, token
            for op in ops {
                let now = clock.now();
                match op {
                    Op::Mint(ttl) => {
                        let t = token_at(&env, "main", OTHER_REPOSITORY, now);
                        if let Ok(m) = env.mint(&t, "lease-api", &[], Some(ttl)).await {
                            held.push((m.lease.unwrap().id, m.lease_secret, m.credential.unwrap().token));
                        }
                    }
                    Op::Renew(i, ttl) => {
                        if let Some((id, s, tok)) = held.get_mut(i) {
                            if let Ok(r) = renew(&env, "", id, s, Some(ttl)).await {
                                let l = r.lease.unwrap();
                                assert!(l.expires_at.unwrap().seconds <= l.max_expires_at.unwrap().seconds);
                                *tok = r.credential.unwrap().token;
                            }
                        }
                    }
                    Op::Revoke(i) => {
                        if let Some((id, s, _)) = held.get(i) {
                            assert!(revoke(&env, "", id, s).await.unwrap().revoked);
                        }
                    }
                    Op::Advance(s) => clock.advance(s),
                    Op::Reap => { env.broker().reaper().run_once().await.unwrap(); }
                }
                let now = clock.now();
                let all = env
                    .broker()
                    .store()
                    .leases(&latchkey::lease::LeaseFilter { include_inactive: true, ..Default::default() }, now, None, 1000)
                    .await
                    .unwrap();
                for l in &all {
                    assert!(l.max_expires_at - l.issued_at <= 3600, "{l:?}");
                    assert!(l.expires_at <= l.max_expires_at, "{l:?}");
                    if l.is_live(now) {
                        assert!(now < l.max_expires_at);
                    }
                }
                let auditor = auditor_claims(now);
                for (id, _, tok) in &held {
                    let r = introspect(&env, &auditor, tok).await;
                    let l = all.iter().find(|l| &l.id == id).unwrap();
                    assert_eq!(r.active, l.is_live(now) && payload(tok)["exp"].as_i64().unwrap() > now, "{r:?} {l:?}");
                }
            }
            env.stop().await;
        });
    }
}

/// A target with an upstream credential: mints a token plus a handle, and revokes by
/// handle, failing while told to.
#[derive(Debug, Default)]
struct FakeUpstream {
    fail_revoke: std::sync::atomic::AtomicBool,
    revoked: std::sync::Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl latchkey::mint::Minter for FakeUpstream {
    fn kind(&self) -> &'static str {
        "fake"
    }
    async fn mint(
        &self,
        ctx: &latchkey::mint::MintContext<'_>,
    ) -> Result<latchkey::mint::Credential, latchkey::mint::MintError> {
        Ok(latchkey::mint::Credential {
            kind: "fake",
            token: Some(latchkey::secret::Secret::new(format!(
                "upstream-token-{}",
                ctx.lease_id
            ))),
            username: None,
            password: None,
            fields: Default::default(),
            expires_at: ctx.now + ctx.ttl.as_secs() as i64,
            id: ctx.lease_id.to_string(),
            upstream: Some(latchkey::secret::Secret::new(format!(
                "handle-{}",
                ctx.lease_id
            ))),
        })
    }
    async fn revoke(
        &self,
        _lease_id: &str,
        upstream: Option<&latchkey::secret::SecretString>,
        _expires_at: i64,
    ) -> Result<(), latchkey::mint::MintError> {
        if self.fail_revoke.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(latchkey::mint::MintError::Upstream {
                target: "reports".into(),
                reason: "HTTP 503".into(),
            });
        }
        self.revoked
            .lock()
            .unwrap()
            .push(upstream.unwrap().expose().clone());
        Ok(())
    }
}

#[tokio::test]
async fn upstream_revocations_are_retried_until_the_target_answers() {
    use std::sync::atomic::Ordering::SeqCst;
    let t0 = SystemClock.now();
    let clock = ManualClock::new(t0);
    let fake = Arc::new(FakeUpstream::default());
    // The fake serves the running broker itself, so its background reaper (whose first
    // pass may come late on a loaded machine) revokes through the same fake and opens
    // handles with the same master key as the calls below.
    let env = Env::start_with_minters(
        "",
        "busy_timeout = \"2s\"",
        &extra(),
        Arc::new(clock.clone()),
        vec![(
            "reports".to_string(),
            fake.clone() as Arc<dyn latchkey::mint::Minter>,
        )],
    )
    .await;
    let broker = env.broker().clone();
    let token = token_at(&env, "main", DEV_REPOSITORY, t0);
    let admin = token_at(&env, "ops/admin", DEV_REPOSITORY, t0);
    let req = || latchkey::broker::MintRequest {
        target: "reports".into(),
        ..Default::default()
    };
    let m = broker.mint(Some(&token), req(), "m1").await.unwrap();
    let id = m.lease.id.clone();

    // The target is down: revoked here at once, upstream pending.
    fake.fail_revoke.store(true, SeqCst);
    let proof = latchkey::broker::LeaseProof {
        token: Some(&token),
        lease_secret: None,
    };
    let r = broker.revoke(proof, &id, "r1").await.unwrap();
    assert!(r.revoked && r.upstream_pending);
    let l = broker.store().lease(&id).await.unwrap().unwrap();
    assert_eq!(l.state, latchkey::lease::LeaseState::Revoking);
    assert_eq!(l.attempts, 1);
    assert_eq!(
        l.last_error.as_deref(),
        Some("upstream reports unavailable: HTTP 503")
    );

    // Bulk revocation reports what failed upstream.
    for i in 0..3 {
        broker
            .mint(Some(&token), req(), &format!("m{i}"))
            .await
            .unwrap();
    }
    let s = broker
        .revoke_matching(
            Some(&admin),
            latchkey::broker::RevokeMatching {
                filter: latchkey::lease::LeaseFilter {
                    target: Some("reports".into()),
                    ..Default::default()
                },
                reason: "drill".into(),
                ..Default::default()
            },
            "bulk",
        )
        .await
        .unwrap();
    assert_eq!((s.matched, s.revoked, s.failed.len()), (3, 3, 3));
    assert!(s.failed.iter().all(|(_, why)| why.contains("HTTP 503")));

    // The target recovers; once the backoff passes the reaper finishes every one.
    fake.fail_revoke.store(false, SeqCst);
    assert_eq!(
        broker.reaper().run_once().await.unwrap().revoked_upstream,
        0,
        "not due yet"
    );
    clock.advance(5);
    let rep = broker.reaper().run_once().await.unwrap();
    assert_eq!((rep.revoked_upstream, rep.failed), (4, 0));
    let mut handles = fake.revoked.lock().unwrap().clone();
    handles.sort();
    assert_eq!(handles.len(), 4);
    assert!(handles.contains(&format!("handle-{id}")));
    let l = broker.store().lease(&id).await.unwrap().unwrap();
    assert_eq!(l.state, latchkey::lease::LeaseState::Revoked);

    // Upstream handles and tokens are sealed or fingerprinted, never stored in the clear.
    let mut env = env;
    drop(broker);
    env.stop_checkpointless().await;
    let bytes = common::all_bytes_under(env.dir.path());
    assert!(!common::contains(&bytes, "handle-"));
    assert!(!common::contains(&bytes, "upstream-token-"));
}

#[tokio::test]
async fn a_caller_introspecting_some_targets_cannot_tell_a_genuine_token_of_another_from_a_forged_one(
) {
    let now = SystemClock.now();
    let env = start(Arc::new(SystemClock), "").await;
    let mine = token_at(&env, "main", DEV_REPOSITORY, now);
    let narrow = token_at(&env, "ops/reports", DEV_REPOSITORY, now);
    let other_target = mint(&env, &mine, "lease-api", None)
        .await
        .credential
        .unwrap()
        .token;
    let report = mint(&env, &mine, "reports", None)
        .await
        .credential
        .unwrap()
        .token;
    let mut forged = other_target.clone();
    forged.push('A');
    let genuine = introspect(&env, &narrow, &other_target).await;
    let fake = introspect(&env, &narrow, &forged).await;
    for r in [&genuine, &fake] {
        assert!(!r.active);
        assert_eq!(r.reason, "", "an inactive answer says nothing more");
        assert!(r.lease.is_none());
    }
    assert_eq!(genuine, fake, "the two answers are the same");
    // Its own target: active, with the lease.
    let r = introspect(&env, &narrow, &report).await;
    assert!(r.active, "{}", r.reason);
    assert!(r.lease.is_some());
    // The audit record keeps the real reason.
    let refused = env
        .records()
        .await
        .into_iter()
        .filter(|r| r.entry.action == "introspect")
        .any(|r| {
            r.entry
                .reason
                .as_deref()
                .unwrap_or("")
                .contains("introspect")
        });
    assert!(refused, "the refusal is audited with its reason");
    env.stop().await;
}
