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
    pki_named("latchkey test ca")
}

fn pki_named(ca_name: &str) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, ca_name);
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

fn https_client(pki: &Pki, with_cert: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap());
    if with_cert {
        let pem = format!("{}{}", pki.client.0, pki.client.1);
        b = b.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
    }
    b.build().unwrap()
}

#[tokio::test]
async fn the_http_port_serves_tls_and_mtls_from_the_same_files() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let (running, issuer) = start(&pki, dir.path(), true).await;
    let base = format!("https://localhost:{}", running.http_addr.port());
    let token = issuer.sign(&issuer.bitbucket_claims("main"));
    let form = [
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        ("subject_token", token.as_str()),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("audience", "orders-api"),
    ];
    let r = https_client(&pki, true)
        .post(format!("{base}/v1/token"))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Without a client certificate the handshake is refused.
    assert!(https_client(&pki, false)
        .get(format!("{base}/healthz"))
        .send()
        .await
        .is_err());
    // Plain HTTP against the TLS port gets nothing.
    assert!(reqwest::get(format!(
        "http://127.0.0.1:{}/healthz",
        running.http_addr.port()
    ))
    .await
    .is_err());
    running.shutdown().await;
}

#[tokio::test]
async fn certificates_reload_without_dropping_connections_and_bad_files_are_refused() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let (running, issuer) = start(&pki, dir.path(), false).await;
    let config = dir.path().join("latchkey.toml");
    // The raw configuration in force, as `serve` keeps it.
    let applied: toml::Value = toml::from_str(&format!(
        "[server.tls]\ncert_file = \"{d}/server.pem\"\nkey_file = \"{d}/server.key\"\n",
        d = dir.path().display()
    ))
    .unwrap();
    std::fs::write(&config, toml::to_string(&applied).unwrap()).unwrap();
    let url = format!("https://127.0.0.1:{}", running.grpc_addr.port());
    let token = issuer.sign(&issuer.bitbucket_claims("main"));
    let old_ca = Certificate::from_pem(&pki.ca_pem);
    let connect = |ca: Certificate| {
        let url = url.clone();
        async move {
            Endpoint::from_shared(url)
                .unwrap()
                .tls_config(ClientTlsConfig::new().ca_certificate(ca))
                .unwrap()
                .connect()
                .await
        }
    };
    let open = connect(old_ca.clone()).await.unwrap();
    let mut open_client = CredentialBrokerClient::new(open);
    open_client
        .mint(common::authed(mint_req(), &token))
        .await
        .unwrap();

    // Reloading the config (not a valid broker config here) is refused, nothing changes.
    assert!(running.reload(&config, &applied).await.is_err());

    // New certificate from another CA: new connections get it, the open one keeps working.
    let next = pki_named("latchkey second ca");
    std::fs::write(dir.path().join("server.pem"), &next.server.0).unwrap();
    std::fs::write(dir.path().join("server.key"), &next.server.1).unwrap();
    running.reload_tls().unwrap();
    open_client
        .mint(common::authed(mint_req(), &token))
        .await
        .expect("a connection opened before the reload is not dropped");
    let fresh = connect(Certificate::from_pem(&next.ca_pem)).await.unwrap();
    CredentialBrokerClient::new(fresh)
        .mint(common::authed(mint_req(), &token))
        .await
        .expect("new connections see the new certificate");
    assert!(
        connect(old_ca.clone()).await.is_err()
            || CredentialBrokerClient::new(connect(old_ca.clone()).await.unwrap())
                .mint(common::authed(mint_req(), &token))
                .await
                .is_err(),
        "the old certificate is no longer served"
    );

    // A broken key file is refused and the certificate in service stays.
    std::fs::write(dir.path().join("server.key"), "not a key").unwrap();
    let e = running.reload_tls().unwrap_err();
    assert!(e.to_string().contains("server.key"), "{e}");
    let still = connect(Certificate::from_pem(&next.ca_pem)).await.unwrap();
    CredentialBrokerClient::new(still)
        .mint(common::authed(mint_req(), &token))
        .await
        .expect("still serving the last good certificate");
    running.shutdown().await;
}
