//! `deploy/` works as shipped: every YAML and TOML file parses, the Kubernetes manifests
//! are complete and agree with each other and with the container image, the configs pass
//! `latchkey check-config`, the systemd units pass `systemd-analyze verify`, and the
//! pipeline examples' own commands run green against a `latchkey dev` broker, with local
//! Pulsar and Airflow stand-ins verifying the minted tokens the way those systems do.

mod common;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use common::fakes::bearer;
use common::{free_port, wait_for_port, Killed};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use yaml_rust2::{Yaml, YamlLoader};

const BIN: &str = env!("CARGO_BIN_EXE_latchkey");

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Every file under `dir`, recursively, sorted.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn ext(p: &Path) -> &str {
    p.extension().and_then(|e| e.to_str()).unwrap_or_default()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn yaml(path: &Path) -> Vec<Yaml> {
    let src = std::fs::read_to_string(path).unwrap();
    YamlLoader::load_from_str(&src).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Fails on a node YAML could not resolve (an unknown alias) anywhere in `y`.
fn assert_resolved(y: &Yaml, at: &str) {
    match y {
        Yaml::BadValue => panic!("{at}: unresolvable value (an alias without its anchor?)"),
        Yaml::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, v)| assert_resolved(v, &format!("{at}[{i}]"))),
        Yaml::Hash(h) => h
            .iter()
            .for_each(|(k, v)| assert_resolved(v, &format!("{at}.{}", k.as_str().unwrap_or("?")))),
        _ => {}
    }
}

fn s(y: &Yaml) -> &str {
    y.as_str().unwrap_or_else(|| panic!("not a string: {y:?}"))
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .unwrap_or_else(|| panic!("not a list: {y:?}"))
        .iter()
        .map(|v| s(v).to_string())
        .collect()
}

/// The Kubernetes objects in `deploy/kubernetes/`, by `kind/name`.
fn manifests() -> BTreeMap<String, Yaml> {
    let mut out = BTreeMap::new();
    for p in walk(&deploy().join("kubernetes")) {
        if p.file_name().unwrap() == "kustomization.yaml" {
            continue;
        }
        for doc in yaml(&p) {
            let key = format!("{}/{}", s(&doc["kind"]), s(&doc["metadata"]["name"]));
            assert!(out.insert(key.clone(), doc).is_none(), "{key} twice");
        }
    }
    out
}

#[test]
fn every_yaml_and_toml_file_in_deploy_parses() {
    let (mut yamls, mut tomls) = (0, 0);
    for p in walk(&deploy()) {
        let at = p.display().to_string();
        match ext(&p) {
            "yaml" | "yml" => {
                let docs = yaml(&p);
                assert!(!docs.is_empty(), "{at} is empty");
                for (i, d) in docs.iter().enumerate() {
                    assert_resolved(d, &format!("{at}#{i}"));
                }
                yamls += 1;
            }
            "toml" => {
                let src = std::fs::read_to_string(&p).unwrap();
                toml::from_str::<toml::Table>(&src).unwrap_or_else(|e| panic!("{at}: {e}"));
                tomls += 1;
            }
            _ => {}
        }
    }
    assert!(
        yamls >= 14 && tomls >= 1,
        "{yamls} YAML, {tomls} TOML files"
    );
    // Every Kubernetes document names its API, kind, name and namespace.
    for p in walk(&deploy().join("kubernetes"))
        .into_iter()
        .chain([deploy().join("examples/kubernetes-job.yaml")])
    {
        for doc in yaml(&p) {
            for k in ["apiVersion", "kind"] {
                assert!(doc[k].as_str().is_some(), "{}: no {k}", p.display());
            }
            if s(&doc["kind"]) != "Kustomization" {
                assert!(doc["metadata"]["name"].as_str().is_some());
                if s(&doc["kind"]) != "Namespace" {
                    assert!(doc["metadata"]["namespace"].as_str().is_some());
                }
            }
        }
    }
}

