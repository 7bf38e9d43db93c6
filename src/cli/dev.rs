//! `latchkey dev`: a development broker in one command. Starts a built-in issuer that
//! issues Bitbucket-shaped tokens, writes an example config, master key and SQLite store
//! under a state directory, and prints a ready token and the exact `mint` command.

use crate::config::Config;
use crate::devissuer::{
    DevIssuer, DEV_GITHUB_REPOSITORY_ID, DEV_GITLAB_PROJECT_ID, DEV_K8S_NAMESPACE,
    DEV_K8S_SERVICE_ACCOUNT, DEV_REPOSITORY,
};
use crate::jose::Alg;
use crate::keys::MasterKey;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// gRPC listener.
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub grpc_addr: SocketAddr,
    /// HTTP listener (discovery, JWKS).
    #[arg(long, default_value = "127.0.0.1:7480")]
    pub http_addr: SocketAddr,
    /// The development issuer's listener.
    #[arg(long, default_value = "127.0.0.1:7481")]
    pub issuer_addr: SocketAddr,
    /// Where the config, master key and database go.
    #[arg(long, default_value = ".latchkey-dev")]
    pub state_dir: PathBuf,
}

/// The example configuration `dev` writes.
pub fn example_config(
    issuer_url: &str,
    audience: &str,
    grpc: SocketAddr,
    http: SocketAddr,
    state_dir: &Path,
) -> String {
    format!(
        r#"# Written by `latchkey dev`. A starting point for a real config: replace the issuer with
# your Bitbucket workspace's, and the repository UUID with yours.
[server]
grpc_addr = "{grpc}"
http_addr = "{http}"
issuer_url = "http://{http}"

[store]
path = "{db}"
master_key_file = "{key}"

[[issuers]]
name = "dev"
preset = "bitbucket"
issuer = "{issuer_url}"
audiences = ["{audience}"]
jwks_refresh = "1m"

# The same dev issuer also speaks GitHub Actions, GitLab CI and Kubernetes, each under
# its own issuer URL, so every example in deploy/examples/ runs against this broker.
[[issuers]]
name = "dev-github"
preset = "github"
issuer = "{issuer_url}/github"
audiences = ["latchkey"]

[[issuers]]
name = "dev-gitlab"
preset = "gitlab"
issuer = "{issuer_url}/gitlab"
audiences = ["latchkey"]

[[issuers]]
name = "dev-kubernetes"
preset = "kubernetes"
issuer = "{issuer_url}/kubernetes"
audiences = ["latchkey"]

[[targets]]
name = "orders-api"
kind = "jwt"
audience = "https://orders.example.com"
algorithm = "ES256"
default_ttl = "5m"
max_ttl = "1h"
subject = "bb:{{repositoryUuid}}"
claims = {{ branch = "{{branchName}}" }}
rotation = "24h"

[[targets]]
name = "pulsar"
kind = "pulsar"
roles = {{ "orders-produce" = "orders-writer", "orders-consume" = "orders-reader" }}
max_ttl = "1h"

[[targets]]
name = "airflow"
kind = "airflow"
algorithm = "ES256"
roles = {{ "dags-read" = "viewer", "dags-run" = "user" }}

[[rules]]
name = "data-pipelines-on-main"
issuer = "dev"
claims = {{ repositoryUuid = "{repo}", branchName = "main" }}
grants = [
  {{ target = "pulsar", scopes = ["orders-produce", "orders-consume"] }},
  {{ target = "airflow", scopes = ["dags-read", "dags-run"] }},
]

[[rules]]
name = "data-pipelines-github"
issuer = "dev-github"
claims = {{ repository_id = "{gh_repo}", ref = "refs/heads/main" }}
grants = [
  {{ target = "pulsar", scopes = ["orders-produce", "orders-consume"] }},
  {{ target = "airflow", scopes = ["dags-read", "dags-run"] }},
]

[[rules]]
name = "data-pipelines-gitlab"
issuer = "dev-gitlab"
claims = {{ project_id = "{gl_project}", ref = "main", ref_protected = "true" }}
grants = [
  {{ target = "pulsar", scopes = ["orders-produce", "orders-consume"] }},
  {{ target = "airflow", scopes = ["dags-read", "dags-run"] }},
]

[[rules]]
name = "data-pipelines-kubernetes"
issuer = "dev-kubernetes"
claims = {{ "/kubernetes.io/namespace" = "{k8s_ns}", "/kubernetes.io/serviceaccount/name" = "{k8s_sa}" }}
grants = [
  {{ target = "pulsar", scopes = ["orders-produce", "orders-consume"] }},
  {{ target = "airflow", scopes = ["dags-read", "dags-run"] }},
]

[[rules]]
name = "orders-main-and-release"
issuer = "dev"
claims = {{ repositoryUuid = "{repo}", branchName = ["main", {{ glob = "release/*" }}] }}
grants = [{{ target = "orders-api", scopes = ["orders:read", "orders:write"], max_ttl = "15m" }}]

[[rules]]
name = "no-experimental-branches"
issuer = "dev"
effect = "deny"
claims = {{ branchName = {{ glob = "experimental/*" }} }}

[[rules]]
name = "security-team"
issuer = "dev"
claims = {{ repositoryUuid = "{repo}", branchName = "ops/audit" }}
roles = ["auditor"]

[[rules]]
name = "rotation-operators"
issuer = "dev"
claims = {{ repositoryUuid = "{repo}", branchName = "ops/rotate" }}
roles = ["rotator", "introspect"]

# Explain's whole trace shows every rule's conditions: in production grant it to the
# people who own the policy, not to every pipeline.
[[rules]]
name = "developers-read-the-policy"
issuer = "dev"
claims = {{ repositoryUuid = "{repo}" }}
roles = ["explain"]

[audit]
checkpoint_every = 100
checkpoint_interval = "1m"
witness_file = "{witness}"
"#,
        witness = state_dir.join("audit-witness.jsonl").display(),
        db = state_dir.join("latchkey.db").display(),
        key = state_dir.join("master.key").display(),
        repo = DEV_REPOSITORY,
        gh_repo = DEV_GITHUB_REPOSITORY_ID,
        gl_project = DEV_GITLAB_PROJECT_ID,
        k8s_ns = DEV_K8S_NAMESPACE,
        k8s_sa = DEV_K8S_SERVICE_ACCOUNT,
    )
}

