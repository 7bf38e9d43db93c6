//! Criterion micro-benchmarks of the pieces one mint is made of:
//!
//! - `verify_warm_jwks/<alg>`: a caller token verified against a warm key cache (parse,
//!   signature, claims, preset normalisation);
//! - `policy_decide/<rules>`: a decision with 1, 100 and 10,000 rules over 10 issuers and
//!   100 targets (rules are indexed by issuer and target, so the 10,000 are not scanned);
//! - `sign_jwt/<alg>`: a credential signed per algorithm;
//! - `audit_append/single` (one writer: one commit and fsync per record) and
//!   `audit_append/group_64` (64 concurrent writers group-committed), `synchronous=FULL`,
//!   on a file in the working directory;
//! - `audit_chain/verify_per_record`: re-hashing and linking one record of the chain.
//!
//! Run: `cargo bench --bench micro` (one group: `cargo bench --bench micro -- policy`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use latchkey::audit::{AuditEntry, AuditRecord, GENESIS_HASH};
use latchkey::clock::SystemClock;
use latchkey::config::Config;
use latchkey::devissuer::{DevIssuer, DEV_REPOSITORY};
use latchkey::identity::Verifier;
use latchkey::jose::{Alg, SigningKey};
use latchkey::policy::Request;
use latchkey::store::sqlite::{self, SqliteStore};
use latchkey::store::AuditLog;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Duration;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn verify(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("verify_warm_jwks");
    for alg in [Alg::RS256, Alg::ES256, Alg::EdDSA] {
        let issuer = rt
            .block_on(DevIssuer::spawn("127.0.0.1:0".parse().unwrap(), alg))
            .expect("issuer");
        let text = format!(
            r#"
[server]
grpc_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
issuer_url = "http://127.0.0.1:9"
[[issuers]]
name = "bb"
preset = "bitbucket"
issuer = "{}"
audiences = ["{}"]
"#,
            issuer.issuer_url(),
            issuer.audience()
        );
        let cfg = Config::parse(&text, "bench.toml").expect("config");
        let verifier = Verifier::new(&cfg.issuers, Arc::new(SystemClock));
        let token = issuer.sign(&issuer.bitbucket_claims("main"));
        rt.block_on(verifier.verify(&token))
            .expect("warm-up verify");
        g.bench_with_input(BenchmarkId::from_parameter(alg), &token, |b, t| {
            b.iter(|| rt.block_on(verifier.verify(t)).expect("verify"))
        });
    }
    g.finish();
}

/// A config with `rules` allow rules spread over 10 issuers and 100 targets, each on one
/// repository and a branch list, like a real estate of pipelines.
fn policy_config(rules: usize) -> String {
    let mut t = String::from(
        "[server]\ngrpc_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\nissuer_url = \"http://127.0.0.1:9\"\n",
    );
    for i in 0..10 {
        t += &format!(
            "[[issuers]]\nname = \"ws{i}\"\npreset = \"bitbucket\"\nissuer = \"https://issuer{i}.example.com\"\naudiences = [\"a\"]\n"
        );
    }
    for i in 0..100 {
        t += &format!("[[targets]]\nname = \"t{i}\"\nkind = \"jwt\"\naudience = \"t{i}\"\n");
    }
    for r in 0..rules {
        t += &format!(
            "[[rules]]\nname = \"r{r}\"\nissuer = \"ws{}\"\nclaims = {{ repositoryUuid = \"{{repo-{r}}}\", branchName = [\"main\", {{ glob = \"release/*\" }}] }}\ngrants = [{{ target = \"t{}\", scopes = [\"read\", \"write\"], max_ttl = \"10m\" }}]\n",
            r % 10,
            r % 100
        );
    }
    t += "[[rules]]\nname = \"deny-wip\"\nissuer = \"ws3\"\neffect = \"deny\"\nclaims = { branchName = { glob = \"wip/*\" } }\n";
    t
}

