//! `latchkey bench`: the load generator. It starts a built-in test issuer in this process
//! and a broker as a child process (this binary's `serve`, with its SQLite store and audit
//! log in a directory under the working directory), pre-generates identity tokens (so
//! token creation is not measured), then drives `Mint` over gRPC (or the RFC 8693
//! endpoint over HTTP) from N concurrent streams for a fixed time after a warm-up.
//!
//! Reported: mints/s, latency percentiles, errors by code, the broker's CPU per mint (from
//! `/proc/<pid>/stat`) against the cost of the cryptography alone (one caller-token verify
//! plus one credential sign, measured here with the same ring calls the broker makes), and
//! the broker's resident memory: at the start and end of the measured run, its peak
//! (`VmHWM`), and the growth across the run (sampled every second).

use crate::devissuer::{DevIssuer, DEV_REPOSITORY};
use crate::jose::{Alg, SigningKey};
use crate::transport::pb;
use clap::ValueEnum;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Algorithms the bench can use for caller tokens and minted credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchAlg {
    /// RSA 2048, PKCS#1 v1.5, SHA-256.
    Rs256,
    /// ECDSA P-256.
    Es256,
    /// Ed25519.
    Eddsa,
}

impl BenchAlg {
    fn alg(self) -> Alg {
        match self {
            BenchAlg::Rs256 => Alg::RS256,
            BenchAlg::Es256 => Alg::ES256,
            BenchAlg::Eddsa => Alg::EdDSA,
        }
    }
}

/// Which endpoint to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// `CredentialBroker/Mint` over gRPC (HTTP/2, multiplexed).
    Grpc,
    /// `POST /v1/token` (RFC 8693) over HTTP/1.1 with keep-alive.
    Http,
    /// `grpc.health.v1.Health/Check` on the same server, connections and streams, with
    /// the same bearer metadata: what the gRPC transport alone costs per call (tonic, h2,
    /// HPACK, tokio, sockets), with no verification, policy, signing or store. The floor
    /// under Mint's CPU per call (the JSON report's `mints` fields then count calls).
    GrpcHealth,
}

impl Protocol {
    /// The name on the command line and in the report.
    fn name(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::Http => "http",
            Protocol::GrpcHealth => "grpc-health",
        }
    }
}

/// Report format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A human-readable table.
    Table,
    /// One JSON object.
    Json,
}

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Connections the streams share (gRPC multiplexes streams on each; HTTP uses a pool).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Measured duration.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Load before measuring (JIT-free, but caches, connections and the page cache warm up).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Algorithm of the callers' identity tokens.
    #[arg(long, value_enum, default_value_t = BenchAlg::Rs256)]
    pub caller_alg: BenchAlg,
    /// Algorithm of the minted credentials.
    #[arg(long, value_enum, default_value_t = BenchAlg::Es256)]
    pub minted_alg: BenchAlg,
    /// Endpoint to drive.
    #[arg(long, value_enum, default_value_t = Protocol::Grpc)]
    pub protocol: Protocol,
    /// Directory for the broker's config, key and store (audit with synchronous=FULL);
    /// emptied first.
    #[arg(long, default_value = "latchkey-bench")]
    pub state_dir: PathBuf,
    /// Output format on stdout.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Also write the JSON report to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

/// Runs the benchmark and prints the report; 0 when it ran (whatever the numbers), 1 when
/// it could not run.
pub async fn run(args: Args) -> anyhow::Result<i32> {
    anyhow::ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    anyhow::ensure!(args.connections >= 1, "--connections must be at least 1");
    anyhow::ensure!(
        args.duration >= Duration::from_millis(100),
        "--duration must be at least 100ms"
    );
    let report = bench(&args).await?;
    let text = serde_json::to_string_pretty(&report)?;
    if let Some(p) = &args.json_out {
        std::fs::write(p, format!("{text}\n"))?;
    }
    match args.format {
        Format::Json => println!("{text}"),
        Format::Table => print!("{}", table(&report)),
    }
    Ok(0)
}

