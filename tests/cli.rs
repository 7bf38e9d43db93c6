//! The `latchkey` binary end to end: check-config, policy test, serve + mint + explain
//! over real sockets, `dev`, and the logs (which must never contain a token).

mod common;

use common::{free_port, wait_for_port, Killed};

use latchkey::devissuer::{DevIssuer, DEV_REPOSITORY};
use latchkey::jose::Alg;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_latchkey");

fn run(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args)
        .env_remove("BITBUCKET_STEP_OIDC_TOKEN")
        .env_remove("LATCHKEY_TOKEN")
        .env_remove("LATCHKEY_MASTER_KEY");
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sigterm(child: &mut Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "server did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn write_config(dir: &Path, issuer: &DevIssuer, grpc: u16, http: u16) -> String {
    let db = dir.join("latchkey.db").display().to_string();
    let mut text = common::config_text(issuer.issuer_url(), &issuer.audience(), &db, "", "");
    text.push_str(
        "\n[[rules]]\nname = \"admins\"\nissuer = \"bb\"\nclaims = { branchName = \"ops/admin\" }\nroles = [\"admin\"]\n",
    );
    text = text
        .replace(
            "grpc_addr = \"127.0.0.1:0\"",
            &format!("grpc_addr = \"127.0.0.1:{grpc}\""),
        )
        .replace(
            "http_addr = \"127.0.0.1:0\"",
            &format!("http_addr = \"127.0.0.1:{http}\""),
        );
    let path = dir.join("latchkey.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn check_config_accepts_good_and_names_the_key_in_bad() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        common::config_text("https://issuer.example.com", "aud", "x.db", "", ""),
    )
    .unwrap();
    let out = run(&["check-config", "--config", good.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("ok (1 issuers, 5 targets, 4 rules)"));

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        common::config_text("https://issuer.example.com", "aud", "x.db", "", "")
            .replace("glob = \"release/*\"", "regex = \"release/(\""),
    )
    .unwrap();
    let out = run(&["check-config", "--config", bad.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(64));
    let err = text(&out.stderr);
    assert!(
        err.contains("bad.toml")
            && err.contains("rules[0].claims.branchName[1].regex")
            && err.contains("invalid regex"),
        "{err}"
    );

    let out = run(&["serve", "--config", bad.to_str().unwrap()], &[]);
    assert_eq!(
        out.status.code(),
        Some(64),
        "serve runs the same check before binding"
    );
    let out = run(&["serve", "--config", good.to_str().unwrap()], &[]);
    assert_eq!(
        out.status.code(),
        Some(64),
        "no master key is a configuration error"
    );
    assert!(
        text(&out.stderr).contains("no master key"),
        "{}",
        text(&out.stderr)
    );
    let out = run(
        &["serve", "--config", good.to_str().unwrap()],
        &[("LATCHKEY_MASTER_KEY", "too-short")],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out.stderr).contains("malformed"));
    assert!(
        !text(&out.stderr).contains("too-short"),
        "the key itself is never echoed"
    );
}

