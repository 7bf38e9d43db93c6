//! The two listeners: accept loops with a connection cap, a cap per source address and
//! a handshake deadline (the TLS handshake and, on the gRPC port, the HTTP/2 connection
//! preface must arrive within it, or the socket is closed), TLS (rustls) whose
//! certificate, key and client CA are reloaded in place (new connections get the new
//! files; open ones keep theirs), and the HTTP/1 server with header size and header read
//! time limits and a draining graceful shutdown.

use axum::extract::ConnectInfo;
use axum::Router;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

/// The HTTP/2 client connection preface (RFC 9113, section 3.4): the first bytes every
/// gRPC client sends.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest a client may take to send its request headers (HTTP port).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head on the HTTP port (request line and headers).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most header fields in one request on the HTTP port.
const MAX_HEADERS: usize = 100;
/// Longest a graceful shutdown waits for in-flight HTTP requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Why TLS files could not be used. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The files do not make a usable configuration (key does not match, ...).
    #[error("{0}")]
    Config(String),
}

fn file_err(p: &std::path::Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: p.display().to_string(),
        reason: e.to_string(),
    }
}

fn server_config(cfg: &TlsPaths, alpn: &[u8]) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert_file)
        .map_err(|e| file_err(&cfg.cert_file, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(&cfg.cert_file, e))?;
    if certs.is_empty() {
        return Err(file_err(&cfg.cert_file, "no certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file)
        .map_err(|_| file_err(&cfg.key_file, "no usable private key in the file"))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &cfg.client_ca_file {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(|e| file_err(ca, e))? {
                roots
                    .add(c.map_err(|e| file_err(ca, e))?)
                    .map_err(|e| file_err(ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| file_err(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut sc = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(format!("certificate and key: {e}")))?;
    sc.alpn_protocols = vec![alpn.to_vec()];
    Ok(sc)
}

/// The PEM files TLS is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    /// Certificate chain.
    pub cert_file: std::path::PathBuf,
    /// Private key.
    pub key_file: std::path::PathBuf,
    /// CA bundle; when set, clients must present a certificate it signed.
    pub client_ca_file: Option<std::path::PathBuf>,
}

/// TLS for both ports from one set of files, replaceable while serving.
#[derive(Debug)]
pub struct Tls {
    files: TlsPaths,
    grpc: RwLock<Arc<ServerConfig>>,
    http: RwLock<Arc<ServerConfig>>,
}

/// TLS configurations read from the files, not yet in service.
pub struct TlsFiles {
    grpc: Arc<ServerConfig>,
    http: Arc<ServerConfig>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsFiles")
    }
}

/// Which port a connection arrived on (they negotiate different protocols).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// gRPC: HTTP/2 only.
    Grpc,
    /// HTTP: HTTP/1.1.
    Http,
}

impl Tls {
    /// Loads the files. Fails when any is unreadable or they do not fit together.
    pub fn load(files: &TlsPaths) -> Result<Arc<Tls>, TlsError> {
        Ok(Arc::new(Tls {
            grpc: RwLock::new(Arc::new(server_config(files, b"h2")?)),
            http: RwLock::new(Arc::new(server_config(files, b"http/1.1")?)),
            files: files.clone(),
        }))
    }

    /// Reads the files again; on success new connections use them. On failure the
    /// configuration in service stays, and the error says why.
    pub fn reload(&self) -> Result<(), TlsError> {
        let read = self.read()?;
        self.install(read);
        Ok(())
    }

    /// Reads and checks the files without using them yet.
    pub fn read(&self) -> Result<TlsFiles, TlsError> {
        Ok(TlsFiles {
            grpc: Arc::new(server_config(&self.files, b"h2")?),
            http: Arc::new(server_config(&self.files, b"http/1.1")?),
        })
    }

    /// Puts files read by [`Tls::read`] in service for new connections.
    pub fn install(&self, files: TlsFiles) {
        *self.grpc.write().unwrap_or_else(|e| e.into_inner()) = files.grpc;
        *self.http.write().unwrap_or_else(|e| e.into_inner()) = files.http;
    }

    fn acceptor(&self, port: Port) -> TlsAcceptor {
        let l = match port {
            Port::Grpc => &self.grpc,
            Port::Http => &self.http,
        };
        TlsAcceptor::from(l.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// One accepted connection (after the TLS handshake, when TLS is on). Holds its place
/// under the connection cap until dropped.
pub struct Conn {
    io: Io,
    local: SocketAddr,
    remote: SocketAddr,
    /// Bytes read by the listener itself (the HTTP/2 preface), handed to the server
    /// before anything else is read from the socket.
    replay: Vec<u8>,
    replayed: usize,
    _permit: OwnedSemaphorePermit,
    _source: SourceSlot,
}

impl Conn {
    /// The peer's address.
    pub fn remote(&self) -> SocketAddr {
        self.remote
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.replayed < this.replay.len() {
            let rest = &this.replay[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            if this.replayed == this.replay.len() {
                this.replay = Vec::new();
                this.replayed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: Some(self.local),
            remote_addr: Some(self.remote),
        }
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|v| *v).await;
}

/// How one port admits connections (`[limits]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// Most connections open at once on the port; further ones wait in the kernel's
    /// accept queue.
    pub max_connections: usize,
    /// Most connections open at once from one source: an IPv4 address, or an IPv6 /64
    /// (one host's usual allocation). A connection past it is closed at once, so one
    /// source cannot take every slot.
    pub max_per_source: usize,
    /// Longest from accept to a usable connection: the TLS handshake and, on the gRPC
    /// port, the HTTP/2 connection preface. A socket that sends nothing is closed then.
    pub handshake_timeout: Duration,
}

pub use crate::net::source_key;

/// Open connections per source.
#[derive(Debug)]
struct Sources {
    open: Mutex<HashMap<IpAddr, usize>>,
    max: usize,
}

/// One connection's place in its source's budget; given back on drop.
struct SourceSlot {
    sources: Arc<Sources>,
    key: IpAddr,
}

impl Sources {
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let key = source_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            sources: self.clone(),
            key,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self.sources.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Why an accepted socket was closed before it reached the server (logged at debug).
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("tls handshake failed: {0}")]
    Tls(io::Error),
    #[error("no http/2 preface: {0}")]
    Preface(io::Error),
    #[error("not an http/2 connection preface")]
    NotHttp2,
}

/// Runs the handshake of one accepted socket: TLS when on, then (gRPC port) reads and
/// checks the HTTP/2 preface, keeping it to hand to the server.
async fn handshake(
    tcp: TcpStream,
    acceptor: Option<TlsAcceptor>,
    port: Port,
    local: SocketAddr,
    remote: SocketAddr,
    permit: OwnedSemaphorePermit,
    source: SourceSlot,
) -> Result<Conn, Refused> {
    let io = match acceptor {
        None => Io::Plain(tcp),
        Some(a) => Io::Tls(Box::new(a.accept(tcp).await.map_err(Refused::Tls)?)),
    };
    let mut conn = Conn {
        io,
        local,
        remote,
        replay: Vec::new(),
        replayed: 0,
        _permit: permit,
        _source: source,
    };
    if port == Port::Grpc {
        let mut preface = [0u8; 24];
        conn.read_exact(&mut preface)
            .await
            .map_err(Refused::Preface)?;
        if &preface != H2_PREFACE {
            return Err(Refused::NotHttp2);
        }
        conn.replay = preface.to_vec();
    }
    Ok(conn)
}

/// Accepts connections until `stop` under `admission`: at most `max_connections` open
/// at once, at most `max_per_source` from one source, each through its handshake
/// (concurrently, bounded by `handshake_timeout`) before the server sees it.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    port: Port,
    admission: Admission,
    mut stop: watch::Receiver<bool>,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(admission.max_connections));
    let sources = Arc::new(Sources {
        open: Mutex::new(HashMap::new()),
        max: admission.max_per_source.max(1),
    });
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = stopped(&mut stop) => return,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let (tcp, remote) = tokio::select! {
                _ = stopped(&mut stop) => return,
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: pause, keep serving.
                        tracing::warn!(error = %e, ?port, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Some(source) = sources.take(remote.ip()) else {
                // Dropping the socket closes it; the permit goes back with it.
                tracing::debug!(%remote, ?port, "connection closed: too many open from this source");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let local = tcp.local_addr().unwrap_or(remote);
            let tx = tx.clone();
            let acceptor = tls.as_ref().map(|t| t.acceptor(port));
            tokio::spawn(async move {
                let shake = handshake(tcp, acceptor, port, local, remote, permit, source);
                match tokio::time::timeout(admission.handshake_timeout, shake).await {
                    Ok(Ok(conn)) => {
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, ?port, error = %e, "connection closed"),
                    Err(_) => {
                        tracing::debug!(%remote, ?port, "connection closed: handshake timed out")
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Serves `app` over HTTP/1.1 on the accepted connections until `stop`; then stops
/// accepting, lets in-flight requests finish (bounded by the drain timeout), and
/// returns. Each request carries its peer address as `ConnectInfo<SocketAddr>`.
pub async fn serve_http(
    mut conns: ReceiverStream<io::Result<Conn>>,
    app: Router,
    mut stop: watch::Receiver<bool>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tokio_stream::StreamExt;
    use tower_service::Service;

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let conn = tokio::select! {
            _ = stopped(&mut stop) => break,
            c = conns.next() => match c {
                Some(Ok(c)) => c,
                Some(Err(_)) => continue,
                None => break,
            },
        };
        let remote = conn.remote();
        let app = app.clone();
        let svc =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(remote));
                let mut app = app.clone();
                async move { app.call(req).await }
            });
        let served = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_header_size(MAX_HEADER_BYTES)
            .max_headers(MAX_HEADERS)
            .serve_connection(TokioIo::new(conn), svc);
        let watched = graceful.watch(served);
        tokio::spawn(async move {
            if let Err(e) = watched.await {
                tracing::debug!(%remote, error = %e, "http connection ended with an error");
            }
        });
    }
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => {
            tracing::warn!("http drain timed out; closing remaining connections");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_past_its_budget_is_refused_until_one_closes() {
        let sources = Arc::new(Sources {
            open: Mutex::new(HashMap::new()),
            max: 2,
        });
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let a2: IpAddr = "2001:db8::2".parse().unwrap();
        let b: IpAddr = "192.0.2.1".parse().unwrap();
        let s1 = sources.take(a).unwrap();
        let _s2 = sources.take(a2).unwrap();
        assert!(sources.take(a).is_none(), "the /64 is full");
        assert!(
            sources.take(b).is_some(),
            "another source has its own budget"
        );
        drop(s1);
        assert!(
            sources.take(a).is_some(),
            "a closed connection gives its place back"
        );
    }
}
