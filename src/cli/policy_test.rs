//! `latchkey policy test --config FILE --claims claims.json --target T`: the decision
//! and trace for a set of claims, offline (no signature check, no broker).

use crate::config::Config;
use crate::policy::Request;
use serde_json::{Map, Value};
use std::path::PathBuf;

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The configuration file.
    #[arg(long, short)]
    pub config: PathBuf,
    /// A JSON file with the token's claims (e.g. a decoded CI token).
    #[arg(long)]
    pub claims: PathBuf,
    /// Target name.
    #[arg(long)]
    pub target: String,
    /// Scope to ask for (repeatable).
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// Issuer name from the config; default: the one whose `issuer` equals the claims' `iss`.
    #[arg(long)]
    pub issuer: Option<String>,
}

/// Exit 0 allowed, 2 denied, 64 bad config, 1 other errors.
pub fn run(args: Args) -> i32 {
    let cfg = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return super::EXIT_CONFIG;
        }
    };
    match decide(&cfg, &args) {
        Ok((allowed, text)) => {
            print!("{text}");
            if allowed {
                0
            } else {
                2
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// The decision and its printed form.
pub fn decide(cfg: &Config, args: &Args) -> Result<(bool, String), String> {
    let text = std::fs::read_to_string(&args.claims)
        .map_err(|e| format!("cannot read {}: {}", args.claims.display(), e.kind()))?;
    let claims: Map<String, Value> = serde_json::from_str(&text)
        .map_err(|e| format!("{}: not a JSON object: {e}", args.claims.display()))?;
    let issuer = match &args.issuer {
        Some(n) => cfg
            .issuers
            .iter()
            .find(|i| &i.name == n)
            .ok_or(format!("no issuer named {n:?}"))?,
        None => {
            let iss = claims
                .get("iss")
                .and_then(Value::as_str)
                .ok_or("claims have no iss; pass --issuer")?;
            cfg.issuers.iter().find(|i| i.issuer == iss).ok_or(format!(
                "no configured issuer has iss {iss:?}; pass --issuer"
            ))?
        }
    };
    let target = cfg
        .target(&args.target)
        .ok_or(format!("unknown target {:?}", args.target))?;
    let identity = issuer
        .preset
        .normalise(
            &issuer.name,
            claims,
            "offline".into(),
            issuer.key_environment,
        )
        .map_err(|e| format!("claims do not fit preset {}: {e}", issuer.preset.as_str()))?;
    let ex = cfg.policy.explain(
        &issuer.name,
        &identity.claims,
        target.limits(),
        Request {
            target: &args.target,
            scopes: &args.scopes,
            ttl: None,
        },
    );
    let mut out = String::new();
    for (k, v) in identity.fields() {
        out.push_str(&format!("identity.{k}: {v}\n"));
    }
    for t in &ex.trace {
        out.push_str(&format!("trace: {t}\n"));
    }
    let allowed = match &ex.decision {
        Ok(a) => {
            out.push_str(&format!(
                "decision: allowed by {} scopes [{}] ttl {}s max_ttl {}s\n",
                a.rule,
                a.scopes.join(" "),
                a.ttl.as_secs(),
                a.max_ttl.as_secs()
            ));
            true
        }
        Err(d) => {
            out.push_str(&format!("decision: denied: {d}\n"));
            false
        }
    };
    Ok((allowed, out))
}
