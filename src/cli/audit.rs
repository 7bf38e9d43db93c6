//! `latchkey audit query|tail|export|verify`: the security team's tools.

use super::client::{authorized, channel, status_line};
use super::leases::Format;
use super::TokenArgs;
use crate::audit::checkpoint::{Checkpoint, CheckpointKeys};
use crate::audit::verify::{Report, VerifyOptions, Walker};
use crate::audit::{AuditQuery, AuditRecord};
use crate::clock::{rfc3339, Clock, SystemClock};
use crate::store::backend;
use crate::store::Location;
use crate::transport::pb::{self, audit_client::AuditClient};
use clap::Subcommand;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use tokio_stream::StreamExt;

/// `latchkey audit …`
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the records matching the filters (auditor role).
    Query(QueryArgs),
    /// Follow new records matching the filters as they are committed, like `tail -f`.
    Tail(TailArgs),
    /// Write matching records as JSON lines (each with its sequence number and hashes,
    /// so the slice can itself be verified), from a broker or a database file.
    Export(ExportArgs),
    /// Walk the whole chain and every signed checkpoint; exit 0 only when intact.
    Verify(VerifyArgs),
}

/// A broker connection.
#[derive(Debug, clap::Args)]
pub struct Server {
    /// Broker gRPC URL.
    #[arg(long, env = "LATCHKEY_SERVER")]
    pub server: Option<String>,
    /// Extra CA certificate (PEM) to trust for https.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Identity token source.
    #[command(flatten)]
    pub token: TokenArgs,
}

/// Which records. Every filter given must match.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Filter {
    /// At or after this time: a duration ago (`24h`, `30m`) or an RFC 3339 time.
    #[arg(long, value_parser = parse_when)]
    pub since: Option<i64>,
    /// Before this time: a duration ago or an RFC 3339 time.
    #[arg(long, value_parser = parse_when)]
    pub until: Option<i64>,
    /// Records after this sequence number (resume paging).
    #[arg(long)]
    pub after_seq: Option<i64>,
    /// Records up to this sequence number.
    #[arg(long)]
    pub until_seq: Option<i64>,
    /// Issuer name from the config.
    #[arg(long)]
    pub issuer: Option<String>,
    /// Stable identity key.
    #[arg(long)]
    pub identity_key: Option<String>,
    /// Repository (as the platform names it, e.g. a Bitbucket repository UUID).
    #[arg(long)]
    pub repository: Option<String>,
    /// `sub` of the caller's token.
    #[arg(long)]
    pub subject: Option<String>,
    /// Target name.
    #[arg(long)]
    pub target: Option<String>,
    /// allowed, denied or error.
    #[arg(long)]
    pub outcome: Option<String>,
    /// mint, explain, renew, revoke, revoke_matching, audit_query, ...
    #[arg(long)]
    pub action: Option<String>,
    /// Lease id.
    #[arg(long)]
    pub lease_id: Option<String>,
    /// Request id (as returned in x-request-id).
    #[arg(long)]
    pub request_id: Option<String>,
    /// Text the denial or error reason contains (case-insensitive).
    #[arg(long)]
    pub reason_contains: Option<String>,
}

impl Filter {
    fn to_query(&self) -> AuditQuery {
        AuditQuery {
            since_ms: self.since,
            until_ms: self.until,
            after_seq: self.after_seq,
            until_seq: self.until_seq,
            issuer: self.issuer.clone(),
            identity_key: self.identity_key.clone(),
            repository: self.repository.clone(),
            subject: self.subject.clone(),
            target: self.target.clone(),
            outcome: self.outcome.clone(),
            action: self.action.clone(),
            lease_id: self.lease_id.clone(),
            request_id: self.request_id.clone(),
            reason_contains: self.reason_contains.clone(),
        }
    }

