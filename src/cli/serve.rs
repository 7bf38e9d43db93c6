//! `latchkey serve --config FILE`

use crate::clock::SystemClock;
use crate::config::Config;
use crate::keys::MasterKey;
use std::path::PathBuf;
use std::sync::Arc;

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The configuration file.
    #[arg(long, short, env = "LATCHKEY_CONFIG")]
    pub config: PathBuf,
}

/// Checks the config (exit 64 on error), then serves until SIGINT/SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<i32> {
    let cfg = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(super::EXIT_CONFIG);
        }
    };
    let master = match MasterKey::load(cfg.store.master_key_file.as_deref()) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(super::EXIT_CONFIG);
        }
    };
    serve_until_signal(&cfg, &master).await
}

/// Starts the service and runs until SIGINT or SIGTERM.
pub async fn serve_until_signal(cfg: &Config, master: &MasterKey) -> anyhow::Result<i32> {
    let running = match crate::server::start(cfg, master, Arc::new(SystemClock)).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(1);
        }
    };
    shutdown_signal().await;
    tracing::info!("shutting down: draining in-flight requests");
    running.shutdown().await;
    Ok(0)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
