//! TLS to PostgreSQL servers (the `postgres` target's admin connection, and any other
//! PostgreSQL connection the broker makes): libpq's `sslmode` over rustls.
//!
//! - `disable`: plaintext.
//! - `prefer`: TLS when the server offers it, without checking its certificate; else
//!   plaintext (a man in the middle only has to refuse TLS).
//! - `require`: TLS, without checking the certificate.
//! - `verify-ca`: TLS, the certificate chains to a trusted CA (`ca_file`, else the
//!   system's roots); any host name.
//! - `verify-full`: `verify-ca`, and the certificate names the host connected to.
//!
//! Whoever picks the mode picks what a network attacker can do; configuration refuses
//! the plaintext-capable modes for hosts other than this machine unless allowed
//! explicitly ([`SslMode::refusal`]).

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::Path;
use std::sync::Arc;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plaintext.
    Disable,
    /// TLS if offered, unchecked; else plaintext.
    Prefer,
    /// TLS, certificate unchecked.
    Require,
    /// TLS, certificate chains to a trusted CA.
    VerifyCa,
    /// TLS, certificate chains to a trusted CA and names the host.
    VerifyFull,
}

impl SslMode {
    /// Parses libpq's name.
    pub fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// libpq's name.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// The mode when none is configured: `verify-full`, except for a server on this
    /// machine (a loopback address, `localhost`, a Unix socket), where `prefer`.
    pub fn default_for(local: bool) -> SslMode {
        if local {
            SslMode::Prefer
        } else {
            SslMode::VerifyFull
        }
    }

    /// Why this mode is refused for a server elsewhere: plaintext is possible
    /// (`disable`, `prefer`) and `allow_plaintext` is not set. `None` when it is fine.
    pub fn refusal(self, local: bool, allow_plaintext: bool) -> Option<String> {
        let plaintext = matches!(self, SslMode::Disable | SslMode::Prefer);
        (plaintext && !local && !allow_plaintext).then(|| {
            format!(
                "sslmode {} may send the admin login in plaintext to a server on another machine; use verify-full (the default), or set allow_plaintext = true if the network is trusted",
                self.as_str()
            )
        })
    }
}

/// Whether a PostgreSQL URL's hosts are all on this machine (loopback, `localhost`, a
/// Unix socket directory).
pub fn is_local(cfg: &tokio_postgres::Config) -> bool {
    use tokio_postgres::config::Host;
    !cfg.get_hosts().is_empty()
        && cfg.get_hosts().iter().all(|h| match h {
            Host::Tcp(name) => crate::net::is_loopback_host(name),
            Host::Unix(_) => true,
        })
}

/// A connector for one mode: give it to `tokio_postgres::Config::connect` after
/// [`PgTls::apply`].
#[derive(Clone)]
pub struct PgTls {
    mode: SslMode,
    connect: tokio_postgres_rustls::MakeRustlsConnect,
}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTls").field("mode", &self.mode).finish()
    }
}

impl PgTls {
    /// The connector for `mode`, trusting `ca_file` (PEM) or, without one, the system's
    /// roots. Fails, naming the file, when it cannot be read or holds no certificate.
    pub fn new(mode: SslMode, ca_file: Option<&Path>) -> Result<PgTls, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?;
        let config = match mode {
            SslMode::VerifyFull => builder
                .with_root_certificates(roots(ca_file)?)
                .with_no_client_auth(),
            SslMode::VerifyCa => {
                let inner = WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots(ca_file)?),
                    provider,
                )
                .build()
                .map_err(|e| format!("TLS: {e}"))?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AnyName(inner)))
                    .with_no_client_auth()
            }
            SslMode::Disable | SslMode::Prefer | SslMode::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unchecked(provider)))
                .with_no_client_auth(),
        };
        Ok(PgTls {
            mode,
            connect: tokio_postgres_rustls::MakeRustlsConnect::new(config),
        })
    }

    /// The mode.
    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// Sets the connection's TLS negotiation for this mode.
    pub fn apply(&self, cfg: &mut tokio_postgres::Config) {
        use tokio_postgres::config::SslMode as Pg;
        cfg.ssl_mode(match self.mode {
            SslMode::Disable => Pg::Disable,
            SslMode::Prefer => Pg::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Pg::Require,
        });
    }

    /// The connector.
    pub fn connector(&self) -> tokio_postgres_rustls::MakeRustlsConnect {
        self.connect.clone()
    }
}

fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
            for c in certs {
                let c = c.map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                roots
                    .add(c)
                    .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("ca_file {}: no certificate in it", path.display()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(
                    "no system CA certificates found: set ca_file for sslmode verify-ca or verify-full"
                        .into(),
                );
            }
        }
    }
    Ok(roots)
}

/// `verify-ca`: the chain is checked, the name is not.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `require` and `prefer`: any certificate (libpq's meaning), the handshake's
/// signatures still checked.
#[derive(Debug)]
struct Unchecked(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_round_trip_and_plaintext_to_another_machine_is_refused() {
        for m in ["disable", "prefer", "require", "verify-ca", "verify-full"] {
            assert_eq!(SslMode::parse(m).unwrap().as_str(), m);
        }
        assert_eq!(SslMode::parse("allow"), None);
        assert_eq!(SslMode::default_for(false), SslMode::VerifyFull);
        assert_eq!(SslMode::default_for(true), SslMode::Prefer);
        assert!(SslMode::Disable.refusal(false, false).is_some());
        assert!(SslMode::Prefer.refusal(false, false).is_some());
        assert!(SslMode::Prefer.refusal(true, false).is_none());
        assert!(SslMode::Disable.refusal(false, true).is_none());
        assert!(SslMode::Require.refusal(false, false).is_none());
        let local: tokio_postgres::Config = "postgres://a@127.0.0.1/db".parse().unwrap();
        assert!(is_local(&local));
        let local: tokio_postgres::Config = "host=/run/postgresql user=a".parse().unwrap();
        assert!(is_local(&local));
        let remote: tokio_postgres::Config = "postgres://a@db.internal/db".parse().unwrap();
        assert!(!is_local(&remote));
        let trick: tokio_postgres::Config = "postgres://a@127.0.0.1.nip.io/db".parse().unwrap();
        assert!(!is_local(&trick));
    }

    #[test]
    fn a_ca_file_must_hold_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = PgTls::new(SslMode::VerifyFull, Some(&empty)).unwrap_err();
        assert!(e.contains("no certificate"), "{e}");
        let e = PgTls::new(SslMode::VerifyFull, Some(&dir.path().join("nope.pem"))).unwrap_err();
        assert!(e.contains("nope.pem"), "{e}");
    }
}