#[test]
fn the_kustomization_ties_every_manifest_together() {
    let dir = deploy().join("kubernetes");
    let k = &yaml(&dir.join("kustomization.yaml"))[0];
    let mut listed = strings(&k["resources"]);
    listed.sort();
    let mut present: Vec<String> = walk(&dir)
        .iter()
        .filter(|p| ext(p) == "yaml" && p.file_name().unwrap() != "kustomization.yaml")
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    present.sort();
    assert_eq!(listed, present, "kustomization resources vs files");
    assert_eq!(s(&k["namespace"]), "latchkey");
    for (key, doc) in manifests() {
        if !key.starts_with("Namespace/") {
            assert_eq!(s(&doc["metadata"]["namespace"]), "latchkey", "{key}");
        }
    }
}

/// The broker's Deployment is locked down and agrees with the ConfigMap, the Service, the
/// PodDisruptionBudget, the NetworkPolicy and the container image.
#[test]
fn the_broker_manifests_are_locked_down_and_consistent() {
    let m = manifests();
    let dep = &m["Deployment/latchkey"];
    let spec = &dep["spec"];
    assert_eq!(
        spec["replicas"].as_i64(),
        Some(1),
        "one writer of the SQLite store"
    );
    assert_eq!(s(&spec["strategy"]["type"]), "Recreate");
    let pod = &spec["template"]["spec"];
    let labels = &spec["template"]["metadata"]["labels"];
    assert_eq!(
        &spec["selector"]["matchLabels"], labels,
        "selector matches the pod"
    );
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
    let psc = &pod["securityContext"];
    assert_eq!(psc["runAsNonRoot"].as_bool(), Some(true));
    assert!(psc["runAsUser"].as_i64().unwrap() > 0);
    assert_eq!(s(&psc["seccompProfile"]["type"]), "RuntimeDefault");
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(s(&c["readinessProbe"]["httpGet"]["path"]), "/readyz");
    assert_eq!(s(&c["livenessProbe"]["httpGet"]["path"]), "/healthz");
    for r in ["requests", "limits"] {
        assert!(c["resources"][r]["memory"].as_str().is_some(), "memory {r}");
    }

    // Volumes: where each mount comes from.
    let volumes: BTreeMap<&str, &Yaml> = pod["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|v| (s(&v["name"]), v))
        .collect();
    let mounts: BTreeMap<&str, &str> = c["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|v| (s(&v["mountPath"]), s(&v["name"])))
        .collect();
    let source_of = |path: &str| -> &Yaml {
        let (mp, name) = mounts
            .iter()
            .filter(|(mp, _)| Path::new(path).starts_with(mp))
            .max_by_key(|(mp, _)| mp.len())
            .unwrap_or_else(|| panic!("{path} is on no volume (the root filesystem is read-only)"));
        assert!(Path::new(path).starts_with(mp));
        volumes[name]
    };

    // The config the container is started with is the ConfigMap's, and it passes.
    let args = strings(&c["args"]);
    let cfg_path = &args[args.iter().position(|a| a == "--config").unwrap() + 1];
    let cm_vol = source_of(cfg_path);
    let cm = &m[&format!("ConfigMap/{}", s(&cm_vol["configMap"]["name"]))];
    let file = Path::new(cfg_path).file_name().unwrap().to_str().unwrap();
    let cfg_text = s(&cm["data"][file]);
    let cfg: toml::Table = toml::from_str(cfg_text).unwrap();
    // The store is on the persistent volume, the master key in a Secret, TLS from a Secret.
    let store = cfg["store"]["path"].as_str().unwrap();
    assert!(source_of(store)["persistentVolumeClaim"]["claimName"]
        .as_str()
        .is_some_and(|n| m.contains_key(&format!("PersistentVolumeClaim/{n}"))));
    let key = cfg["store"]["master_key_file"].as_str().unwrap();
    assert!(source_of(key)["secret"]["secretName"].as_str().is_some());
    let tls_key = cfg["server"]["tls"]["key_file"].as_str().unwrap();
    assert!(source_of(tls_key)["secret"]["secretName"]
        .as_str()
        .is_some());
    let witness = cfg["audit"]["witness_file"].as_str().unwrap();
    assert!(source_of(witness)["persistentVolumeClaim"]
        .as_hash()
        .is_some());
    for i in cfg["issuers"].as_array().unwrap() {
        if let Some(ca) = i.get("ca_file").and_then(|v| v.as_str()) {
            assert!(source_of(ca)["configMap"].as_hash().is_some(), "{ca}");
        }
    }

    // Ports: the container's, the Service's, the probes', the NetworkPolicy's.
    let ports: BTreeMap<&str, i64> = c["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| (s(&p["name"]), p["containerPort"].as_i64().unwrap()))
        .collect();
    let listen = |k: &str| -> i64 {
        cfg["server"][k]
            .as_str()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(ports["grpc"], listen("grpc_addr"));
    assert_eq!(ports["https"], listen("http_addr"));
    assert_eq!(s(&c["readinessProbe"]["httpGet"]["port"]), "https");
    let svc = &m["Service/latchkey"]["spec"];
    assert_eq!(&svc["selector"], labels);
    for p in svc["ports"].as_vec().unwrap() {
        assert!(ports.contains_key(s(&p["targetPort"])), "{p:?}");
    }
    assert_eq!(
        &m["PodDisruptionBudget/latchkey"]["spec"]["selector"]["matchLabels"],
        labels
    );
    let np = &m["NetworkPolicy/latchkey-broker"]["spec"];
    assert_eq!(&np["podSelector"]["matchLabels"], labels);
    let np_ports: Vec<i64> = np["ingress"][0]["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_i64().unwrap())
        .collect();
    assert_eq!(np_ports, [ports["grpc"], ports["https"]]);
    // The rotation job's pods are the ones its NetworkPolicy selects.
    let cron_pod = &m["CronJob/latchkey-rotate"]["spec"]["jobTemplate"]["spec"]["template"];
    assert_eq!(
        &m["NetworkPolicy/latchkey-rotate"]["spec"]["podSelector"]["matchLabels"],
        &cron_pod["metadata"]["labels"]
    );

    // The image: the binary where the manifests run it, as the non-root user they expect,
    // with the Deployment's config path as its default.
    let cf = std::fs::read_to_string(deploy().join("Containerfile")).unwrap();
    let runtime = cf.rsplit("\nFROM ").next().unwrap();
    let user = runtime
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the runtime stage sets USER");
    assert_eq!(
        user.split(':').next().unwrap(),
        psc["runAsUser"].as_i64().unwrap().to_string()
    );
    assert!(runtime.contains(r#"ENTRYPOINT ["/usr/local/bin/latchkey"]"#));
    assert!(runtime.contains(&format!(r#""--config", "{cfg_path}""#)));
    assert!(runtime.contains(&format!(
        "VOLUME [\"{}\"]",
        Path::new(store).parent().unwrap().display()
    )));
}

#[test]
fn shipped_configs_pass_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut configs = vec![deploy().join("latchkey.toml")];
    // The ConfigMap's config, checked as the pod sees it: each of the Deployment's volume
    // mounts is a directory here, holding what the operator puts in its Secret or
    // ConfigMap (a certificate, a key, the master key, the cluster CA).
    let m = manifests();
    let c = &m["Deployment/latchkey"]["spec"]["template"]["spec"]["containers"][0];
    let mut mounts: Vec<(String, PathBuf)> = c["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|v| {
            (
                s(&v["mountPath"]).to_string(),
                dir.path().join(s(&v["name"])),
            )
        })
        .collect();
    mounts.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    for (key, doc) in &m {
        if !key.starts_with("ConfigMap/") {
            continue;
        }
        for (k, v) in doc["data"].as_hash().unwrap() {
            if !s(k).ends_with(".toml") {
                continue;
            }
            // Two passes, so a local path is never rewritten again by a shorter mount path.
            let mut text = s(v).to_string();
            for (i, (path, local)) in mounts.iter().enumerate() {
                std::fs::create_dir_all(local).unwrap();
                text = text.replace(&format!("\"{path}/"), &format!("\"\u{0}{i}/"));
            }
            for (i, (_, local)) in mounts.iter().enumerate() {
                text = text.replace(&format!("\"\u{0}{i}/"), &format!("\"{}/", local.display()));
            }
            let cfg: toml::Table = toml::from_str(&text).unwrap();
            let cert =
                rcgen::generate_simple_self_signed(vec!["latchkey.latchkey.svc".into()]).unwrap();
            let file =
                |p: &toml::Value, body: &str| std::fs::write(p.as_str().unwrap(), body).unwrap();
            file(&cfg["server"]["tls"]["cert_file"], &cert.cert.pem());
            file(
                &cfg["server"]["tls"]["key_file"],
                &cert.signing_key.serialize_pem(),
            );
            file(
                &cfg["store"]["master_key_file"],
                latchkey::keys::MasterKey::generate().to_base64().expose(),
            );
            for i in cfg["issuers"].as_array().unwrap() {
                if let Some(ca) = i.get("ca_file") {
                    file(ca, &cert.cert.pem());
                }
            }
            let p = dir.path().join(s(k));
            std::fs::write(&p, text).unwrap();
            configs.push(p);
        }
    }
    assert_eq!(configs.len(), 2, "deploy/latchkey.toml and the ConfigMap's");
    for p in configs {
        let out = Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            p.display(),
            text(&out.stderr)
        );
    }
    // The systemd unit hands the master key over where deploy/latchkey.toml looks for it.
    let unit = std::fs::read_to_string(deploy().join("systemd/latchkey.service")).unwrap();
    let cfg: toml::Table =
        toml::from_str(&std::fs::read_to_string(deploy().join("latchkey.toml")).unwrap()).unwrap();
    let (name, _) = unit
        .lines()
        .find_map(|l| l.strip_prefix("LoadCredential="))
        .unwrap()
        .split_once(':')
        .unwrap();
    assert_eq!(
        cfg["store"]["master_key_file"].as_str().unwrap(),
        format!("/run/credentials/latchkey.service/{name}")
    );
    let state = unit
        .lines()
        .find_map(|l| l.strip_prefix("StateDirectory="))
        .unwrap();
    for path in [
        cfg["store"]["path"].as_str().unwrap(),
        cfg["audit"]["witness_file"].as_str().unwrap(),
    ] {
        assert!(
            state
                .split_whitespace()
                .any(|d| Path::new(path).starts_with(Path::new("/var/lib").join(d))),
            "{path} is outside StateDirectory={state}"
        );
    }
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("SKIPPED: systemd-analyze is not installed; the units were not verified");
        return;
    }
    // Verified as installed: the binary at the path the units name (here, the one just built).
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for p in walk(&deploy().join("systemd")) {
        let body = std::fs::read_to_string(&p)
            .unwrap()
            .replace("/usr/local/bin/latchkey", BIN);
        let to = dir.path().join(p.file_name().unwrap());
        std::fs::write(&to, body).unwrap();
        units.push(to);
    }
    assert_eq!(units.len(), 3);
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units)
        .output()
        .unwrap();
    // Unknown keys and bad values are warnings with exit 0: any output is a failure.
    assert!(
        out.status.success() && out.stderr.is_empty() && out.stdout.is_empty(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

// ---- the pipeline examples, run for real ----

/// What the Pulsar and Airflow stand-ins saw: (system, role) per accepted call.
#[derive(Clone)]
struct Targets {
    calls: Arc<Mutex<Vec<(String, String)>>>,
    rejected: Arc<Mutex<Vec<String>>>,
    pulsar_pem: String,
    jwks_url: String,
    issuer: String,
}

/// Pulsar with `tokenPublicKey` = the exported key, RS256, and the default `sub` role claim:
/// a token is accepted when it verifies and has not expired (Pulsar requires nothing else).
async fn pulsar_stats(State(t): State<Targets>, h: HeaderMap) -> (StatusCode, Json<Value>) {
    let check = || -> Result<String, String> {
        let token = bearer(&h).ok_or("no bearer token")?;
        let key = jsonwebtoken::DecodingKey::from_rsa_pem(t.pulsar_pem.as_bytes())
            .map_err(|e| e.to_string())?;
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        v.validate_aud = false;
        v.set_required_spec_claims(&["exp", "sub"]);
        let data = jsonwebtoken::decode::<Value>(&token, &key, &v).map_err(|e| e.to_string())?;
        Ok(data.claims["sub"].as_str().unwrap_or_default().to_string())
    };
    match check() {
        Ok(role) => {
            t.calls.lock().unwrap().push(("pulsar".into(), role));
            (
                StatusCode::OK,
                Json(json!({"msgRateIn": 0.0, "publishers": []})),
            )
        }
        Err(e) => {
            t.rejected.lock().unwrap().push(format!("pulsar: {e}"));
            (
                StatusCode::UNAUTHORIZED,
                Json(json!({"reason": "unauthorized"})),
            )
        }
    }
}

/// Airflow 3 with `trusted_jwks_url` = the broker's JWKS, `jwt_audience` apache-airflow and
/// `jwt_issuer` the broker: the role claim decides what the caller may do; triggering a run
/// needs `Op`, and the body must carry `logical_date` (null for "now").
async fn airflow_dag_run(
    State(t): State<Targets>,
    h: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let check = async {
        let token = bearer(&h).ok_or("no bearer token")?;
        let claims =
            common::fakes::verify_jwt(&t.jwks_url, &token, &t.issuer, "apache-airflow", None)
                .await?;
        if !body.get("logical_date").is_some_and(Value::is_null) || !body["conf"].is_object() {
            return Err(format!("body {body}"));
        }
        Ok::<_, String>(claims["role"].as_str().unwrap_or_default().to_string())
    };
    match check.await {
        Ok(role) => {
            t.calls.lock().unwrap().push(("airflow".into(), role));
            (
                StatusCode::OK,
                Json(json!({"dag_run_id": "manual__1", "state": "queued"})),
            )
        }
        Err(e) => {
            t.rejected.lock().unwrap().push(format!("airflow: {e}"));
            (
                StatusCode::UNAUTHORIZED,
                Json(json!({"detail": "unauthorized"})),
            )
        }
    }
}

struct Dev {
    _child: Killed,
    grpc: u16,
    issuer: String,
    targets: Targets,
    target_url: String,
    home: tempfile::TempDir,
}

impl Dev {
    /// `latchkey dev` on free ports, and the Pulsar/Airflow stand-ins.
    async fn start() -> Dev {
        let home = tempfile::tempdir().unwrap();
        let (grpc, http, iss) = (free_port(), free_port(), free_port());
        let state = home.path().join("state");
        let mut child = Command::new(BIN)
            .args(["dev", "--grpc-addr", &format!("127.0.0.1:{grpc}")])
            .args(["--http-addr", &format!("127.0.0.1:{http}")])
            .args(["--issuer-addr", &format!("127.0.0.1:{iss}")])
            .arg("--state-dir")
            .arg(&state)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(home.path().join("dev.log")).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || BufReader::new(stdout).lines().for_each(drop));
        let child = Killed(child);
        tokio::task::block_in_place(|| wait_for_port(grpc));
        // Pulsar is configured with the key `latchkey keys export` prints.
        let out = tokio::task::block_in_place(|| {
            Command::new(BIN)
                .args(["keys", "export", "--target", "pulsar", "--format", "pem"])
                .arg("--config")
                .arg(state.join("latchkey.toml"))
                .output()
                .unwrap()
        });
        assert!(out.status.success(), "{}", text(&out.stderr));
        let targets = Targets {
            calls: Arc::default(),
            rejected: Arc::default(),
            pulsar_pem: text(&out.stdout),
            jwks_url: format!("http://127.0.0.1:{http}/.well-known/jwks.json"),
            issuer: format!("http://127.0.0.1:{http}"),
        };
        let app = Router::new()
            .route(
                "/admin/v2/persistent/orders/prod/orders/stats",
                get(pulsar_stats),
            )
            .route("/api/v2/dags/orders_etl/dagRuns", post(airflow_dag_run))
            .with_state(targets.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target_url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Dev {
            _child: child,
            grpc,
            issuer: format!("http://127.0.0.1:{iss}"),
            targets,
            target_url,
            home,
        }
    }

    /// A fresh token from the dev issuer's endpoint for `platform` ("" is Bitbucket).
    async fn token(&self, platform: &str, claims: Value) -> String {
        let r = reqwest::Client::new()
            .post(format!("{}{platform}/token", self.issuer))
            .json(&claims)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        r.text().await.unwrap()
    }

    /// The environment every example runs in: a clean one, with `latchkey` and the
    /// system's tools on PATH, and the broker and targets at local addresses.
    fn base_env(&self) -> BTreeMap<String, String> {
        let bin_dir = Path::new(BIN).parent().unwrap().display().to_string();
        BTreeMap::from([
            (
                "PATH".into(),
                format!("{bin_dir}:/usr/local/bin:/usr/bin:/bin"),
            ),
            ("HOME".into(), self.home.path().display().to_string()),
        ])
    }

    /// Points the example's own settings at this machine: the broker (plain gRPC, so no
    /// CA file) and the target stand-ins.
    fn local(&self, env: &mut BTreeMap<String, String>) {
        env.insert(
            "LATCHKEY_SERVER".into(),
            format!("http://127.0.0.1:{}", self.grpc),
        );
        env.insert("PULSAR_WEB_URL".into(), self.target_url.clone());
        env.insert("AIRFLOW_URL".into(), self.target_url.clone());
        env.remove("LATCHKEY_CA_FILE");
    }

    /// Runs a script as the platform would and checks that it used one Pulsar token with
    /// the produce role and one Airflow token with the Op role.
    fn run(&self, name: &str, program: &[&str], script: &str, env: &BTreeMap<String, String>) {
        let out = tokio::task::block_in_place(|| {
            Command::new(program[0])
                .args(&program[1..])
                .arg(script)
                .env_clear()
                .envs(env)
                .output()
                .unwrap()
        });
        self.assert_ran(name, &out);
    }

    fn assert_ran(&self, name: &str, out: &Output) {
        assert!(
            out.status.success(),
            "{name} failed:\n{}\n{}\nrejected: {:?}",
            text(&out.stdout),
            text(&out.stderr),
            self.targets.rejected.lock().unwrap()
        );
        let calls = std::mem::take(&mut *self.targets.calls.lock().unwrap());
        assert_eq!(
            calls,
            [
                ("pulsar".to_string(), "orders-writer".to_string()),
                ("airflow".to_string(), "USER".to_string())
            ],
            "{name}"
        );
        assert!(self.targets.rejected.lock().unwrap().is_empty());
    }
}

fn env_map(y: &Yaml) -> BTreeMap<String, String> {
    y.as_hash()
        .map(|h| {
            h.iter()
                .map(|(k, v)| (s(k).to_string(), s(v).to_string()))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn pipeline_examples_run_green_against_latchkey_dev() {
    for tool in ["bash", "curl", "jq", "tar"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .unwrap()
            .status
            .success();
        assert!(found, "the example scripts need {tool} on this machine");
    }
    let dev = Dev::start().await;
    let examples = deploy().join("examples");
    let sha = "0123456789abcdef0123456789abcdef01234567";

    // Bitbucket Pipelines: each script line in one shell, stopping at the first failure;
    // the step's identity token in BITBUCKET_STEP_OIDC_TOKEN.
    let bb = &yaml(&examples.join("bitbucket-pipelines.yml"))[0];
    let step = &bb["pipelines"]["branches"]["main"][0]["step"];
    assert_eq!(step["oidc"].as_bool(), Some(true), "oidc: true");
    let mut env = dev.base_env();
    env.insert(
        "BITBUCKET_STEP_OIDC_TOKEN".into(),
        dev.token("", json!({})).await,
    );
    env.insert("BITBUCKET_BUILD_NUMBER".into(), "42".into());
    env.insert("BITBUCKET_COMMIT".into(), sha.into());
    dev.local(&mut env);
    dev.run(
        "bitbucket",
        &["bash", "-eo", "pipefail", "-c"],
        &strings(&step["script"]).join("\n"),
        &env,
    );

    // GitHub Actions: each step with `shell: bash` (bash --noprofile --norc -eo pipefail),
    // the job's env, and the token request URL and token the runner provides.
    let gh = &yaml(&examples.join("github-actions.yml"))[0];
    assert_eq!(s(&gh["permissions"]["id-token"]), "write");
    assert_eq!(s(&gh["defaults"]["run"]["shell"]), "bash");
    let job = &gh["jobs"]["orders"];
    let mut env = dev.base_env();
    env.extend(env_map(&job["env"]));
    env.insert(
        "ACTIONS_ID_TOKEN_REQUEST_URL".into(),
        format!("{}/github/token?api-version=2.0", dev.issuer),
    );
    env.insert(
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN".into(),
        "runner-request-token".into(),
    );
    env.insert("GITHUB_RUN_ID".into(), "9000000001".into());
    env.insert("GITHUB_SHA".into(), sha.into());
    dev.local(&mut env);
    let steps = job["steps"].as_vec().unwrap();
    let script: Vec<&str> = steps.iter().map(|st| s(&st["run"])).collect();
    // The install step finds latchkey on PATH and does nothing; the last step uses the tokens.
    for (i, run) in script.iter().enumerate() {
        let out = tokio::task::block_in_place(|| {
            Command::new("bash")
                .args(["--noprofile", "--norc", "-eo", "pipefail", "-c", run])
                .env_clear()
                .envs(&env)
                .output()
                .unwrap()
        });
        if i + 1 < script.len() {
            assert!(
                out.status.success(),
                "github step {i}: {}",
                text(&out.stderr)
            );
        } else {
            dev.assert_ran("github", &out);
            // Every token the step handled was masked before use.
            assert_eq!(text(&out.stdout).matches("::add-mask::").count(), 3);
        }
    }

    // GitLab CI: before_script and script in one shell; the ID token in the variable
    // id_tokens names, with the audience it asks for.
    let gl = &yaml(&examples.join("gitlab-ci.yml"))[0];
    let job = &gl["orders"];
    let (var, spec) = job["id_tokens"].as_hash().unwrap().iter().next().unwrap();
    let mut env = dev.base_env();
    env.extend(env_map(&job["variables"]));
    env.insert(
        s(var).to_string(),
        dev.token("/gitlab", json!({ "aud": s(&spec["aud"]) }))
            .await,
    );
    env.insert("CI_JOB_ID".into(), "990001".into());
    env.insert("CI_COMMIT_SHA".into(), sha.into());
    env.insert("CI_COMMIT_BRANCH".into(), "main".into());
    dev.local(&mut env);
    let lines: Vec<String> = strings(&job["before_script"])
        .into_iter()
        .chain(strings(&job["script"]))
        .collect();
    dev.run(
        "gitlab",
        &["bash", "-eo", "pipefail", "-c"],
        &lines.join("\n"),
        &env,
    );

    // Kubernetes: the init containers (the Latchkey image: its entrypoint is the binary)
    // and then the workload's shell, each volume a temporary directory, the projected
    // token a dev Kubernetes token with the audience the volume asks for.
    let docs = yaml(&examples.join("kubernetes-job.yaml"));
    let job = docs.iter().find(|d| s(&d["kind"]) == "Job").unwrap();
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
    let vols = dev.home.path().join("volumes");
    let mut volume_dir = BTreeMap::new();
    for v in pod["volumes"].as_vec().unwrap() {
        let dir = vols.join(s(&v["name"]));
        std::fs::create_dir_all(&dir).unwrap();
        if let Some(sources) = v["projected"]["sources"].as_vec() {
            let sat = &sources[0]["serviceAccountToken"];
            let token = dev
                .token("/kubernetes", json!({ "aud": [s(&sat["audience"])] }))
                .await;
            std::fs::write(dir.join(s(&sat["path"])), token).unwrap();
        }
        volume_dir.insert(s(&v["name"]).to_string(), dir);
    }
    let remap = |c: &Yaml, text: &str| -> String {
        let mut out = text.to_string();
        for m in c["volumeMounts"].as_vec().unwrap() {
            let dir = volume_dir[s(&m["name"])].display().to_string();
            out = out.replace(s(&m["mountPath"]), &dir);
        }
        out
    };
    let container_env = |c: &Yaml| -> BTreeMap<String, String> {
        let mut env = dev.base_env();
        for e in c["env"].as_vec().into_iter().flatten() {
            env.insert(s(&e["name"]).into(), s(&e["value"]).into());
        }
        dev.local(&mut env);
        env
    };
    let inits = pod["initContainers"].as_vec().unwrap();
    assert_eq!(inits.len(), 2);
    for c in inits {
        assert!(s(&c["image"]).contains("/latchkey:"));
        let args: Vec<String> = strings(&c["args"]).iter().map(|a| remap(c, a)).collect();
        let out = tokio::task::block_in_place(|| {
            Command::new(BIN)
                .args(&args)
                .env_clear()
                .envs(container_env(c))
                .output()
                .unwrap()
        });
        assert!(
            out.status.success(),
            "{}: {}",
            s(&c["name"]),
            text(&out.stderr)
        );
        assert!(
            out.stdout.is_empty(),
            "the credential goes to the file only"
        );
    }
    for f in ["pulsar-token", "airflow-token"] {
        let meta = std::fs::metadata(volume_dir["credentials"].join(f)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{f}");
    }
    let c = &pod["containers"][0];
    let cmd = strings(&c["command"]);
    let script = remap(c, s(&c["args"][0]));
    let program: Vec<&str> = cmd.iter().map(String::as_str).collect();
    dev.run("kubernetes", &program, &script, &container_env(c));
}