    fn to_pb(&self, limit: u32) -> pb::AuditQuery {
        let s = |v: &Option<String>| v.clone().unwrap_or_default();
        let ts = |ms: Option<i64>| {
            ms.map(|ms| prost_types::Timestamp {
                seconds: ms.div_euclid(1000),
                nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
            })
        };
        pb::AuditQuery {
            since: ts(self.since),
            until: ts(self.until),
            after_seq: self.after_seq.unwrap_or(0),
            until_seq: self.until_seq.unwrap_or(0),
            issuer: s(&self.issuer),
            identity_key: s(&self.identity_key),
            repository: s(&self.repository),
            subject: s(&self.subject),
            target: s(&self.target),
            outcome: s(&self.outcome),
            action: s(&self.action),
            lease_id: s(&self.lease_id),
            request_id: s(&self.request_id),
            reason_contains: s(&self.reason_contains),
            limit,
        }
    }
}

/// A time given as a duration ago or an RFC 3339 time, in milliseconds since the epoch.
fn parse_when(s: &str) -> Result<i64, String> {
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(SystemClock.now_ms() - d.as_millis() as i64);
    }
    humantime::parse_rfc3339_weak(s)
        .map_err(|_| format!("{s:?} is neither a duration (24h) nor an RFC 3339 time"))
        .and_then(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .map_err(|_| "time before 1970".to_string())
        })
}

/// `audit query`
#[derive(Debug, clap::Args)]
pub struct QueryArgs {
    /// Connection.
    #[command(flatten)]
    pub server: Server,
    /// Filters.
    #[command(flatten)]
    pub filter: Filter,
    /// At most this many records.
    #[arg(long, default_value_t = 1000)]
    pub limit: u32,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// `audit tail`
#[derive(Debug, clap::Args)]
pub struct TailArgs {
    /// Connection.
    #[command(flatten)]
    pub server: Server,
    /// Filters.
    #[command(flatten)]
    pub filter: Filter,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// `audit export`
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Connection (or --db).
    #[command(flatten)]
    pub server: Server,
    /// Read a store (a copy: a file path or a sqlite:// URL) instead of asking a broker.
    #[arg(long, conflicts_with = "server")]
    pub db: Option<PathBuf>,
    /// Filters.
    #[command(flatten)]
    pub filter: Filter,
}

/// `audit verify`
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Ask a broker to verify its store (auditor role).
    #[command(flatten)]
    pub server: Server,
    /// Verify a database file offline (use a copy of the live file).
    #[arg(long, conflicts_with_all = ["server", "file"])]
    pub db: Option<PathBuf>,
    /// Verify an exported JSON-lines slice: every record hashes and links to the one
    /// before.
    #[arg(long, conflicts_with = "server")]
    pub file: Option<PathBuf>,
    /// The audit public keys (JWKS as served at /v1/audit/keys) to check checkpoints
    /// with; without it --db trusts the keys stored in the file itself.
    #[arg(long)]
    pub audit_keys: Option<PathBuf>,
    /// Checkpoints a witness kept (the JSON-lines file of `audit.witness_file`).
    #[arg(long)]
    pub witness: Option<PathBuf>,
}

/// Runs an `audit` subcommand. Exit 0 on success; verify exits 1 when the log is not
/// intact and 2 when it could not be read at all.
pub async fn run(cmd: Command) -> i32 {
    let r = match cmd {
        Command::Query(a) => query(a).await,
        Command::Tail(a) => tail(a).await,
        Command::Export(a) => export(a).await,
        Command::Verify(a) => return verify(a).await,
    };
    r.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        1
    })
}

async fn client(
    s: &Server,
) -> Result<
    (
        AuditClient<tonic::transport::Channel>,
        crate::secret::SecretString,
    ),
    String,
> {
    let server = s
        .server
        .as_deref()
        .ok_or("--server (or LATCHKEY_SERVER) is required")?;
    let token = s.token.read()?;
    let ch = channel(server, s.ca_file.as_deref()).await?;
    Ok((AuditClient::new(ch), token))
}

