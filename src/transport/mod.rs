//! The edges: gRPC (tonic) and HTTP (axum) handlers, proto ↔ domain conversion, and the
//! one mapping from domain errors to `tonic::Status`. Handlers are thin: they parse,
//! call [`crate::broker::Broker`], and convert.

pub mod audit;
pub mod grpc;
pub mod http;
pub mod leases;
pub mod listen;
pub mod oauth;
pub mod rotation;
pub mod status;

/// Runs each gRPC request with its client's address as the current source
/// ([`crate::net::with_source`]), so the broker can charge what it decides to the source,
/// and puts it in the request's extensions ([`crate::net::ClientAddr`]) for the checks
/// inside. Behind a trusted proxy the client is the forwarded address
/// ([`crate::net::client_address`]).
#[derive(Debug, Clone)]
pub struct SourceLayer {
    trusted: std::sync::Arc<Vec<ipnet::IpNet>>,
}

impl SourceLayer {
    /// A layer believing `X-Forwarded-For` from these proxies only.
    pub fn new(trusted: Vec<ipnet::IpNet>) -> SourceLayer {
        SourceLayer {
            trusted: std::sync::Arc::new(trusted),
        }
    }
}

impl<S> tower_layer::Layer<S> for SourceLayer {
    type Service = SourceScope<S>;

    fn layer(&self, inner: S) -> SourceScope<S> {
        SourceScope(inner, self.trusted.clone())
    }
}

/// The service [`SourceLayer`] makes.
#[derive(Debug, Clone)]
pub struct SourceScope<S>(S, std::sync::Arc<Vec<ipnet::IpNet>>);

impl<S, B> tower_service::Service<axum::http::Request<B>> for SourceScope<S>
where
    S: tower_service::Service<axum::http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut req: axum::http::Request<B>) -> Self::Future {
        let peer = req
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(|c| c.remote_addr())
            .map(|a| {
                let forwarded = req
                    .headers()
                    .get("x-forwarded-for")
                    .and_then(|v| v.to_str().ok());
                crate::net::client_address(a.ip(), forwarded, &self.1)
            });
        if let Some(ip) = peer {
            req.extensions_mut().insert(crate::net::ClientAddr(ip));
        }
        let fut = self.0.call(req);
        Box::pin(async move {
            match peer {
                Some(ip) => crate::net::with_source(ip, fut).await,
                None => fut.await,
            }
        })
    }
}

/// Generated protobuf and gRPC code for `latchkey.v1`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("latchkey.v1");

    /// The encoded `FileDescriptorSet` of `proto/`, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/latchkey_descriptor.bin"));

    // `Credential` is built with `skip_debug`: this hand-written Debug never shows the
    // token or password.
    impl std::fmt::Debug for Credential {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Credential")
                .field("kind", &self.kind)
                .field(
                    "token",
                    &if self.token.is_empty() {
                        ""
                    } else {
                        "[REDACTED]"
                    },
                )
                .field("username", &self.username)
                .field(
                    "password",
                    &if self.password.is_empty() {
                        ""
                    } else {
                        "[REDACTED]"
                    },
                )
                .field("fields", &self.fields)
                .field("expires_at", &self.expires_at)
                .finish()
        }
    }

    fn shown(secret: &str) -> &'static str {
        if secret.is_empty() {
            ""
        } else {
            "[REDACTED]"
        }
    }

    impl std::fmt::Debug for MintResponse {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("MintResponse")
                .field("credential", &self.credential)
                .field("lease", &self.lease)
                .field("lease_secret", &shown(&self.lease_secret))
                .finish()
        }
    }

    impl std::fmt::Debug for RenewRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("RenewRequest")
                .field("lease_id", &self.lease_id)
                .field("ttl", &self.ttl)
                .field("lease_secret", &shown(&self.lease_secret))
                .finish()
        }
    }

    impl std::fmt::Debug for RevokeRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("RevokeRequest")
                .field("lease_id", &self.lease_id)
                .field("lease_secret", &shown(&self.lease_secret))
                .finish()
        }
    }

    impl std::fmt::Debug for IntrospectRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("IntrospectRequest")
                .field("token", &shown(&self.token))
                .finish()
        }
    }
}

/// A gRPC response stream fed from `pages` by a task that stops at the first empty page,
/// at the first error (sent as the stream's status), or when the client goes away.
pub(crate) fn stream_pages<P, T>(
    mut pages: P,
    request_id: String,
) -> std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send>>
where
    P: crate::broker::Pages,
    T: From<P::Item> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let page = tokio::select! {
                _ = tx.closed() => return,
                page = pages.next_page() => page,
            };
            match page {
                Ok(page) if page.is_empty() => return,
                Ok(page) => {
                    for item in page {
                        if tx.send(Ok(item.into())).await.is_err() {
                            return; // the client went away
                        }
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(status::to_status(&e, &request_id))).await;
                    return;
                }
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Extracts the bearer token from an `authorization` header value.
pub fn bearer(value: Option<&str>) -> Option<&str> {
    let v = value?.trim();
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_debug_is_redacted() {
        let c = pb::Credential {
            kind: "jwt".into(),
            token: "eyJhbGciOiJFUzI1NiJ9.secret.sig".into(),
            password: "pa55word".into(),
            username: "u".into(),
            ..Default::default()
        };
        let r = pb::MintResponse {
            credential: Some(c),
            lease: None,
            lease_secret: "lease-s3cret".into(),
        };
        let renew = pb::RenewRequest {
            lease_id: "L".into(),
            ttl: None,
            lease_secret: "lease-s3cret".into(),
        };
        let revoke = pb::RevokeRequest {
            lease_id: "L".into(),
            lease_secret: "lease-s3cret".into(),
        };
        let intro = pb::IntrospectRequest {
            token: "eyJhbGciOiJFUzI1NiJ9.secret.sig".into(),
        };
        for shown in [
            format!("{r:?}"),
            format!("{renew:?}"),
            format!("{revoke:?}"),
            format!("{intro:?}"),
        ] {
            for secret in ["lease-s3cret", "secret.sig", "pa55word"] {
                assert!(!shown.contains(secret), "{shown}");
            }
            assert!(shown.contains("[REDACTED]"), "{shown}");
        }
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(Some("abc")), None);
        assert_eq!(bearer(None), None);
    }
}
