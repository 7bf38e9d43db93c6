//! Prometheus metrics (OpenMetrics text at `GET /metrics`), with `prometheus-client`:
//! one registry per broker, no global state, so every test server has its own.
//!
//! Counted where things happen (mints, denials, stage latencies, audit commits, rate
//! limits); read at scrape time where the source of truth already lives elsewhere
//! (JWKS state per issuer, live leases per target, audit head and witness lag).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Duration;

/// Labels naming a target and an outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetOutcome {
    /// Target name (empty when the request named none).
    pub target: String,
    /// `allowed`, `denied` or `error`.
    pub outcome: String,
}

/// A single `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// A stable error code (`no_rule`, `expired`, ...).
    pub reason: String,
}

/// A single `stage` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Stage {
    /// `verify`, `decide`, `mint`, `audit_commit` or `total`.
    pub stage: &'static str,
}

/// A single `issuer` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuerLabel {
    /// Configured issuer name.
    pub issuer: String,
}

/// A single `target` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabel {
    /// Target name.
    pub target: String,
}

/// Labels naming a rotatable item and an outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ItemOutcome {
    /// `signing-key:<target>` or `root:<target>`.
    pub item: String,
    /// `rotated`, `deferred`, `failed` (`not_due` is not counted).
    pub outcome: String,
}

/// A single `item` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ItemLabel {
    /// `signing-key:<target>` or `root:<target>`.
    pub item: String,
}

/// A single `scope` label for rate limits.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitScope {
    /// `identity`, `source_ip` or `unidentified`.
    pub scope: &'static str,
}

/// What the store's writer reports: shared handles, cheap to clone.
#[derive(Clone, Debug)]
pub struct StoreMetrics {
    /// Writes per group commit.
    pub batch_size: Histogram,
    /// Time to commit one batch (transaction and fsync).
    pub commit_seconds: Histogram,
}

/// Every metric of one broker.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Mint decisions by target and outcome.
    pub mints: Family<TargetOutcome, Counter>,
    /// Refusals and failures by reason, every action.
    pub denials: Family<Reason, Counter>,
    /// Mint latency per stage.
    pub stages: Family<Stage, Histogram, fn() -> Histogram>,
    /// Requests refused by a rate limit.
    pub rate_limited: Family<LimitScope, Counter>,
    /// The store's writer.
    pub store: StoreMetrics,
    jwks_refreshes: Family<IssuerLabel, Counter>,
    jwks_failures: Family<IssuerLabel, Counter>,
    jwks_keys: Family<IssuerLabel, Gauge>,
    jwks_age: Family<IssuerLabel, Gauge>,
    live_leases: Family<TargetLabel, Gauge>,
    rotations: Family<ItemOutcome, Counter>,
    rotation_due: Family<ItemLabel, Gauge>,
    key_age: Family<TargetLabel, Gauge>,
    audit_head: Gauge,
    witness_lag: Gauge,
    store_answered: Gauge,
    /// Serialises scrape-time updates (counters are advanced to their source's value).
    scrape: Mutex<()>,
}