/// One record as a table row.
pub fn row(r: &AuditRecord) -> String {
    let e = &r.entry;
    let who = e
        .repository
        .as_deref()
        .or(e.identity_key.as_deref())
        .unwrap_or("-");
    let why = e.reason.as_deref().or(e.rule.as_deref()).unwrap_or("-");
    format!(
        "{:>8}  {:<24}  {:<16}  {:<7}  {:<8}  {:<40}  {:<16}  {}",
        r.seq,
        rfc3339(e.time_ms / 1000),
        e.action,
        e.outcome,
        e.issuer.as_deref().unwrap_or("-"),
        who,
        e.target.as_deref().unwrap_or("-"),
        why
    )
}

fn header() -> String {
    format!(
        "{:>8}  {:<24}  {:<16}  {:<7}  {:<8}  {:<40}  {:<16}  RULE / REASON",
        "SEQ", "TIME", "ACTION", "OUTCOME", "ISSUER", "REPOSITORY / IDENTITY", "TARGET"
    )
}

fn print(r: &AuditRecord, format: Format) -> Result<(), String> {
    let line = match format {
        Format::Table => row(r),
        Format::Jsonl => serde_json::to_string(r).map_err(|e| e.to_string())?,
    };
    let mut out = std::io::stdout().lock();
    // A closed pipe (`| head`) ends the output quietly.
    writeln!(out, "{line}").map_err(|_| "stdout closed".to_string())
}

async fn query(a: QueryArgs) -> Result<i32, String> {
    let (mut c, token) = client(&a.server).await?;
    let stream = c
        .query(authorized(a.filter.to_pb(a.limit), &token)?)
        .await
        .map_err(|s| status_line(&s))?
        .into_inner();
    print_stream(stream, a.format).await
}

async fn tail(a: TailArgs) -> Result<i32, String> {
    let (mut c, token) = client(&a.server).await?;
    let mut req = authorized(a.filter.to_pb(0), &token)?;
    // A tail runs until interrupted: no deadline.
    req.set_timeout(std::time::Duration::from_secs(100 * 365 * 24 * 3600));
    let stream = c.tail(req).await.map_err(|s| status_line(&s))?.into_inner();
    print_stream(stream, a.format).await
}

async fn print_stream(
    mut stream: tonic::Streaming<pb::AuditRecord>,
    format: Format,
) -> Result<i32, String> {
    if format == Format::Table {
        println!("{}", header());
    }
    while let Some(r) = stream.next().await {
        let r = AuditRecord::try_from(r.map_err(|s| status_line(&s))?)?;
        if print(&r, format).is_err() {
            break;
        }
    }
    Ok(0)
}

async fn export(a: ExportArgs) -> Result<i32, String> {
    let mut q = a.filter.to_query();
    if let Some(db) = &a.db {
        let db = Location::parse(&db.to_string_lossy()).map_err(|e| format!("--db: {e}"))?;
        loop {
            let page = backend::query_offline(&db, &q, 10_000).map_err(|e| e.to_string())?;
            let Some(last) = page.last().map(|r| r.seq) else {
                return Ok(0);
            };
            for r in &page {
                print(r, Format::Jsonl)?;
            }
            q.after_seq = Some(last);
        }
    }
    let (mut c, token) = client(&a.server).await?;
    let mut filter = a.filter.clone();
    loop {
        let mut stream = c
            .query(authorized(filter.to_pb(EXPORT_PAGE as u32), &token)?)
            .await
            .map_err(|s| status_line(&s))?
            .into_inner();
        let (mut last, mut n) = (None, 0);
        while let Some(r) = stream.next().await {
            let r = AuditRecord::try_from(r.map_err(|s| status_line(&s))?)?;
            print(&r, Format::Jsonl)?;
            last = Some(r.seq);
            n += 1;
        }
        // A short page is the end. (Each query is itself audited, so asking again
        // would always find one more record: the record of the last query.)
        match last {
            Some(s) if n == EXPORT_PAGE => filter.after_seq = Some(s),
            _ => return Ok(0),
        }
    }
}

