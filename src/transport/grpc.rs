//! gRPC handlers for `latchkey.v1.CredentialBroker`.

use super::pb::{self, credential_broker_server::CredentialBroker};
use super::status::to_status;
use crate::broker::{Broker, Lease, MintRequest};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::{Request, Response, Status};

/// Largest gRPC request message accepted.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The `CredentialBroker` service.
#[derive(Debug, Clone)]
pub struct BrokerService {
    broker: Arc<Broker>,
}

impl BrokerService {
    /// Serves this broker.
    pub fn new(broker: Arc<Broker>) -> BrokerService {
        BrokerService { broker }
    }
}

fn token<T>(req: &Request<T>) -> Option<&str> {
    super::bearer(
        req.metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
    )
}

fn timestamp(secs: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: secs,
        nanos: 0,
    }
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// Proto → domain, rejecting malformed input once, at the edge.
impl TryFrom<pb::MintRequest> for MintRequest {
    type Error = Status;
    fn try_from(r: pb::MintRequest) -> Result<Self, Status> {
        let ttl = match r.ttl {
            None => None,
            Some(d) if d.seconds < 0 || d.nanos < 0 || (d.seconds == 0 && d.nanos == 0) => {
                return Err(Status::invalid_argument(
                    "invalid request: ttl must be positive",
                ))
            }
            Some(d) => Some(Duration::new(
                d.seconds as u64,
                d.nanos.clamp(0, 999_999_999) as u32,
            )),
        };
        Ok(MintRequest {
            target: r.target,
            scopes: r.scopes,
            ttl,
            context: r.context.into_iter().collect(),
        })
    }
}

impl From<Lease> for pb::Lease {
    fn from(l: Lease) -> Self {
        pb::Lease {
            id: l.id,
            target: l.target,
            scopes: l.scopes,
            issued_at: Some(timestamp(l.issued_at)),
            expires_at: Some(timestamp(l.expires_at)),
            renewable: l.renewable,
        }
    }
}

fn request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn with_id<T>(mut resp: Response<T>, id: &str) -> Response<T> {
    if let Ok(v) = id.parse() {
        resp.metadata_mut().insert("x-request-id", v);
    }
    resp
}

#[tonic::async_trait]
impl CredentialBroker for BrokerService {
    #[tracing::instrument(skip_all, fields(request_id))]
    async fn mint(
        &self,
        request: Request<pb::MintRequest>,
    ) -> Result<Response<pb::MintResponse>, Status> {
        let id = request_id();
        tracing::Span::current().record("request_id", id.as_str());
        let token = token(&request).map(str::to_string);
        let req = MintRequest::try_from(request.into_inner())?;
        let minted = self
            .broker
            .mint(token.as_deref(), req, &id)
            .await
            .map_err(|e| to_status(&e, &id))?;
        let c = minted.credential;
        let credential = pb::Credential {
            kind: c.kind.to_string(),
            token: c
                .token
                .as_ref()
                .map(|t| t.expose().clone())
                .unwrap_or_default(),
            username: c.username.clone().unwrap_or_default(),
            password: c
                .password
                .as_ref()
                .map(|p| p.expose().clone())
                .unwrap_or_default(),
            fields: c.fields.clone().into_iter().collect(),
            expires_at: Some(timestamp(c.expires_at)),
        };
        Ok(with_id(
            Response::new(pb::MintResponse {
                credential: Some(credential),
                lease: Some(minted.lease.into()),
            }),
            &id,
        ))
    }

    async fn renew(
        &self,
        _request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        Err(Status::unimplemented(
            "renew is not available yet: leases are not tracked in this version",
        ))
    }

    async fn revoke(
        &self,
        _request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        Err(Status::unimplemented(
            "revoke is not available yet: leases are not tracked in this version",
        ))
    }

    #[tracing::instrument(skip_all, fields(request_id))]
    async fn explain(
        &self,
        request: Request<pb::ExplainRequest>,
    ) -> Result<Response<pb::ExplainResponse>, Status> {
        let id = request_id();
        tracing::Span::current().record("request_id", id.as_str());
        let token = token(&request).map(str::to_string);
        let r = request.into_inner();
        let ex = self
            .broker
            .explain(token.as_deref(), &r.target, &r.scopes, &id)
            .await
            .map_err(|e| to_status(&e, &id))?;
        Ok(with_id(
            Response::new(pb::ExplainResponse {
                allowed: ex.allowed,
                rule: ex.rule,
                scopes: ex.scopes,
                max_ttl: Some(duration(ex.max_ttl)),
                trace: ex.trace,
                identity: ex
                    .identity
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
                reason: ex.reason,
            }),
            &id,
        ))
    }
}

/// Seconds since the epoch from a proto timestamp (0 when absent).
pub fn seconds(ts: Option<&prost_types::Timestamp>) -> i64 {
    ts.map(|t| t.seconds).unwrap_or(0)
}

/// Now, for clients printing relative times.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