/// A broker child process, stopped (SIGTERM, then SIGKILL) when dropped.
struct Broker {
    child: std::process::Child,
}

impl Broker {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn config(issuer: &DevIssuer, grpc: u16, http: u16, dir: &Path, minted: Alg) -> String {
    format!(
        r#"# Written by `latchkey bench`.
[server]
grpc_addr = "127.0.0.1:{grpc}"
http_addr = "127.0.0.1:{http}"
issuer_url = "http://127.0.0.1:{http}"

[store]
path = "{db}"
master_key_file = "{key}"

# Warnings only: the per-request decision log line (the audit record says the same) is
# left out, as an operator running at this rate would.
[log]
format = "json"
level = "warn"

[[issuers]]
name = "bench"
preset = "bitbucket"
issuer = "{iss}"
audiences = ["{aud}"]

[[targets]]
name = "bench"
kind = "jwt"
audience = "https://bench.example.com"
algorithm = "{minted}"
default_ttl = "5m"
subject = "bb:{{repositoryUuid}}"

[[rules]]
name = "bench"
issuer = "bench"
claims = {{ repositoryUuid = "{DEV_REPOSITORY}", branchName = "main" }}
grants = [{{ target = "bench", scopes = ["read", "write"] }}]

# Measure the broker, not its rate limiter.
[limits]
identity_rate = 0
source_ip_rate = 0
"#,
        db = dir.join("latchkey.db").display(),
        key = dir.join("master.key").display(),
        iss = issuer.issuer_url(),
        aud = issuer.audience(),
        minted = minted.as_str(),
    )
}

/// Starts the broker and waits until `/readyz` answers 200 (store, keys, issuer keys).
async fn start_broker(args: &Args, issuer: &DevIssuer) -> anyhow::Result<(Broker, u16, u16)> {
    let dir = &args.state_dir;
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    std::fs::write(
        dir.join("master.key"),
        crate::keys::MasterKey::generate().to_base64().expose(),
    )?;
    let (grpc, http) = (free_port()?, free_port()?);
    let cfg = dir.join("latchkey.toml");
    std::fs::write(
        &cfg,
        config(issuer, grpc, http, &dir, args.minted_alg.alg()),
    )?;
    let child = std::process::Command::new(std::env::current_exe()?)
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("broker.log"))?)
        .spawn()?;
    let broker = Broker { child };
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = client
            .get(format!("http://127.0.0.1:{http}/readyz"))
            .send()
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false);
        if ready {
            return Ok((broker, grpc, http));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the broker did not become ready in 60 s; see {}",
            dir.join("broker.log").display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow::anyhow!("unreadable /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    // /proc reports in USER_HZ, which is 100 on every Linux ABI.
    Ok(ticks / 100.0)
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// What one mint cost in cryptography alone: verifying the caller's token and signing the
/// credential, with the ring calls the broker makes, in µs (best of five rounds).
fn crypto_cost(caller: Alg, minted: Alg) -> anyhow::Result<(f64, f64)> {
    use ring::signature::UnparsedPublicKey;
    let (caller_key, _) = SigningKey::generate(caller)?;
    let (minted_key, _) = SigningKey::generate(minted)?;
    let message = vec![b'x'; 600];
    let sig = caller_key.sign(&message)?;
    let public = caller_key.public_key_raw();
    let verifier = UnparsedPublicKey::new(caller.verification(), &public);
    let rounds = 400;
    let mut best = (f64::MAX, f64::MAX);
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..rounds {
            verifier
                .verify(&message, &sig)
                .map_err(|_| anyhow::anyhow!("verify failed"))?;
        }
        let v = t.elapsed().as_secs_f64() * 1e6 / rounds as f64;
        let t = Instant::now();
        for _ in 0..rounds {
            minted_key.sign(&message)?;
        }
        let s = t.elapsed().as_secs_f64() * 1e6 / rounds as f64;
        best = (best.0.min(v), best.1.min(s));
    }
    Ok(best)
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: BTreeMap<String, u64>,
}

/// Drives one protocol; the callers' tokens are prepared once, not per request.
enum Driver {
    Grpc {
        clients:
            Vec<pb::credential_broker_client::CredentialBrokerClient<tonic::transport::Channel>>,
        /// `Bearer <token>` per token, ready as metadata.
        auth: Vec<tonic::metadata::AsciiMetadataValue>,
    },
    Http {
        client: reqwest::Client,
        url: String,
        tokens: Vec<String>,
    },
    Health {
        clients: Vec<tonic_health::pb::health_client::HealthClient<tonic::transport::Channel>>,
        auth: Vec<tonic::metadata::AsciiMetadataValue>,
    },
}

impl Driver {
    fn tokens(&self) -> usize {
        match self {
            Driver::Grpc { auth, .. } | Driver::Health { auth, .. } => auth.len(),
            Driver::Http { tokens, .. } => tokens.len(),
        }
    }

    /// One request from `worker` with token `i`: Ok, or the error code.
    async fn once(&self, worker: usize, i: usize) -> Result<(), String> {
        match self {
            Driver::Grpc { clients, auth } => {
                let mut c = clients[worker % clients.len()].clone();
                let mut req = tonic::Request::new(pb::MintRequest {
                    target: "bench".into(),
                    ..Default::default()
                });
                req.metadata_mut()
                    .insert("authorization", auth[i % auth.len()].clone());
                match c.mint(req).await {
                    Ok(r) if r.get_ref().credential.is_some() => Ok(()),
                    Ok(_) => Err("no credential".into()),
                    Err(s) => Err(format!("{:?}", s.code())),
                }
            }
            Driver::Health { clients, auth } => {
                let mut c = clients[worker % clients.len()].clone();
                let mut req = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                });
                req.metadata_mut()
                    .insert("authorization", auth[i % auth.len()].clone());
                match c.check(req).await {
                    Ok(r)
                        if r.get_ref().status
                            == tonic_health::pb::health_check_response::ServingStatus::Serving
                                as i32 =>
                    {
                        Ok(())
                    }
                    Ok(_) => Err("not serving".into()),
                    Err(s) => Err(format!("{:?}", s.code())),
                }
            }
            Driver::Http {
                client,
                url,
                tokens,
            } => {
                let token = tokens[i % tokens.len()].as_str();
                let r = client
                    .post(url)
                    .form(&[
                        (
                            "grant_type",
                            "urn:ietf:params:oauth:grant-type:token-exchange",
                        ),
                        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
                        ("subject_token", token),
                        ("audience", "bench"),
                    ])
                    .send()
                    .await
                    .map_err(|e| {
                        if e.is_timeout() {
                            "timeout".to_string()
                        } else {
                            "connect".to_string()
                        }
                    })?;
                let status = r.status();
                let _ = r.bytes().await;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(format!("HTTP {}", status.as_u16()))
                }
            }
        }
    }
}

