//! Connecting to a broker over gRPC, with the caller's token on every call.

use crate::secret::SecretString;
use crate::transport::pb::credential_broker_client::CredentialBrokerClient;
use std::path::Path;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Connects to `server` (`http://` or `https://`), trusting `ca_file` in addition to the
/// system roots. Fails with a printable reason.
pub async fn connect(
    server: &str,
    ca_file: Option<&Path>,
) -> Result<CredentialBrokerClient<Channel>, String> {
    let mut ep = Endpoint::from_shared(server.to_string())
        .map_err(|_| format!("--server {server:?} is not a URL"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    if server.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_native_roots();
        if let Some(ca) = ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| format!("cannot read {}: {}", ca.display(), e.kind()))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        ep = ep.tls_config(tls).map_err(|e| format!("tls: {e}"))?;
    }
    let ch = ep
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {server}: {e}"))?;
    Ok(CredentialBrokerClient::new(ch))
}

/// A request carrying `authorization: Bearer <token>`.
pub fn authorized<T>(msg: T, token: &SecretString) -> Result<tonic::Request<T>, String> {
    let mut req = tonic::Request::new(msg);
    let v = format!("Bearer {}", token.expose())
        .parse()
        .map_err(|_| "identity token contains characters not allowed in a header".to_string())?;
    req.metadata_mut().insert("authorization", v);
    Ok(req)
}

/// A status as one line for the terminal.
pub fn status_line(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}
