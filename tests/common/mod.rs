//! Shared test harness: a development issuer and a real broker on 127.0.0.1:0, each
//! test owning its own of both, plus its own SQLite file and keys.
#![allow(dead_code)]

pub mod fakes;

use latchkey::clock::SystemClock;
use latchkey::config::Config;
use latchkey::devissuer::{DevIssuer, DEV_REPOSITORY};
use latchkey::jose::Alg;
use latchkey::keys::MasterKey;
use latchkey::server::Running;
use latchkey::transport::pb::credential_broker_client::CredentialBrokerClient;
use latchkey::transport::pb::{ExplainRequest, MintRequest, MintResponse};
use std::path::PathBuf;
use std::sync::Arc;
use tonic::transport::Channel;

pub struct Env {
    pub issuer: DevIssuer,
    pub running: Option<Running>,
    pub dir: tempfile::TempDir,
    pub client: CredentialBrokerClient<Channel>,
    pub channel: Channel,
    pub http: String,
    pub db: PathBuf,
    pub config: Config,
    /// The broker's store, through its ports.
    pub store: Arc<dyn latchkey::store::Store>,
    /// The same store as the SQLite backend it is, for SQLite-only fault injection (made
    /// read-only to simulate a full disk).
    pub sqlite: Arc<latchkey::store::sqlite::SqliteStore>,
    /// The master key, base64 (for the CLI's tools that open the store).
    pub master_b64: String,
    /// The configuration text.
    pub text: String,
}

pub fn config_text(
    issuer_url: &str,
    audience: &str,
    db: &str,
    issuer_extra: &str,
    store_extra: &str,
) -> String {
    format!(
        r#"
[server]
grpc_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
issuer_url = "http://127.0.0.1:9/latchkey"

[store]
path = "{db}"
{store_extra}

[[issuers]]
name = "bb"
preset = "bitbucket"
issuer = "{issuer_url}"
audiences = ["{audience}", "second-audience"]
{issuer_extra}

[[targets]]
name = "orders-api"
kind = "jwt"
audience = "https://orders.example.com"
default_ttl = "5m"
max_ttl = "1h"
subject = "bb:{{repositoryUuid}}"
claims = {{ branch = "{{branchName}}" }}

[[targets]]
name = "ed-api"
kind = "jwt"
audience = "ed"
algorithm = "EdDSA"

[[targets]]
name = "rsa-api"
kind = "jwt"
audience = "rsa"
algorithm = "RS256"

[[targets]]
name = "reports"
kind = "jwt"
audience = "reports"
max_ttl = "30m"

[[targets]]
name = "team-api"
kind = "jwt"
audience = "team"

[[rules]]
name = "orders-main-and-release"
issuer = "bb"
claims = {{ repositoryUuid = "{repo}", branchName = ["main", {{ glob = "release/*" }}] }}
grants = [
  {{ target = "orders-api", scopes = ["orders:read"] }},
  {{ target = "orders-api", scopes = ["orders:write"], max_ttl = "10m" }},
  {{ target = "ed-api", scopes = ["e"] }},
  {{ target = "rsa-api", scopes = ["r"] }},
]

[[rules]]
name = "reports-any-branch"
issuer = "bb"
claims = {{ repositoryUuid = "{repo}" }}
grants = [{{ target = "reports", scopes = ["reports:read"] }}]

[[rules]]
name = "team-by-pointer-and-regex"
issuer = "bb"
claims = {{ "/ci/team" = {{ regex = "pay(ments)?" }}, branchName = {{ not = {{ glob = "wip/*" }} }} }}
grants = [{{ target = "team-api", scopes = ["t"] }}]

[[rules]]
name = "no-experimental"
issuer = "bb"
effect = "deny"
claims = {{ branchName = {{ glob = "experimental/*" }} }}
"#,
        repo = DEV_REPOSITORY
    )
}

impl Env {
    pub async fn start() -> Env {
        Env::start_with("jwks_cooldown = \"0s\"", "busy_timeout = \"300ms\"").await
    }

    pub async fn start_with(issuer_extra: &str, store_extra: &str) -> Env {
        Env::start_full(issuer_extra, store_extra, "", Arc::new(SystemClock)).await
    }

    /// A broker whose config has `extra` appended (more targets, rules, a [leases]
    /// section), reading time from `clock`.
    pub async fn start_full(
        issuer_extra: &str,
        store_extra: &str,
        extra: &str,
        clock: latchkey::clock::SharedClock,
    ) -> Env {
        Env::start_with_minters(issuer_extra, store_extra, extra, clock, Vec::new()).await
    }

