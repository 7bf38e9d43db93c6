//! gRPC handlers for `latchkey.v1.Audit`, and the lossless conversion between stored
//! audit records and their proto form (so a record fetched over gRPC still hashes to its
//! stored hash).

use super::grpc::{request_id, token, with_id};
use super::pb::{self, audit_server::Audit};
use super::status::to_status;
use crate::audit::checkpoint::Checkpoint;
use crate::audit::{AuditEntry, AuditQuery, AuditRecord};
use crate::broker::Broker;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// Default and largest number of records one Query streams.
const QUERY_DEFAULT: usize = 1000;
const QUERY_MAX: usize = 100_000;
/// Longest filter value accepted.
const FILTER_VALUE_LEN: usize = 256;

/// The `Audit` service.
#[derive(Debug, Clone)]
pub struct AuditService {
    broker: Arc<Broker>,
}

impl AuditService {
    /// Serves this broker.
    pub fn new(broker: Arc<Broker>) -> AuditService {
        AuditService { broker }
    }
}

/// Proto → domain, refusing oversized or malformed values at the edge.
impl TryFrom<&pb::AuditQuery> for AuditQuery {
    type Error = Status;
    fn try_from(q: &pb::AuditQuery) -> Result<Self, Status> {
        let opt = |name: &str, v: &str| -> Result<Option<String>, Status> {
            if v.len() > FILTER_VALUE_LEN || v.chars().any(char::is_control) {
                return Err(Status::invalid_argument(format!(
                    "invalid request: filter {name} must be at most {FILTER_VALUE_LEN} printable bytes"
                )));
            }
            Ok((!v.is_empty()).then(|| v.to_string()))
        };
        let seq = |name: &str, v: i64| -> Result<Option<i64>, Status> {
            match v {
                0 => Ok(None),
                v if v < 0 => Err(Status::invalid_argument(format!(
                    "invalid request: {name} must not be negative"
                ))),
                v => Ok(Some(v)),
            }
        };
        let ms = |name: &str, t: &Option<prost_types::Timestamp>| -> Result<Option<i64>, Status> {
            t.as_ref()
                .map(|t| {
                    t.seconds
                        .checked_mul(1000)
                        .and_then(|ms| ms.checked_add(i64::from(t.nanos / 1_000_000)))
                        .ok_or_else(|| {
                            Status::invalid_argument(format!(
                                "invalid request: {name} is out of range"
                            ))
                        })
                })
                .transpose()
        };
        if let Some(o) = opt("outcome", &q.outcome)? {
            if !["allowed", "denied", "error"].contains(&o.as_str()) {
                return Err(Status::invalid_argument(
                    "invalid request: outcome is allowed, denied or error",
                ));
            }
        }
        Ok(AuditQuery {
            since_ms: ms("since", &q.since)?,
            until_ms: ms("until", &q.until)?,
            after_seq: seq("after_seq", q.after_seq)?,
            until_seq: seq("until_seq", q.until_seq)?,
            issuer: opt("issuer", &q.issuer)?,
            identity_key: opt("identity_key", &q.identity_key)?,
            repository: opt("repository", &q.repository)?,
            subject: opt("subject", &q.subject)?,
            target: opt("target", &q.target)?,
            outcome: opt("outcome", &q.outcome)?,
            action: opt("action", &q.action)?,
            lease_id: opt("lease_id", &q.lease_id)?,
            request_id: opt("request_id", &q.request_id)?,
            reason_contains: opt("reason_contains", &q.reason_contains)?,
        })
    }
}

impl From<AuditRecord> for pb::AuditRecord {
    fn from(r: AuditRecord) -> Self {
        let e = r.entry;
        pb::AuditRecord {
            seq: r.seq,
            prev_hash: r.prev_hash,
            hash: r.hash,
            time_ms: e.time_ms,
            request_id: e.request_id,
            action: e.action,
            outcome: e.outcome,
            issuer: e.issuer,
            identity_key: e.identity_key,
            subject: e.subject,
            repository: e.repository,
            git_ref: e.git_ref,
            environment: e.environment,
            pipeline: e.pipeline,
            token_fingerprint: e.token_fingerprint,
            target: e.target,
            requested_scopes: e.requested_scopes,
            granted_scopes: e.granted_scopes,
            ttl_secs: e.ttl_secs,
            rule: e.rule,
            reason: e.reason,
            lease_id: e.lease_id,
            credential_jti: e.credential_jti,
            credential_fingerprint: e.credential_fingerprint,
            context: e.context.into_iter().collect(),
            claims_json: serde_json::to_string(&e.claims).unwrap_or_else(|_| "null".into()),
        }
    }
}

