//! `latchkey keys export --config FILE --target T [--format pulsar|pem|jwk]`: a target's
//! public signing key in the form a verifier that cannot read a JWKS URL wants (Pulsar's
//! `tokenPublicKey`, a PEM file, one JWK). Reads the store with the master key, like
//! `serve`; prints only public material.

use crate::config::Config;
use crate::keys::MasterKey;
use std::path::PathBuf;

/// `latchkey keys …`
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print a target's public signing key.
    Export(ExportArgs),
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `data:;base64,<DER SubjectPublicKeyInfo>`, what Pulsar's tokenPublicKey takes.
    Pulsar,
    /// PEM `PUBLIC KEY`.
    Pem,
    /// One JWK (with kid and alg).
    Jwk,
}

/// Arguments of `keys export`.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The configuration file (names the store and the master key file).
    #[arg(long, short, env = "LATCHKEY_CONFIG")]
    pub config: PathBuf,
    /// The target whose key to print.
    #[arg(long)]
    pub target: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Pem)]
    pub format: Format,
    /// Which key: the one signing now (`current`) or the one published to sign next.
    #[arg(long, default_value = "current")]
    pub state: String,
}

/// Prints the key and answers 0; 64 for a bad config or an unknown target; 1 otherwise.
pub async fn run(cmd: Command) -> anyhow::Result<i32> {
    let Command::Export(args) = cmd;
    let cfg = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(super::EXIT_CONFIG);
        }
    };
    let Some(t) = cfg.target(&args.target) else {
        eprintln!("error: no target named {:?}", args.target);
        return Ok(super::EXIT_CONFIG);
    };
    if t.kind.signing_alg().is_none() {
        eprintln!(
            "error: target {} (kind {}) does not sign with a broker key",
            t.name,
            t.kind.name()
        );
        return Ok(super::EXIT_CONFIG);
    }
    if !matches!(args.state.as_str(), "current" | "next") {
        eprintln!("error: --state must be current or next");
        return Ok(super::EXIT_CONFIG);
    }
    let master = MasterKey::load(cfg.store.master_key_file.as_deref())?;
    let store = crate::store::backend::open(
        &cfg.store.location,
        &crate::store::backend::OpenOptions {
            busy_timeout: cfg.store.busy_timeout,
        },
    )?;
    let keys = store.signing_keys().await?;
    let Some(stored) = keys
        .iter()
        .find(|k| k.target == t.name && k.state.as_str() == args.state)
    else {
        anyhow::bail!(
            "no {} key for target {} in {} (start the broker once to create it)",
            args.state,
            t.name,
            cfg.store.location
        );
    };
    let key = crate::keys::open_stored(&master, stored)?;
    let out = match args.format {
        Format::Pulsar => crate::mint::pulsar_public_key(&key).map_err(anyhow::Error::msg)?,
        Format::Pem => {
            use base64::Engine;
            let der = crate::mint::spki_der(&key).map_err(anyhow::Error::msg)?;
            let b64 = base64::engine::general_purpose::STANDARD.encode(der);
            let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
            for chunk in b64.as_bytes().chunks(64) {
                pem.push_str(std::str::from_utf8(chunk).unwrap_or_default());
                pem.push('\n');
            }
            pem.push_str("-----END PUBLIC KEY-----");
            pem
        }
        Format::Jwk => key.public_jwk().to_string(),
    };
    println!("{out}");
    Ok(0)
}