    /// [`Env::start_full`] with the minters of some targets replaced (fake upstreams).
    pub async fn start_with_minters(
        issuer_extra: &str,
        store_extra: &str,
        extra: &str,
        clock: latchkey::clock::SharedClock,
        minters: Vec<(String, Arc<dyn latchkey::mint::Minter>)>,
    ) -> Env {
        let issuer = DevIssuer::spawn("127.0.0.1:0".parse().unwrap(), Alg::RS256)
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("latchkey.db");
        let text = config_text(
            issuer.issuer_url(),
            &issuer.audience(),
            &db.display().to_string(),
            issuer_extra,
            store_extra,
        ) + extra;
        let config = Config::parse(&text, "test.toml").unwrap();
        let sqlite = Arc::new(
            latchkey::store::sqlite::SqliteStore::open(&latchkey::store::sqlite::Config {
                path: config
                    .store
                    .location
                    .sqlite_path()
                    .expect("tests run on an SQLite store")
                    .to_path_buf(),
                busy_timeout: config.store.busy_timeout,
            })
            .unwrap(),
        );
        let store: Arc<dyn latchkey::store::Store> = sqlite.clone();
        let master = MasterKey::generate();
        let master_b64 = master.to_base64().expose().clone();
        let running =
            latchkey::server::start_with_minters(&config, store.clone(), &master, clock, minters)
                .await
                .unwrap();
        let channel = Channel::from_shared(format!("http://{}", running.grpc_addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let client = CredentialBrokerClient::new(channel.clone());
        Env {
            channel,
            http: format!("http://{}", running.http_addr),
            issuer,
            running: Some(running),
            dir,
            client,
            db,
            config,
            store,
            sqlite,
            master_b64,
            text,
        }
    }

    pub fn leases(&self) -> latchkey::transport::pb::leases_client::LeasesClient<Channel> {
        latchkey::transport::pb::leases_client::LeasesClient::new(self.channel.clone())
    }

    pub fn broker(&self) -> &Arc<latchkey::broker::Broker> {
        &self.running.as_ref().unwrap().broker
    }

    pub fn token(&self, branch: &str) -> String {
        self.issuer.sign(&self.issuer.bitbucket_claims(branch))
    }

    pub fn claims(&self, branch: &str) -> serde_json::Value {
        self.issuer.bitbucket_claims(branch)
    }

    pub async fn mint(
        &self,
        token: &str,
        target: &str,
        scopes: &[&str],
        ttl: Option<i64>,
    ) -> Result<MintResponse, tonic::Status> {
        let mut c = self.client.clone();
        let req = MintRequest {
            target: target.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ttl: ttl.map(|s| prost_types::Duration {
                seconds: s,
                nanos: 0,
            }),
            context: [("commit".to_string(), "abc123".to_string())].into(),
        };
        c.mint(authed(req, token)).await.map(|r| r.into_inner())
    }

    pub async fn explain(
        &self,
        token: &str,
        target: &str,
        scopes: &[&str],
    ) -> Result<latchkey::transport::pb::ExplainResponse, tonic::Status> {
        let mut c = self.client.clone();
        let req = ExplainRequest {
            target: target.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
        };
        c.explain(authed(req, token)).await.map(|r| r.into_inner())
    }

    pub async fn records(&self) -> Vec<latchkey::audit::AuditRecord> {
        self.running
            .as_ref()
            .unwrap()
            .broker
            .store()
            .records(0, 100_000)
            .await
            .unwrap()
    }

    /// Stops the broker but keeps the files for inspection.
    pub async fn stop_checkpointless(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

/// `grant_type` of RFC 8693.
pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

/// `POST /v1/token` as curl sends it: `subject_token` for `audience`, plus `extra`.
pub async fn exchange(
    http: &str,
    subject_token: &str,
    audience: &str,
    extra: &[(&str, &str)],
) -> reqwest::Response {
    let mut form = vec![
        ("grant_type", TOKEN_EXCHANGE),
        ("subject_token", subject_token),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("audience", audience),
    ];
    form.extend_from_slice(extra);
    reqwest::Client::new()
        .post(format!("{http}/v1/token"))
        .form(&form)
        .send()
        .await
        .unwrap()
}

pub fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if !token.is_empty() {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    r
}

pub fn all_bytes_under(dir: &std::path::Path) -> Vec<u8> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            out.extend(std::fs::read(&p).unwrap());
        }
    }
    out
}

pub fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn wait_for_port(port: u16) {
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "server did not start on {port}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A child process killed (and reaped) when dropped, so a failing test leaves none behind.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
