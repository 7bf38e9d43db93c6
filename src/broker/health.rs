//! Readiness: what `/readyz` and the gRPC health service report.

use super::Broker;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;

/// The outcome of the readiness checks.
#[derive(Debug, Clone)]
pub struct Readiness {
    /// Whether the broker should receive traffic.
    pub ready: bool,
    /// Per check: `{"ok": bool, ...}` with a reason when not ok.
    pub checks: Value,
}

impl Broker {
    /// Runs the readiness checks. Ready means: the store can commit (no credential can be
    /// issued otherwise), every signing target has its key loaded, and every issuer has
    /// fetched keys at least once. An issuer whose keys went stale after working is
    /// reported failing but does not make the broker unready: callers of other issuers
    /// are still served, and its own callers get a clear UNAVAILABLE. Witness delivery
    /// is reported and never makes the broker unready (a hung witness must not stop Mint).
    pub async fn readiness(&self) -> Readiness {
        let store = self.store.check_writable().await;
        let store_check = match &store {
            Ok(()) => json!({"ok": true}),
            Err(e) => json!({"ok": false, "reason": e.to_string()}),
        };
        let mut ready = store.is_ok();

        let now = self.clock.now();
        let mut issuers = serde_json::Map::new();
        for (name, st) in self.verifier.status() {
            // `ok` only while the keys are usable and the last refresh worked; keys that
            // still serve after failed refreshes are `serving` but not `ok`, with the
            // reason, so a failing issuer shows before its keys go stale.
            let mut c = json!({
                "ok": st.usable && st.last_error.is_none(),
                "serving": st.usable,
                "keys": st.keys,
                "fetched_at": st.fetched_at,
                "age_secs": st.fetched_at.map(|t| now - t),
            });
            if !st.usable || st.last_error.is_some() {
                c["reason"] = json!(st
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "no keys fetched yet".into()));
            }
            if st.usable && st.last_error.is_some() {
                c["failures"] = json!(st.failures);
            }
            if st.fetched_at.is_none() {
                ready = false;
            }
            issuers.insert(name, c);
        }

        let mut missing: Vec<&str> = self
            .targets
            .iter()
            .filter(|(_, t)| t.cfg.kind.signing_alg().is_some())
            .filter(|(name, _)| self.keys.signer(name).is_err())
            .map(|(name, _)| name.as_str())
            .collect();
        missing.sort_unstable();
        let keys_check = if missing.is_empty() {
            json!({"ok": true})
        } else {
            ready = false;
            json!({"ok": false, "reason": format!("no signing key for {}", missing.join(", "))})
        };

        let status = &self.audit.status;
        let witness = json!({
            "lag": status.witness_lag(),
            "consecutive_failures": status.witness_failures.load(Ordering::SeqCst),
            "last_checkpoint": status.last_checkpoint.load(Ordering::SeqCst),
        });
        Readiness {
            ready,
            checks: json!({
                "store": store_check,
                "issuers": issuers,
                "signing_keys": keys_check,
                "audit_witness": witness,
            }),
        }
    }
}
