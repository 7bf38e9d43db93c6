//! `latchkey leases list|revoke`: inventory and incident response.

use super::client::{authorized, channel, status_line};
use super::TokenArgs;
use crate::clock::rfc3339;
use crate::transport::grpc::seconds;
use crate::transport::pb::{self, leases_client::LeasesClient};
use clap::{Subcommand, ValueEnum};
use serde_json::json;
use std::path::PathBuf;

/// `latchkey leases …`
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List leases (auditor role): live ones, or all with --all.
    List(ListArgs),
    /// Revoke every live lease matching the filters (admin role).
    Revoke(RevokeArgs),
}

/// Connection and identity, shared by both.
#[derive(Debug, clap::Args)]
pub struct Conn {
    /// Broker gRPC URL.
    #[arg(long, env = "LATCHKEY_SERVER")]
    pub server: String,
    /// Extra CA certificate (PEM) to trust for https.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Identity token source.
    #[command(flatten)]
    pub token: TokenArgs,
}

/// Which leases. Every filter given must match.
#[derive(Debug, clap::Args)]
pub struct Filter {
    /// One lease.
    #[arg(long)]
    pub lease_id: Option<String>,
    /// Repository (as the platform names it, e.g. a Bitbucket repository UUID).
    #[arg(long)]
    pub repository: Option<String>,
    /// Issuer name from the config.
    #[arg(long)]
    pub issuer: Option<String>,
    /// Stable identity key.
    #[arg(long)]
    pub identity_key: Option<String>,
    /// Target name.
    #[arg(long)]
    pub target: Option<String>,
    /// A rule that granted the lease.
    #[arg(long)]
    pub rule: Option<String>,
    /// Issued before this time (RFC 3339, e.g. 2026-11-22T10:00:00Z).
    #[arg(long, value_parser = parse_time)]
    pub issued_before: Option<i64>,
}

impl Filter {
    fn to_pb(&self, include_inactive: bool) -> pb::LeaseFilter {
        let s = |v: &Option<String>| v.clone().unwrap_or_default();
        pb::LeaseFilter {
            lease_id: s(&self.lease_id),
            identity_key: s(&self.identity_key),
            issuer: s(&self.issuer),
            repository: s(&self.repository),
            target: s(&self.target),
            rule: s(&self.rule),
            issued_before: self.issued_before.map(crate::transport::grpc::timestamp),
            include_inactive,
        }
    }
}

fn parse_time(s: &str) -> Result<i64, String> {
    humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("{s:?} is not an RFC 3339 time ({e})"))
        .and_then(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .map_err(|_| "time before 1970".to_string())
        })
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// One JSON object per line.
    Jsonl,
}

/// `leases list`
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Connection.
    #[command(flatten)]
    pub conn: Conn,
    /// Filters.
    #[command(flatten)]
    pub filter: Filter,
    /// Include revoked and expired leases.
    #[arg(long)]
    pub all: bool,
    /// At most this many.
    #[arg(long, default_value_t = 1000)]
    pub limit: u32,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// `leases revoke`
#[derive(Debug, clap::Args)]
pub struct RevokeArgs {
    /// Connection.
    #[command(flatten)]
    pub conn: Conn,
    /// Filters.
    #[command(flatten)]
    pub filter: Filter,
    /// Why; recorded in every audit record.
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Count what would be revoked; revoke nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Required to revoke with no filter at all (every live lease).
    #[arg(long)]
    pub all_leases: bool,
}

async fn client(
    c: &Conn,
) -> Result<
    (
        LeasesClient<tonic::transport::Channel>,
        crate::secret::SecretString,
    ),
    String,
> {
    let token = c.token.read()?;
    let ch = channel(&c.server, c.ca_file.as_deref()).await?;
    Ok((LeasesClient::new(ch), token))
}

/// Runs a `leases` subcommand; exit 0 on success, 1 on error, 2 when a bulk revocation
/// left upstream revocations pending.
pub async fn run(cmd: Command) -> i32 {
    let r = match cmd {
        Command::List(a) => list(a).await,
        Command::Revoke(a) => revoke(a).await,
    };
    r.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        1
    })
}

/// One lease as a table row.
pub fn row(l: &pb::Lease) -> String {
    format!(
        "{:<36}  {:<8}  {:<16}  {:<20}  {:<20}  {}  {}",
        l.id,
        l.state,
        l.target,
        rfc3339(seconds(l.issued_at.as_ref())),
        rfc3339(seconds(l.expires_at.as_ref())),
        if l.repository.is_empty() {
            "-"
        } else {
            &l.repository
        },
        l.identity_key
    )
}

/// One lease as a JSON line.
pub fn jsonl(l: &pb::Lease) -> String {
    json!({
        "id": l.id,
        "state": l.state,
        "target": l.target,
        "scopes": l.scopes,
        "issuer": l.issuer,
        "identity_key": l.identity_key,
        "repository": l.repository,
        "rule": l.rule,
        "issued_at": rfc3339(seconds(l.issued_at.as_ref())),
        "expires_at": rfc3339(seconds(l.expires_at.as_ref())),
        "max_expires_at": rfc3339(seconds(l.max_expires_at.as_ref())),
        "renew_count": l.renew_count,
        "revoked_at": l.revoked_at.as_ref().map(|t| rfc3339(t.seconds)),
    })
    .to_string()
}

async fn list(a: ListArgs) -> Result<i32, String> {
    let (mut c, token) = client(&a.conn).await?;
    let req = pb::ListLeasesRequest {
        filter: Some(a.filter.to_pb(a.all)),
        limit: a.limit,
    };
    let mut stream = c
        .list(authorized(req, &token)?)
        .await
        .map_err(|s| status_line(&s))?
        .into_inner();
    if a.format == Format::Table {
        println!(
            "{:<36}  {:<8}  {:<16}  {:<20}  {:<20}  REPOSITORY  IDENTITY",
            "LEASE", "STATE", "TARGET", "ISSUED", "EXPIRES"
        );
    }
    while let Some(l) = stream.message().await.map_err(|s| status_line(&s))? {
        println!(
            "{}",
            match a.format {
                Format::Table => row(&l),
                Format::Jsonl => jsonl(&l),
            }
        );
    }
    Ok(0)
}

async fn revoke(a: RevokeArgs) -> Result<i32, String> {
    let (mut c, token) = client(&a.conn).await?;
    let req = pb::RevokeMatchingRequest {
        filter: Some(a.filter.to_pb(false)),
        reason: a.reason.clone(),
        dry_run: a.dry_run,
        all: a.all_leases,
    };
    let r = c
        .revoke_matching(authorized(req, &token)?)
        .await
        .map_err(|s| status_line(&s))?
        .into_inner();
    if a.dry_run {
        println!("{} live leases match; nothing revoked (dry run)", r.matched);
        return Ok(0);
    }
    println!("{} matched, {} revoked", r.matched, r.revoked);
    for f in &r.failed {
        println!("upstream pending {}: {}", f.lease_id, f.reason);
    }
    Ok(if r.failed.is_empty() { 0 } else { 2 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_rows() {
        assert_eq!(parse_time("1970-01-01T00:01:00Z"), Ok(60));
        assert!(parse_time("yesterday").is_err());
        let l = pb::Lease {
            id: "L".into(),
            state: "live".into(),
            repository: "{r}".into(),
            ..Default::default()
        };
        assert!(row(&l).contains("live") && row(&l).contains("{r}"));
        let j: serde_json::Value = serde_json::from_str(&jsonl(&l)).unwrap();
        assert_eq!(j["state"], "live");
        assert_eq!(j["revoked_at"], serde_json::Value::Null);
    }
}
