//! The audit store at speed and at scale, on a SQLite file in the working directory with
//! `synchronous=FULL`:
//!
//! 1. group-committed appends from 64 concurrent writers (records/s);
//! 2. a store of N records (default 1,000,000; `LATCHKEY_BENCH_RECORDS=10000000` for the
//!    README's number) spread over 1,000 repositories and 30 days: the first page (100
//!    records) of one repository over one day, median and worst of 20 queries;
//! 3. `verify` of the whole chain and its checkpoints (records/s).
//!
//! Run: `cargo bench --bench audit`. Exits 1 when a target is missed (50,000 appends/s,
//! 100 ms first page, 500,000 verified records/s). The store is deleted afterwards unless
//! a target was missed or `LATCHKEY_BENCH_KEEP=1` is set (to run `latchkey audit verify
//! --db` on the settled file).

use latchkey::audit::checkpoint::{AuditStatus, Config};
use latchkey::audit::verify::VerifyOptions;
use latchkey::audit::{AuditEntry, AuditQuery};
use latchkey::broker::checkpoint::{load_audit_signer, Checkpointer};
use latchkey::clock::{SharedClock, SystemClock};
use latchkey::keys::MasterKey;
use latchkey::store::sqlite::{self, SqliteStore};
use latchkey::store::AuditLog;
use latchkey::store::Store;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WRITERS: usize = 64;
const REPOS: u64 = 1000;
const DAYS: i64 = 30;
const DAY_MS: i64 = 24 * 3600 * 1000;
const T0: i64 = 1_790_000_000_000;

fn entry(i: u64, total: u64) -> AuditEntry {
    let repo = i % REPOS;
    // Spread over DAYS in sequence order, as a real log is.
    let time_ms = T0 + (i as i64) * (DAYS * DAY_MS / total.max(1) as i64).max(1);
    AuditEntry {
        time_ms,
        request_id: latchkey::clock::new_id(),
        action: "mint".into(),
        outcome: if i % 10 == 0 { "denied" } else { "allowed" }.into(),
        issuer: Some("bb".into()),
        identity_key: Some(format!("{{repo-{repo}}}")),
        subject: Some(format!("{{repo-{repo}}}:{{step-{i}}}")),
        repository: Some(format!("{{repo-{repo}}}")),
        git_ref: Some("main".into()),
        pipeline: Some(format!("{{pipe-{i}}}")),
        token_fingerprint: Some(latchkey::jose::sha256_hex(i.to_le_bytes())),
        target: Some("orders-api".into()),
        requested_scopes: vec!["orders:read".into()],
        granted_scopes: vec!["orders:read".into()],
        ttl_secs: Some(300),
        rule: Some("orders-main".into()),
        lease_id: Some(latchkey::clock::new_id()),
        credential_fingerprint: Some(latchkey::jose::sha256_hex(i.to_be_bytes())),
        claims: serde_json::json!({
            "repositoryUuid": format!("{{repo-{repo}}}"),
            "branchName": "main",
            "stepUuid": format!("{{step-{i}}}"),
        }),
        ..Default::default()
    }
}