async fn bench(args: &Args) -> anyhow::Result<Value> {
    let (verify_us, sign_us) = crypto_cost(args.caller_alg.alg(), args.minted_alg.alg())?;
    let issuer = DevIssuer::spawn("127.0.0.1:0".parse()?, args.caller_alg.alg()).await?;
    // Tokens valid for the whole run, one per in-flight request slot (so the replay guard,
    // were it on, and per-token caches see many tokens).
    let tokens: Vec<String> = (0..args.concurrency.max(64))
        .map(|_| {
            let mut c = issuer.bitbucket_claims("main");
            c["exp"] = json!(c["iat"].as_i64().unwrap_or(0) + 3 * 3600);
            issuer.sign(&c)
        })
        .collect();
    let (broker, grpc, http) = start_broker(args, &issuer).await?;
    let pid = broker.pid();
    let channels = move || async move {
        let mut channels = Vec::new();
        for _ in 0..args.connections {
            channels.push(
                tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{grpc}"))?
                    .tcp_nodelay(true)
                    .connect()
                    .await?,
            );
        }
        anyhow::Ok(channels)
    };
    let auth = || {
        tokens
            .iter()
            .map(|t| format!("Bearer {t}").parse())
            .collect::<Result<Vec<_>, _>>()
    };
    let driver = Arc::new(match args.protocol {
        Protocol::Grpc => Driver::Grpc {
            clients: channels()
                .await?
                .into_iter()
                .map(pb::credential_broker_client::CredentialBrokerClient::new)
                .collect(),
            auth: auth()?,
        },
        Protocol::GrpcHealth => {
            let clients: Vec<_> = channels()
                .await?
                .into_iter()
                .map(tonic_health::pb::health_client::HealthClient::new)
                .collect();
            let driver = Driver::Health {
                clients,
                auth: auth()?,
            };
            // gRPC health follows readiness every couple of seconds, so it may still say
            // NOT_SERVING just after /readyz said ready.
            let deadline = Instant::now() + Duration::from_secs(30);
            while let Err(e) = driver.once(0, 0).await {
                if Instant::now() > deadline {
                    anyhow::bail!("the broker's gRPC health check did not pass in 30 s: {e}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            driver
        }
        Protocol::Http => Driver::Http {
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(args.concurrency)
                .tcp_nodelay(true)
                .timeout(Duration::from_secs(30))
                .build()?,
            url: format!("http://127.0.0.1:{http}/v1/token"),
            tokens,
        },
    });

    let start = Instant::now();
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let tallies: Vec<Arc<Mutex<Tally>>> = (0..args.concurrency)
        .map(|_| Arc::new(Mutex::new(Tally::default())))
        .collect();
    let mut workers = Vec::new();
    for (w, tally) in tallies.iter().enumerate() {
        let (driver, tally) = (driver.clone(), tally.clone());
        workers.push(tokio::spawn(async move {
            let mut local = Tally::default();
            let mut i = w;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let r = driver.once(w, i).await;
                i += driver.tokens() / 7 + 1;
                if t0 < measure_from {
                    continue;
                }
                match r {
                    Ok(()) => local
                        .latencies_us
                        .push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32),
                    Err(code) => *local.errors.entry(code).or_default() += 1,
                }
            }
            *tally.lock().unwrap_or_else(|e| e.into_inner()) = local;
        }));
    }

    tokio::time::sleep_until(measure_from.into()).await;
    let cpu0 = cpu_seconds(pid)?;
    let rss_start = status_kib(pid, "VmRSS");
    let mut rss_samples = vec![rss_start];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(end.into()) => break,
            _ = tick.tick() => rss_samples.push(status_kib(pid, "VmRSS")),
        }
    }
    let cpu1 = cpu_seconds(pid)?;
    let elapsed = end.saturating_duration_since(measure_from).as_secs_f64();
    let rss_end = status_kib(pid, "VmRSS");
    rss_samples.push(rss_end);
    let rss_peak = status_kib(pid, "VmHWM");
    for w in workers {
        w.await?;
    }
    drop(broker);

    let mut lat = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for t in &tallies {
        let t = std::mem::take(&mut *t.lock().unwrap_or_else(|e| e.into_inner()));
        lat.extend(t.latencies_us);
        for (k, v) in t.errors {
            *errors.entry(k).or_default() += v;
        }
    }
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((p / 100.0) * lat.len() as f64).ceil() as usize;
        lat[i.clamp(1, lat.len()) - 1] as f64 / 1000.0
    };
    let ok = lat.len() as u64;
    let error_total: u64 = errors.values().sum();
    let cpu = cpu1 - cpu0;
    let cpu_per_mint_us = if ok > 0 { cpu * 1e6 / ok as f64 } else { 0.0 };
    let crypto_us = verify_us + sign_us;
    // Growth: the last third of the samples against the first third (steady state).
    let third = (rss_samples.len() / 3).max(1);
    let avg = |s: &[u64]| s.iter().sum::<u64>() as f64 / s.len().max(1) as f64;
    let growth = avg(&rss_samples[rss_samples.len() - third..]) - avg(&rss_samples[..third]);
    Ok(json!({
        "protocol": args.protocol.name(),
        "rpc": if args.protocol == Protocol::GrpcHealth { "grpc.health.v1.Health/Check" } else { "Mint" },
        "concurrency": args.concurrency,
        "connections": args.connections,
        "caller_alg": args.caller_alg.alg().as_str(),
        "minted_alg": args.minted_alg.alg().as_str(),
        "warmup_secs": args.warmup.as_secs_f64(),
        "duration_secs": elapsed,
        "mints": ok,
        "mints_per_sec": ok as f64 / elapsed,
        "latency_ms": {
            "p50": pct(50.0), "p90": pct(90.0), "p99": pct(99.0), "p99_9": pct(99.9),
            "max": lat.last().map(|v| *v as f64 / 1000.0).unwrap_or(0.0),
        },
        "errors": errors,
        "errors_total": error_total,
        "server": {
            "pid": pid,
            "cpu_secs": cpu,
            "cpu_cores_used": cpu / elapsed,
            "cpu_us_per_mint": cpu_per_mint_us,
            "rss_kib_start": rss_start,
            "rss_kib_end": rss_end,
            "rss_kib_peak": rss_peak,
            "rss_kib_growth": growth,
            "rss_samples": rss_samples.len(),
        },
        "crypto": {
            "verify_us": verify_us,
            "sign_us": sign_us,
            "per_mint_us": crypto_us,
            "cpu_ratio": if crypto_us > 0.0 { cpu_per_mint_us / crypto_us } else { 0.0 },
        },
        "store": args.state_dir.join("latchkey.db").display().to_string(),
    }))
}

