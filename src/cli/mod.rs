//! The `latchkey` command line: one file per subcommand.

pub mod audit;
pub mod bench;
pub mod check_config;
pub mod client;
pub mod dev;
pub mod explain;
pub mod keys;
pub mod leases;
pub mod mint;
pub mod policy_test;
pub mod revoke;
pub mod rotate;
pub mod serve;
pub mod store;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Exit status for configuration errors (EX_USAGE).
pub const EXIT_CONFIG: i32 = 64;

/// Latchkey: short-lived credentials for CI jobs and workloads, from the identity token
/// their platform already gives them.
#[derive(Debug, Parser)]
#[command(name = "latchkey", version, about)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, global = true, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker from a configuration file.
    Serve(serve::Args),
    /// Run a development broker with a built-in issuer and an example config.
    Dev(dev::Args),
    /// Get a credential from a broker (or renew one with --renew).
    Mint(mint::Args),
    /// Revoke one of your own leases.
    Revoke(revoke::Args),
    /// List leases, or revoke them by match during an incident.
    Leases {
        /// What to do.
        #[command(subcommand)]
        command: leases::Command,
    },
    /// The security team's tools: query, tail, export and verify the audit log.
    Audit {
        /// What to do.
        #[command(subcommand)]
        command: audit::Command,
    },
    /// Rotate signing keys and root credentials: --due (cron), --target T --now, --schedule.
    Rotate(rotate::Args),
    /// Ask a broker what Mint would decide for this token, without minting.
    Explain(explain::Args),
    /// Validate a configuration file without starting anything.
    CheckConfig(check_config::Args),
    /// Policy tools.
    Policy {
        /// What to do.
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Print a new random master key (base64) for LATCHKEY_MASTER_KEY or a key file.
    Keygen,
    /// Load generator: starts a broker and drives Mint, reporting throughput, latency,
    /// CPU per mint against the cryptography alone, and memory.
    Bench(bench::Args),
    /// Store tools: make a new, empty store (`store init`).
    Store {
        /// What to do.
        #[command(subcommand)]
        command: store::Command,
    },
    /// Signing key tools: export a target's public key (Pulsar's tokenPublicKey, PEM, JWK).
    Keys {
        /// What to do.
        #[command(subcommand)]
        command: keys::Command,
    },
}

/// `latchkey policy …`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Decide offline for a claims file: prints the decision and the trace.
    Test(policy_test::Args),
}

/// Where the caller's identity token comes from.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// Read the identity token from this file.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Read the identity token from this environment variable [default:
    /// BITBUCKET_STEP_OIDC_TOKEN, then LATCHKEY_TOKEN].
    #[arg(long)]
    pub token_env: Option<String>,
}

impl TokenArgs {
    /// The token. Fails with a message saying where it looked.
    pub fn read(&self) -> Result<crate::secret::SecretString, String> {
        if let Some(f) = &self.token_file {
            let t = std::fs::read_to_string(f)
                .map_err(|e| format!("cannot read token file {}: {}", f.display(), e.kind()))?;
            return non_empty(t, &f.display().to_string());
        }
        let vars: Vec<String> = match &self.token_env {
            Some(v) => vec![v.clone()],
            None => vec!["BITBUCKET_STEP_OIDC_TOKEN".into(), "LATCHKEY_TOKEN".into()],
        };
        for v in &vars {
            if let Ok(t) = std::env::var(v) {
                return non_empty(t, v);
            }
        }
        Err(format!(
            "no identity token: set {} or pass --token-file",
            vars.join(" or ")
        ))
    }
}

fn non_empty(t: String, origin: &str) -> Result<crate::secret::SecretString, String> {
    let t = crate::secret::Secret::new(t.trim().to_string());
    if t.expose().is_empty() {
        return Err(format!("identity token from {origin} is empty"));
    }
    Ok(t)
}

/// Writes `contents` to `path` readable by its owner only: the mode is set before anything
/// is written, also when the file already existed. With `create_new`, an existing file is
/// an error instead of being replaced (a master key is never overwritten).
pub(crate) fn write_private(
    path: &std::path::Path,
    contents: &str,
    create_new: bool,
) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true);
    if create_new {
        opts.create_new(true);
    } else {
        opts.create(true).truncate(true);
    }
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path)?;
    #[cfg(unix)]
    f.set_permissions(
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )?;
    f.write_all(contents.as_bytes())
}
