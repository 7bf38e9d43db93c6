//! Starting and stopping the whole service: store, key ring, broker, gRPC and HTTP
//! listeners, background key refresh.

use crate::audit::checkpoint::AuditStatus;
use crate::broker::checkpoint::{load_audit_signer, AuditKeyError, Checkpointer, Witness};
use crate::broker::keys::{load_key_ring, KeyLoadError};
use crate::broker::Broker;
use crate::clock::SharedClock;
use crate::config::Config;
use crate::keys::MasterKey;
use crate::store::{Store, StoreError};
use crate::transport::audit::AuditService;
use crate::transport::grpc::{BrokerService, MAX_REQUEST_BYTES};
use crate::transport::leases::LeasesService;
use crate::transport::listen::{self, Port, Tls};
use crate::transport::pb::audit_server::AuditServer;
use crate::transport::pb::credential_broker_server::CredentialBrokerServer;
use crate::transport::pb::leases_server::LeasesServer;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Why the service did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store could not be opened.
    #[error("store {path}: {source}")]
    Store {
        /// The store's location.
        path: String,
        /// Why.
        source: StoreError,
    },
    /// Signing keys could not be loaded or created.
    #[error(transparent)]
    Keys(#[from] KeyLoadError),
    /// The audit checkpoint key could not be loaded or created.
    #[error(transparent)]
    AuditKey(#[from] AuditKeyError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// TLS files could not be loaded.
    #[error("tls: {0}")]
    Tls(String),
    /// An issuer's `ca_file` cannot be used.
    #[error("issuer {issuer}: {reason}")]
    Issuer {
        /// The issuer's name.
        issuer: String,
        /// Why (names the file).
        reason: String,
    },
    /// A target's minter could not be built (an upstream secret cannot be read).
    #[error("target {target}: {reason}")]
    Target {
        /// The target.
        target: String,
        /// Why (names the secret's source, never its value).
        reason: String,
    },
    /// The embedded protobuf descriptors are broken (a build fault).
    #[error("grpc reflection: {0}")]
    Reflection(String),
}

/// Why a configuration reload was refused. The configuration in service stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The new configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Sections that cannot change while serving changed.
    #[error("{} changed; only [[rules]], [policy] and the [limits] rates reload, restart to apply the rest", .0.join(", "))]
    NeedsRestart(Vec<String>),
    /// The TLS files could not be used.
    #[error("tls: {0}")]
    Tls(#[from] crate::transport::listen::TlsError),
    /// The reload's audit record could not be committed, so nothing was applied.
    #[error("audit store unavailable; configuration not reloaded")]
    Audit,
}

/// `[limits]` keys that a reload applies.
const RELOADABLE_LIMITS: [&str; 6] = [
    "identity_rate",
    "identity_burst",
    "source_ip_rate",
    "source_ip_burst",
    "unidentified_rate",
    "unidentified_burst",
];

/// The sections (and `[limits]` keys) that differ between two raw configurations,
/// leaving out what a reload applies.
fn fixed_changes(old: &toml::Value, new: &toml::Value) -> Vec<String> {
    let empty = toml::map::Map::new();
    let (o, n) = (
        old.as_table().unwrap_or(&empty),
        new.as_table().unwrap_or(&empty),
    );
    let mut keys: Vec<&String> = o.keys().chain(n.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut changed = Vec::new();
    for k in keys {
        match k.as_str() {
            "rules" | "policy" => {}
            "limits" => {
                let strip = |v: Option<&toml::Value>| {
                    let mut t = v.and_then(|v| v.as_table()).cloned().unwrap_or_default();
                    for r in RELOADABLE_LIMITS {
                        t.remove(r);
                    }
                    t
                };
                if strip(o.get(k)) != strip(n.get(k)) {
                    changed.push(
                        "[limits] request_timeout/max_connections/handshake_timeout/body_timeout"
                            .to_string(),
                    );
                }
            }
            _ if o.get(k) != n.get(k) => changed.push(format!("[{k}]")),
            _ => {}
        }
    }
    changed
}

/// A running service.
#[derive(Debug)]
pub struct Running {
    /// Where gRPC listens.
    pub grpc_addr: SocketAddr,
    /// Where HTTP listens.
    pub http_addr: SocketAddr,
    /// The broker.
    pub broker: Arc<Broker>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    refreshers: Vec<JoinHandle<()>>,
    checkpointer: Checkpointer,
    witness: Option<Witness>,
    health_task: JoinHandle<()>,
    tls: Option<Arc<Tls>>,
}

impl Running {
    /// Stops accepting, drains in-flight requests, and waits for the listeners to close.
    /// Then signs a last audit checkpoint of everything committed and hands it to the
    /// witness (bounded by the witness timeout).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.health_task.await; // NOT_SERVING first, so balancers move away
        self.broker.stop_streams();
        for r in &self.refreshers {
            r.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        if let Err(e) = self.checkpointer.checkpoint_now().await {
            tracing::error!(error = %e, "final audit checkpoint failed");
        }
        if let Some(w) = &self.witness {
            // One try, bounded: a hung witness must not hold up shutdown either.
            let r = tokio::time::timeout(w.timeout() * 2, w.deliver_pending()).await;
            if !matches!(r, Ok(Ok(_))) {
                tracing::warn!(
                    lag = self.broker.audit_status().witness_lag(),
                    "witness did not take the final checkpoints; they stay in the store"
                );
            }
        }
    }

    /// Reloads the configuration file at `path` (SIGHUP): the TLS files are read again,
    /// and the new rules and rate limits go into force. Refused, with the old
    /// configuration still serving, when the file is invalid, when anything else changed
    /// from `applied` (the raw configuration in force), or when the TLS files are bad.
    /// Applied or refused, the reload is audited. Answers the raw configuration now in
    /// force.
    pub async fn reload(
        &self,
        path: &std::path::Path,
        applied: &toml::Value,
    ) -> Result<toml::Value, ReloadError> {
        let result = self.try_reload(path, applied);
        let mut ctx =
            std::collections::BTreeMap::from([("file".to_string(), path.display().to_string())]);
        let (ok, reason) = match &result {
            Ok((raw, cfg, _)) => {
                let rules = raw.get("rules").map(|r| r.to_string()).unwrap_or_default();
                ctx.insert(
                    "rules_sha256".into(),
                    crate::jose::sha256_hex(rules.as_bytes()),
                );
                ctx.insert("rules".into(), cfg.policy.rules().len().to_string());
                (true, "configuration reloaded".to_string())
            }
            Err(e) => (false, format!("reload refused: {e}")),
        };
        if let Err(e) = self.broker.audit_reload(ok, &reason, ctx).await {
            // Not applying what cannot be audited keeps the log the whole truth.
            tracing::error!(error = %e, "config reload not applied: its audit record could not be committed");
            return Err(ReloadError::Audit);
        }
        let (raw, cfg, tls_files) = result?;
        if let (Some(t), Some(files)) = (&self.tls, tls_files) {
            t.install(files);
        }
        self.broker.reconfigure(cfg.policy, cfg.limits.rate);
        tracing::info!(
            rules = self.broker.policy().rules().len(),
            "configuration reloaded"
        );
        Ok(raw)
    }

    /// Reads the TLS files again (new connections use them; open ones keep theirs).
    /// Nothing to do without TLS. On failure the files in service stay.
    pub fn reload_tls(&self) -> Result<(), crate::transport::listen::TlsError> {
        match &self.tls {
            Some(t) => t.reload(),
            None => Ok(()),
        }
    }

    fn try_reload(
        &self,
        path: &std::path::Path,
        applied: &toml::Value,
    ) -> Result<
        (
            toml::Value,
            Config,
            Option<crate::transport::listen::TlsFiles>,
        ),
        ReloadError,
    > {
        let text = std::fs::read_to_string(path).map_err(|e| ReloadError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let cfg = Config::parse(&text, &path.display().to_string())?;
        let raw: toml::Value = toml::from_str(&text).map_err(|e| ReloadError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let changed = fixed_changes(applied, &raw);
        if !changed.is_empty() {
            return Err(ReloadError::NeedsRestart(changed));
        }
        // Read and check the TLS files before anything is applied; `reload` installs them.
        let tls_files = self.tls.as_ref().map(|t| t.read()).transpose()?;
        Ok((raw, cfg, tls_files))
    }

    /// Waits until the listeners stop on their own (they do not, unless shut down).
    pub async fn wait(&mut self) {
        for t in self.tasks.iter_mut() {
            let _ = t.await;
        }
    }
}

/// Opens the store, loads keys, binds both listeners and serves. Fails before serving
/// anything when any part cannot be set up.
pub async fn start(
    cfg: &Config,
    master: &MasterKey,
    clock: SharedClock,
) -> Result<Running, StartError> {
    let store = crate::store::backend::open(
        &cfg.store.location,
        &crate::store::backend::OpenOptions {
            busy_timeout: cfg.store.busy_timeout,
        },
    )
    .map_err(|source| StartError::Store {
        path: cfg.store.location.to_string(),
        source,
    })?;
    start_with_store(cfg, store, master, clock).await
}

/// [`start`] on a store the caller opened (another backend, or a store the caller keeps
/// a handle on). Fails like [`start`].
pub async fn start_with_store(
    cfg: &Config,
    store: Arc<dyn Store>,
    master: &MasterKey,
    clock: SharedClock,
) -> Result<Running, StartError> {
    start_with_minters(cfg, store, master, clock, Vec::new()).await
}

/// [`start_with_store`] with the minters of some targets replaced (a fake upstream in
/// tests, a minter of the embedder's own). Fails like [`start`].
pub async fn start_with_minters(
    cfg: &Config,
    store: Arc<dyn Store>,
    master: &MasterKey,
    clock: SharedClock,
    minters: Vec<(String, Arc<dyn crate::mint::Minter>)>,
) -> Result<Running, StartError> {
    let wanted: Vec<_> = cfg
        .targets
        .iter()
        .filter_map(|t| t.kind.signing_alg().map(|a| (t.name.clone(), a)))
        .collect();
    let keys = Arc::new(load_key_ring(store.as_ref(), master, &wanted, &clock).await?);
    keys.set_private_targets(
        cfg.targets
            .iter()
            .filter(|t| t.own_issuer)
            .map(|t| t.name.clone())
            .collect(),
    );
    let signer = Arc::new(load_audit_signer(store.as_ref(), master, &clock).await?);
    let status = Arc::new(AuditStatus::default());
    let checkpointer = Checkpointer::new(
        store.clone(),
        signer.clone(),
        clock.clone(),
        cfg.audit.clone(),
        status.clone(),
    );
    let master = Arc::new(master.duplicate());
    let deps = crate::mint::Deps {
        issuer_url: cfg.server.issuer_url.clone(),
        keys: keys.clone(),
        store: store.clone(),
        master: master.clone(),
        clock: clock.clone(),
    };
    for i in &cfg.issuers {
        crate::identity::issuer_http_client(i).map_err(|reason| StartError::Issuer {
            issuer: i.name.clone(),
            reason,
        })?;
    }
    let mut built = HashMap::new();
    for t in &cfg.targets {
        if let Some((_, m)) = minters.iter().find(|(n, _)| *n == t.name) {
            built.insert(t.name.clone(), m.clone());
            continue;
        }
        let m = crate::mint::build(t, &deps)
            .await
            .map_err(|reason| StartError::Target {
                target: t.name.clone(),
                reason,
            })?;
        built.insert(t.name.clone(), m);
    }
    let broker = Broker::new(
        &cfg.broker_settings(),
        store.clone(),
        keys,
        master,
        clock,
        built,
    )
    .with_audit(signer.keys().clone(), status.clone());
    let broker = Arc::new(broker);
    store.attach_metrics(broker.metrics().store.clone());

    let grpc_listener = bind(cfg.server.grpc_addr).await?;
    let http_listener = bind(cfg.server.http_addr).await?;
    let grpc_addr = grpc_listener.local_addr().map_err(|e| StartError::Bind {
        addr: cfg.server.grpc_addr,
        reason: e.to_string(),
    })?;
    let http_addr = http_listener.local_addr().map_err(|e| StartError::Bind {
        addr: cfg.server.http_addr,
        reason: e.to_string(),
    })?;

    let (stop, stopped) = watch::channel(false);
    let tls = match &cfg.server.tls {
        Some(files) => Some(
            Tls::load(&listen::TlsPaths {
                cert_file: files.cert_file.clone(),
                key_file: files.key_file.clone(),
                client_ca_file: files.client_ca_file.clone(),
            })
            .map_err(|e| StartError::Tls(e.to_string()))?,
        ),
        None => None,
    };
    let limiter = broker.clone();
    let mut builder = tonic::transport::Server::builder()
        .timeout(cfg.limits.request_timeout)
        .concurrency_limit_per_connection(256)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        // Headers up to 64 KiB reach the handler, so a token over the 16 KiB limit gets a
        // clean UNAUTHENTICATED instead of a bare HTTP 431; larger ones are still cut off.
        .http2_max_header_list_size(Some(64 * 1024))
        // Outermost: the client address (behind trusted proxies, the forwarded one) for
        // everything inside, the source checks and the broker.
        .layer(crate::transport::SourceLayer::new(
            cfg.limits.trusted_proxies.clone(),
        ))
        .layer(tonic::service::InterceptorLayer::new(
            move |req: tonic::Request<()>| {
                let peer = match req.extensions().get::<crate::net::ClientAddr>() {
                    Some(c) => c.0,
                    None => match req.remote_addr() {
                        Some(a) => a.ip(),
                        None => return Ok(req),
                    },
                };
                let limits = limiter.rate_limits();
                let checked = limits
                    .check_source(peer)
                    .map_err(|e| (e, "source_ip"))
                    .and_then(|()| {
                        limits
                            .check_unidentified(peer)
                            .map_err(|e| (e, "unidentified"))
                    });
                match checked {
                    Ok(()) => Ok(req),
                    Err((e, scope)) => {
                        limiter
                            .metrics()
                            .rate_limited
                            .get_or_create(&crate::metrics::LimitScope { scope })
                            .inc();
                        let mut st = tonic::Status::resource_exhausted(format!(
                            "rate limit exceeded for this address; retry in {}s",
                            e.retry_after_secs()
                        ));
                        if let Ok(v) = e.retry_after_secs().to_string().parse() {
                            st.metadata_mut().insert("retry-after", v);
                        }
                        Err(st)
                    }
                }
            },
        ));
    let service = CredentialBrokerServer::new(BrokerService::new(broker.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let leases = LeasesServer::new(LeasesService::new(broker.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let audit = AuditServer::new(AuditService::new(broker.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let rotation = crate::transport::pb::rotation_server::RotationServer::new(
        crate::transport::rotation::RotationService::new(broker.clone()),
    )
    .max_decoding_message_size(MAX_REQUEST_BYTES);
    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = |b: tonic_reflection::server::Builder<'static>| {
        b.register_encoded_file_descriptor_set(crate::transport::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection(tonic_reflection::server::Builder::configure())
        .build_v1()
        .map_err(|e| StartError::Reflection(e.to_string()))?;
    let reflection_v1alpha = reflection(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .map_err(|e| StartError::Reflection(e.to_string()))?;
    let router = builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .add_service(leases)
        .add_service(audit)
        .add_service(rotation);
    let admission = listen::Admission {
        max_connections: cfg.limits.max_connections,
        max_per_source: cfg.limits.max_connections_per_source,
        handshake_timeout: cfg.limits.handshake_timeout,
    };
    let grpc_conns = listen::incoming(
        grpc_listener,
        tls.clone(),
        Port::Grpc,
        admission,
        stopped.clone(),
    );
    let mut s1 = stopped.clone();
    let grpc_task = tokio::spawn(async move {
        if let Err(e) = router
            .serve_with_incoming_shutdown(grpc_conns, async move {
                let _ = s1.wait_for(|v| *v).await;
            })
            .await
        {
            tracing::error!(error = %e, "grpc server stopped");
        }
    });
    let app = crate::transport::http::router(
        broker.clone(),
        cfg.limits.request_timeout,
        cfg.limits.body_timeout,
        cfg.limits.trusted_proxies.clone(),
    );
    let http_conns = listen::incoming(
        http_listener,
        tls.clone(),
        Port::Http,
        admission,
        stopped.clone(),
    );
    let http_task = tokio::spawn(listen::serve_http(http_conns, app, stopped));
    let mut refreshers = broker.verifier().spawn_refreshers();
    if cfg.rotation.scheduler {
        refreshers.push(tokio::spawn(run_scheduler(
            broker.clone(),
            cfg.rotation.check_interval,
            stop.subscribe(),
        )));
    }
    let forgetter = broker.clone();
    refreshers.push(tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            forgetter.rate_limits().forget_idle();
        }
    }));
    // Every service is known from the start (NOT_SERVING until the first check passes),
    // so a probe never sees NOT_FOUND for a service that is merely starting.
    for n in HEALTH_SERVICES {
        health
            .set_service_status(n, tonic_health::ServingStatus::NotServing)
            .await;
    }
    let health_task = tokio::spawn(report_health(broker.clone(), health, stop.subscribe()));
    refreshers.push(tokio::spawn(
        broker
            .reaper()
            .clone()
            .run(cfg.leases.reap_interval, stop.subscribe()),
    ));
    refreshers.push(tokio::spawn(checkpointer.clone().run(stop.subscribe())));
    if !cfg.store.integrity_check_interval.is_zero() {
        refreshers.push(tokio::spawn(broker.clone().run_integrity_checks(
            cfg.store.integrity_check_interval,
            stop.subscribe(),
        )));
    }
    let witness = cfg.audit.witness.clone().map(|target| {
        let w = Witness::new(
            store.clone(),
            target,
            cfg.audit.witness_timeout,
            status.clone(),
        );
        refreshers.push(tokio::spawn(
            w.clone().run(checkpointer.subscribe(), stop.subscribe()),
        ));
        w
    });
    tracing::info!(%grpc_addr, %http_addr, issuer = %broker.issuer_url(), "latchkey serving");
    Ok(Running {
        grpc_addr,
        http_addr,
        broker,
        stop,
        tasks: vec![grpc_task, http_task],
        refreshers,
        checkpointer,
        witness,
        health_task,
        tls,
    })
}

/// Keeps `grpc.health.v1` in step with readiness: the overall status (`""`) and each
/// Latchkey service are SERVING when ready, NOT_SERVING when not and once shutdown begins.
async fn report_health(
    broker: Arc<Broker>,
    health: tonic_health::server::HealthReporter,
    mut stop: watch::Receiver<bool>,
) {
    use tonic_health::ServingStatus;
    let names = HEALTH_SERVICES;
    let mut was_ready = None;
    let mut was_ready_once = false;
    loop {
        let r = broker.readiness().await;
        if was_ready != Some(r.ready) {
            // Logged on change only: an outage is one line, not one every interval.
            if r.ready {
                tracing::info!("ready");
            } else {
                tracing::warn!(checks = %r.checks, "not ready");
            }
            was_ready = Some(r.ready);
        }
        let status = if r.ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for n in names {
            health.set_service_status(n, status).await;
        }
        // Until the first time it is ready (issuer keys being fetched at start), look
        // again soon: a probe sees SERVING as soon as Mint works, not an interval later.
        let wait = if was_ready_once {
            HEALTH_INTERVAL
        } else {
            HEALTH_INTERVAL.min(STARTUP_HEALTH_INTERVAL)
        };
        was_ready_once |= r.ready;
        tokio::select! {
            _ = stop.wait_for(|v| *v) => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    for n in names {
        health
            .set_service_status(n, ServingStatus::NotServing)
            .await;
    }
}

/// The in-process rotation scheduler: every `interval`, the same run a cron's `RunDue`
/// makes, under the same lock.
async fn run_scheduler(broker: Arc<Broker>, interval: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        let id = crate::clock::new_id();
        if let Err(e) = broker
            .run_due(crate::broker::RotationCaller::Scheduler, &id)
            .await
        {
            tracing::warn!(error = %e, "scheduled rotation run did not run");
        }
        tokio::select! {
            _ = stop.wait_for(|v| *v) => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// The services `grpc.health.v1` reports on (`""` is the server as a whole).
const HEALTH_SERVICES: [&str; 5] = [
    "",
    "latchkey.v1.CredentialBroker",
    "latchkey.v1.Leases",
    "latchkey.v1.Audit",
    "latchkey.v1.Rotation",
];

/// How often the gRPC health status is recomputed.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// How often readiness is checked while the broker has not yet been ready.
const STARTUP_HEALTH_INTERVAL: Duration = Duration::from_millis(100);

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, StartError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| StartError::Bind {
            addr,
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_rules_and_limit_rates_change_without_a_restart() {
        let old: toml::Value = toml::from_str(
            "[server]\ngrpc_addr = \"a\"\n[limits]\nidentity_rate = 1.0\n[[rules]]\nname = \"a\"\n",
        )
        .unwrap();
        let same_but_rules: toml::Value = toml::from_str(
            "[server]\ngrpc_addr = \"a\"\n[limits]\nidentity_rate = 9.0\nsource_ip_burst = 3\n[[rules]]\nname = \"b\"\n",
        )
        .unwrap();
        assert!(fixed_changes(&old, &same_but_rules).is_empty());
        let moved: toml::Value = toml::from_str(
            "[server]\ngrpc_addr = \"b\"\n[limits]\nrequest_timeout = \"5s\"\n[[issuers]]\nname = \"x\"\n",
        )
        .unwrap();
        assert_eq!(
            fixed_changes(&old, &moved),
            vec![
                "[issuers]".to_string(),
                "[limits] request_timeout/max_connections/handshake_timeout/body_timeout"
                    .to_string(),
                "[server]".to_string()
            ]
        );
    }
}
