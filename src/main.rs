//! The `latchkey` binary: parse the command line, start telemetry, call the library.

use clap::Parser;
use latchkey::cli::{self, Cli, Command, LogFormat, PolicyCommand};

/// mimalloc instead of glibc's malloc: under load the broker's request path allocates
/// and frees small objects on every worker thread, where glibc spent about a tenth of its
/// CPU (docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args = Cli::parse();
    // `serve` logs as its config's [log] says (`--log-format json` also turns JSON on); a
    // config that does not load is reported by `serve` itself, with default logging.
    let log = match &args.command {
        Command::Serve(a) => latchkey::config::Config::load(&a.config)
            .ok()
            .map(|c| c.log),
        _ => None,
    };
    latchkey::telemetry::init(
        args.log_format == LogFormat::Json || log.as_ref().is_some_and(|l| l.json),
        log.as_ref().and_then(|l| l.level.as_deref()),
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(async move {
        let r: anyhow::Result<i32> = match args.command {
            Command::Serve(a) => cli::serve::run(a).await,
            Command::Dev(a) => cli::dev::run(a).await,
            Command::Mint(a) => Ok(cli::mint::run(a).await),
            Command::Revoke(a) => Ok(cli::revoke::run(a).await),
            Command::Leases { command } => Ok(cli::leases::run(command).await),
            Command::Audit { command } => Ok(cli::audit::run(command).await),
            Command::Explain(a) => Ok(cli::explain::run(a).await),
            Command::Rotate(a) => Ok(cli::rotate::run(a).await),
            Command::CheckConfig(a) => Ok(cli::check_config::run(a)),
            Command::Policy {
                command: PolicyCommand::Test(a),
            } => Ok(cli::policy_test::run(a)),
            Command::Keys { command } => cli::keys::run(command).await,
            Command::Store { command } => Ok(cli::store::run(command).await),
            Command::Bench(a) => cli::bench::run(a).await,
            Command::Keygen => {
                println!(
                    "{}",
                    latchkey::keys::MasterKey::generate().to_base64().expose()
                );
                Ok(0)
            }
        };
        r.unwrap_or_else(|e| {
            eprintln!("error: {e:#}");
            1
        })
    });
    std::process::exit(code);
}
