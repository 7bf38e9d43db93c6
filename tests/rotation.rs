//! Rotation through the real server: two-phase signing key rotation with a manual clock
//! (no token in flight ever meets a JWKS without its key), exclusive runs, forced
//! rotation after a leak, and upstream root rotation through the cron's CLI.

mod common;

use common::{authed, Env};
use latchkey::clock::{Clock, ManualClock, SystemClock};
use latchkey::devissuer::DEV_REPOSITORY;
use latchkey::transport::pb::rotation_client::RotationClient;
use latchkey::transport::pb::{self, MintRequest, RotateRequest, RunDueRequest, ScheduleRequest};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

const DAY: i64 = 86_400;
const BIN: &str = env!("CARGO_BIN_EXE_latchkey");

fn extra() -> String {
    format!(
        r#"
[[targets]]
name = "rot-api"
kind = "jwt"
audience = "rot"
default_ttl = "1h"
max_ttl = "1h"
rotation = "24h"

[[rules]]
name = "rot-users"
issuer = "bb"
claims = {{ repositoryUuid = "{DEV_REPOSITORY}" }}
grants = [{{ target = "rot-api" }}]

[[rules]]
name = "rotation-cron"
issuer = "bb"
claims = {{ branchName = "ops/rotate" }}
roles = ["rotator", "introspect"]

[rotation]
scheduler = false
jwks_cache = "5m"

[limits]
identity_rate = 0
"#
    )
}

async fn start(clock: Arc<dyn Clock>) -> Env {
    Env::start_full("jwks_cooldown = \"0s\"", "", &extra(), clock).await
}

/// A token valid at the broker's `now`.
fn token_at(env: &Env, branch: &str, now: i64) -> String {
    let mut c = env.claims(branch);
    c["iat"] = json!(now);
    c["exp"] = json!(now + 3600);
    if c.get("nbf").is_some() {
        c["nbf"] = json!(now);
    }
    env.issuer.sign(&c)
}

fn rotation(env: &Env) -> RotationClient<tonic::transport::Channel> {
    RotationClient::new(env.channel.clone())
}

async fn run_due(env: &Env, now: i64) -> Vec<pb::RotationResult> {
    rotation(env)
        .run_due(authed(RunDueRequest {}, &token_at(env, "ops/rotate", now)))
        .await
        .unwrap()
        .into_inner()
        .results
}

fn result<'a>(r: &'a [pb::RotationResult], item: &str) -> &'a pb::RotationResult {
    r.iter().find(|x| x.item == item).unwrap()
}

async fn mint(env: &Env, now: i64) -> String {
    let mut c = env.client.clone();
    let r = c
        .mint(authed(
            MintRequest {
                target: "rot-api".into(),
                ..Default::default()
            },
            &token_at(env, "main", now),
        ))
        .await
        .unwrap()
        .into_inner();
    r.credential.unwrap().token
}

