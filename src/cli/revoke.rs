//! `latchkey revoke LEASE_ID`: a job gives back its own credential.

use super::client::{connect, lease_proof, maybe_authorized, status_line};
use super::TokenArgs;
use crate::transport::pb;
use std::path::PathBuf;

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The lease to revoke (from mint's output, LATCHKEY_LEASE_ID).
    #[arg(env = "LATCHKEY_LEASE_ID")]
    pub lease_id: String,
    /// Broker gRPC URL.
    #[arg(long, env = "LATCHKEY_SERVER")]
    pub server: String,
    /// Environment variable holding the lease secret; when unset, the identity token
    /// proves ownership instead.
    #[arg(long, default_value = "LATCHKEY_LEASE_SECRET")]
    pub lease_secret_env: String,
    /// Extra CA certificate (PEM) to trust for https.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Identity token source.
    #[command(flatten)]
    pub token: TokenArgs,
}

/// Revokes; exit 0 when revoked (now or before), 1 on error.
pub async fn run(args: Args) -> i32 {
    let go = async {
        let (token, secret) = lease_proof(&args.token, &args.lease_secret_env)?;
        let mut client = connect(&args.server, args.ca_file.as_deref()).await?;
        let req = pb::RevokeRequest {
            lease_id: args.lease_id.clone(),
            lease_secret: secret.map(|s| s.expose().clone()).unwrap_or_default(),
        };
        client
            .revoke(maybe_authorized(req, token.as_ref())?)
            .await
            .map_err(|s| status_line(&s))
            .map(|r| r.into_inner())
    };
    match go.await {
        Ok(r) => {
            if r.upstream_pending {
                println!(
                    "revoked {}; the target did not answer yet, the broker keeps retrying",
                    args.lease_id
                );
            } else {
                println!("revoked {}", args.lease_id);
            }
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}
