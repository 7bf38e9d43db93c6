//! The security team's audit service through the real server: query, tail, verify,
//! checkpoints, the auditor role, redaction, failing closed when the store cannot
//! commit; and offline verification of a database file that an attacker edited with
//! SQLite after dropping the triggers.

mod common;

use common::{authed, Env};
use latchkey::audit::checkpoint::{Checkpoint, CheckpointKeys};
use latchkey::audit::verify::{Tamper, VerifyOptions};
use latchkey::audit::{record_hash, AuditQuery, AuditRecord};
use latchkey::clock::SystemClock;
use latchkey::devissuer::DEV_REPOSITORY;
use latchkey::store::sqlite::audit::{query_file, verify_file, verify_in_parts};
use latchkey::transport::pb::{self, audit_client::AuditClient};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamExt;
use tonic::Code;

fn extra(witness: &Path) -> String {
    format!(
        r#"
[[rules]]
name = "security-team"
issuer = "bb"
claims = {{ branchName = "ops/audit" }}
roles = ["auditor"]

[audit]
checkpoint_every = 5
checkpoint_interval = "1h"
witness_file = "{}"
redact_claims = ["pipelineUuid"]
"#,
        witness.display()
    )
}

async fn start(witness_dir: &tempfile::TempDir) -> Env {
    Env::start_full(
        "jwks_cooldown = \"0s\"",
        "busy_timeout = \"300ms\"",
        &extra(&witness_dir.path().join("witness.jsonl")),
        Arc::new(SystemClock),
    )
    .await
}

fn audit_client(env: &Env) -> AuditClient<tonic::transport::Channel> {
    AuditClient::new(env.channel.clone())
}

async fn query(
    env: &Env,
    token: &str,
    q: pb::AuditQuery,
) -> Result<Vec<AuditRecord>, tonic::Status> {
    let mut s = audit_client(env)
        .query(authed(q, token))
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(r) = s.next().await {
        out.push(AuditRecord::try_from(r?).unwrap());
    }
    Ok(out)
}