fn latency() -> Histogram {
    // 100 µs .. ~3.3 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// What a scrape reads from elsewhere.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Per issuer: successful and failed JWKS fetches, keys held, age of the held set.
    pub issuers: Vec<(String, u64, u64, usize, Option<i64>)>,
    /// Live leases per target (every configured target, zero included).
    pub live_leases: Vec<(String, u64)>,
    /// Last audit sequence number committed.
    pub audit_head: i64,
    /// Checkpoints the witness has not yet taken.
    pub witness_lag: i64,
    /// Per scheduled item: seconds until it is next due (0 when due).
    pub rotation_due: Vec<(String, i64)>,
    /// Per signing target: seconds since its current key started signing.
    pub key_age: Vec<(String, i64)>,
    /// Whether the store answered this scrape's reads in time.
    pub store_answered: bool,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("latchkey");
        let mints = Family::<TargetOutcome, Counter>::default();
        registry.register(
            "mints",
            "Mint decisions by target and outcome",
            mints.clone(),
        );
        let denials = Family::<Reason, Counter>::default();
        registry.register(
            "denials",
            "Refused or failed requests by reason code, every action",
            denials.clone(),
        );
        let stages = Family::<Stage, Histogram, fn() -> Histogram>::new_with_constructor(latency);
        registry.register(
            "mint_stage_duration_seconds",
            "Mint latency per stage: verify, decide, mint, audit_commit, total",
            stages.clone(),
        );
        let rate_limited = Family::<LimitScope, Counter>::default();
        registry.register(
            "rate_limited",
            "Requests refused by a rate limit, by scope",
            rate_limited.clone(),
        );
        let store = StoreMetrics {
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            commit_seconds: latency(),
        };
        registry.register(
            "audit_batch_size",
            "Writes per group commit of the audit store",
            store.batch_size.clone(),
        );
        registry.register(
            "audit_commit_duration_seconds",
            "Time to commit one batch to the audit store",
            store.commit_seconds.clone(),
        );
        let jwks_refreshes = Family::<IssuerLabel, Counter>::default();
        registry.register(
            "jwks_refreshes",
            "Successful JWKS fetches per issuer",
            jwks_refreshes.clone(),
        );
        let jwks_failures = Family::<IssuerLabel, Counter>::default();
        registry.register(
            "jwks_refresh_failures",
            "Failed JWKS fetches per issuer",
            jwks_failures.clone(),
        );
        let jwks_keys = Family::<IssuerLabel, Gauge>::default();
        registry.register(
            "jwks_keys",
            "Usable keys held per issuer",
            jwks_keys.clone(),
        );
        let jwks_age = Family::<IssuerLabel, Gauge>::default();
        registry.register_with_unit(
            "jwks_key_set_age",
            "Age of the key set held per issuer (-1 before the first fetch)",
            prometheus_client::registry::Unit::Seconds,
            jwks_age.clone(),
        );
        let live_leases = Family::<TargetLabel, Gauge>::default();
        registry.register("live_leases", "Live leases per target", live_leases.clone());
        let rotations = Family::<ItemOutcome, Counter>::default();
        registry.register(
            "rotations",
            "Rotation attempts by item and outcome (rotated, deferred, failed)",
            rotations.clone(),
        );
        let rotation_due = Family::<ItemLabel, Gauge>::default();
        registry.register_with_unit(
            "rotation_next_due",
            "Time until each scheduled item is next due to rotate (0 when due)",
            prometheus_client::registry::Unit::Seconds,
            rotation_due.clone(),
        );
        let key_age = Family::<TargetLabel, Gauge>::default();
        registry.register_with_unit(
            "signing_key_age",
            "Time since each target's current signing key started signing",
            prometheus_client::registry::Unit::Seconds,
            key_age.clone(),
        );
        let audit_head = Gauge::default();
        registry.register(
            "audit_head_seq",
            "Sequence number of the last committed audit record",
            audit_head.clone(),
        );
        let witness_lag = Gauge::default();
        registry.register(
            "audit_witness_lag",
            "Audit checkpoints not yet taken by the witness",
            witness_lag.clone(),
        );
        let store_answered = Gauge::default();
        registry.register(
            "store_answered",
            "1 when the store answered this scrape's reads in time (live leases, rotation schedule), 0 when they were left out",
            store_answered.clone(),
        );
        Metrics {
            registry,
            mints,
            denials,
            stages,
            rate_limited,
            store,
            jwks_refreshes,
            jwks_failures,
            jwks_keys,
            jwks_age,
            live_leases,
            rotations,
            rotation_due,
            key_age,
            audit_head,
            witness_lag,
            store_answered,
            scrape: Mutex::new(()),
        }
    }

    /// Records how long a mint stage took.
    pub fn stage(&self, stage: &'static str, d: Duration) {
        self.stages
            .get_or_create(&Stage { stage })
            .observe(d.as_secs_f64());
    }

    /// Records a refusal or failure by its stable code.
    pub fn denied(&self, reason: &str) {
        self.denials
            .get_or_create(&Reason {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Records a mint decision.
    pub fn mint(&self, target: &str, outcome: &str) {
        self.mints
            .get_or_create(&TargetOutcome {
                target: target.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Records a rotation attempt (`not_due` is not one).
    pub fn rotation(&self, item: &str, outcome: &str) {
        if outcome != "not_due" {
            self.rotations
                .get_or_create(&ItemOutcome {
                    item: item.to_string(),
                    outcome: outcome.to_string(),
                })
                .inc();
        }
    }

    /// The exposition text after applying `snap`.
    pub fn render(&self, snap: &Snapshot) -> String {
        let _serial = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        for (issuer, fetches, failures, keys, age) in &snap.issuers {
            let l = IssuerLabel {
                issuer: issuer.clone(),
            };
            advance(&self.jwks_refreshes.get_or_create(&l), *fetches);
            advance(&self.jwks_failures.get_or_create(&l), *failures);
            self.jwks_keys.get_or_create(&l).set(*keys as i64);
            self.jwks_age.get_or_create(&l).set(age.unwrap_or(-1));
        }
        for (target, n) in &snap.live_leases {
            self.live_leases
                .get_or_create(&TargetLabel {
                    target: target.clone(),
                })
                .set(*n as i64);
        }
        for (item, secs) in &snap.rotation_due {
            self.rotation_due
                .get_or_create(&ItemLabel { item: item.clone() })
                .set(*secs);
        }
        for (target, secs) in &snap.key_age {
            self.key_age
                .get_or_create(&TargetLabel {
                    target: target.clone(),
                })
                .set(*secs);
        }
        self.audit_head.set(snap.audit_head);
        self.witness_lag.set(snap.witness_lag);
        self.store_answered.set(i64::from(snap.store_answered));
        let mut out = String::new();
        // Writing to a String does not fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Moves a counter up to `to` (its source counts; the counter mirrors it).
fn advance(c: &Counter<u64, AtomicU64>, to: u64) {
    let now = c.get();
    if to > now {
        c.inc_by(to - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_openmetrics_with_what_was_recorded() {
        let m = Metrics::new();
        m.mint("orders", "allowed");
        m.mint("orders", "allowed");
        m.denied("no_rule");
        m.stage("verify", Duration::from_millis(2));
        m.store.batch_size.observe(3.0);
        m.rotation("signing-key:orders", "rotated");
        m.rotation("signing-key:orders", "not_due");
        let text = m.render(&Snapshot {
            issuers: vec![("bb".into(), 4, 1, 2, Some(30))],
            live_leases: vec![("orders".into(), 7)],
            audit_head: 42,
            witness_lag: 1,
            rotation_due: vec![("signing-key:orders".into(), 3600)],
            key_age: vec![("orders".into(), 60)],
            store_answered: true,
        });
        for want in [
            "latchkey_mints_total{target=\"orders\",outcome=\"allowed\"} 2",
            "latchkey_denials_total{reason=\"no_rule\"} 1",
            "latchkey_rotations_total{item=\"signing-key:orders\",outcome=\"rotated\"} 1",
            "latchkey_mint_stage_duration_seconds_count{stage=\"verify\"} 1",
            "latchkey_audit_batch_size_count 1",
            "latchkey_jwks_refreshes_total{issuer=\"bb\"} 4",
            "latchkey_jwks_refresh_failures_total{issuer=\"bb\"} 1",
            "latchkey_jwks_key_set_age_seconds{issuer=\"bb\"} 30",
            "latchkey_live_leases{target=\"orders\"} 7",
            "latchkey_audit_head_seq 42",
            "latchkey_rotation_next_due_seconds{item=\"signing-key:orders\"} 3600",
            "latchkey_signing_key_age_seconds{target=\"orders\"} 60",
            "# EOF",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        // A second scrape with the same source values does not count twice.
        let again = m.render(&Snapshot {
            issuers: vec![("bb".into(), 4, 1, 2, Some(31))],
            ..Snapshot::default()
        });
        assert!(again.contains("latchkey_jwks_refreshes_total{issuer=\"bb\"} 4"));
    }
}
