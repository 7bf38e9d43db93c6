//! The `postgres` target against the real PostgreSQL server on this machine. The URL of
//! a superuser connection comes from `LATCHKEY_TEST_POSTGRES_URL` (`.ci/run` sets it
//! when 127.0.0.1:5432 answers); without it every test here says so and skips.
//!
//! Each test makes its own admin role (CREATEROLE, not superuser), group role, table and
//! role prefix, and removes them at the end.

mod common;

use common::{all_bytes_under, authed, contains, Env};
use latchkey::clock::{Clock, ManualClock, SystemClock};
use latchkey::devissuer::DEV_REPOSITORY;
use latchkey::store::RootSecrets;
use latchkey::transport::pb::{RenewRequest, RevokeRequest};
use std::sync::Arc;
use tokio_postgres::NoTls;

const VAR: &str = "LATCHKEY_TEST_POSTGRES_URL";

fn pg_url() -> Option<String> {
    match std::env::var(VAR) {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            eprintln!(
                "SKIPPED: {VAR} is not set; PostgreSQL target tests need a server (see CONTRIBUTING.md)"
            );
            None
        }
    }
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(conn);
    c
}

/// Admin role, group role and table of one test.
struct Fixture {
    su: tokio_postgres::Client,
    url: String,
    admin: String,
    group: String,
    table: String,
    prefix: String,
    secrets: tempfile::TempDir,
}

impl Fixture {
    async fn new(url: &str) -> Fixture {
        let tag: String = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        let su = connect(url).await;
        let admin = format!("lkadmin_{tag}");
        let group = format!("lkgroup_{tag}");
        let table = format!("lktable_{tag}");
        su.batch_execute(&format!(
            "CREATE ROLE {admin} LOGIN CREATEROLE PASSWORD 'initial-admin-pass-{tag}';
             CREATE ROLE {group} NOLOGIN;
             GRANT {group} TO {admin} WITH ADMIN OPTION;
             CREATE TABLE {table} (id int);
             INSERT INTO {table} VALUES (1), (2);
             GRANT SELECT ON {table} TO {group};"
        ))
        .await
        .unwrap();
        let secrets = tempfile::tempdir().unwrap();
        std::fs::write(
            secrets.path().join("admin-password"),
            format!("initial-admin-pass-{tag}\n"),
        )
        .unwrap();
        Fixture {
            su,
            url: url.to_string(),
            admin,
            group,
            table,
            prefix: format!("lkt{tag}_"),
            secrets,
        }
    }

    /// The target's config, and a rule granting it.
    fn config(&self, extra: &str) -> String {
        let u = reqwest::Url::parse(&self.url).unwrap();
        let host = u.host_str().unwrap_or("127.0.0.1");
        let port = u.port().unwrap_or(5432);
        let db = u.path().trim_start_matches('/');
        format!(
            r#"
[[targets]]
name = "warehouse"
kind = "postgres"
url = "postgres://{admin}@{host}:{port}/{db}"
password_file = "{pw}"
role_prefix = "{prefix}"
roles = {{ read = ["{group}"] }}
max_ttl = "1h"
{extra}

[[rules]]
name = "warehouse"
issuer = "bb"
claims = {{ repositoryUuid = "{DEV_REPOSITORY}" }}
grants = [{{ target = "warehouse", scopes = ["read"] }}]
"#,
            admin = self.admin,
            pw = self.secrets.path().join("admin-password").display(),
            prefix = self.prefix,
            group = self.group,
        )
    }

    /// A connection as `user` with `password`.
    async fn login(
        &self,
        user: &str,
        password: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let mut cfg: tokio_postgres::Config = self.url.parse().unwrap();
        cfg.user(user).password(password);
        let (c, conn) = cfg.connect(NoTls).await?;
        tokio::spawn(conn);
        Ok(c)
    }

    async fn role_exists(&self, role: &str) -> bool {
        self.su
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
            .await
            .unwrap()
            .is_some()
    }

    async fn valid_until(&self, role: &str) -> i64 {
        let r = self
            .su
            .query_one(
                "SELECT extract(epoch FROM rolvaliduntil)::bigint FROM pg_roles WHERE rolname = $1",
                &[&role],
            )
            .await
            .unwrap();
        r.get(0)
    }