/// Runs until SIGINT/SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<i32> {
    std::fs::create_dir_all(&args.state_dir)?;
    let key_file = args.state_dir.join("master.key");
    if !key_file.exists() {
        super::write_private(&key_file, MasterKey::generate().to_base64().expose(), true)?;
    }
    let issuer = DevIssuer::spawn(args.issuer_addr, Alg::RS256).await?;
    let cfg_path = args.state_dir.join("latchkey.toml");
    std::fs::write(
        &cfg_path,
        example_config(
            issuer.issuer_url(),
            &issuer.audience(),
            args.grpc_addr,
            args.http_addr,
            &args.state_dir,
        ),
    )?;
    let cfg = match Config::load(&cfg_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(super::EXIT_CONFIG);
        }
    };
    let master = MasterKey::load(Some(&key_file))?;
    let token = issuer.sign(&issuer.bitbucket_claims("main"));
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "latchkey".into());
    // A closed stdout (piped into `head`, a test reading one line) must not stop the broker.
    use std::io::Write;
    let _ = writeln!(
        std::io::stdout(),
        r#"latchkey dev: broker on grpc://{grpc} and http://{http}, dev issuer on {iss}
config:  {cfg}
A Bitbucket-shaped identity token for branch main (valid 1h):

export LATCHKEY_TOKEN={token}

Try:
  {exe} mint --server http://{grpc} --target orders-api
  {exe} explain --server http://{grpc} --target orders-api
  {exe} mint --server http://{grpc} --target pulsar --scope orders-produce --format json
  {exe} mint --server http://{grpc} --target airflow --scope dags-run --format json
Fresh tokens (JSON body overrides claims, e.g. a branch):
  curl -s -X POST {iss}/token -H 'content-type: application/json' -d '{{"branchName":"release/1.0"}}'
GitHub Actions, GitLab CI and Kubernetes tokens (the examples in deploy/examples/ run against this):
  curl -s -H 'Authorization: bearer dev' '{iss}/github/token?api-version=2.0&audience=latchkey'
  curl -s -X POST {iss}/gitlab/token
  curl -s -X POST {iss}/kubernetes/token
Minted tokens verify against http://{http}/.well-known/jwks.json
"#,
        grpc = args.grpc_addr,
        http = args.http_addr,
        iss = issuer.issuer_url(),
        cfg = cfg_path.display(),
    );
    super::serve::serve_until_signal(&cfg, &master, None).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_passes_check_config() {
        let text = example_config(
            "http://127.0.0.1:7481",
            "ari:cloud:bitbucket::workspace/x",
            "127.0.0.1:7443".parse().unwrap(),
            "127.0.0.1:7480".parse().unwrap(),
            Path::new("/tmp/x"),
        );
        let cfg = Config::parse(&text, "dev.toml").unwrap();
        assert_eq!(cfg.targets.len(), 3);
        assert_eq!(cfg.policy.rules().len(), 9);
        assert_eq!(cfg.issuers.len(), 4);
        assert!(
            cfg.targets[0].rotation.is_some(),
            "dev rotates its key daily"
        );
        assert!(cfg.audit.witness.is_some());
    }
}
