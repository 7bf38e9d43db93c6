//! `latchkey serve --config FILE`

use crate::clock::SystemClock;
use crate::config::Config;
use crate::keys::MasterKey;
use std::path::{Path, PathBuf};
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
    serve_until_signal(&cfg, &master, Some(&args.config)).await
}

/// Starts the service and runs until SIGINT or SIGTERM. On SIGHUP, reloads `config`
/// (rules, rate limits, TLS files); a bad new configuration is refused and logged, and
/// the old one keeps serving.
pub async fn serve_until_signal(
    cfg: &Config,
    master: &MasterKey,
    config: Option<&Path>,
) -> anyhow::Result<i32> {
    let running = match crate::server::start(cfg, master, Arc::new(SystemClock)).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(1);
        }
    };
    let mut applied: Option<toml::Value> = config
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| toml::from_str(&t).ok());
    let mut signals = Signals::new();
    loop {
        match signals.next().await {
            Signal::Stop => break,
            Signal::Reload => match (config, &applied) {
                (Some(path), Some(prev)) => match running.reload(path, prev).await {
                    Ok(raw) => applied = Some(raw),
                    Err(e) => {
                        tracing::error!(error = %e, "configuration reload refused; the previous configuration keeps serving")
                    }
                },
                _ => tracing::warn!(
                    "SIGHUP ignored: this broker was not started from a configuration file"
                ),
            },
        }
    }
    tracing::info!("shutting down: draining in-flight requests");
    running.shutdown().await;
    Ok(0)
}

enum Signal {
    Stop,
    Reload,
}

/// SIGINT/SIGTERM (stop) and SIGHUP (reload).
struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Signals {
                term: signal(SignalKind::terminate()).ok(),
                hup: signal(SignalKind::hangup()).ok(),
            }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    async fn next(&mut self) -> Signal {
        #[cfg(unix)]
        {
            async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                _ = tokio::signal::ctrl_c() => Signal::Stop,
                _ = recv(&mut self.term) => Signal::Stop,
                _ = recv(&mut self.hup) => Signal::Reload,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Signal::Stop
        }
    }
}