fn table(r: &Value) -> String {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let s = &r["server"];
    let c = &r["crypto"];
    let l = &r["latency_ms"];
    let errors = r["errors"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    // The health-check floor counts calls; the JSON keys stay the same for both.
    let unit = if r["rpc"] == "Mint" { "mint" } else { "call" };
    format!(
        "latchkey bench: {proto} {rpc}, {conc} streams over {conns} connections, caller {ca}, minted {ma}, {dur:.0} s after {warm:.0} s warm-up\n\
         {:<22}{:>12.0}\n\
         {:<22}{:>12}\n\
         {:<22}{:>12}  {errors}\n\
         {:<22}{:>12.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}\n\
         {:<22}{:>12.1}  ({:.2} cores)\n\
         {:<22}{:>12.1}  (verify {} {:.1} + sign {} {:.1})\n\
         {:<22}{:>12.2}\n\
         {:<22}{:>12.1}  start {:.1}  end {:.1}  growth {:+.1}\n\
         store: {store}\n",
        format!("{unit}s/s"), f(&r["mints_per_sec"]),
        format!("{unit}s"), r["mints"].as_u64().unwrap_or(0),
        "errors", r["errors_total"].as_u64().unwrap_or(0),
        "latency p50 (ms)", f(&l["p50"]), f(&l["p90"]), f(&l["p99"]), f(&l["p99_9"]), f(&l["max"]),
        format!("server CPU µs/{unit}"), f(&s["cpu_us_per_mint"]), f(&s["cpu_cores_used"]),
        "crypto µs/mint", f(&c["per_mint_us"]), r["caller_alg"].as_str().unwrap_or(""), f(&c["verify_us"]),
        r["minted_alg"].as_str().unwrap_or(""), f(&c["sign_us"]),
        "CPU / crypto", f(&c["cpu_ratio"]),
        "server RSS peak (MiB)", f(&s["rss_kib_peak"]) / 1024.0, f(&s["rss_kib_start"]) / 1024.0,
        f(&s["rss_kib_end"]) / 1024.0, f(&s["rss_kib_growth"]) / 1024.0,
        proto = r["protocol"].as_str().unwrap_or(""),
        rpc = r["rpc"].as_str().unwrap_or(""),
        conc = r["concurrency"],
        conns = r["connections"],
        ca = r["caller_alg"].as_str().unwrap_or(""),
        ma = r["minted_alg"].as_str().unwrap_or(""),
        dur = f(&r["duration_secs"]),
        warm = f(&r["warmup_secs"]),
        store = r["store"].as_str().unwrap_or(""),
    )
}
