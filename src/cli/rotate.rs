//! `latchkey rotate`: the rotation cron's command (`--due`), incident response
//! (`--target T --now`), and the schedule (`--schedule`).

use super::client::{authorized, channel, status_line};
use super::leases::Conn;
use crate::clock::rfc3339;
use crate::transport::grpc::seconds;
use crate::transport::pb::{self, rotation_client::RotationClient};

/// Arguments: exactly one of `--due`, `--now` (with `--target`), `--schedule`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["due", "now", "schedule"])))]
pub struct Args {
    /// Connection and identity (the cron's own workload token, rotator role).
    #[command(flatten)]
    pub conn: Conn,
    /// Run whatever is due; exit 1 if anything failed.
    #[arg(long)]
    pub due: bool,
    /// Rotate --target now, due or not.
    #[arg(long, requires = "target")]
    pub now: bool,
    /// List every rotatable item with its last and next rotation.
    #[arg(long)]
    pub schedule: bool,
    /// The target to rotate with --now.
    #[arg(long)]
    pub target: Option<String>,
    /// With --now: rotate the target's upstream root credential, not its signing key.
    #[arg(long)]
    pub root: bool,
    /// With --now: the old signing key leaked; remove it at once instead of retiring it
    /// (tokens it signed stop verifying).
    #[arg(long)]
    pub drop_old: bool,
}

fn when(t: Option<&prost_types::Timestamp>) -> String {
    t.map(|t| rfc3339(t.seconds)).unwrap_or_else(|| "-".into())
}

/// Exit status of `--now` when the rotation was deferred (nothing rotated yet).
pub const EXIT_DEFERRED: i32 = 2;

/// Prints a report; answers the exit status: 1 when anything failed, [`EXIT_DEFERRED`]
/// when a forced rotation was deferred, else 0.
fn report(r: &pb::RotationReport, forced: bool) -> i32 {
    let mut failed = false;
    let mut deferred = false;
    for x in &r.results {
        failed |= x.outcome == "failed";
        deferred |= x.outcome == "deferred";
        let next = match &x.next_due {
            Some(t) => format!(" (next due {})", rfc3339(t.seconds)),
            None => String::new(),
        };
        println!("{:<32} {:<9} {}{}", x.item, x.outcome, x.detail, next);
    }
    if failed {
        1
    } else if forced && deferred {
        EXIT_DEFERRED
    } else {
        0
    }
}

/// Runs the command: 0 when everything asked for worked (or was not due), 1 when a
/// rotation failed or the broker refused, 2 when `--now` was deferred because the next
/// key has not been published long enough for the target's verifiers.
pub async fn run(a: Args) -> i32 {
    let r = async {
        let token = a.conn.token.read()?;
        let ch = channel(&a.conn.server, a.conn.ca_file.as_deref()).await?;
        let mut c = RotationClient::new(ch);
        if a.schedule {
            let s = c
                .schedule(authorized(pb::ScheduleRequest {}, &token)?)
                .await
                .map_err(|e| status_line(&e))?
                .into_inner();
            println!(
                "{:<32} {:<10} {:<12} {:<20} {:<20} current / next / retired",
                "item", "every", "window", "last", "next due"
            );
            for i in s.items {
                let every = i
                    .period
                    .map(|p| {
                        humantime::format_duration(std::time::Duration::from_secs(p.seconds as u64))
                            .to_string()
                    })
                    .unwrap_or_else(|| "manual".into());
                let retired: Vec<String> = i
                    .retired
                    .iter()
                    .map(|r| format!("{} until {}", r.kid, rfc3339(seconds(r.remove_at.as_ref()))))
                    .collect();
                println!(
                    "{:<32} {:<10} {:<12} {:<20} {:<20} {} / {} / {}",
                    i.item,
                    every,
                    if i.window.is_empty() { "-" } else { &i.window },
                    when(i.last_rotated.as_ref()),
                    when(i.next_due.as_ref()),
                    if i.current_kid.is_empty() {
                        "-"
                    } else {
                        &i.current_kid
                    },
                    if i.next_kid.is_empty() {
                        "-"
                    } else {
                        &i.next_kid
                    },
                    if retired.is_empty() {
                        "-".to_string()
                    } else {
                        retired.join(", ")
                    },
                );
            }
            return Ok(0);
        }
        let r = if a.due {
            c.run_due(authorized(pb::RunDueRequest {}, &token)?).await
        } else {
            c.rotate(authorized(
                pb::RotateRequest {
                    target: a.target.clone().unwrap_or_default(),
                    root: a.root,
                    drop_old: a.drop_old,
                },
                &token,
            )?)
            .await
        }
        .map_err(|e| status_line(&e))?
        .into_inner();
        Ok::<i32, String>(report(&r, a.now))
    }
    .await;
    r.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        1
    })
}
