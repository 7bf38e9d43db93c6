//! `latchkey explain --server URL --target T`

use super::client::{authorized, connect, status_line};
use super::TokenArgs;
use crate::transport::pb;
use std::path::PathBuf;

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Broker gRPC URL.
    #[arg(long, env = "LATCHKEY_SERVER")]
    pub server: String,
    /// Target name.
    #[arg(long)]
    pub target: String,
    /// Scope to ask about (repeatable).
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// Extra CA certificate (PEM) to trust for https.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Identity token source.
    #[command(flatten)]
    pub token: TokenArgs,
}

/// Prints the decision and trace; exit 0 when allowed, 2 when denied, 1 on error.
pub async fn run(args: Args) -> i32 {
    let go = async {
        let token = args.token.read()?;
        let mut client = connect(&args.server, args.ca_file.as_deref()).await?;
        let req = pb::ExplainRequest {
            target: args.target.clone(),
            scopes: args.scopes.clone(),
        };
        client
            .explain(authorized(req, &token)?)
            .await
            .map_err(|s| status_line(&s))
            .map(|r| r.into_inner())
    };
    match go.await {
        Ok(r) => {
            let mut identity: Vec<_> = r.identity.iter().collect();
            identity.sort();
            for (k, v) in identity {
                println!("identity.{k}: {v}");
            }
            for line in &r.trace {
                println!("trace: {line}");
            }
            if r.trace_withheld {
                println!("trace: withheld (it shows other rules' conditions: ask for the explain role, or an auditor, who sees it in the audit record)");
            }
            if r.allowed {
                println!(
                    "decision: allowed by {} scopes [{}] max_ttl {}s",
                    r.rule,
                    r.scopes.join(" "),
                    r.max_ttl.map(|d| d.seconds).unwrap_or(0)
                );
                0
            } else {
                println!("decision: denied: {}", r.reason);
                2
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}
