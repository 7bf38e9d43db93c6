//! Starting and stopping the whole service: store, key ring, broker, gRPC and HTTP
//! listeners, background key refresh.

use crate::audit::checkpoint::{AuditKeyError, AuditSigner, AuditStatus, Checkpointer, Witness};
use crate::broker::Broker;
use crate::clock::SharedClock;
use crate::config::{Config, TargetKind};
use crate::keys::{KeyError, KeyRing, MasterKey};
use crate::store::sqlite::{self, SqliteStore};
use crate::store::{Store, StoreError};
use crate::transport::audit::AuditService;
use crate::transport::grpc::{BrokerService, MAX_REQUEST_BYTES};
use crate::transport::leases::LeasesService;
use crate::transport::pb::audit_server::AuditServer;
use crate::transport::pb::credential_broker_server::CredentialBrokerServer;
use crate::transport::pb::leases_server::LeasesServer;
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
        /// The database file.
        path: String,
        /// Why.
        source: StoreError,
    },
    /// Signing keys could not be loaded or created.
    #[error(transparent)]
    Keys(#[from] KeyError),
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
}

impl Running {
    /// Stops accepting, drains in-flight requests, and waits for the listeners to close.
    /// Then signs a last audit checkpoint of everything committed and hands it to the
    /// witness (bounded by the witness timeout).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
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
    let store = SqliteStore::open(&sqlite::Config {
        path: cfg.store.path.clone(),
        busy_timeout: cfg.store.busy_timeout,
    })
    .map_err(|source| StartError::Store {
        path: cfg.store.path.display().to_string(),
        source,
    })?;
    start_with_store(cfg, Arc::new(store), master, clock).await
}

/// [`start`] on a store the caller opened (another backend, or a store the caller keeps
/// a handle on). Fails like [`start`].
pub async fn start_with_store(
    cfg: &Config,
    store: Arc<dyn Store>,
    master: &MasterKey,
    clock: SharedClock,
) -> Result<Running, StartError> {
    let wanted: Vec<_> = cfg
        .targets
        .iter()
        .map(|t| match &t.kind {
            TargetKind::Jwt(j) => (t.name.clone(), j.algorithm),
        })
        .collect();
    let keys = Arc::new(KeyRing::load(store.as_ref(), master, &wanted, &clock).await?);
    let signer = Arc::new(AuditSigner::load(store.as_ref(), master, &clock).await?);
    let status = Arc::new(AuditStatus::default());
    let checkpointer = Checkpointer::new(
        store.clone(),
        signer.clone(),
        clock.clone(),
        cfg.audit.clone(),
        status.clone(),
    );
    let broker = Arc::new(
        Broker::new(
            cfg,
            store.clone(),
            keys,
            Arc::new(master.duplicate()),
            clock,
        )
        .with_audit(signer.keys().clone(), status.clone()),
    );

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
    let mut builder = tonic::transport::Server::builder()
        .timeout(Duration::from_secs(30))
        .concurrency_limit_per_connection(256)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        // Headers up to 64 KiB reach the handler, so a token over the 16 KiB limit gets a
        // clean UNAUTHENTICATED instead of a bare HTTP 431; larger ones are still cut off.
        .http2_max_header_list_size(Some(64 * 1024));
    if let Some(tls) = &cfg.server.tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| StartError::Tls(format!("{}: {e}", p.display())))
        };
        let mut t = tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(read(&tls.cert_file)?, read(&tls.key_file)?),
        );
        if let Some(ca) = &tls.client_ca_file {
            t = t.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        builder = builder
            .tls_config(t)
            .map_err(|e| StartError::Tls(e.to_string()))?;
    }
    let service = CredentialBrokerServer::new(BrokerService::new(broker.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let leases = LeasesServer::new(LeasesService::new(broker.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let audit = AuditServer::new(AuditService::new(broker.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let router = builder
        .add_service(service)
        .add_service(leases)
        .add_service(audit);
    let mut s1 = stopped.clone();
    let grpc_task = tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc_listener);
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = s1.wait_for(|v| *v).await;
            })
            .await
        {
            tracing::error!(error = %e, "grpc server stopped");
        }
    });
    let app = crate::transport::http::router(broker.clone());
    let mut s2 = stopped;
    let http_task = tokio::spawn(async move {
        if let Err(e) = axum::serve(http_listener, app)
            .with_graceful_shutdown(async move {
                let _ = s2.wait_for(|v| *v).await;
            })
            .await
        {
            tracing::error!(error = %e, "http server stopped");
        }
    });
    let mut refreshers = broker.verifier().spawn_refreshers();
    refreshers.push(tokio::spawn(
        broker
            .reaper()
            .clone()
            .run(cfg.leases.reap_interval, stop.subscribe()),
    ));
    refreshers.push(tokio::spawn(checkpointer.clone().run(stop.subscribe())));
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
    })
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, StartError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| StartError::Bind {
            addr,
            reason: e.to_string(),
        })
}
