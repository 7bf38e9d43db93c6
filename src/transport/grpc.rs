//! gRPC handlers for `latchkey.v1.CredentialBroker`.

use super::pb::{self, credential_broker_server::CredentialBroker};
use super::status::to_status;
use crate::broker::{Broker, Lease, LeaseProof, MintRequest, RenewRequest};
use crate::mint::Credential;
use crate::secret::SecretString;
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

/// A secret from a proto string field; `None` when empty.
pub(crate) fn secret(s: String) -> Option<SecretString> {
    (!s.is_empty()).then(|| SecretString::new(s))
}

pub(crate) fn token<T>(req: &Request<T>) -> Option<&str> {
    super::bearer(
        req.metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
    )
}

pub(crate) fn timestamp(secs: i64) -> prost_types::Timestamp {
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
        Ok(MintRequest {
            target: r.target,
            scopes: r.scopes,
            ttl: ttl_from_pb(r.ttl)?,
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
            state: l.state.to_string(),
            max_expires_at: Some(timestamp(l.max_expires_at)),
            renew_count: l.renew_count,
            identity_key: l.identity_key,
            issuer: l.issuer,
            repository: l.repository.unwrap_or_default(),
            rule: l.rule,
            revoked_at: l.revoked_at.map(timestamp),
        }
    }
}

/// The credential as it goes on the wire: the one place secrets leave their wrappers.
pub(crate) fn credential_to_pb(c: &Credential) -> pb::Credential {
    pb::Credential {
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
    }
}

/// A proto TTL in domain form; `None` when unset. Refuses negative or zero.
pub(crate) fn ttl_from_pb(d: Option<prost_types::Duration>) -> Result<Option<Duration>, Status> {
    match d {
        None => Ok(None),
        Some(d) if d.seconds < 0 || d.nanos < 0 || (d.seconds == 0 && d.nanos == 0) => Err(
            Status::invalid_argument("invalid request: ttl must be positive"),
        ),
        Some(d) => Ok(Some(Duration::new(
            d.seconds as u64,
            d.nanos.clamp(0, 999_999_999) as u32,
        ))),
    }
}

pub(crate) fn request_id() -> String {
    crate::clock::new_id()
}

pub(crate) fn with_id<T>(mut resp: Response<T>, id: &str) -> Response<T> {
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
        Ok(with_id(
            Response::new(pb::MintResponse {
                credential: Some(credential_to_pb(&minted.credential)),
                lease: Some(minted.lease.into()),
                lease_secret: minted.lease_secret.expose().clone(),
            }),
            &id,
        ))
    }

    #[tracing::instrument(skip_all, fields(request_id))]
    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let id = request_id();
        tracing::Span::current().record("request_id", id.as_str());
        let token = token(&request).map(str::to_string);
        let r = request.into_inner();
        let req = RenewRequest {
            lease_id: r.lease_id,
            ttl: ttl_from_pb(r.ttl)?,
            lease_secret: secret(r.lease_secret),
        };
        let renewed = self
            .broker
            .renew(token.as_deref(), req, &id)
            .await
            .map_err(|e| to_status(&e, &id))?;
        Ok(with_id(
            Response::new(pb::RenewResponse {
                lease: Some(renewed.lease.into()),
                credential: renewed.credential.as_ref().map(credential_to_pb),
            }),
            &id,
        ))
    }

    #[tracing::instrument(skip_all, fields(request_id))]
    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let id = request_id();
        tracing::Span::current().record("request_id", id.as_str());
        let token = token(&request).map(str::to_string);
        let r = request.into_inner();
        let lease_secret = secret(r.lease_secret);
        let proof = LeaseProof {
            token: token.as_deref(),
            lease_secret: lease_secret.as_ref(),
        };
        let done = self
            .broker
            .revoke(proof, &r.lease_id, &id)
            .await
            .map_err(|e| to_status(&e, &id))?;
        Ok(with_id(
            Response::new(pb::RevokeResponse {
                revoked: done.revoked,
                upstream_pending: done.upstream_pending,
            }),
            &id,
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
                trace_withheld: ex.trace_withheld,
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
