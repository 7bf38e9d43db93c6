//! Logging and tracing setup: `tracing` to stderr, text or JSON.

use tracing_subscriber::EnvFilter;

/// The filter directive that keeps tokio-postgres' statement logging off.
pub const QUIET_POSTGRES: &str = "tokio_postgres=info";

/// Installs the global subscriber. `RUST_LOG` overrides `level` (default `info`).
pub fn init(json: bool, level: Option<&str>) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level.unwrap_or("info")))
        .unwrap_or_else(|_| EnvFilter::new("info"))
        // tokio-postgres logs every statement it sends at debug level, and the statement
        // that makes a lease's role carries its password's SCRAM verifier: never below info,
        // whatever RUST_LOG says.
        .add_directive(QUIET_POSTGRES.parse().expect("a valid directive"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    } else {
        builder.try_init()
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_postgres_directive_parses() {
        assert!(super::QUIET_POSTGRES
            .parse::<tracing_subscriber::filter::Directive>()
            .is_ok());
    }
}