#[test]
fn policy_test_decides_offline() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        common::config_text("https://issuer.example.com", "aud", "x.db", "", ""),
    )
    .unwrap();
    let claims = dir.path().join("claims.json");
    let mut c =
        latchkey::devissuer::bitbucket_claims("https://issuer.example.com", "aud", "release/3");
    std::fs::write(&claims, c.to_string()).unwrap();
    let args = |target: &str| {
        vec![
            "policy".to_string(),
            "test".into(),
            "--config".into(),
            cfg.display().to_string(),
            "--claims".into(),
            claims.display().to_string(),
            "--target".into(),
            target.into(),
        ]
    };
    let out = Command::new(BIN).args(args("orders-api")).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let o = text(&out.stdout);
    assert!(
        o.contains("decision: allowed by orders-main-and-release"),
        "{o}"
    );
    assert!(o.contains(&format!("identity.repository: {DEV_REPOSITORY}")));
    c["branchName"] = "experimental/1".into();
    std::fs::write(&claims, c.to_string()).unwrap();
    let out = Command::new(BIN).args(args("reports")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stdout).contains("decision: denied: denied by rule no-experimental"));
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_then_mint_and_explain_with_the_cli_and_logs_hold_no_token() {
    let issuer = DevIssuer::spawn("127.0.0.1:0".parse().unwrap(), Alg::RS256)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (grpc, http) = (free_port(), free_port());
    let cfg = write_config(dir.path(), &issuer, grpc, http);
    let master = latchkey::keys::MasterKey::generate().to_base64();
    let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
    let child = Command::new(BIN)
        .args(["--log-format", "json", "serve", "--config", &cfg])
        .env("LATCHKEY_MASTER_KEY", master.expose())
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut server = Killed(child);
    wait_for_port(grpc);
    let server_url = format!("http://127.0.0.1:{grpc}");
    let caller = issuer.sign(&issuer.bitbucket_claims("main"));

    let mint = |format: &str, target: &str, token: &str| {
        let mut c = Command::new(BIN);
        c.args([
            "mint",
            "--server",
            &server_url,
            "--target",
            target,
            "--format",
            format,
            "--context",
            "reason=test",
        ])
        .env_remove("LATCHKEY_TOKEN");
        c.env("BITBUCKET_STEP_OIDC_TOKEN", token);
        c.output().unwrap()
    };
    let out = tokio::task::block_in_place(|| mint("raw", "orders-api", &caller));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let minted = text(&out.stdout).trim().to_string();
    assert_eq!(minted.split('.').count(), 3);
    let out = tokio::task::block_in_place(|| mint("env", "orders-api", &caller));
    let env_out = text(&out.stdout);
    assert!(
        env_out.contains("export LATCHKEY_TOKEN='ey")
            && env_out.contains("export LATCHKEY_LEASE_ID="),
        "{env_out}"
    );
    let out = tokio::task::block_in_place(|| mint("json", "orders-api", &caller));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["kind"], "jwt");
    assert_eq!(
        j["lease"]["scopes"],
        serde_json::json!(["orders:read", "orders:write"])
    );
    // Renew with the lease secret alone, then revoke with the identity token.
    let lease_id = j["lease"]["id"].as_str().unwrap().to_string();
    let lease_secret = j["lease_secret"].as_str().unwrap().to_string();
    let cli = |args: &[&str], envs: &[(&str, &str)]| {
        let mut c = Command::new(BIN);
        c.args(args)
            .env_remove("LATCHKEY_TOKEN")
            .env_remove("BITBUCKET_STEP_OIDC_TOKEN")
            .env_remove("LATCHKEY_LEASE_SECRET")
            .env("LATCHKEY_SERVER", &server_url);
        for (k, v) in envs {
            c.env(k, v);
        }
        tokio::task::block_in_place(|| c.output().unwrap())
    };
    let out = cli(
        &["mint", "--renew", &lease_id, "--format", "json"],
        &[("LATCHKEY_LEASE_SECRET", &lease_secret)],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["lease"]["renew_count"], 1);
    assert_eq!(r["token"].as_str().unwrap().split('.').count(), 3);
    let out = cli(&["revoke", &lease_id], &[("LATCHKEY_TOKEN", &caller)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), format!("revoked {lease_id}"));
    let out = cli(
        &["mint", "--renew", &lease_id],
        &[("LATCHKEY_LEASE_SECRET", &lease_secret)],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("FailedPrecondition: lease cannot be renewed: lease is revoked")
    );
    // Incident response: list, then revoke everything of the repository.
    let admin = issuer.sign(&issuer.bitbucket_claims("ops/admin"));
    let out = cli(
        &["leases", "list", "--all", "--format", "jsonl"],
        &[("LATCHKEY_TOKEN", &admin)],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 3);
    assert!(listed
        .iter()
        .any(|l| l["id"] == lease_id.as_str() && l["state"] == "revoked"));
    let out = cli(&["leases", "revoke"], &[("LATCHKEY_TOKEN", &admin)]);
    assert_eq!(out.status.code(), Some(1), "no filter is refused");
    assert!(text(&out.stderr).contains("name a filter"));
    let out = cli(
        &[
            "leases",
            "revoke",
            "--repository",
            latchkey::devissuer::DEV_REPOSITORY,
            "--reason",
            "drill",
        ],
        &[("LATCHKEY_TOKEN", &admin)],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "2 matched, 2 revoked");
    let out = cli(&["leases", "list"], &[("LATCHKEY_TOKEN", &admin)]);
    assert_eq!(
        text(&out.stdout).lines().count(),
        1,
        "only the header: nothing live"
    );

    // A remote export ends: every query is audited, so asking once more would always
    // find the record of the last ask.
    let out = cli(&["audit", "export"], &[("LATCHKEY_TOKEN", &admin)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let exported: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(exported.len() > 10, "{}", exported.len());
    assert_eq!(
        exported.last().unwrap()["action"],
        "audit_query",
        "ends with its own query's record"
    );
    assert_eq!(
        exported
            .iter()
            .filter(|r| r["action"] == "audit_query")
            .count(),
        1
    );

    // Denied: exit 1, the status on stderr.
    let denied = issuer.sign(&issuer.bitbucket_claims("experimental/z"));
    let out = tokio::task::block_in_place(|| mint("raw", "reports", &denied));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("PermissionDenied: denied by rule no-experimental"),
        "{}",
        text(&out.stderr)
    );
    // Explain via the CLI, token from a file.
    let tf = dir.path().join("token");
    std::fs::write(&tf, &caller).unwrap();
    let out = tokio::task::block_in_place(|| {
        Command::new(BIN)
            .args([
                "explain",
                "--server",
                &server_url,
                "--target",
                "orders-api",
                "--token-file",
                tf.to_str().unwrap(),
            ])
            .output()
            .unwrap()
    });
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("decision: allowed by orders-main-and-release"));
    // JWKS over HTTP serves the key that signed it.
    let jwks: serde_json::Value = reqwest::get(format!(
        "http://127.0.0.1:{http}/latchkey/.well-known/jwks.json"
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let kid = jsonwebtoken::decode_header(&minted).unwrap().kid.unwrap();
    assert!(jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["kid"] == kid.as_str()));

    tokio::task::block_in_place(|| sigterm(&mut server.0));
    let logs = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    let decisions: Vec<serde_json::Value> = BufReader::new(logs.as_bytes())
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l.unwrap()).ok())
        .filter(|v| v["message"] == "decision")
        .collect();
    assert_eq!(
        decisions.len(),
        13,
        "one structured line per decision (the export's query included): {logs}"
    );
    assert!(
        !logs.contains(&lease_secret),
        "a lease secret reached the logs"
    );
    assert!(decisions.iter().all(|d| d["request_id"].is_string()
        && d["identity_key"].is_string()
        && d["latency_us"].is_number()));
    for secret in [&caller, &minted, &denied] {
        assert!(!logs.contains(secret.as_str()), "a token reached the logs");
        assert!(
            !logs.contains(secret.rsplit('.').next().unwrap()),
            "a token signature reached the logs"
        );
    }
    assert!(
        !logs.contains(master.expose().as_str()),
        "the master key reached the logs"
    );
    std::fs::remove_file(&tf).unwrap();
    let db = common::all_bytes_under(dir.path());
    assert!(!common::contains(&db, &minted) && !common::contains(&db, &caller));
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_runs_the_whole_flow_in_one_command() {
    let dir = tempfile::tempdir().unwrap();
    let (grpc, http, iss) = (free_port(), free_port(), free_port());
    let child = Command::new(BIN)
        .args([
            "dev",
            "--grpc-addr",
            &format!("127.0.0.1:{grpc}"),
            "--http-addr",
            &format!("127.0.0.1:{http}"),
            "--issuer-addr",
            &format!("127.0.0.1:{iss}"),
            "--state-dir",
        ])
        .arg(dir.path().join("state"))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("dev.log")).unwrap())
        .spawn()
        .unwrap();
    let mut dev = Killed(child);
    let stdout = dev.0.stdout.take().unwrap();
    let token = tokio::task::block_in_place(|| {
        let mut lines = BufReader::new(stdout).lines();
        let token = lines
            .by_ref()
            .map(|l| l.unwrap())
            .find_map(|l| l.strip_prefix("export LATCHKEY_TOKEN=").map(str::to_string))
            .expect("dev prints a token");
        // Keep draining so the rest of the banner has somewhere to go.
        std::thread::spawn(move || lines.for_each(drop));
        token
    });
    if std::panic::catch_unwind(|| wait_for_port(grpc)).is_err() {
        panic!(
            "dev did not serve: {}",
            std::fs::read_to_string(dir.path().join("dev.log")).unwrap_or_default()
        );
    }
    let out = tokio::task::block_in_place(|| {
        Command::new(BIN)
            .args([
                "mint",
                "--server",
                &format!("http://127.0.0.1:{grpc}"),
                "--target",
                "orders-api",
                "--format",
                "raw",
            ])
            .env("LATCHKEY_TOKEN", &token)
            .env_remove("BITBUCKET_STEP_OIDC_TOKEN")
            .output()
            .unwrap()
    });
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim().split('.').count(), 3);
    // The dev config also has a Pulsar and an Airflow target, granted to main.
    for (target, scope, field) in [
        ("pulsar", "orders-produce", "orders-writer"),
        ("airflow", "dags-run", "USER"),
    ] {
        let out = tokio::task::block_in_place(|| {
            Command::new(BIN)
                .args(["mint", "--server", &format!("http://127.0.0.1:{grpc}")])
                .args(["--target", target, "--scope", scope, "--format", "json"])
                .env("LATCHKEY_TOKEN", &token)
                .env_remove("BITBUCKET_STEP_OIDC_TOKEN")
                .output()
                .unwrap()
        });
        assert!(out.status.success(), "{target}: {}", text(&out.stderr));
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(j["kind"], target);
        assert_eq!(j["fields"]["role"], field, "{j}");
    }
    // Fresh tokens from the dev issuer, with claim overrides.
    let t = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{iss}/token"))
        .json(&serde_json::json!({"branchName": "experimental/x"}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let out = tokio::task::block_in_place(|| {
        Command::new(BIN)
            .args([
                "mint",
                "--server",
                &format!("http://127.0.0.1:{grpc}"),
                "--target",
                "orders-api",
            ])
            .env("LATCHKEY_TOKEN", &t)
            .env_remove("BITBUCKET_STEP_OIDC_TOKEN")
            .output()
            .unwrap()
    });
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("denied by rule no-experimental"),
        "{}",
        text(&out.stderr)
    );
    tokio::task::block_in_place(|| sigterm(&mut dev.0));
    assert!(dir.path().join("state/latchkey.db").exists());
}

