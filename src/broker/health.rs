//! Readiness: what `/readyz` and the gRPC health service report.

use super::Broker;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Longest `/readyz` waits for the store to answer before saying it is busy.
pub const STORE_PROBE_WAIT: Duration = Duration::from_millis(750);

/// At most one "can you commit?" question to the store at a time, however many probes
/// ask: a store stuck behind another process's lock answers when it can, and meanwhile
/// readiness says it has not answered, and for how long, instead of hanging.
#[derive(Debug, Default)]
pub(super) struct StoreProbe {
    asking: AtomicBool,
    /// When the current question was asked.
    asked_at: Mutex<Option<Instant>>,
    /// The last answer and when it came.
    last: Mutex<Option<(Instant, Result<(), String>)>>,
    answered: tokio::sync::Notify,
}

/// The outcome of the readiness checks.
#[derive(Debug, Clone)]
pub struct Readiness {
    /// Whether the broker should receive traffic.
    pub ready: bool,
    /// Per check: `{"ok": bool, ...}` with a reason when not ok.
    pub checks: Value,
}

impl Broker {
    /// Whether the store can commit, asked at most once at a time and waited for at most
    /// `wait`: an answer that came after this call began, or why there is none.
    pub async fn store_writable(&self, wait: Duration) -> Result<(), String> {
        let p = self.store_probe.clone();
        let began = Instant::now();
        let answered = p.answered.notified();
        tokio::pin!(answered);
        answered.as_mut().enable();
        if !p.asking.swap(true, Ordering::SeqCst) {
            *p.asked_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(began);
            let (store, probe) = (self.store.clone(), p.clone());
            tokio::spawn(async move {
                let r = store.check_writable().await.map_err(|e| e.to_string());
                *probe.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), r));
                probe.asking.store(false, Ordering::SeqCst);
                probe.answered.notify_waiters();
            });
        }
        let fresh = || {
            p.last
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .filter(|(at, _)| *at >= began)
                .map(|(_, r)| r.clone())
        };
        if tokio::time::timeout(wait, answered).await.is_ok() {
            if let Some(r) = fresh() {
                return r;
            }
        }
        if let Some(r) = fresh() {
            return r;
        }
        let asked = p
            .asked_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed())
            .unwrap_or_default();
        Err(format!(
            "store busy: no answer to a write check for {} ms (another process may hold its lock, or the disk is stuck)",
            asked.as_millis().max(wait.as_millis())
        ))
    }

    /// Checks the store's integrity now ([`crate::store::Coordination::check_integrity`])
    /// and keeps the finding for readiness: a store found damaged makes the broker unready
    /// until a later check finds it sound (a damaged chain must not keep growing unseen).
    pub async fn check_store_integrity(&self) -> Result<(), String> {
        let r = match self.store.check_integrity().await {
            Ok(()) => Ok(()),
            Err(crate::store::StoreError::Corrupt(why)) => Err(why),
            // Busy or unavailable says nothing about integrity: readiness reports those.
            Err(e) => {
                tracing::info!(error = %e, "store integrity check could not run; will retry");
                return Ok(());
            }
        };
        if let Err(why) = &r {
            tracing::error!(reason = %why, "store failed its integrity check; not ready");
        }
        *self.integrity.lock().unwrap_or_else(|e| e.into_inner()) = r.clone().err();
        r
    }

    /// Runs [`Broker::check_store_integrity`] every `every` until `stop`.
    pub async fn run_integrity_checks(
        self: std::sync::Arc<Self>,
        every: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
            let _ = self.check_store_integrity().await;
        }
    }

    /// Runs the readiness checks. Ready means: the store can commit (no credential can be
    /// issued otherwise), every signing target has its key loaded, and every issuer has
    /// fetched keys at least once. An issuer whose keys went stale after working is
    /// reported failing but does not make the broker unready: callers of other issuers
    /// are still served, and its own callers get a clear UNAVAILABLE. Witness delivery
    /// is reported and never makes the broker unready (a hung witness must not stop Mint).
    pub async fn readiness(&self) -> Readiness {
        let store = self.store_writable(STORE_PROBE_WAIT).await;
        let store_check = match &store {
            Ok(()) => json!({"ok": true}),
            Err(e) => json!({"ok": false, "reason": e}),
        };
        let mut ready = store.is_ok();
        let integrity = self
            .integrity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let integrity_check = match &integrity {
            None => json!({"ok": true}),
            Some(why) => {
                ready = false;
                json!({"ok": false, "reason": why})
            }
        };

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
                "store_integrity": integrity_check,
                "issuers": issuers,
                "signing_keys": keys_check,
                "audit_witness": witness,
            }),
        }
    }
}