    async fn cleanup(self) {
        let roles = self
            .su
            .query(
                "SELECT rolname::text FROM pg_roles WHERE left(rolname, length($1)) = $1",
                &[&self.prefix],
            )
            .await
            .unwrap();
        for r in roles {
            let n: String = r.get(0);
            let _ = self
                .su
                .batch_execute(&format!("DROP OWNED BY \"{n}\"; DROP ROLE \"{n}\""))
                .await;
        }
        let _ = self
            .su
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {t}; DROP OWNED BY {a}; DROP ROLE IF EXISTS {a}; DROP ROLE IF EXISTS {g};",
                t = self.table,
                a = self.admin,
                g = self.group
            ))
            .await;
    }
}

async fn admin_hash(fx: &Fixture) -> String {
    fx.su
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&fx.admin],
        )
        .await
        .unwrap()
        .get(0)
}

async fn start(fx: &Fixture, extra: &str, clock: latchkey::clock::SharedClock) -> Env {
    Env::start_full(
        "jwks_cooldown = \"0s\"",
        "busy_timeout = \"300ms\"",
        &fx.config(extra),
        clock,
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn minted_role_logs_in_reads_what_the_grant_allows_and_dies_on_revoke() {
    let Some(url) = pg_url() else { return };
    let fx = Fixture::new(&url).await;
    let env = start(&fx, "", Arc::new(SystemClock)).await;
    let caller = env.token("main");
    let now = SystemClock.now();
    let m = env
        .mint(&caller, "warehouse", &["read"], Some(600))
        .await
        .unwrap();
    let cred = m.credential.unwrap();
    let lease = m.lease.unwrap();
    assert_eq!(cred.kind, "postgres");
    assert!(cred.username.starts_with(&fx.prefix), "{}", cred.username);
    assert!(cred.password.len() >= 32);
    assert_eq!(cred.fields["database"], "test");
    // VALID UNTIL is the lease's expiry.
    let until = fx.valid_until(&cred.username).await;
    assert!((until - (now + 600)).abs() <= 2, "{until} vs {now}");
    // The server keeps a SCRAM verifier, never the password.
    let stored: String = fx
        .su
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&cred.username],
        )
        .await
        .unwrap()
        .get(0);
    assert!(stored.starts_with("SCRAM-SHA-256$"), "{stored}");
    assert!(!stored.contains(&cred.password));

    // It can do what the grant allows and nothing else.
    let session = fx.login(&cred.username, &cred.password).await.unwrap();
    let n: i64 = session
        .query_one(&format!("SELECT count(*) FROM {}", fx.table), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    let e = session
        .batch_execute(&format!("INSERT INTO {} VALUES (3)", fx.table))
        .await
        .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "42501", "{e}");
    let e = session
        .batch_execute("CREATE ROLE lk_should_not_exist")
        .await
        .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "42501", "{e}");

    // Renew moves VALID UNTIL.
    let renewed = env
        .client
        .clone()
        .renew(authed(
            RenewRequest {
                lease_id: lease.id.clone(),
                ttl: Some(prost_types::Duration {
                    seconds: 1800,
                    nanos: 0,
                }),
                lease_secret: String::new(),
            },
            &caller,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        renewed.credential.is_none() || renewed.credential.as_ref().unwrap().password.is_empty()
    );
    let until = fx.valid_until(&cred.username).await;
    assert!((until - (now + 1800)).abs() <= 3, "{until}");

    // Revoke: the open session is terminated and the role is gone; again is fine.
    env.client
        .clone()
        .revoke(authed(
            RevokeRequest {
                lease_id: lease.id.clone(),
                lease_secret: String::new(),
            },
            &caller,
        ))
        .await
        .unwrap();
    assert!(!fx.role_exists(&cred.username).await);
    assert!(
        session.query_one("SELECT 1", &[]).await.is_err(),
        "the revoked role's session must be terminated"
    );
    assert!(fx.login(&cred.username, &cred.password).await.is_err());
    env.broker().reaper().run_once().await.unwrap();

    // The password is nowhere in the store; the audit record has its fingerprint only.
    let hay = all_bytes_under(env.dir.path());
    assert!(!contains(&hay, &cred.password));
    env.stop().await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn expiry_revokes_owned_objects_go_and_the_reconciler_removes_orphans() {
    let Some(url) = pg_url() else { return };
    let fx = Fixture::new(&url).await;
    let t0 = SystemClock.now();
    let clock = ManualClock::new(t0);
    // A second database that does not exist: that step fails, the rest still runs.
    let env = start(
        &fx,
        "databases = [\"lk_no_such_db\"]",
        Arc::new(clock.clone()),
    )
    .await;
    let caller = env.token("main");
    let m = env
        .mint(&caller, "warehouse", &["read"], Some(60))
        .await
        .unwrap();
    let role = m.credential.unwrap().username;
    // The role owns something: revocation must reassign and drop it.
    fx.su
        .batch_execute(&format!(
            "CREATE TABLE {t}_owned (x int); ALTER TABLE {t}_owned OWNER TO \"{role}\";",
            t = fx.table
        ))
        .await
        .unwrap();

    // Past its expiry the reaper revokes it at the server (VALID UNTIL alone would not
    // end an open session or remove the role).
    clock.set(t0 + 61);
    let r = env.broker().reaper().run_once().await.unwrap();
    assert_eq!(r.expired, 1);
    assert!(
        !fx.role_exists(&role).await,
        "role dropped despite the failed step"
    );
    assert_eq!(r.failed, 1, "the missing database is reported: {r:?}");
    // The retry finds the role gone and settles (idempotent).
    clock.set(t0 + 61 + 3600);
    let r = env.broker().reaper().run_once().await.unwrap();
    assert_eq!(r.revoked_upstream, 1, "{r:?}");
    let owner: String = fx
        .su
        .query_one(
            "SELECT tableowner::text FROM pg_tables WHERE tablename = $1",
            &[&format!("{}_owned", fx.table)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, fx.admin, "owned objects reassigned to the admin");
    fx.su
        .batch_execute(&format!("DROP TABLE {}_owned", fx.table))
        .await
        .unwrap();

    // Orphans: an old role under our prefix with no lease goes; a young one, a
    // hand-made name and a live lease's role stay.
    let now = clock.now();
    let mut claims = env.claims("main");
    claims["iat"] = serde_json::json!(now);
    claims["exp"] = serde_json::json!(now + 3600);
    if claims.get("nbf").is_some() {
        claims["nbf"] = serde_json::json!(now);
    }
    let caller = env.issuer.sign(&claims);
    let live = env
        .mint(&caller, "warehouse", &["read"], Some(600))
        .await
        .unwrap()
        .credential
        .unwrap()
        .username;
    // Only roles carrying this broker's marker for this target are ours: an old role
    // without it (a person's, or an older version's) and one marked for another target
    // or another broker stay.
    let store_id = env.store.store_id().await.unwrap();
    let ours = format!("latchkey store={store_id} target=warehouse");
    let old = format!("{}{}_orphan", fx.prefix, now - 7200);
    let young = format!("{}{}_young", fx.prefix, now - 60);
    let hand = format!("{}handmade", fx.prefix);
    let unmarked = format!("{}{}_unmarked", fx.prefix, now - 7200);
    let other_target = format!("{}{}_othertarget", fx.prefix, now - 7200);
    let other_broker = format!("{}{}_otherbroker", fx.prefix, now - 7200);
    for (r, comment) in [
        (&old, Some(ours.clone())),
        (&young, Some(ours.clone())),
        (&hand, Some(ours.clone())),
        (&unmarked, None),
        (
            &other_target,
            Some(format!("latchkey store={store_id} target=lake")),
        ),
        (
            &other_broker,
            Some("latchkey store=0123456789abcdef target=warehouse".to_string()),
        ),
    ] {
        fx.su
            .batch_execute(&format!(
                "CREATE ROLE \"{r}\" LOGIN; GRANT \"{r}\" TO {}",
                fx.admin
            ))
            .await
            .unwrap();
        if let Some(c) = comment {
            fx.su
                .batch_execute(&format!("COMMENT ON ROLE \"{r}\" IS '{c}'"))
                .await
                .unwrap();
        }
    }
    let removed = env.broker().reaper().reconcile(now).await.unwrap();
    assert_eq!(removed, 1);
    assert!(!fx.role_exists(&old).await);
    for r in [
        &young,
        &hand,
        &live,
        &unmarked,
        &other_target,
        &other_broker,
    ] {
        assert!(fx.role_exists(r).await, "{r} must stay");
    }
    let audited = env.records().await.iter().any(|r| {
        r.entry.action == "reconcile" && r.entry.reason.as_deref().unwrap_or("").contains(&old)
    });
    assert!(audited);
    env.stop().await;
    fx.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_password_rotates_two_phase_and_minting_goes_on() {
    let Some(url) = pg_url() else { return };
    let fx = Fixture::new(&url).await;
    let env = start(&fx, "root_rotation = \"720h\"", Arc::new(SystemClock)).await;
    let before = admin_hash(&fx).await;
    let r = env
        .broker()
        .rotate_now(
            latchkey::broker::RotationCaller::Scheduler,
            "warehouse",
            latchkey::broker::Force {
                root: true,
                drop_old: false,
            },
            "rotate-pg",
        )
        .await
        .unwrap();
    assert_eq!(r.outcome, latchkey::rotation::Outcome::Rotated, "{r:?}");
    let after = admin_hash(&fx).await;
    assert_ne!(before, after);
    assert!(after.starts_with("SCRAM-SHA-256$"));
    let phases: Vec<String> = env
        .records()
        .await
        .iter()
        .filter(|r| r.entry.action == "rotation" && r.entry.target.as_deref() == Some("warehouse"))
        .filter_map(|r| r.entry.context.get("phase").cloned())
        .collect();
    for p in ["create", "verify", "switch"] {
        assert!(phases.iter().any(|x| x == p), "{p}: {phases:?}");
    }
    // The new password is sealed in the store.
    let stored = env.store.as_ref();
    let s = RootSecrets::root_secret(stored, "warehouse")
        .await
        .unwrap()
        .unwrap();
    assert!(s.pending.is_none());
    let m = env
        .mint(&env.token("main"), "warehouse", &["read"], None)
        .await
        .unwrap();
    assert!(m.credential.is_some());
    env.stop().await;
    fx.cleanup().await;
}

/// Two brokers (two stores) whose targets share one database and one role prefix: each
/// reconciler leaves the other's live roles alone, and both credentials keep working.
#[tokio::test(flavor = "multi_thread")]
async fn two_brokers_on_one_prefix_never_remove_each_others_live_roles() {
    let Some(url) = pg_url() else { return };
    let fx = Fixture::new(&url).await;
    let t0 = SystemClock.now();
    let clock = ManualClock::new(t0);
    let a = start(&fx, "", Arc::new(clock.clone())).await;
    let b = start(&fx, "", Arc::new(clock.clone())).await;
    let mut creds = Vec::new();
    for env in [&a, &b] {
        let c = env
            .mint(&env.token("main"), "warehouse", &["read"], Some(3600))
            .await
            .unwrap()
            .credential
            .unwrap();
        creds.push((c.username, c.password));
    }
    // Past the reconciler's grace period, both leases still live.
    let later = t0 + 900;
    clock.set(later);
    for env in [&a, &b] {
        assert_eq!(env.broker().reaper().reconcile(later).await.unwrap(), 0);
    }
    for (user, password) in &creds {
        assert!(
            fx.role_exists(user).await,
            "{user} was removed by the other broker"
        );
        let c = fx
            .login(user, password)
            .await
            .expect("the holder still logs in");
        let n: i64 = c
            .query_one(&format!("SELECT count(*) FROM {}", fx.table), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 2);
    }
    a.stop().await;
    b.stop().await;
    fx.cleanup().await;
}

/// The real binary at debug level: the minted role's password and its SCRAM verifier
/// never reach the log (tokio-postgres logs every statement it sends at debug).
#[tokio::test(flavor = "multi_thread")]
async fn debug_logs_never_carry_the_role_password_or_its_verifier() {
    let Some(url) = pg_url() else { return };
    let fx = Fixture::new(&url).await;
    let issuer = latchkey::devissuer::DevIssuer::spawn(
        "127.0.0.1:0".parse().unwrap(),
        latchkey::jose::Alg::RS256,
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (grpc, http) = (common::free_port(), common::free_port());
    let db = dir.path().join("latchkey.db").display().to_string();
    let text = common::config_text(issuer.issuer_url(), &issuer.audience(), &db, "", "")
        .replace(
            "grpc_addr = \"127.0.0.1:0\"",
            &format!("grpc_addr = \"127.0.0.1:{grpc}\""),
        )
        .replace(
            "http_addr = \"127.0.0.1:0\"",
            &format!("http_addr = \"127.0.0.1:{http}\""),
        )
        + &fx.config("");
    let cfg = dir.path().join("latchkey.toml");
    std::fs::write(&cfg, text).unwrap();
    let master = latchkey::keys::MasterKey::generate().to_base64();
    let log_path = dir.path().join("serve.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&cfg)
        .env("LATCHKEY_MASTER_KEY", master.expose())
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
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
    let req = latchkey::transport::pb::MintRequest {
        target: "warehouse".into(),
        scopes: vec!["read".into()],
        ..Default::default()
    };
    let cred = client
        .mint(authed(req, &issuer.sign(&issuer.bitbucket_claims("main"))))
        .await
        .unwrap()
        .into_inner()
        .credential
        .unwrap();
    assert!(fx.login(&cred.username, &cred.password).await.is_ok());
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("\"level\":\"DEBUG\""),
        "the log is at debug level"
    );
    assert!(!log.contains(&cred.password), "the password is in the log");
    assert!(
        !log.contains("SCRAM-SHA-256$"),
        "a SCRAM verifier is in the log"
    );
    assert!(
        !log.contains("CREATE ROLE"),
        "role statements are in the log"
    );
    fx.cleanup().await;
}

/// The server's certificate file, when the server speaks TLS (Debian's default: the
/// snakeoil certificate, CN and SAN `localhost`).
async fn server_certificate(fx: &Fixture) -> Option<std::path::PathBuf> {
    let ssl: String = fx.su.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    let file: String = fx
        .su
        .query_one("SHOW ssl_cert_file", &[])
        .await
        .unwrap()
        .get(0);
    let path = std::path::PathBuf::from(file);
    if ssl != "on" || !path.exists() {
        eprintln!("SKIPPED: the PostgreSQL server does not speak TLS (ssl = {ssl}) or its certificate is not readable here");
        return None;
    }
    Some(path)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_connection_speaks_tls_and_checks_the_certificate_as_sslmode_says() {
    let Some(url) = pg_url() else { return };
    let fx = Fixture::new(&url).await;
    let Some(cert) = server_certificate(&fx).await else {
        fx.cleanup().await;
        return;
    };
    let other_ca = fx.secrets.path().join("other-ca.pem");
    let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(&other_ca, ca.cert.pem()).unwrap();
    let cert = cert.display().to_string();
    let other = other_ca.display().to_string();
    // (host, TLS keys, whether a mint works, what the refusal says)
    let cases: Vec<(&str, String, bool, &str)> = vec![
        ("127.0.0.1", "sslmode = \"require\"".into(), true, ""),
        (
            "127.0.0.1",
            format!("sslmode = \"verify-ca\"\nca_file = \"{cert}\""),
            true,
            "",
        ),
        (
            "localhost",
            format!("sslmode = \"verify-full\"\nca_file = \"{cert}\""),
            true,
            "",
        ),
        // The certificate names localhost, not 127.0.0.1.
        (
            "127.0.0.1",
            format!("sslmode = \"verify-full\"\nca_file = \"{cert}\""),
            false,
            "TLS with the server failed",
        ),
        // Signed by nobody this CA file trusts.
        (
            "localhost",
            format!("sslmode = \"verify-full\"\nca_file = \"{other}\""),
            false,
            "TLS with the server failed",
        ),
        (
            "localhost",
            format!("sslmode = \"verify-ca\"\nca_file = \"{other}\""),
            false,
            "TLS with the server failed",
        ),
    ];
    for (host, tls, works, says) in cases {
        let config = fx.config(&tls).replace("@127.0.0.1:", &format!("@{host}:"));
        let env = Env::start_full(
            "jwks_cooldown = \"0s\"",
            "busy_timeout = \"300ms\"",
            &config,
            Arc::new(SystemClock),
        )
        .await;
        let r = env
            .mint(&env.token("main"), "warehouse", &["read"], Some(60))
            .await;
        match (works, r) {
            (true, Ok(m)) => assert!(m.credential.unwrap().username.starts_with(&fx.prefix)),
            (false, Err(e)) => {
                assert_eq!(e.code(), tonic::Code::Unavailable, "{host} {tls}: {e:?}");
                assert!(e.message().contains(says), "{host} {tls}: {}", e.message());
            }
            (w, r) => panic!("{host} {tls}: expected works={w}, got {r:?}"),
        }
        env.stop().await;
    }
    fx.cleanup().await;
}