/// Proto → domain for clients (export, offline verification). Fails when the claims are
/// not JSON.
impl TryFrom<pb::AuditRecord> for AuditRecord {
    type Error = String;
    fn try_from(r: pb::AuditRecord) -> Result<Self, String> {
        let claims = serde_json::from_str(&r.claims_json)
            .map_err(|_| format!("record {}: claims are not JSON", r.seq))?;
        Ok(AuditRecord {
            seq: r.seq,
            prev_hash: r.prev_hash,
            hash: r.hash,
            entry: AuditEntry {
                time_ms: r.time_ms,
                request_id: r.request_id,
                action: r.action,
                outcome: r.outcome,
                issuer: r.issuer,
                identity_key: r.identity_key,
                subject: r.subject,
                repository: r.repository,
                git_ref: r.git_ref,
                environment: r.environment,
                pipeline: r.pipeline,
                token_fingerprint: r.token_fingerprint,
                target: r.target,
                requested_scopes: r.requested_scopes,
                granted_scopes: r.granted_scopes,
                ttl_secs: r.ttl_secs,
                rule: r.rule,
                reason: r.reason,
                lease_id: r.lease_id,
                credential_jti: r.credential_jti,
                credential_fingerprint: r.credential_fingerprint,
                context: r.context.into_iter().collect(),
                claims,
            },
        })
    }
}

impl From<Checkpoint> for pb::Checkpoint {
    fn from(c: Checkpoint) -> Self {
        pb::Checkpoint {
            id: c.id,
            seq: c.seq,
            hash: c.hash,
            time_ms: c.time_ms,
            kid: c.kid,
            signature: c.signature,
        }
    }
}

impl From<pb::Checkpoint> for Checkpoint {
    fn from(c: pb::Checkpoint) -> Self {
        Checkpoint {
            id: c.id,
            seq: c.seq,
            hash: c.hash,
            time_ms: c.time_ms,
            kid: c.kid,
            signature: c.signature,
        }
    }
}

type RecordStream = Pin<Box<dyn Stream<Item = Result<pb::AuditRecord, Status>> + Send>>;

fn limit(n: u32) -> usize {
    match n as usize {
        0 => QUERY_DEFAULT,
        n => n.min(QUERY_MAX),
    }
}

#[tonic::async_trait]
impl Audit for AuditService {
    type QueryStream = RecordStream;
    type TailStream = RecordStream;

    #[tracing::instrument(skip_all, fields(request_id))]
    async fn query(
        &self,
        request: Request<pb::AuditQuery>,
    ) -> Result<Response<Self::QueryStream>, Status> {
        let id = request_id();
        tracing::Span::current().record("request_id", id.as_str());
        let token = token(&request).map(str::to_string);
        let q = AuditQuery::try_from(request.get_ref())?;
        let pager = self
            .broker
            .query_audit(token.as_deref(), q, limit(request.get_ref().limit), &id)
            .await
            .map_err(|e| to_status(&e, &id))?;
        Ok(with_id(
            Response::new(super::stream_pages(pager, id.clone())),
            &id,
        ))
    }

    #[tracing::instrument(skip_all, fields(request_id))]
    async fn tail(
        &self,
        request: Request<pb::AuditQuery>,
    ) -> Result<Response<Self::TailStream>, Status> {
        let id = request_id();
        tracing::Span::current().record("request_id", id.as_str());
        let token = token(&request).map(str::to_string);
        let q = AuditQuery::try_from(request.get_ref())?;
        let tail = self
            .broker
            .tail_audit(token.as_deref(), q, &id)
            .await
            .map_err(|e| to_status(&e, &id))?;
        Ok(with_id(
            Response::new(super::stream_pages(tail, id.clone())),
            &id,
        ))
    }