async fn jwks_kids(env: &Env) -> BTreeSet<String> {
    let v: Value = reqwest::get(format!("{}/latchkey/.well-known/jwks.json", env.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect()
}

fn kid(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

/// Verifies `token` against the JWKS served now, with an independent library.
async fn verifies(env: &Env, token: &str) -> bool {
    let jwks: jsonwebtoken::jwk::JwkSet =
        reqwest::get(format!("{}/latchkey/.well-known/jwks.json", env.http))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let Some(jwk) = jwks.find(&kid(token)) else {
        return false;
    };
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::decode_header(token).unwrap().alg);
    v.set_audience(&["rot"]);
    v.validate_exp = false; // the broker's clock is ahead of the wall clock here
    jsonwebtoken::decode::<Value>(
        token,
        &jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap(),
        &v,
    )
    .is_ok()
}

async fn schedule_of(env: &Env, now: i64, item: &str) -> pb::ScheduledItem {
    rotation(env)
        .schedule(authed(
            ScheduleRequest {},
            &token_at(env, "ops/rotate", now),
        ))
        .await
        .unwrap()
        .into_inner()
        .items
        .into_iter()
        .find(|i| i.item == item)
        .unwrap()
}

#[tokio::test]
async fn tokens_stay_verifiable_across_a_rotation_and_keys_come_and_go_on_time() {
    let t0 = SystemClock.now();
    let clock = ManualClock::new(t0);
    let env = start(Arc::new(clock.clone())).await;
    let item = "signing-key:rot-api";
    let s = schedule_of(&env, t0, item).await;
    let (k1, k2) = (s.current_kid.clone(), s.next_kid.clone());
    assert!(!k1.is_empty() && !k2.is_empty() && k1 != k2);
    let published = jwks_kids(&env).await;
    assert!(
        published.contains(&k1) && published.contains(&k2),
        "the next key is published from the start, long before it signs"
    );
    assert_eq!(s.next_due.unwrap().seconds, t0 + DAY);

    // Not yet due.
    clock.set(t0 + DAY - 60);
    let before = mint(&env, t0 + DAY - 60).await;
    assert_eq!(kid(&before), k1);
    let r = run_due(&env, t0 + DAY - 60).await;
    assert_eq!(result(&r, item).outcome, "not_due");
    assert_eq!(
        result(&r, item).next_due.as_ref().unwrap().seconds,
        t0 + DAY
    );

    // Due: K2 signs, K1 retires but stays published, K3 is the new next key.
    clock.set(t0 + DAY);
    let r = run_due(&env, t0 + DAY).await;
    assert_eq!(result(&r, item).outcome, "rotated", "{r:?}");
    let after = mint(&env, t0 + DAY).await;
    assert_eq!(
        kid(&after),
        k2,
        "a token minted after the rotation uses the new kid"
    );
    let s = schedule_of(&env, t0 + DAY, item).await;
    let k3 = s.next_kid.clone();
    assert_eq!(s.current_kid, k2);
    assert_eq!(s.retired[0].kid, k1);
    let remove_at = s.retired[0].remove_at.as_ref().unwrap().seconds;
    assert_eq!(
        remove_at,
        t0 + DAY + 3600 + 60,
        "max_ttl + leeway after retirement"
    );
    let published = jwks_kids(&env).await;
    assert!(published.contains(&k1) && published.contains(&k2) && published.contains(&k3));
    assert!(
        verifies(&env, &before).await,
        "minted before the rotation, still verifies"
    );
    assert!(verifies(&env, &after).await);

    // Until every token K1 signed has expired, K1 stays; then the next run removes it.
    clock.set(remove_at - 1);
    let r = run_due(&env, remove_at - 1).await;
    assert_eq!(result(&r, item).outcome, "not_due");
    assert!(jwks_kids(&env).await.contains(&k1));
    assert!(
        verifies(&env, &before).await,
        "still verifies until it expires"
    );
    clock.set(remove_at);
    run_due(&env, remove_at).await;
    let published = jwks_kids(&env).await;
    assert!(!published.contains(&k1), "retired key removed on time");
    assert!(published.contains(&k2) && published.contains(&k3));

    // Every phase is an audit record, with who asked.
    let recs = env.records().await;
    let phases: Vec<String> = recs
        .iter()
        .filter(|r| r.entry.action == "rotation")
        .map(|r| r.entry.context["phase"].clone())
        .collect();
    assert_eq!(phases, vec!["activate", "retire", "publish", "remove"]);
    assert!(recs
        .iter()
        .filter(|r| r.entry.action == "rotation")
        .all(|r| r.entry.identity_key.is_some() && r.entry.context["item"] == item));

    // Metrics: one rotation, and the time until the next.
    let m = reqwest::get(format!("{}/metrics", env.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("latchkey_rotations_total{item=\"signing-key:rot-api\",outcome=\"rotated\"} 1"),
        "{m}"
    );
    assert!(m.contains(&format!(
        "latchkey_rotation_next_due_seconds{{item=\"signing-key:rot-api\"}} {}",
        t0 + 2 * DAY - remove_at
    )));
    env.stop().await;
}

#[tokio::test]
async fn concurrent_runs_rotate_once() {
    let t0 = SystemClock.now();
    let clock = ManualClock::new(t0);
    let env = start(Arc::new(clock.clone())).await;
    clock.set(t0 + DAY + 5);
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let mut c = rotation(&env);
            let t = token_at(&env, "ops/rotate", t0 + DAY);
            tokio::spawn(async move {
                c.run_due(authed(RunDueRequest {}, &t))
                    .await
                    .unwrap()
                    .into_inner()
                    .results
            })
        })
        .collect();
    // And the broker's own scheduler at the same moment.
    let broker = env.broker().clone();
    let scheduler = tokio::spawn(async move {
        broker
            .run_due(latchkey::broker::RotationCaller::Scheduler, "scheduler-run")
            .await
            .unwrap()
    });
    let mut rotated = 0;
    for r in runs {
        rotated += r
            .await
            .unwrap()
            .iter()
            .filter(|x| x.item == "signing-key:rot-api" && x.outcome == "rotated")
            .count();
    }
    rotated += scheduler
        .await
        .unwrap()
        .iter()
        .filter(|x| {
            x.item == "signing-key:rot-api" && x.outcome == latchkey::rotation::Outcome::Rotated
        })
        .count();
    assert_eq!(rotated, 1, "five runs at once, one rotation");
    let activations = env
        .records()
        .await
        .iter()
        .filter(|r| {
            r.entry.action == "rotation"
                && r.entry.context.get("phase").map(String::as_str) == Some("activate")
                && r.entry.target.as_deref() == Some("rot-api")
        })
        .count();
    assert_eq!(activations, 1);
    env.stop().await;
}

#[tokio::test]
async fn a_young_next_key_defers_and_a_leaked_key_can_be_dropped_at_once() {
    let t0 = SystemClock.now();
    let clock = ManualClock::new(t0);
    let env = start(Arc::new(clock.clone())).await;
    let item = "signing-key:rot-api";
    let rotator = |now| token_at(&env, "ops/rotate", now);
    let force = |drop_old| RotateRequest {
        target: "rot-api".into(),
        root: false,
        drop_old,
    };

    // The next key was published at t0: a forced rotation a minute later must wait
    // until verifiers' cached JWKS (5m) know it.
    clock.set(t0 + 60);
    let r = rotation(&env)
        .rotate(authed(force(false), &rotator(t0 + 60)))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(r[0].outcome, "deferred", "{r:?}");
    assert_eq!(r[0].next_due.as_ref().unwrap().seconds, t0 + 300);

    // The key leaked: drop it now. Tokens it signed stop verifying at once.
    let leaked = mint(&env, t0 + 60).await;
    let r = rotation(&env)
        .rotate(authed(force(true), &rotator(t0 + 60)))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(r[0].outcome, "rotated");
    assert!(r[0].detail.contains("removed at once"), "{}", r[0].detail);
    assert!(
        r[0].detail.contains("cache"),
        "says verifiers may lag: {}",
        r[0].detail
    );
    assert!(
        r[0].detail.contains("1 live lease(s) it signed revoked"),
        "{}",
        r[0].detail
    );
    assert!(!jwks_kids(&env).await.contains(&kid(&leaked)));
    assert!(!verifies(&env, &leaked).await);
    let revoked: Vec<_> = env
        .records()
        .await
        .into_iter()
        .filter(|r| r.entry.action == "revoke")
        .collect();
    assert_eq!(
        revoked.len(),
        1,
        "the leaked key's lease is revoked, audited"
    );
    let reason = revoked[0].entry.reason.clone().unwrap_or_default();
    assert!(reason.contains("dropped (forced rotation)"), "{reason}");
    assert_eq!(revoked[0].entry.context["kid"], kid(&leaked));
    let intro = env
        .leases()
        .introspect(authed(
            pb::IntrospectRequest {
                token: leaked.clone(),
            },
            &rotator(t0 + 60),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!intro.active);
    assert_eq!(intro.reason, "bad signature");
    let fresh = mint(&env, t0 + 61).await;
    assert!(verifies(&env, &fresh).await);
    let s = schedule_of(&env, t0 + 61, item).await;
    assert!(s.retired.is_empty());

    // Without the role: refused, and the refusal audited.
    let e = rotation(&env)
        .run_due(authed(RunDueRequest {}, &token_at(&env, "main", t0 + 61)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let e = rotation(&env)
        .rotate(authed(
            RotateRequest {
                target: "nope".into(),
                ..Default::default()
            },
            &rotator(t0 + 61),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(env
        .records()
        .await
        .iter()
        .any(|r| r.entry.action == "rotation_run" && r.entry.outcome == "denied"));
    env.stop().await;
}

#[tokio::test]
async fn an_airflow_key_waits_an_hour_whatever_jwks_cache_says_and_pulsar_is_told_to_reexport() {
    // Airflow reads the JWKS at most hourly: with [rotation] jwks_cache = 5m, the next
    // key of an airflow target still waits an hour; a jwt target's waits 5 minutes.
    let t0 = SystemClock.now();
    let clock = ManualClock::new(t0);
    let extra = extra().replace(
        "[rotation]",
        "[[targets]]\nname = \"rot-air\"\nkind = \"airflow\"\nalgorithm = \"ES256\"\nrole = \"viewer\"\n\n[[targets]]\nname = \"rot-pulsar\"\nkind = \"pulsar\"\n\n[rotation]",
    );
    let env = Env::start_full(
        "jwks_cooldown = \"0s\"",
        "",
        &extra,
        Arc::new(clock.clone()),
    )
    .await;
    let rotate = |target: &'static str, now: i64| {
        let env = &env;
        async move {
            rotation(env)
                .rotate(authed(
                    RotateRequest {
                        target: target.into(),
                        root: false,
                        drop_old: false,
                    },
                    &token_at(env, "ops/rotate", now),
                ))
                .await
                .unwrap()
                .into_inner()
                .results
                .remove(0)
        }
    };
    clock.set(t0 + 600);
    assert_eq!(rotate("rot-api", t0 + 600).await.outcome, "rotated");
    // Pulsar never reads the JWKS: the report says what the operator must do.
    let r = rotate("rot-pulsar", t0 + 600).await;
    assert_eq!(r.outcome, "rotated");
    assert!(
        r.detail.contains("set its tokenPublicKey")
            && r.detail
                .contains("keys export --target rot-pulsar --format pulsar"),
        "{}",
        r.detail
    );
    let r = rotate("rot-air", t0 + 600).await;
    assert_eq!(r.outcome, "deferred", "{r:?}");
    assert_eq!(r.next_due.as_ref().unwrap().seconds, t0 + 3600);
    let when = latchkey::clock::rfc3339(t0 + 3600);
    assert!(
        r.detail.contains(&format!("may sign from {when}")),
        "{}",
        r.detail
    );
    assert!(
        r.detail
            .contains("airflow verifiers cache the JWKS for up to 1h")
            && r.detail.contains("--drop-old"),
        "{}",
        r.detail
    );
    clock.set(t0 + 3600);
    assert_eq!(rotate("rot-air", t0 + 3600).await.outcome, "rotated");
    env.stop().await;
}

/// An upstream whose root credential rotates: create, verify, switch, delete.
#[derive(Debug, Default)]
struct FakeRoot {
    fail_verify: AtomicBool,
    /// The credential in service.
    current: Mutex<String>,
    /// Every credential that exists upstream.
    existing: Mutex<Vec<String>>,
    counter: Mutex<u32>,
}

#[async_trait::async_trait]
impl latchkey::mint::Minter for FakeRoot {
    fn kind(&self) -> &'static str {
        "fake-root"
    }
    fn rotates_root(&self) -> bool {
        true
    }
    async fn mint(
        &self,
        ctx: &latchkey::mint::MintContext<'_>,
    ) -> Result<latchkey::mint::Credential, latchkey::mint::MintError> {
        Ok(latchkey::mint::Credential {
            kind: "fake-root",
            token: Some(latchkey::secret::SecretString::new(format!(
                "minted-with-{}",
                self.current.lock().unwrap()
            ))),
            username: None,
            password: None,
            fields: Default::default(),
            expires_at: ctx.now + 60,
            id: ctx.lease_id.into(),
            upstream: None,
        })
    }
    async fn rotate_root(
        &self,
        journal: &mut Vec<latchkey::mint::RootStep>,
    ) -> Result<String, latchkey::mint::MintError> {
        use latchkey::mint::RootStep;
        let new = {
            let mut n = self.counter.lock().unwrap();
            *n += 1;
            format!("root-{}", *n + 1)
        };
        self.existing.lock().unwrap().push(new.clone());
        journal.push(RootStep {
            phase: "create",
            detail: format!("{new} created"),
        });
        if self.fail_verify.load(Ordering::SeqCst) {
            // The new credential does not work: remove it, keep the old one.
            self.existing.lock().unwrap().retain(|c| *c != new);
            journal.push(RootStep {
                phase: "cleanup",
                detail: format!("{new} deleted: it failed verification"),
            });
            return Err(latchkey::mint::MintError::Upstream {
                target: "reports".into(),
                reason: "new root credential failed verification (HTTP 401)".into(),
            });
        }
        journal.push(RootStep {
            phase: "verify",
            detail: format!("{new} works"),
        });
        let old = std::mem::replace(&mut *self.current.lock().unwrap(), new.clone());
        journal.push(RootStep {
            phase: "switch",
            detail: format!("now using {new}"),
        });
        self.existing.lock().unwrap().retain(|c| *c != old);
        journal.push(RootStep {
            phase: "delete",
            detail: format!("{old} deleted"),
        });
        Ok(format!("now using {new}"))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cron_cli_runs_due_work_and_fails_loudly_when_an_upstream_rotation_fails() {
    let fake = Arc::new(FakeRoot::default());
    *fake.current.lock().unwrap() = "root-1".into();
    fake.existing.lock().unwrap().push("root-1".into());
    let mut env = Env::start_with_minters(
        "",
        "",
        &extra(),
        Arc::new(SystemClock),
        vec![("reports".into(), fake.clone())],
    )
    .await;
    let (issuer, dir, db) = (&env.issuer, env.dir.path().to_path_buf(), env.db.clone());
    let server = format!("http://{}", env.running.as_ref().unwrap().grpc_addr);
    let rotator = issuer.sign(&issuer.bitbucket_claims("ops/rotate"));
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(BIN)
            .args(args)
            .args(["--server", &server])
            .env_remove("BITBUCKET_STEP_OIDC_TOKEN")
            .env("LATCHKEY_TOKEN", &rotator)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // The cron: nothing due right after start; every item listed with when it is due.
    let (code, out, err) = tokio::task::block_in_place(|| cli(&["rotate", "--due"]));
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("signing-key:rot-api") && out.contains("not_due"),
        "{out}"
    );
    assert!(out.contains("root:reports"), "{out}");
    let (code, out, _) = tokio::task::block_in_place(|| cli(&["rotate", "--schedule"]));
    assert_eq!(code, Some(0));
    assert!(
        out.contains("signing-key:rot-api") && out.contains("1day"),
        "{out}"
    );
    assert!(
        out.contains("root:reports") && out.contains("manual"),
        "{out}"
    );

    // The upstream refuses the new root credential: exit 1, the old one keeps working.
    fake.fail_verify.store(true, Ordering::SeqCst);
    let (code, out, _) =
        tokio::task::block_in_place(|| cli(&["rotate", "--target", "reports", "--now", "--root"]));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("failed") && out.contains("old credential stays in service"),
        "{out}"
    );
    assert_eq!(*fake.current.lock().unwrap(), "root-1");
    assert_eq!(
        *fake.existing.lock().unwrap(),
        vec!["root-1".to_string()],
        "nothing half-made left"
    );
    let mint = {
        let ch = tonic::transport::Channel::from_shared(server.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        latchkey::transport::pb::credential_broker_client::CredentialBrokerClient::new(ch)
            .mint(authed(
                MintRequest {
                    target: "reports".into(),
                    ..Default::default()
                },
                &issuer.sign(&issuer.bitbucket_claims("main")),
            ))
            .await
            .unwrap()
            .into_inner()
    };
    assert_eq!(mint.credential.unwrap().token, "minted-with-root-1");

    // It recovers: exit 0, the new credential in service, the old one deleted.
    fake.fail_verify.store(false, Ordering::SeqCst);
    let (code, out, _) =
        tokio::task::block_in_place(|| cli(&["rotate", "--target", "reports", "--now", "--root"]));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("rotated"), "{out}");
    assert_eq!(
        *fake.existing.lock().unwrap(),
        vec![fake.current.lock().unwrap().clone()]
    );
    assert_ne!(*fake.current.lock().unwrap(), "root-1");

    // The shipped CronJob and systemd unit run exactly these commands: their arguments,
    // pointed at this server (plain http, so no CA file) with a token file.
    let token_file = dir.join("rotator.jwt");
    std::fs::write(&token_file, &rotator).unwrap();
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let cron = std::fs::read_to_string(deploy.join("kubernetes/rotation-cronjob.yaml")).unwrap();
    let cron_args: Vec<String> = cron
        .lines()
        .skip_while(|l| l.trim() != "args:")
        .skip(1)
        .take_while(|l| l.trim_start().starts_with("- "))
        .map(|l| l.trim_start().trim_start_matches("- ").to_string())
        .collect();
    let unit = std::fs::read_to_string(deploy.join("systemd/latchkey-rotate.service")).unwrap();
    let exec: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(str::to_string)
        .collect();
    for shipped in [cron_args, exec] {
        assert!(
            shipped.starts_with(&["rotate".to_string(), "--due".to_string()]),
            "{shipped:?}"
        );
        let mut args = Vec::new();
        let mut it = shipped.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--server" => {
                    it.next();
                    args.extend(["--server".to_string(), server.clone()]);
                }
                "--ca-file" => {
                    it.next();
                }
                "--token-file" => {
                    it.next();
                    args.extend(["--token-file".to_string(), token_file.display().to_string()]);
                }
                _ => args.push(a.clone()),
            }
        }
        let out = tokio::task::block_in_place(|| {
            std::process::Command::new(BIN)
                .args(&args)
                .env_remove("BITBUCKET_STEP_OIDC_TOKEN")
                .env_remove("LATCHKEY_TOKEN")
                .output()
                .unwrap()
        });
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("signing-key:rot-api"));
    }

    // No rotator role, no rotation; a bad target is named.
    let (code, _, err) = tokio::task::block_in_place(|| {
        let out = std::process::Command::new(BIN)
            .args(["rotate", "--due", "--server", &server])
            .env_remove("BITBUCKET_STEP_OIDC_TOKEN")
            .env(
                "LATCHKEY_TOKEN",
                issuer.sign(&issuer.bitbucket_claims("main")),
            )
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    });
    assert_eq!(code, Some(1));
    assert!(err.contains("role rotator not granted"), "{err}");
    env.running.take().unwrap().shutdown().await;

    // Both attempts are in the audit log, the failure as an error with its reason.
    let recs = latchkey::store::sqlite::audit::query_file(
        &db,
        &latchkey::audit::AuditQuery {
            action: Some("rotation".into()),
            ..Default::default()
        },
        100,
    )
    .unwrap();
    let root: Vec<(String, String)> = recs
        .iter()
        .filter(|r| r.entry.context.get("item").map(String::as_str) == Some("root:reports"))
        .map(|r| (r.entry.context["phase"].clone(), r.entry.outcome.clone()))
        .collect();
    let want: Vec<(String, String)> = [
        ("create", "allowed"),
        ("cleanup", "allowed"),
        ("rotate_root", "error"),
        ("create", "allowed"),
        ("verify", "allowed"),
        ("switch", "allowed"),
        ("delete", "allowed"),
        ("rotate_root", "allowed"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(root, want, "every phase of both attempts is audited");
    assert!(recs.iter().any(|r| r
        .entry
        .reason
        .as_deref()
        .is_some_and(|x| x.contains("HTTP 401"))));
}