fn policy(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy_decide");
    for rules in [1usize, 100, 10_000] {
        let cfg = Config::parse(&policy_config(rules), "bench.toml").expect("config");
        // The caller the last rule grants: worst place in configuration order.
        let r = rules - 1;
        let (issuer, target) = (format!("ws{}", r % 10), format!("t{}", r % 100));
        let claims: Map<String, Value> = match json!({
            "repositoryUuid": format!("{{repo-{r}}}"),
            "branchName": "release/2.1",
            "workspaceUuid": "{ws}",
            "stepUuid": "{step}",
        }) {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let limits = cfg.target(&target).expect("target").limits();
        let scopes = vec!["read".to_string()];
        let req = Request {
            target: &target,
            scopes: &scopes,
            ttl: None,
        };
        assert!(
            cfg.policy.decide(&issuer, &claims, limits, req).is_ok(),
            "the bench caller is allowed"
        );
        g.bench_function(BenchmarkId::from_parameter(rules), |b| {
            b.iter(|| cfg.policy.decide(&issuer, &claims, limits, req))
        });
    }
    g.finish();
}

fn sign(c: &mut Criterion) {
    let mut g = c.benchmark_group("sign_jwt");
    let now = 1_790_000_000i64;
    let claims = json!({
        "iss": "https://latchkey.internal", "sub": format!("bb:{DEV_REPOSITORY}"),
        "aud": "https://orders.example.com", "iat": now, "nbf": now, "exp": now + 600,
        "jti": "0b4f7e0c-1f7e-4c7e-9a51-6c1f0d7c2a11", "scope": "orders:read orders:write",
        "act": { "iss": "https://api.bitbucket.org/2.0/workspaces/acme/pipelines-config/identity/oidc",
                 "sub": "{repo}:{step}" },
    });
    for alg in [Alg::ES256, Alg::ES384, Alg::EdDSA, Alg::RS256, Alg::PS256] {
        let (key, _) = SigningKey::generate(alg).expect("key");
        g.bench_function(BenchmarkId::from_parameter(alg), |b| {
            b.iter(|| key.sign_jwt(&claims, None).expect("sign"))
        });
    }
    g.finish();
}

fn entry(i: u64) -> AuditEntry {
    AuditEntry {
        time_ms: 1_790_000_000_000 + i as i64,
        request_id: format!("req-{i}"),
        action: "mint".into(),
        outcome: "allowed".into(),
        issuer: Some("bb".into()),
        identity_key: Some(format!("bb:{{ws}}/{{repo-{}}}", i % 100)),
        subject: Some(format!("{{repo-{}}}:{{step-{i}}}", i % 100)),
        repository: Some(format!("{{repo-{}}}", i % 100)),
        git_ref: Some("main".into()),
        token_fingerprint: Some(latchkey::jose::sha256_hex(i.to_le_bytes())),
        target: Some("orders-api".into()),
        requested_scopes: vec!["orders:read".into()],
        granted_scopes: vec!["orders:read".into()],
        ttl_secs: Some(300),
        rule: Some("orders-main".into()),
        lease_id: Some(format!("lease-{i}")),
        credential_fingerprint: Some(latchkey::jose::sha256_hex(i.to_be_bytes())),
        claims: json!({ "repositoryUuid": format!("{{repo-{}}}", i % 100), "branchName": "main" }),
        ..Default::default()
    }
}

fn audit(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir_in(".").expect("temp dir in the working directory");
    let store = Arc::new(
        SqliteStore::open(&sqlite::Config {
            path: dir.path().join("micro-audit.db"),
            busy_timeout: Duration::from_secs(5),
        })
        .expect("store"),
    );
    let mut g = c.benchmark_group("audit_append");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    let mut i = 0u64;
    g.throughput(Throughput::Elements(1));
    g.bench_function("single", |b| {
        b.iter(|| {
            i += 1;
            rt.block_on(store.append(entry(i))).expect("append")
        })
    });
    g.throughput(Throughput::Elements(64));
    g.bench_function("group_64", |b| {
        b.iter(|| {
            rt.block_on(async {
                let tasks: Vec<_> = (0..64)
                    .map(|_| {
                        i += 1;
                        let (s, e) = (store.clone(), entry(i));
                        tokio::spawn(async move { s.append(e).await })
                    })
                    .collect();
                for t in tasks {
                    t.await.expect("task").expect("append");
                }
            })
        })
    });
    g.finish();

    let mut g = c.benchmark_group("audit_chain");
    let mut records = Vec::with_capacity(10_000);
    let (mut seq, mut prev) = (0i64, GENESIS_HASH.to_string());
    for n in 0..10_000u64 {
        let r = AuditRecord::chain(seq, &prev, entry(n));
        (seq, prev) = (r.seq, r.hash.clone());
        records.push(r);
    }
    g.throughput(Throughput::Elements(records.len() as u64));
    g.bench_function("verify_per_record", |b| {
        b.iter(|| latchkey::audit::verify_chain(&records, (0, GENESIS_HASH)).expect("intact"))
    });
    g.finish();
}

criterion_group!(benches, verify, policy, sign, audit);
criterion_main!(benches);
