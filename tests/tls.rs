//! TLS and mTLS on the gRPC listener, with certificates generated at test time.

mod common;

use latchkey::clock::SystemClock;
use latchkey::config::Config;
use latchkey::keys::MasterKey;
use latchkey::transport::pb::credential_broker_client::CredentialBrokerClient;
use latchkey::transport::pb::MintRequest;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};
use std::sync::Arc;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "latchkey test ca");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |name: &str| {
        let mut p = CertificateParams::new(vec![name.to_string()]).unwrap();
        p.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca_pem: ca.pem(),
        server: leaf("localhost"),
        client: leaf("ci-runner"),
    }
}

async fn start(
    pki: &Pki,
    dir: &std::path::Path,
    mtls: bool,
) -> (latchkey::server::Running, latchkey::devissuer::DevIssuer) {
    let issuer = latchkey::devissuer::DevIssuer::spawn(
        "127.0.0.1:0".parse().unwrap(),
        latchkey::jose::Alg::ES256,
    )
    .await
    .unwrap();
    for (name, body) in [
        ("ca.pem", &pki.ca_pem),
        ("server.pem", &pki.server.0),
        ("server.key", &pki.server.1),
    ] {
        std::fs::write(dir.join(name), body).unwrap();
    }
    let tls = format!(
        "[server.tls]\ncert_file = \"{d}/server.pem\"\nkey_file = \"{d}/server.key\"\n{ca}",
        d = dir.display(),
        ca = if mtls {
            format!("client_ca_file = \"{}/ca.pem\"\n", dir.display())
        } else {
            String::new()
        }
    );
    let text = common::config_text(
        issuer.issuer_url(),
        &issuer.audience(),
        &dir.join("l.db").display().to_string(),
        "",
        "",
    )
    .replacen("[store]", &format!("{tls}\n[store]"), 1);
    let cfg = Config::parse(&text, "tls.toml").unwrap();
    let running = latchkey::server::start(&cfg, &MasterKey::generate(), Arc::new(SystemClock))
        .await
        .unwrap();
    (running, issuer)
}

fn mint_req() -> MintRequest {
    MintRequest {
        target: "orders-api".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn tls_handshake_and_mint_through_the_cli_client() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let (running, issuer) = start(&pki, dir.path(), false).await;
    let url = format!("https://127.0.0.1:{}", running.grpc_addr.port());
    // The CLI's own connector, trusting the test CA through --ca-file.
    let mut client = latchkey::cli::client::connect(&url, Some(&dir.path().join("ca.pem")))
        .await
        .unwrap();
    let token = latchkey::secret::Secret::new(issuer.sign(&issuer.bitbucket_claims("main")));
    let r = client
        .mint(latchkey::cli::client::authorized(mint_req(), &token).unwrap())
        .await
        .unwrap();
    assert_eq!(r.into_inner().credential.unwrap().kind, "jwt");
    // Plaintext against the TLS port fails.
    let plain =
        CredentialBrokerClient::connect(format!("http://127.0.0.1:{}", running.grpc_addr.port()))
            .await;
    if let Ok(mut c) = plain {
        assert!(c
            .mint(common::authed(mint_req(), token.expose()))
            .await
            .is_err());
    }
    running.shutdown().await;
}

#[tokio::test]
async fn mtls_requires_a_client_certificate_from_the_configured_ca() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let (running, issuer) = start(&pki, dir.path(), true).await;
    let url = format!("https://127.0.0.1:{}", running.grpc_addr.port());
    let token = issuer.sign(&issuer.bitbucket_claims("main"));
    let ca = Certificate::from_pem(&pki.ca_pem);

    let with_cert = Endpoint::from_shared(url.clone())
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(ca.clone())
                .identity(Identity::from_pem(&pki.client.0, &pki.client.1)),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    CredentialBrokerClient::new(with_cert)
        .mint(common::authed(mint_req(), &token))
        .await
        .unwrap();

    let without = Endpoint::from_shared(url)
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(ca))
        .unwrap()
        .connect()
        .await;
    match without {
        Err(_) => {}
        Ok(ch) => assert!(
            CredentialBrokerClient::new(ch)
                .mint(common::authed(mint_req(), &token))
                .await
                .is_err(),
            "no client certificate, no service"
        ),
    }
    running.shutdown().await;
}
