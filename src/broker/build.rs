//! Wiring a broker once: its settings, the targets' minters, the reaper.

use super::*;

/// What a broker is built from (the assembling layer makes it from the configuration).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The broker's issuer URL (`iss` of what it signs).
    pub issuer_url: String,
    /// Trusted issuers of callers' tokens.
    pub issuers: Vec<IssuerConfig>,
    /// Targets.
    pub targets: Vec<TargetConfig>,
    /// The rules.
    pub policy: Policy,
    /// Lease bookkeeping.
    pub leases: LeaseConfig,
    /// Per-identity and per-source rate limits.
    pub rate: crate::ratelimit::Limits,
    /// The rotation scheduler.
    pub rotation: RotationConfig,
    /// Claims replaced in audit records.
    pub redact_claims: Vec<String>,
}

impl Broker {
    /// [`Broker::new`] with every target's minter built from the config (reading the
    /// targets' upstream secrets). Fails, naming the target, when one cannot be built.
    pub async fn build(
        cfg: &Settings,
        store: Arc<dyn Store>,
        keys: Arc<KeyRing>,
        master: Arc<MasterKey>,
        clock: SharedClock,
    ) -> Result<Broker, String> {
        let deps = crate::mint::Deps {
            issuer_url: cfg.issuer_url.clone(),
            keys: keys.clone(),
            store: store.clone(),
            master: master.clone(),
            clock: clock.clone(),
        };
        let minters = crate::mint::build_all(&cfg.targets, &deps).await?;
        Ok(Broker::new(cfg, store, keys, master, clock, minters))
    }

    /// Builds the broker from checked config, an open store, a loaded key ring, and the
    /// targets' minters ([`crate::mint::build_all`]). A target without a minter here
    /// cannot be minted for.
    pub fn new(
        cfg: &Settings,
        store: Arc<dyn Store>,
        keys: Arc<KeyRing>,
        master: Arc<MasterKey>,
        clock: SharedClock,
        mut built: HashMap<String, Arc<dyn Minter>>,
    ) -> Broker {
        let targets: HashMap<String, Target> = cfg
            .targets
            .iter()
            .filter_map(|t| {
                let minter = built.remove(&t.name)?;
                Some((
                    t.name.clone(),
                    Target {
                        cfg: t.clone(),
                        minter,
                    },
                ))
            })
            .collect();
        let reaper = Reaper::new(
            store.clone(),
            minters(&targets),
            master.clone(),
            cfg.leases.clone(),
            clock.clone(),
        );
        Broker {
            reaper,
            verifier: Verifier::new(&cfg.issuers, clock.clone()),
            policy: std::sync::RwLock::new(Arc::new(cfg.policy.clone())),
            rate_limits: crate::ratelimit::RateLimits::new(cfg.rate),
            rotation_cfg: cfg.rotation.clone(),
            targets,
            store,
            keys,
            master,
            clock,
            issuer_url: cfg.issuer_url.clone(),
            replay_limits: cfg
                .issuers
                .iter()
                .filter_map(|i| i.max_mints_per_token.map(|n| (i.name.clone(), n)))
                .collect(),
            lease_cfg: cfg.leases.clone(),
            audit: AuditParts {
                redact: cfg.redact_claims.clone(),
                ..AuditParts::default()
            },
            stopping: tokio::sync::watch::channel(false).0,
            metrics: Arc::new(crate::metrics::Metrics::new()),
            store_probe: Arc::default(),
            integrity: std::sync::Mutex::new(None),
        }
    }
}

pub(super) fn minters(targets: &HashMap<String, Target>) -> HashMap<String, Arc<dyn Minter>> {
    targets
        .iter()
        .map(|(k, t)| (k.clone(), t.minter.clone()))
        .collect()
}