    #[tracing::instrument(skip_all, fields(request_id))]
    async fn verify(
        &self,
        request: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let id = request_id();
        tracing::Span::current().record("request_id", id.as_str());
        let token = token(&request).map(str::to_string);
        let r = self
            .broker
            .verify_audit(token.as_deref(), &id)
            .await
            .map_err(|e| to_status(&e, &id))?;
        Ok(with_id(
            Response::new(pb::VerifyResponse {
                intact: r.intact(),
                records: r.records,
                head_seq: r.head_seq,
                head_hash: r.head_hash.clone(),
                last_checkpoint: r.last_checkpoint.clone().map(Into::into),
                checkpoints: r.checkpoints,
                unattested: r.unattested,
                problem_kind: r
                    .problem
                    .as_ref()
                    .map(|p| p.kind().to_string())
                    .unwrap_or_default(),
                problem_seq: r.problem.as_ref().map(|p| p.seq()).unwrap_or_default(),
                summary: r.to_string(),
            }),
            &id,
        ))
    }

    #[tracing::instrument(skip_all, fields(request_id))]
    async fn checkpoints(
        &self,
        request: Request<pb::CheckpointsRequest>,
    ) -> Result<Response<pb::CheckpointsResponse>, Status> {
        let id = request_id();
        tracing::Span::current().record("request_id", id.as_str());
        let token = token(&request).map(str::to_string);
        let r = request.get_ref();
        if r.after_id < 0 {
            return Err(Status::invalid_argument(
                "invalid request: after_id must not be negative",
            ));
        }
        let out = self
            .broker
            .checkpoints(token.as_deref(), r.after_id, limit(r.limit), &id)
            .await
            .map_err(|e| to_status(&e, &id))?;
        Ok(with_id(
            Response::new(pb::CheckpointsResponse {
                checkpoints: out.checkpoints.into_iter().map(Into::into).collect(),
                keys_jwks: out.keys_jwks.to_string(),
                witness_lag: out.witness_lag,
            }),
            &id,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_the_round_trip_through_proto_with_their_hash() {
        let entry = AuditEntry {
            time_ms: 5,
            request_id: "r".into(),
            action: "mint".into(),
            outcome: "denied".into(),
            issuer: Some("bb".into()),
            subject: Some(String::new()),
            ttl_secs: Some(60),
            requested_scopes: vec!["a".into()],
            context: [("k".to_string(), "v".to_string())].into(),
            claims: serde_json::json!({"b": [1, 2], "a": {"x": null}}),
            ..Default::default()
        };
        let r = AuditRecord::chain(0, crate::audit::GENESIS_HASH, entry);
        let back = AuditRecord::try_from(pb::AuditRecord::from(r.clone())).unwrap();
        assert_eq!(back, r);
        assert_eq!(
            crate::audit::record_hash(back.seq, &back.prev_hash, &back.entry),
            r.hash
        );
    }

    #[test]
    fn queries_are_checked_at_the_edge() {
        let q = AuditQuery::try_from(&pb::AuditQuery {
            repository: "{r}".into(),
            since: Some(prost_types::Timestamp {
                seconds: 10,
                nanos: 5_000_000,
            }),
            after_seq: 7,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(q.repository.as_deref(), Some("{r}"));
        assert_eq!(
            (q.since_ms, q.after_seq, q.until_seq),
            (Some(10_005), Some(7), None)
        );
        for bad in [
            pb::AuditQuery {
                outcome: "maybe".into(),
                ..Default::default()
            },
            pb::AuditQuery {
                target: "x".repeat(300),
                ..Default::default()
            },
            pb::AuditQuery {
                after_seq: -1,
                ..Default::default()
            },
            pb::AuditQuery {
                since: Some(prost_types::Timestamp {
                    seconds: i64::MAX,
                    nanos: 0,
                }),
                ..Default::default()
            },
        ] {
            assert_eq!(
                AuditQuery::try_from(&bad).unwrap_err().code(),
                tonic::Code::InvalidArgument
            );
        }
    }
}