/// Records per query of a remote export.
const EXPORT_PAGE: usize = 100_000;

fn read_keys(p: &Path) -> Result<CheckpointKeys, String> {
    let text = std::fs::read_to_string(p)
        .map_err(|e| format!("cannot read {}: {}", p.display(), e.kind()))?;
    let doc = serde_json::from_str(&text).map_err(|_| format!("{} is not JSON", p.display()))?;
    CheckpointKeys::from_jwks(&doc).map_err(|e| format!("{}: {e}", p.display()))
}

/// Reads JSON lines of `T`, naming the first bad line.
pub fn read_lines<T: serde::de::DeserializeOwned>(p: &Path) -> Result<Vec<T>, String> {
    let f =
        std::fs::File::open(p).map_err(|e| format!("cannot read {}: {}", p.display(), e.kind()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| format!("{}: {}", p.display(), e.kind()))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line)
                .map_err(|e| format!("{} line {}: {e}", p.display(), i + 1))?,
        );
    }
    Ok(out)
}

/// Verifies an exported slice: each record hashes to its hash and links to the one
/// before it in the file.
pub fn verify_slice(records: &[AuditRecord]) -> Report {
    let Some(first) = records.first() else {
        return Walker::whole(Vec::new(), &CheckpointKeys::default()).finish();
    };
    let mut w = Walker::new(
        first.seq - 1,
        &first.prev_hash,
        Vec::new(),
        &CheckpointKeys::default(),
    );
    for r in records {
        if !w.record(r) {
            break;
        }
    }
    w.finish()
}

async fn verify(a: VerifyArgs) -> i32 {
    let outcome = if a.file.is_none() && a.db.is_none() {
        verify_remote(&a).await
    } else {
        verify_report(&a).await.map(|r| (r.to_string(), r.intact()))
    };
    match outcome {
        Ok((summary, intact)) => {
            println!("{summary}");
            if intact {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    }
}

/// Asks the broker to verify its own store: its summary line and whether it is intact.
async fn verify_remote(a: &VerifyArgs) -> Result<(String, bool), String> {
    let (mut c, token) = client(&a.server).await?;
    let mut req = authorized(pb::VerifyRequest {}, &token)?;
    req.set_timeout(std::time::Duration::from_secs(3600));
    let r = c
        .verify(req)
        .await
        .map_err(|s| status_line(&s))?
        .into_inner();
    Ok((r.summary, r.intact))
}

/// Verifies an exported file or a database file offline.
async fn verify_report(a: &VerifyArgs) -> Result<Report, String> {
    if let Some(file) = &a.file {
        let records: Vec<AuditRecord> = read_lines(file)?;
        return Ok(verify_slice(&records));
    }
    let Some(db) = &a.db else {
        return Err("give --db, --file or --server".into());
    };
    let db = Location::parse(&db.to_string_lossy()).map_err(|e| format!("--db: {e}"))?;
    let keys = a.audit_keys.as_deref().map(read_keys).transpose()?;
    if keys.is_none() {
        eprintln!(
            "note: checking checkpoints with the audit keys stored in {} itself; pass --audit-keys to pin them",
            db.sqlite_path().map(|p| p.display().to_string()).unwrap_or_else(|| db.to_string())
        );
    }
    let witnessed: Vec<Checkpoint> = match &a.witness {
        Some(w) => read_lines(w)?,
        None => Vec::new(),
    };
    tokio::task::spawn_blocking(move || {
        backend::verify_offline(&db, &VerifyOptions { keys, witnessed })
    })
    .await
    .map_err(|_| "verification failed to run".to_string())?
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_parses_durations_and_times() {
        let now = SystemClock.now_ms();
        let t = parse_when("1h").unwrap();
        assert!((now - 3_600_000 - t).abs() < 5_000);
        assert_eq!(parse_when("1970-01-01T00:00:10Z").unwrap(), 10_000);
        assert!(parse_when("yesterday").is_err());
    }
}