#[tokio::test]
async fn auditors_query_tail_verify_and_read_checkpoints_others_are_refused_and_recorded() {
    let wdir = tempfile::tempdir().unwrap();
    let mut env = start(&wdir).await;
    let main = env.token("main");
    let auditor = env.token("ops/audit");
    let mut minted = Vec::new();
    for _ in 0..3 {
        minted.push(
            env.mint(&main, "orders-api", &[], None)
                .await
                .unwrap()
                .credential
                .unwrap()
                .token,
        );
    }
    let denied = env.token("experimental/x");
    assert_eq!(
        env.mint(&denied, "orders-api", &[], None)
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    // Someone without the auditor role is refused, and the refusal is on the record.
    let e = query(&env, &main, pb::AuditQuery::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("auditor"), "{}", e.message());
    let refused = query(
        &env,
        &auditor,
        pb::AuditQuery {
            action: "audit_query".into(),
            outcome: "denied".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].entry.issuer.as_deref(), Some("bb"));
    assert_eq!(refused[0].entry.repository.as_deref(), Some(DEV_REPOSITORY));
    assert!(refused[0]
        .entry
        .reason
        .as_deref()
        .unwrap()
        .contains("auditor"));

    // Denials of one repository, with the clause that failed.
    let rows = query(
        &env,
        &auditor,
        pb::AuditQuery {
            repository: DEV_REPOSITORY.into(),
            action: "mint".into(),
            outcome: "denied".into(),
            since: Some(prost_types::Timestamp {
                seconds: latchkey::clock::Clock::now(&SystemClock) - 3600,
                nanos: 0,
            }),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].entry.rule.as_deref(), Some("no-experimental"));
    assert!(rows[0]
        .entry
        .reason
        .as_deref()
        .unwrap()
        .contains("denied by rule no-experimental"));
    // Every record fetched over gRPC still hashes to its stored hash.
    for r in &rows {
        assert_eq!(record_hash(r.seq, &r.prev_hash, &r.entry), r.hash);
    }
    // Free text on the reason, and paging by sequence number.
    let by_reason = query(
        &env,
        &auditor,
        pb::AuditQuery {
            reason_contains: "DENIED BY RULE".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(by_reason.len(), 1);
    let first_two = query(
        &env,
        &auditor,
        pb::AuditQuery {
            limit: 2,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(first_two.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);
    let next = query(
        &env,
        &auditor,
        pb::AuditQuery {
            after_seq: 2,
            limit: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(next[0].seq, 3);

    // Listed claims are redacted in the record.
    assert_eq!(rows[0].entry.claims["pipelineUuid"], "[REDACTED]");
    assert_eq!(rows[0].entry.claims["branchName"], "experimental/x");

    // Tail sees records minted after it started, and only those matching.
    let mut tail = audit_client(&env)
        .tail(authed(
            pb::AuditQuery {
                action: "mint".into(),
                ..Default::default()
            },
            &auditor,
        ))
        .await
        .unwrap()
        .into_inner();
    env.explain(&main, "orders-api", &[]).await.unwrap();
    let m = env.mint(&main, "reports", &[], None).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), tail.next())
        .await
        .expect("tail delivers the new record")
        .unwrap()
        .unwrap();
    assert_eq!(got.action, "mint");
    assert_eq!(got.lease_id.as_deref(), Some(m.lease.unwrap().id.as_str()));
    drop(tail);

    // Checkpoints every 5 records, signed with a key published over HTTP.
    let mut cps = Vec::new();
    for _ in 0..100 {
        let r = audit_client(&env)
            .checkpoints(authed(pb::CheckpointsRequest::default(), &auditor))
            .await
            .unwrap()
            .into_inner();
        cps = r.checkpoints;
        if !cps.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!cps.is_empty(), "a checkpoint after 5 records");
    let jwks: serde_json::Value = reqwest::get(format!("{}/v1/audit/keys", env.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let keys = CheckpointKeys::from_jwks(&jwks).unwrap();
    for c in &cps {
        keys.verify(&Checkpoint::from(c.clone())).unwrap();
    }

    // The broker verifies its own chain.
    let v = audit_client(&env)
        .verify(authed(pb::VerifyRequest {}, &auditor))
        .await
        .unwrap()
        .into_inner();
    assert!(v.intact, "{}", v.summary);
    assert!(v.summary.contains("chain intact"), "{}", v.summary);
    assert!(v.records >= 10);

    // Ready, with the witness caught up or catching up.
    let ready: serde_json::Value = reqwest::get(format!("{}/readyz", env.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready", "{ready}");

    // Stop, with a tail still open (it must not hold up shutdown): a last checkpoint of
    // everything, handed to the witness.
    let mut open_tail = audit_client(&env)
        .tail(authed(pb::AuditQuery::default(), &auditor))
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(Duration::from_secs(10), env.stop_checkpointless())
        .await
        .expect("shutdown is not held up by an open tail");
    // It had its own audit_tail record to deliver, then it ends.
    tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = open_tail.next().await {}
    })
    .await
    .expect("the tail ended with the server");
    let witnessed: Vec<Checkpoint> =
        latchkey::cli::audit::read_lines(&wdir.path().join("witness.jsonl")).unwrap();
    let report = verify_file(
        &env.db,
        &VerifyOptions {
            keys: Some(keys),
            witnessed,
        },
    )
    .unwrap();
    assert!(report.intact(), "{report}");
    assert_eq!(report.unattested, 0, "{report}");

    // Nothing secret in the store: no identity token, no minted credential.
    let bytes = common::all_bytes_under(env.dir.path());
    for t in minted.iter().chain([&main, &auditor, &denied]) {
        let sig = t.rsplit('.').next().unwrap();
        assert!(!common::contains(&bytes, sig), "a token reached the store");
    }
}

/// A finished store: 12 mints, stopped (so the last checkpoint covers the head), and the
/// witness file.
async fn finished_store() -> (tempfile::TempDir, PathBuf, PathBuf, CheckpointKeys) {
    let wdir = tempfile::tempdir().unwrap();
    let mut env = start(&wdir).await;
    let t = env.token("main");
    for _ in 0..12 {
        env.mint(&t, "orders-api", &[], None).await.unwrap();
    }
    let jwks: serde_json::Value = reqwest::get(format!("{}/v1/audit/keys", env.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    env.stop_checkpointless().await;
    let db = wdir.path().join("copy.db");
    std::fs::copy(&env.db, &db).unwrap();
    // The WAL was checkpointed into the file when the store closed; copy it if not.
    let wal = env.db.with_extension("db-wal");
    if wal.exists() {
        std::fs::copy(&wal, db.with_extension("db-wal")).unwrap();
    }
    let witness = wdir.path().join("witness.jsonl");
    (wdir, db, witness, CheckpointKeys::from_jwks(&jwks).unwrap())
}

/// A copy of `db` changed by `sql` with the append-only triggers dropped, as an attacker
/// with the file would.
fn tampered(db: &Path, name: &str, sql: &str) -> PathBuf {
    let out = db.with_file_name(format!("{name}.db"));
    std::fs::copy(db, &out).unwrap();
    let wal = db.with_extension("db-wal");
    if wal.exists() {
        std::fs::copy(&wal, out.with_extension("db-wal")).unwrap();
    }
    let c = rusqlite::Connection::open(&out).unwrap();
    c.execute_batch(
        "DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;
         DROP TRIGGER audit_checkpoints_no_update; DROP TRIGGER audit_checkpoints_no_delete;",
    )
    .unwrap();
    c.execute_batch(sql).unwrap();
    drop(c);
    out
}

/// The problem verification finds, the same whether the log is walked whole or in
/// parallel parts.
fn problem(db: &Path, keys: &CheckpointKeys, witnessed: Vec<Checkpoint>) -> Option<Tamper> {
    let opts = VerifyOptions {
        keys: Some(keys.clone()),
        witnessed,
    };
    let whole = verify_in_parts(db, &opts, 1).unwrap();
    for parts in [2, 3, 5] {
        let split = verify_in_parts(db, &opts, parts).unwrap();
        assert_eq!(split.problem, whole.problem, "{parts} parts");
        if whole.problem.is_none() {
            assert_eq!(split, whole, "{parts} parts");
        }
    }
    whole.problem
}

const COLS: &str = "time_ms, request_id, action, outcome, issuer, identity_key, subject, repository, git_ref, environment, pipeline, token_fingerprint, target, requested_scopes, granted_scopes, ttl_secs, rule, reason, lease_id, credential_jti, credential_fingerprint, context, claims, prev_hash, hash";

#[tokio::test]
async fn every_kind_of_tampering_with_the_file_is_detected_and_named() {
    let (_dir, db, witness, keys) = finished_store().await;
    let intact = verify_file(
        &db,
        &VerifyOptions {
            keys: Some(keys.clone()),
            witnessed: Vec::new(),
        },
    )
    .unwrap();
    assert!(intact.intact(), "{intact}");
    assert_eq!(intact.records, 12);
    let text = intact.to_string();
    assert!(
        text.starts_with("12 records, chain intact, last checkpoint #"),
        "{text}"
    );

    let cases: Vec<(&str, String, Tamper)> = vec![
        (
            "edited",
            "UPDATE audit SET outcome = 'denied' WHERE seq = 3".into(),
            Tamper::Edited { seq: 3 },
        ),
        (
            "removed",
            "DELETE FROM audit WHERE seq = 4".into(),
            Tamper::Removed { from: 4, to: 4 },
        ),
        (
            "inserted",
            format!(
                "UPDATE audit SET seq = seq + 1000 WHERE seq >= 5;
                 UPDATE audit SET seq = seq - 999 WHERE seq >= 1000;
                 INSERT INTO audit (seq, {COLS}) SELECT 5, {COLS} FROM audit WHERE seq = 4;"
            ),
            Tamper::Inserted { seq: 5 },
        ),
        (
            "reordered",
            "UPDATE audit SET seq = -3 WHERE seq = 3;
             UPDATE audit SET seq = 3 WHERE seq = 8;
             UPDATE audit SET seq = 8 WHERE seq = -3;"
                .into(),
            Tamper::Reordered { seq: 3 },
        ),
        (
            "forged-below-one",
            format!("INSERT INTO audit (seq, {COLS}) SELECT 0, {COLS} FROM audit WHERE seq = 4;"),
            Tamper::Misnumbered {
                seq: 0,
                expected: 1,
            },
        ),
        (
            "retyped",
            "UPDATE audit SET time_ms = 'yesterday' WHERE seq = 6".into(),
            Tamper::Edited { seq: 6 },
        ),
        (
            "truncated",
            "DELETE FROM audit WHERE seq > 9".into(),
            Tamper::Truncated {
                checkpoint: 0,
                checkpoint_seq: 12,
                head: 9,
            },
        ),
    ];
    for (name, sql, want) in cases {
        let copy = tampered(&db, name, &sql);
        let got = problem(&copy, &keys, Vec::new()).unwrap_or_else(|| panic!("{name} undetected"));
        match (&got, &want) {
            (Tamper::Truncated { head, .. }, Tamper::Truncated { head: h, .. }) => {
                assert_eq!(head, h);
                assert!(
                    got.to_string().contains("truncated after checkpoint #"),
                    "{got}"
                );
            }
            _ => assert_eq!(got, want, "{name}: {got}"),
        }
    }

    // Rewriting the whole chain with recomputed hashes passes the chain check, but not
    // the signed checkpoints.
    let mut records = query_file(&db, &AuditQuery::default(), 100).unwrap();
    records[1].entry.outcome = "denied".into();
    let mut prev = latchkey::audit::GENESIS_HASH.to_string();
    let mut sql = String::new();
    for r in &mut records {
        r.prev_hash = prev.clone();
        r.hash = record_hash(r.seq, &r.prev_hash, &r.entry);
        sql.push_str(&format!(
            "UPDATE audit SET outcome = '{}', prev_hash = '{}', hash = '{}' WHERE seq = {};",
            r.entry.outcome, r.prev_hash, r.hash, r.seq
        ));
        prev = r.hash.clone();
    }
    let copy = tampered(&db, "rewritten", &sql);
    let got = problem(&copy, &keys, Vec::new()).unwrap();
    assert_eq!(got.kind(), "checkpoint_mismatch", "{got}");

    // ... and re-signing is impossible without the sealed key: a checkpoint the attacker
    // forged with a key of their own does not verify against the published keys.
    let (other, _) = {
        let (k, _) = latchkey::jose::SigningKey::generate(latchkey::jose::Alg::EdDSA).unwrap();
        (
            CheckpointKeys::new([(k.kid().to_string(), k.public_key_raw())]),
            k,
        )
    };
    let got = problem(&db, &other, Vec::new()).unwrap();
    assert_eq!(got.kind(), "bad_checkpoint", "{got}");

    // Deleting the checkpoints as well as the tail of the log fools the file alone, but
    // not the witness.
    let copy = tampered(
        &db,
        "deleted",
        "DELETE FROM audit WHERE seq > 6; DELETE FROM audit_checkpoints;",
    );
    assert_eq!(problem(&copy, &keys, Vec::new()), None);
    let witnessed: Vec<Checkpoint> = latchkey::cli::audit::read_lines(&witness).unwrap();
    assert!(!witnessed.is_empty());
    let got = problem(&copy, &keys, witnessed).unwrap();
    assert_eq!(got.kind(), "witness_mismatch", "{got}");
}

fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test]
async fn cli_verify_exits_by_outcome_and_exports_verify_round_trip() {
    let (dir, db, witness, keys) = finished_store().await;
    let keys_file = dir.path().join("keys.json");
    std::fs::write(&keys_file, keys.to_jwks().to_string()).unwrap();
    let dbs = db.display().to_string();
    let kf = keys_file.display().to_string();
    let ws = witness.display().to_string();

    let ok = cli(&[
        "audit",
        "verify",
        "--db",
        &dbs,
        "--audit-keys",
        &kf,
        "--witness",
        &ws,
    ]);
    let out = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(ok.status.code(), Some(0), "{out}");
    assert!(
        out.contains("12 records, chain intact, last checkpoint #"),
        "{out}"
    );

    let bad = tampered(
        &db,
        "cli-edit",
        "UPDATE audit SET target = 'x' WHERE seq = 7",
    );
    let r = cli(&["audit", "verify", "--db", &bad.display().to_string()]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stdout)
        .contains("record 7: content does not match its hash (edited)"));

    let r = cli(&["audit", "verify", "--db", "/nonexistent/x.db"]);
    assert_eq!(r.status.code(), Some(2));

    // Export a slice (records 4..9) as JSON lines; the slice verifies on its own.
    let r = cli(&[
        "audit",
        "export",
        "--db",
        &dbs,
        "--after-seq",
        "3",
        "--until-seq",
        "9",
    ]);
    assert_eq!(r.status.code(), Some(0));
    let export = dir.path().join("slice.jsonl");
    std::fs::write(&export, &r.stdout).unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&r.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    assert_eq!(lines[0]["seq"], 4);
    assert!(lines[0]["hash"].is_string() && lines[0]["prev_hash"].is_string());
    let r = cli(&["audit", "verify", "--file", &export.display().to_string()]);
    assert_eq!(
        r.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stdout)
    );

    // The documented outside check (no Latchkey needed) agrees.
    let outside = |file: &Path| -> Option<(i32, String)> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/verify-export.py");
        let out = std::process::Command::new("python3")
            .arg(script)
            .stdin(std::fs::File::open(file).unwrap())
            .output()
            .ok()?;
        Some((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    };
    match outside(&export) {
        Some((code, out)) => {
            assert_eq!(code, 0, "{out}");
            assert_eq!(
                out.lines().filter(|l| l.ends_with(" ok")).count(),
                6,
                "{out}"
            );
        }
        None => eprintln!("python3 not found: skipping deploy/verify-export.py"),
    }

    // An edited export line is caught.
    let edited = String::from_utf8_lossy(&std::fs::read(&export).unwrap()).replacen(
        "\"allowed\"",
        "\"denied\"",
        1,
    );
    std::fs::write(&export, edited).unwrap();
    let r = cli(&["audit", "verify", "--file", &export.display().to_string()]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stdout).contains("edited"));
    if let Some((code, out)) = outside(&export) {
        assert_eq!(code, 1, "{out}");
        assert!(out.contains("edited"), "{out}");
    }
}

#[tokio::test]
async fn a_store_that_cannot_commit_fails_mint_closed_and_recovers_without_restart() {
    use latchkey::store::sqlite::{self, SqliteStore};
    let issuer = latchkey::devissuer::DevIssuer::spawn(
        "127.0.0.1:0".parse().unwrap(),
        latchkey::jose::Alg::RS256,
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("latchkey.db");
    let text = common::config_text(
        issuer.issuer_url(),
        &issuer.audience(),
        &db.display().to_string(),
        "",
        "",
    );
    let config = latchkey::config::Config::parse(&text, "t.toml").unwrap();
    let store = Arc::new(
        SqliteStore::open(&sqlite::Config {
            path: db.clone(),
            busy_timeout: Duration::from_millis(300),
        })
        .unwrap(),
    );
    let running = latchkey::server::start_with_store(
        &config,
        store.clone(),
        &latchkey::keys::MasterKey::generate(),
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", running.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = pb::credential_broker_client::CredentialBrokerClient::new(channel);
    let http = format!("http://{}", running.http_addr);
    let token = issuer.sign(&issuer.bitbucket_claims("main"));
    let mint = |c: &mut pb::credential_broker_client::CredentialBrokerClient<_>| {
        let mut c = c.clone();
        let t = token.clone();
        async move {
            c.mint(authed(
                pb::MintRequest {
                    target: "orders-api".into(),
                    ..Default::default()
                },
                &t,
            ))
            .await
        }
    };
    mint(&mut client).await.unwrap();

    store.set_read_only(true).await.unwrap();
    let e = mint(&mut client).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert_eq!(e.message(), "audit store unavailable; no credential issued");
    let r = reqwest::get(format!("{http}/readyz")).await.unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["checks"]["store"]["ok"], false, "{body}");
    // Other calls keep being served.
    assert_eq!(
        reqwest::get(format!("{http}/healthz"))
            .await
            .unwrap()
            .status(),
        200
    );
    let jwks = reqwest::get(format!("{http}/latchkey/.well-known/jwks.json"))
        .await
        .unwrap();
    assert_eq!(jwks.status(), 200);

    store.set_read_only(false).await.unwrap();
    mint(&mut client).await.expect("recovers without a restart");
    assert_eq!(
        reqwest::get(format!("{http}/readyz"))
            .await
            .unwrap()
            .status(),
        200
    );
    running.shutdown().await;
    let report = verify_file(&db, &VerifyOptions::default()).unwrap();
    assert!(report.intact(), "{report}");
    // Two mints, each with its record; the refused one left none and no gap.
    let mints = query_file(
        &db,
        &AuditQuery {
            action: Some("mint".into()),
            ..Default::default()
        },
        100,
    )
    .unwrap();
    assert_eq!(mints.len(), 2);
}

/// A witness URL that fails, hangs or takes checkpoints, as told; records what it took.
#[derive(Clone, Default)]
struct FakeWitness {
    mode: Arc<std::sync::atomic::AtomicU8>,
    got: Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

const TAKE: u8 = 0;
const FAIL: u8 = 1;
const HANG: u8 = 2;

async fn spawn_witness(w: FakeWitness) -> String {
    use axum::routing::post;
    let app = axum::Router::new()
        .route(
            "/cp",
            post(
                |axum::extract::State(w): axum::extract::State<FakeWitness>,
                 axum::Json(body): axum::Json<serde_json::Value>| async move {
                    match w.mode.load(std::sync::atomic::Ordering::SeqCst) {
                        FAIL => axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        HANG => {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            axum::http::StatusCode::OK
                        }
                        _ => {
                            w.got.lock().unwrap().push(body);
                            axum::http::StatusCode::NO_CONTENT
                        }
                    }
                },
            ),
        )
        .with_state(w);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}/cp")
}

async fn witness_lag(env: &Env) -> i64 {
    let ready: serde_json::Value = reqwest::get(format!("{}/readyz", env.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        ready["status"], "ready",
        "a witness problem never makes the broker unready"
    );
    ready["checks"]["audit_witness"]["lag"].as_i64().unwrap()
}

#[tokio::test]
async fn a_failing_or_hung_witness_never_blocks_mint_and_catches_up_in_order() {
    use std::sync::atomic::Ordering::SeqCst;
    let fake = FakeWitness::default();
    fake.mode.store(HANG, SeqCst);
    let url = spawn_witness(fake.clone()).await;
    let env = Env::start_full(
        "jwks_cooldown = \"0s\"",
        "busy_timeout = \"300ms\"",
        &format!(
            "[audit]\ncheckpoint_every = 2\ncheckpoint_interval = \"1h\"\nwitness_url = \"{url}\"\nwitness_timeout = \"300ms\"\n"
        ),
        Arc::new(SystemClock),
    )
    .await;
    let t = env.token("main");
    // Hung witness: mints stay fast, checkpoints pile up in the store, the lag shows.
    for _ in 0..6 {
        let started = std::time::Instant::now();
        env.mint(&t, "orders-api", &[], None).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    let mut lag = 0;
    for _ in 0..100 {
        lag = witness_lag(&env).await;
        if lag >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(lag >= 2, "lag {lag}");
    // Failing witness: still retried.
    fake.mode.store(FAIL, SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(fake.got.lock().unwrap().is_empty());
    // The witness recovers: everything is delivered, in order, without gaps.
    fake.mode.store(TAKE, SeqCst);
    for _ in 0..200 {
        if witness_lag(&env).await == 0 && !fake.got.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(witness_lag(&env).await, 0);
    let ids: Vec<i64> = fake
        .got
        .lock()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        ids,
        (1..=ids.len() as i64).collect::<Vec<_>>(),
        "in order, no gaps"
    );
    assert!(ids.len() >= 2);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redacted_claim_is_in_no_store_file_and_renewal_still_decides_on_it() {
    let wdir = tempfile::tempdir().unwrap();
    let env = start(&wdir).await;
    let mut claims = env.claims("main");
    claims["pipelineUuid"] = "{pipeline-7f3e9c1d-only-here}".into();
    let token = env.issuer.sign(&claims);
    let m = env.mint(&token, "orders-api", &[], None).await.unwrap();
    let lease = m.lease.unwrap();
    // Renewal reads the claims back (sealed under the master key) and decides again.
    let mut c = env.client.clone();
    let renewed = c
        .renew(authed(
            pb::RenewRequest {
                lease_id: lease.id.clone(),
                lease_secret: m.lease_secret.clone(),
                ttl: None,
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(renewed.lease.is_some());
    env.broker().store().check_writable().await.unwrap();
    let bytes = common::all_bytes_under(env.dir.path());
    assert!(
        !common::contains(&bytes, "pipeline-7f3e9c1d-only-here"),
        "a redacted claim reached a store file"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_damaged_while_serving_makes_the_broker_unready_with_the_reason() {
    let wdir = tempfile::tempdir().unwrap();
    let env = start(&wdir).await;
    for i in 0..300 {
        let mut e = latchkey::audit::AuditEntry {
            action: "test".into(),
            request_id: format!("r{i}"),
            ..Default::default()
        };
        e.claims = serde_json::json!({ "pad": "x".repeat(1500) });
        env.store.append(e).await.unwrap();
    }
    assert!(env.broker().check_store_integrity().await.is_ok());
    let db = env.dir.path().join("latchkey.db");
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
    let mut bytes = std::fs::read(&db).unwrap();
    let mid = bytes.len() / 2 / 4096 * 4096;
    for b in &mut bytes[mid..mid + 8192] {
        *b = 0x5a;
    }
    std::fs::write(&db, &bytes).unwrap();
    let why = env.broker().check_store_integrity().await.unwrap_err();
    assert!(why.contains("failed its integrity check"), "{why}");
    let r = reqwest::get(format!("{}/readyz", env.http)).await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["checks"]["store_integrity"]["ok"], false, "{body}");
    assert!(
        body["checks"]["store_integrity"]["reason"]
            .as_str()
            .unwrap()
            .contains("integrity check"),
        "{body}"
    );
}