#[test]
fn mint_without_a_token_says_where_it_looked() {
    let out = run(
        &["mint", "--server", "http://127.0.0.1:1", "--target", "x"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("BITBUCKET_STEP_OIDC_TOKEN or LATCHKEY_TOKEN"),
        "{}",
        text(&out.stderr)
    );
    let out = run(
        &["mint", "--server", "http://127.0.0.1:1", "--target", "x"],
        &[("LATCHKEY_TOKEN", "abc")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot connect"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn keygen_prints_a_usable_master_key() {
    let out = run(&["keygen"], &[]);
    assert!(out.status.success());
    let k = text(&out.stdout);
    assert!(latchkey::keys::MasterKey::from_base64(&k, "test").is_ok());
}

#[test]
fn shipped_configs_pass_check_config() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut checked = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().and_then(|x| x.to_str()) == Some("toml") {
            let out = run(&["check-config", "--config", p.to_str().unwrap()], &[]);
            assert!(
                out.status.success(),
                "{}: {}",
                p.display(),
                text(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 1, "deploy/ holds at least one example config");
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_rules_and_refuses_a_bad_config() {
    let issuer = DevIssuer::spawn("127.0.0.1:0".parse().unwrap(), latchkey::jose::Alg::RS256)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (grpc, http) = (free_port(), free_port());
    let cfg = write_config(dir.path(), &issuer, grpc, http);
    let master = latchkey::keys::MasterKey::generate().to_base64();
    let log_path = dir.path().join("serve.log");
    let child = Command::new(BIN)
        .args(["--log-format", "json", "serve", "--config", &cfg])
        .env("LATCHKEY_MASTER_KEY", master.expose())
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let mut server = Killed(child);
    wait_for_port(http);
    let exchange = |token: String| {
        let url = format!("http://127.0.0.1:{http}/v1/token");
        async move {
            reqwest::Client::new()
                .post(url)
                .form(&[
                    (
                        "grant_type",
                        "urn:ietf:params:oauth:grant-type:token-exchange",
                    ),
                    ("subject_token", token.as_str()),
                    ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
                    ("audience", "team-api"),
                ])
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let hup = |pid: u32| {
        Command::new("kill")
            .arg("-HUP")
            .arg(pid.to_string())
            .status()
            .unwrap();
    };
    let wip = issuer.sign(&issuer.bitbucket_claims("wip/x"));
    assert_eq!(exchange(wip.clone()).await, 403);

    let original = std::fs::read_to_string(&cfg).unwrap();
    let good = format!("{original}\n[[rules]]\nname = \"wip-team\"\nissuer = \"bb\"\nclaims = {{ branchName = {{ glob = \"wip/*\" }} }}\ngrants = [{{ target = \"team-api\" }}]\n");
    std::fs::write(&cfg, &good).unwrap();
    hup(server.0.id());
    let mut status = 0;
    for _ in 0..100 {
        status = exchange(wip.clone()).await;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 200, "the new rule is in force after SIGHUP");

    std::fs::write(&cfg, good.replace("glob = \"wip/*\"", "regex = \"wip/(\"")).unwrap();
    hup(server.0.id());
    let start = Instant::now();
    while !std::fs::read_to_string(&log_path)
        .unwrap()
        .contains("reload refused")
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "refusal not logged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("invalid regex"), "{log}");
    assert_eq!(
        exchange(wip).await,
        200,
        "the last good configuration keeps serving"
    );
    tokio::task::block_in_place(|| sigterm(&mut server.0));
    assert_eq!(server.0.wait().unwrap().code(), Some(0));
}

/// The load generator runs (a second, against a broker it starts) and reports sane fields.
/// Only that it works: its numbers are benchmarks, read from docs/performance.md, never asserted.
#[test]
fn bench_runs_for_a_second_and_reports_sane_fields() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["bench", "--duration", "1s", "--warmup", "200ms"])
        .args([
            "--concurrency",
            "4",
            "--connections",
            "1",
            "--format",
            "json",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (r["protocol"].as_str(), r["rpc"].as_str()),
        (Some("grpc"), Some("Mint"))
    );
    assert!(r["mints"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["errors_total"], 0, "{r}");
    let l = &r["latency_ms"];
    let p = |k: &str| l[k].as_f64().unwrap();
    assert!(
        0.0 < p("p50") && p("p50") <= p("p99") && p("p99") <= p("p99_9") && p("p99_9") <= p("max")
    );
    assert!(r["server"]["cpu_us_per_mint"].as_f64().unwrap() > 0.0);
    assert!(r["server"]["rss_kib_peak"].as_u64().unwrap() > 1024);
    assert!(r["crypto"]["verify_us"].as_f64().unwrap() > 0.0);
    assert_eq!(
        (r["caller_alg"].as_str(), r["minted_alg"].as_str()),
        (Some("RS256"), Some("ES256"))
    );
    // The store is in the working directory, and the broker stopped with the run.
    assert!(dir.path().join("latchkey-bench/latchkey.db").exists());
    let pid = r["server"]["pid"].as_u64().unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "broker still running"
    );
}

/// The transport floor (`--protocol grpc-health`) drives the same server's health check
/// with the same metadata: it runs, every call answers SERVING, and the report says which
/// RPC it measured.
#[test]
fn bench_transport_floor_runs_and_names_its_rpc() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["bench", "--duration", "1s", "--warmup", "200ms"])
        .args(["--concurrency", "4", "--connections", "1"])
        .args(["--protocol", "grpc-health", "--format", "json"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["protocol"], "grpc-health", "{r}");
    assert_eq!(r["rpc"], "grpc.health.v1.Health/Check", "{r}");
    assert!(r["mints"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["errors_total"], 0, "{r}");
    assert!(r["server"]["cpu_us_per_mint"].as_f64().unwrap() > 0.0);
}

#[test]
fn serve_refuses_an_empty_store_file_and_store_init_makes_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("latchkey.db");
    let cfg = dir.path().join("latchkey.toml");
    std::fs::write(
        &cfg,
        common::config_text(
            "https://issuer.example.com",
            "aud",
            &db.display().to_string(),
            "",
            "",
        ),
    )
    .unwrap();
    let master = latchkey::keys::MasterKey::generate().to_base64();
    let key = [("LATCHKEY_MASTER_KEY", master.expose().as_str())];
    // A truncated store: an empty file where the database was.
    std::fs::write(&db, b"").unwrap();
    let out = run(&["serve", "--config", cfg.to_str().unwrap()], &key);
    assert_ne!(out.status.code(), Some(0));
    let err = text(&out.stderr);
    assert!(
        err.contains("is empty") && err.contains("latchkey store init"),
        "{err}"
    );
    assert_eq!(std::fs::metadata(&db).unwrap().len(), 0, "nothing written");
    // The operator says so: a new store.
    let out = run(&["store", "init", "--config", cfg.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("made a new, empty store"));
    assert!(std::fs::metadata(&db).unwrap().len() > 0);
    // A file that holds anything is left alone.
    let out = run(&["store", "init", "--db", db.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("is not empty: nothing done"));
}
