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
    channel(server, ca_file)
        .await
        .map(CredentialBrokerClient::new)
}

/// A channel to `server`, for any of the broker's services.
pub async fn channel(server: &str, ca_file: Option<&Path>) -> Result<Channel, String> {
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
    ep.connect()
        .await
        .map_err(|e| format!("cannot connect to {server}: {e}"))
}

/// A request carrying the lease secret's proof or the identity token, whichever the
/// caller has: the lease secret when set, else the token (an error if neither).
pub fn lease_proof(
    token: &super::TokenArgs,
    secret_env: &str,
) -> Result<(Option<SecretString>, Option<SecretString>), String> {
    let secret = std::env::var(secret_env)
        .ok()
        .map(|s| crate::secret::Secret::new(s.trim().to_string()))
        .filter(|s| !s.expose().is_empty());
    if secret.is_some() {
        return Ok((token.read().ok(), secret));
    }
    token
        .read()
        .map(|t| (Some(t), None))
        .map_err(|e| format!("{e}; or set {secret_env} to the lease secret from mint"))
}

/// A request with `authorization` set when there is a token.
pub fn maybe_authorized<T>(
    msg: T,
    token: Option<&SecretString>,
) -> Result<tonic::Request<T>, String> {
    match token {
        Some(t) => authorized(msg, t),
        None => Ok(tonic::Request::new(msg)),
    }
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