/// Appends `n` records with WRITERS concurrent tasks; answers the elapsed time.
async fn append_n(store: &Arc<SqliteStore>, n: u64, total: u64, offset: u64) -> Duration {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..WRITERS {
        let (store, next) = (store.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                store
                    .append(entry(offset + i, total))
                    .await
                    .expect("append");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    started.elapsed()
}

/// CPU seconds (user + system) used so far by this process's threads named `name`
/// (`None`: all of them), from `/proc/self/task`.
fn cpu_seconds(name: Option<&str>) -> f64 {
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if name.is_some_and(|n| comm.trim() != n) {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: state is 3rd; utime and stime 14th, 15th.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<&str> = rest.split_whitespace().collect();
        ticks += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    // Clock ticks are 1/100 s on Linux.
    ticks as f64 / 100.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let total: u64 = std::env::var("LATCHKEY_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir_in(".").expect("temp dir in the working directory");
    let db = dir.path().join("audit-bench.db");
    let store = Arc::new(
        SqliteStore::open(&sqlite::Config {
            path: db.clone(),
            busy_timeout: Duration::from_secs(5),
        })
        .expect("store"),
    );
    let mut missed = Vec::new();

    // 1. Appends, 64 writers, group commit.
    let warm = 20_000.min(total);
    append_n(&store, warm, total, 0).await;
    let measured = 200_000.min(total - warm);
    let (writer0, all0) = (cpu_seconds(Some("latchkey-store")), cpu_seconds(None));
    let took = append_n(&store, measured, total, warm).await;
    let (writer1, all1) = (cpu_seconds(Some("latchkey-store")), cpu_seconds(None));
    let rate = measured as f64 / took.as_secs_f64();
    println!(
        "appends: {measured} records from {WRITERS} concurrent writers in {:.2} s = {:.0} records/s (synchronous=FULL); CPU per record: store writer thread {:.1} µs, whole process {:.1} µs",
        took.as_secs_f64(),
        rate,
        (writer1 - writer0) * 1e6 / measured as f64,
        (all1 - all0) * 1e6 / measured as f64,
    );
    if rate < 50_000.0 {
        missed.push(format!("appends {rate:.0}/s < 50,000/s"));
    }

    // 2. Fill to `total`, with checkpoints every 1,000 records as the server makes them.
    let shared: Arc<dyn Store> = store.clone();
    let clock: SharedClock = Arc::new(SystemClock);
    let master = MasterKey::generate();
    let signer = Arc::new(
        load_audit_signer(shared.as_ref(), &master, &clock)
            .await
            .expect("audit key"),
    );
    let cp = Checkpointer::new(
        shared.clone(),
        signer.clone(),
        clock,
        Config::default(),
        Arc::new(AuditStatus::default()),
    );
    let filled_at = Instant::now();
    let mut done = warm + measured;
    while done < total {
        let chunk = 100_000.min(total - done);
        append_n(&store, chunk, total, done).await;
        done += chunk;
        cp.checkpoint_now().await.expect("checkpoint");
    }
    cp.checkpoint_now().await.expect("checkpoint");
    println!(
        "filled to {total} records in {:.1} s",
        filled_at.elapsed().as_secs_f64()
    );

    // First page of one repository over one day.
    let mut lat = Vec::new();
    for k in 0..20u64 {
        let repo = (k * 37) % REPOS;
        let day = (k as i64 * 7) % DAYS;
        let q = AuditQuery {
            repository: Some(format!("{{repo-{repo}}}")),
            since_ms: Some(T0 + day * DAY_MS),
            until_ms: Some(T0 + (day + 1) * DAY_MS),
            ..Default::default()
        };
        let t = Instant::now();
        let page = store.query_audit(&q, 100).await.expect("query");
        lat.push(t.elapsed());
        assert!(!page.is_empty(), "the query found records");
        assert!(page
            .iter()
            .all(|r| r.entry.repository == q.repository && r.entry.time_ms >= T0 + day * DAY_MS));
    }
    lat.sort();
    let (median, worst) = (lat[lat.len() / 2], lat[lat.len() - 1]);
    println!(
        "query: first page (100) of one repository over one day in {total} records: median {:.2} ms, worst {:.2} ms",
        median.as_secs_f64() * 1e3,
        worst.as_secs_f64() * 1e3
    );
    if worst > Duration::from_millis(100) {
        missed.push(format!("query worst {worst:?} > 100 ms"));
    }

    // 3. Verify everything.
    let t = Instant::now();
    let report = store
        .verify_audit(VerifyOptions {
            keys: Some(signer.keys().clone()),
            witnessed: Vec::new(),
        })
        .await
        .expect("verify");
    let took = t.elapsed();
    assert!(report.intact(), "{report}");
    let vrate = report.records as f64 / took.as_secs_f64();
    println!(
        "verify: {} records and {} checkpoints in {:.2} s = {:.0} records/s ({report})",
        report.records,
        report.checkpoints,
        took.as_secs_f64(),
        vrate
    );
    if vrate < 500_000.0 {
        missed.push(format!("verify {vrate:.0}/s < 500,000/s"));
    }
    let size = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);
    println!("database file: {:.0} MiB", size as f64 / 1048576.0);
    let keep = std::env::var("LATCHKEY_BENCH_KEEP").is_ok_and(|v| v == "1");
    if keep || !missed.is_empty() {
        println!(
            "store kept: {}",
            dir.keep().join("audit-bench.db").display()
        );
    }
    if !missed.is_empty() {
        println!("MISSED: {}", missed.join("; "));
        std::process::exit(1);
    }
}
