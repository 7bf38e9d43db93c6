//! Bulk revocation against the embedded store: seeds N live leases (default 100,000)
//! into a fresh SQLite file, revokes them all with `Broker::revoke_matching` (one audit
//! record per lease), and meanwhile mints through the full path every few milliseconds
//! to show revocation does not stall Mint.
//!
//! Run: `cargo bench --bench bulk_revoke` (set LATCHKEY_BENCH_LEASES to change N).
//! Exits 1 when the revocation takes 10 s or more, or leaves a lease live.

use latchkey::audit::AuditEntry;
use latchkey::broker::{Broker, MintRequest, RevokeMatching};
use latchkey::clock::{SharedClock, SystemClock};
use latchkey::config::Config;
use latchkey::devissuer::{DevIssuer, DEV_REPOSITORY};
use latchkey::jose::Alg;
use latchkey::keys::MasterKey;
use latchkey::lease::{LeaseFilter, LeaseRecord, LeaseState, MintGuard};
use latchkey::store::sqlite::{self, SqliteStore};
use latchkey::store::Store;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn config(issuer: &DevIssuer, db: &str) -> Config {
    let text = format!(
        r#"
[server]
grpc_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
issuer_url = "http://127.0.0.1:9/latchkey"
[store]
path = "{db}"
[[issuers]]
name = "bb"
preset = "bitbucket"
issuer = "{iss}"
audiences = ["{aud}"]
[[targets]]
name = "bulk"
kind = "jwt"
audience = "bulk"
[[targets]]
name = "probe"
kind = "jwt"
audience = "probe"
[[rules]]
name = "probe"
issuer = "bb"
claims = {{ repositoryUuid = "{DEV_REPOSITORY}" }}
grants = [{{ target = "probe" }}]
[[rules]]
name = "admins"
issuer = "bb"
claims = {{ branchName = "ops/admin" }}
roles = ["admin"]
# Measure the broker, not the rate limiter.
[limits]
identity_rate = 0
source_ip_rate = 0
"#,
        iss = issuer.issuer_url(),
        aud = issuer.audience(),
    );
    Config::parse(&text, "bench.toml").expect("bench config")
}

fn lease(now: i64, i: usize) -> LeaseRecord {
    LeaseRecord {
        id: uuid::Uuid::new_v4().to_string(),
        issuer: "bb".into(),
        identity_key: format!("bb:{{ws}}/{DEV_REPOSITORY}"),
        subject: format!("step-{i}"),
        repository: Some(DEV_REPOSITORY.into()),
        target: "bulk".into(),
        kind: "jwt".into(),
        rule: "seed".into(),
        scopes: vec!["read".into()],
        issued_at: now - (i % 600) as i64,
        expires_at: now + 3600,
        max_expires_at: now + 3600,
        renew_count: 0,
        state: LeaseState::Live,
        revoked_at: None,
        secret_hash: latchkey::jose::sha256_hex(i.to_string()),
        claims_json: serde_json::json!({"repositoryUuid": DEV_REPOSITORY, "branchName": "main", "stepUuid": format!("{{{i}}}")}).to_string(),
        upstream: None,
        attempts: 0,
        next_attempt_at: None,
        last_error: None,
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("LATCHKEY_BENCH_LEASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let issuer = DevIssuer::spawn("127.0.0.1:0".parse().unwrap(), Alg::RS256)
        .await
        .expect("dev issuer");
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("bench.db");
    let cfg = config(&issuer, &db.display().to_string());
    let clock: SharedClock = Arc::new(SystemClock);
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&sqlite::Config {
            path: db.clone(),
            busy_timeout: Duration::from_secs(5),
        })
        .expect("store"),
    );
    let master = Arc::new(MasterKey::generate());
    let wanted = vec![
        ("bulk".to_string(), Alg::ES256),
        ("probe".to_string(), Alg::ES256),
    ];
    let keys = Arc::new(
        latchkey::broker::keys::load_key_ring(store.as_ref(), &master, &wanted, &clock)
            .await
            .expect("keys"),
    );
    let broker = Arc::new(
        Broker::build(
            &cfg.broker_settings(),
            store.clone(),
            keys,
            master,
            clock.clone(),
        )
        .await
        .expect("broker"),
    );

    // Seed: concurrent commits, so the writer group-commits them.
    let now = clock.now();
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let s = store.clone();
        set.spawn(async move {
            let e = AuditEntry {
                time_ms: now * 1000,
                request_id: format!("seed-{i}"),
                action: "mint".into(),
                outcome: "allowed".into(),
                ..AuditEntry::default()
            };
            s.commit_mint(lease(now, i), MintGuard::default(), e, now)
                .await
        });
        if set.len() >= 4096 {
            set.join_next()
                .await
                .expect("task")
                .expect("join")
                .expect("seed");
        }
    }
    while let Some(r) = set.join_next().await {
        r.expect("join").expect("seed");
    }
    let seed = started.elapsed();
    println!(
        "seeded {n} leases in {:.2} s ({:.0} commits/s)",
        seed.as_secs_f64(),
        n as f64 / seed.as_secs_f64()
    );

    // A mint every 5 ms through the whole path while the revocation runs.
    let caller = issuer.sign(&issuer.bitbucket_claims("main"));
    let admin = issuer.sign(&issuer.bitbucket_claims("ops/admin"));
    let stop = Arc::new(AtomicBool::new(false));
    let probe = {
        let (b, stop, token) = (broker.clone(), stop.clone(), caller.clone());
        tokio::spawn(async move {
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let req = MintRequest {
                    target: "probe".into(),
                    ..MintRequest::default()
                };
                b.mint(Some(&token), req, "probe")
                    .await
                    .expect("probe mint");
                lat.push(t.elapsed());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            lat
        })
    };
    let started = Instant::now();
    let summary = broker
        .revoke_matching(
            Some(&admin),
            RevokeMatching {
                filter: LeaseFilter {
                    repository: Some(DEV_REPOSITORY.into()),
                    target: Some("bulk".into()),
                    ..LeaseFilter::default()
                },
                reason: "bench".into(),
                ..RevokeMatching::default()
            },
            "bench",
        )
        .await
        .expect("revoke_matching");
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut lat = probe.await.expect("probe");
    lat.sort();
    let left = store
        .leases(
            &LeaseFilter {
                target: Some("bulk".into()),
                ..LeaseFilter::default()
            },
            clock.now(),
            None,
            10,
        )
        .await
        .expect("leases")
        .len();
    println!(
        "revoked {} of {} matched leases in {:.2} s ({:.0} leases/s), {} left live",
        summary.revoked,
        summary.matched,
        took.as_secs_f64(),
        summary.revoked as f64 / took.as_secs_f64(),
        left
    );
    println!(
        "mint latency during the revocation: {} mints, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        lat.len(),
        pct(&lat, 0.5).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    let ok = took < Duration::from_secs(10) && left == 0 && summary.revoked as usize == n;
    println!(
        "{}",
        if ok {
            "PASS: under 10 s, nothing left live"
        } else {
            "FAIL"
        }
    );
    if !ok {
        std::process::exit(1);
    }
}
