//! gRPC handlers for `latchkey.v1.Leases`: list, revoke by match, introspect.

use super::grpc::{request_id, token, with_id};
use super::pb::{self, leases_server::Leases};
use super::status::to_status;
use crate::broker::{Broker, RevokeMatching};
use crate::lease::LeaseFilter;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// Default and largest number of leases one List call streams.
const LIST_DEFAULT: usize = 1000;
const LIST_MAX: usize = 100_000;
/// Longest filter value accepted.
const FILTER_VALUE_LEN: usize = 256;

/// The `Leases` service.
#[derive(Debug, Clone)]
pub struct LeasesService {
    broker: Arc<Broker>,
}

impl LeasesService {
    /// Serves this broker.
    pub fn new(broker: Arc<Broker>) -> LeasesService {
        LeasesService { broker }
    }
}

/// Proto → domain, refusing oversized values at the edge.
impl TryFrom<Option<pb::LeaseFilter>> for LeaseFilter {
    type Error = Status;
    fn try_from(f: Option<pb::LeaseFilter>) -> Result<Self, Status> {
        let f = f.unwrap_or_default();
        let opt = |name: &str, v: String| -> Result<Option<String>, Status> {
            if v.len() > FILTER_VALUE_LEN || v.chars().any(char::is_control) {
                return Err(Status::invalid_argument(format!(
                    "invalid request: filter {name} must be at most {FILTER_VALUE_LEN} printable bytes"
                )));
            }
            Ok((!v.is_empty()).then_some(v))
        };
        Ok(LeaseFilter {
            id: opt("lease_id", f.lease_id)?,
            identity_key: opt("identity_key", f.identity_key)?,
            issuer: opt("issuer", f.issuer)?,
            repository: opt("repository", f.repository)?,
            target: opt("target", f.target)?,
            rule: opt("rule", f.rule)?,
            issued_before: f.issued_before.map(|t| t.seconds),
            include_inactive: f.include_inactive,
        })
    }
}

type LeaseStream = Pin<Box<dyn Stream<Item = Result<pb::Lease, Status>> + Send>>;

#[tonic::async_trait]
impl Leases for LeasesService {
    type ListStream = LeaseStream;

    #[tracing::instrument(skip_all, fields(request_id))]
    async fn list(
        &self,
        request: Request<pb::ListLeasesRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let id = request_id();
        tracing::Span::current().record("request_id", id.as_str());
        let token = token(&request).map(str::to_string);
        let r = request.into_inner();
        let filter = LeaseFilter::try_from(r.filter)?;
        let limit = match r.limit as usize {
            0 => LIST_DEFAULT,
            n => n.min(LIST_MAX),
        };
        let lister = self
            .broker
            .list_leases(token.as_deref(), filter, limit, &id)
            .await
            .map_err(|e| to_status(&e, &id))?;
        Ok(with_id(
            Response::new(super::stream_pages(lister, id.clone())),
            &id,
        ))
    }

    #[tracing::instrument(skip_all, fields(request_id))]
    async fn revoke_matching(
        &self,
        request: Request<pb::RevokeMatchingRequest>,
    ) -> Result<Response<pb::RevokeMatchingResponse>, Status> {
        let id = request_id();
        tracing::Span::current().record("request_id", id.as_str());
        let token = token(&request).map(str::to_string);
        let r = request.into_inner();
        let req = RevokeMatching {
            filter: LeaseFilter::try_from(r.filter)?,
            reason: r.reason,
            dry_run: r.dry_run,
            all: r.all,
        };
        let s = self
            .broker
            .revoke_matching(token.as_deref(), req, &id)
            .await
            .map_err(|e| to_status(&e, &id))?;
        Ok(with_id(
            Response::new(pb::RevokeMatchingResponse {
                matched: s.matched,
                revoked: s.revoked,
                failed: s
                    .failed
                    .into_iter()
                    .map(|(lease_id, reason)| pb::RevokeFailure { lease_id, reason })
                    .collect(),
            }),
            &id,
        ))
    }

    #[tracing::instrument(skip_all, fields(request_id))]
    async fn introspect(
        &self,
        request: Request<pb::IntrospectRequest>,
    ) -> Result<Response<pb::IntrospectResponse>, Status> {
        let id = request_id();
        tracing::Span::current().record("request_id", id.as_str());
        let token = token(&request).map(str::to_string);
        let r = request.into_inner();
        let out = self
            .broker
            .introspect(token.as_deref(), &r.token, &id)
            .await
            .map_err(|e| to_status(&e, &id))?;
        Ok(with_id(
            Response::new(pb::IntrospectResponse {
                active: out.active,
                lease: out.lease.map(Into::into),
                reason: out.reason,
            }),
            &id,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_checked_at_the_edge() {
        let f = LeaseFilter::try_from(Some(pb::LeaseFilter {
            repository: "{abc}".into(),
            issued_before: Some(prost_types::Timestamp {
                seconds: 5,
                nanos: 0,
            }),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(f.repository.as_deref(), Some("{abc}"));
        assert_eq!(f.issued_before, Some(5));
        assert!(f.target.is_none());
        assert!(LeaseFilter::try_from(None).unwrap().is_unrestricted());
        let long = LeaseFilter::try_from(Some(pb::LeaseFilter {
            target: "x".repeat(300),
            ..Default::default()
        }));
        assert_eq!(long.unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
