//! `latchkey check-config --config FILE`

use crate::config::Config;
use std::path::PathBuf;

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The configuration file.
    #[arg(long, short, env = "LATCHKEY_CONFIG")]
    pub config: PathBuf,
}

/// Prints a summary and exits 0, or the file, key and reason and exits 64.
pub fn run(args: Args) -> i32 {
    match Config::load(&args.config) {
        Ok(c) => {
            println!(
                "{}: ok ({} issuers, {} targets, {} rules)",
                c.source,
                c.issuers.len(),
                c.targets.len(),
                c.policy.rules().len()
            );
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            super::EXIT_CONFIG
        }
    }
}
