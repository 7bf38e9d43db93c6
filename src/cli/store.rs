//! `latchkey store init`: makes a new, empty store where the broker refuses to start
//! one by itself (an existing empty file), so a fresh audit chain and fresh signing keys
//! are never made by accident.

use crate::config::Config;
use crate::store::backend::{self, OpenOptions};
use crate::store::Location;
use std::path::PathBuf;

/// `latchkey store …`
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Make a new, empty store at the configured location: where there is no file, or an
    /// empty one (the broker refuses to start over an empty file by itself). A file that
    /// holds anything is left alone.
    Init(InitArgs),
}

/// Arguments of `store init`.
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// The configuration naming the store (`[store] url` or `path`).
    #[arg(long, conflicts_with = "db")]
    pub config: Option<PathBuf>,
    /// The store itself (`sqlite:///path` or a path), instead of --config.
    #[arg(long)]
    pub db: Option<String>,
}

/// Runs the command: 0 when a new store was made, 1 when a file that holds something is
/// in the way, 64 for a bad configuration.
pub async fn run(cmd: Command) -> i32 {
    let Command::Init(a) = cmd;
    let location = match (&a.config, &a.db) {
        (Some(c), _) => match Config::load(c) {
            Ok(cfg) => cfg.store.location.clone(),
            Err(e) => {
                eprintln!("error: {e}");
                return super::EXIT_CONFIG;
            }
        },
        (None, Some(db)) => match Location::parse(db) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: --db: {e}");
                return super::EXIT_CONFIG;
            }
        },
        (None, None) => {
            eprintln!("error: give --config or --db");
            return super::EXIT_CONFIG;
        }
    };
    match init(&location) {
        Ok(msg) => {
            println!("{msg}");
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

fn init(location: &Location) -> Result<String, String> {
    let Some(path) = location.sqlite_path() else {
        return Err(format!(
            "{location}: not a store this version can initialise"
        ));
    };
    match std::fs::metadata(path) {
        Ok(m) if m.len() == 0 => {
            std::fs::remove_file(path)
                .map_err(|e| format!("cannot replace {}: {}", path.display(), e.kind()))?;
        }
        Ok(_) => {
            return Err(format!(
                "{} is not empty: nothing done. If it is a Latchkey store, it is used as it is; if it is damaged, restore it from a backup or move it away first",
                path.display()
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read {}: {}", path.display(), e.kind())),
    }
    let opts = OpenOptions {
        busy_timeout: std::time::Duration::from_secs(5),
    };
    let store = backend::open(location, &opts).map_err(|e| e.to_string())?;
    drop(store);
    Ok(format!(
        "made a new, empty store at {}: a new audit chain starts with the broker's first record",
        path.display()
    ))
}
