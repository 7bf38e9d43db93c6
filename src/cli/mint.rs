//! `latchkey mint --server URL --target T`, and `latchkey mint --renew LEASE_ID`.

use super::client::{authorized, connect, lease_proof, maybe_authorized, status_line};
use super::TokenArgs;
use crate::clock::rfc3339;
use crate::transport::grpc::seconds;
use crate::transport::pb;
use clap::ValueEnum;
use serde_json::{json, Map, Value};
use std::path::PathBuf;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// The credential and lease as JSON.
    Json,
    /// Shell `export` lines.
    Env,
    /// The bare token (or password).
    Raw,
}

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Broker gRPC URL, e.g. https://latchkey.internal:7443
    #[arg(long, env = "LATCHKEY_SERVER")]
    pub server: String,
    /// Target name.
    #[arg(long, required_unless_present = "renew")]
    pub target: Option<String>,
    /// Renew this lease instead of minting: prints the renewed credential. Proves
    /// ownership with the lease secret (from --lease-secret-env) or the identity token.
    #[arg(long, value_name = "LEASE_ID", conflicts_with_all = ["target", "scopes", "context"])]
    pub renew: Option<String>,
    /// Environment variable holding the lease secret (for --renew).
    #[arg(long, default_value = "LATCHKEY_LEASE_SECRET")]
    pub lease_secret_env: String,
    /// Scope wanted (repeatable); none means all granted.
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// Lifetime wanted, e.g. 10m (clamped to the policy's cap).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<std::time::Duration>,
    /// Context recorded in the audit log, KEY=VALUE (repeatable).
    #[arg(long = "context", value_parser = parse_kv)]
    pub context: Vec<(String, String)>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    pub format: Format,
    /// Extra CA certificate (PEM) to trust for https.
    #[arg(long, env = "LATCHKEY_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Write the output to this file (created or truncated, mode 0600) instead of stdout:
    /// for an init container handing a credential to the workload through a shared volume.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Identity token source.
    #[command(flatten)]
    pub token: TokenArgs,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// Mints and prints; exit 1 with the status on failure.
pub async fn run(args: Args) -> i32 {
    match mint(&args).await {
        Ok(out) => match &args.output {
            None => {
                print!("{out}");
                0
            }
            Some(path) => match super::write_private(path, &out, false) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("error: cannot write {}: {}", path.display(), e.kind());
                    1
                }
            },
        },
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

async fn mint(args: &Args) -> Result<String, String> {
    let ttl = args.ttl.map(|d| prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    });
    if let Some(lease_id) = &args.renew {
        let (token, secret) = lease_proof(&args.token, &args.lease_secret_env)?;
        let mut client = connect(&args.server, args.ca_file.as_deref()).await?;
        let req = pb::RenewRequest {
            lease_id: lease_id.clone(),
            ttl,
            lease_secret: secret.map(|s| s.expose().clone()).unwrap_or_default(),
        };
        let resp = client
            .renew(maybe_authorized(req, token.as_ref())?)
            .await
            .map_err(|s| status_line(&s))?
            .into_inner();
        let lease = resp.lease.unwrap_or_default();
        let c = resp.credential.unwrap_or_else(|| pb::Credential {
            expires_at: lease.expires_at,
            ..Default::default()
        });
        return Ok(render(&c, &lease, "", args.format));
    }
    let token = args.token.read()?;
    let mut client = connect(&args.server, args.ca_file.as_deref()).await?;
    let req = pb::MintRequest {
        target: args.target.clone().unwrap_or_default(),
        scopes: args.scopes.clone(),
        ttl,
        context: args.context.iter().cloned().collect(),
    };
    let resp = client
        .mint(authorized(req, &token)?)
        .await
        .map_err(|s| status_line(&s))?
        .into_inner();
    let lease = resp.lease.clone().unwrap_or_default();
    let c = resp
        .credential
        .as_ref()
        .ok_or("broker returned no credential")?;
    Ok(render(c, &lease, &resp.lease_secret, args.format))
}

/// Renders a credential (and its lease, and the lease secret when there is one) in the
/// chosen format.
pub fn render(c: &pb::Credential, lease: &pb::Lease, lease_secret: &str, format: Format) -> String {
    let expires = rfc3339(seconds(c.expires_at.as_ref()));
    match format {
        Format::Raw => format!(
            "{}\n",
            if c.token.is_empty() {
                &c.password
            } else {
                &c.token
            }
        ),
        Format::Env => {
            let mut out = String::new();
            let mut put = |k: &str, v: &str| {
                if !v.is_empty() {
                    out.push_str(&format!("export {k}={}\n", shell_quote(v)));
                }
            };
            put("LATCHKEY_TOKEN", &c.token);
            put("LATCHKEY_USERNAME", &c.username);
            put("LATCHKEY_PASSWORD", &c.password);
            put("LATCHKEY_EXPIRES_AT", &expires);
            put("LATCHKEY_LEASE_ID", &lease.id);
            put("LATCHKEY_LEASE_SECRET", lease_secret);
            out
        }
        Format::Json => {
            let mut m = Map::new();
            m.insert("kind".into(), json!(c.kind));
            for (k, v) in [
                ("token", &c.token),
                ("username", &c.username),
                ("password", &c.password),
            ] {
                if !v.is_empty() {
                    m.insert(k.into(), json!(v));
                }
            }
            if !c.fields.is_empty() {
                m.insert("fields".into(), json!(c.fields));
            }
            m.insert("expires_at".into(), json!(expires));
            m.insert(
                "lease".into(),
                json!({
                    "id": lease.id,
                    "target": lease.target,
                    "scopes": lease.scopes,
                    "issued_at": rfc3339(seconds(lease.issued_at.as_ref())),
                    "expires_at": rfc3339(seconds(lease.expires_at.as_ref())),
                    "renewable": lease.renewable,
                    "max_expires_at": rfc3339(seconds(lease.max_expires_at.as_ref())),
                    "renew_count": lease.renew_count,
                }),
            );
            if !lease_secret.is_empty() {
                m.insert("lease_secret".into(), json!(lease_secret));
            }
            format!(
                "{}\n",
                serde_json::to_string_pretty(&Value::Object(m)).unwrap_or_default()
            )
        }
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r#"'\''"#))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_each_format() {
        let c = pb::Credential {
            kind: "jwt".into(),
            token: "tok'en".into(),
            expires_at: Some(prost_types::Timestamp {
                seconds: 60,
                nanos: 0,
            }),
            ..Default::default()
        };
        let l = pb::Lease {
            id: "L1".into(),
            ..Default::default()
        };
        assert_eq!(render(&c, &l, "", Format::Raw), "tok'en\n");
        let env = render(&c, &l, "lks_s", Format::Env);
        assert!(env.contains("export LATCHKEY_LEASE_SECRET='lks_s'"));
        assert!(
            env.contains(r#"export LATCHKEY_TOKEN='tok'\''en'"#),
            "{env}"
        );
        assert!(env.contains("export LATCHKEY_LEASE_ID='L1'"));
        let j: Value = serde_json::from_str(&render(&c, &l, "lks_s", Format::Json)).unwrap();
        assert_eq!(j["lease_secret"], "lks_s");
        assert_eq!(j["token"], "tok'en");
        assert_eq!(j["expires_at"], "1970-01-01T00:01:00Z");
        assert_eq!(j["lease"]["id"], "L1");
        assert!(j.get("password").is_none());
        assert!(parse_kv("a=b=c").unwrap() == ("a".into(), "b=c".into()));
        assert!(parse_kv("ab").is_err());
    }
}
