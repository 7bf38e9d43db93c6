//! gRPC handlers for `latchkey.v1.Rotation`: run what is due, list the schedule, force.

use super::grpc::{request_id, timestamp, token, with_id};
use super::pb::{self, rotation_server::Rotation};
use super::status::to_status;
use crate::broker::{Broker, Force, RotationCaller};
use crate::rotation::{ItemResult, ScheduledItem};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The `Rotation` service.
#[derive(Debug, Clone)]
pub struct RotationService {
    broker: Arc<Broker>,
}

impl RotationService {
    /// Serves this broker.
    pub fn new(broker: Arc<Broker>) -> RotationService {
        RotationService { broker }
    }
}

impl From<ItemResult> for pb::RotationResult {
    fn from(r: ItemResult) -> Self {
        pb::RotationResult {
            item: r.item,
            outcome: r.outcome.as_str().to_string(),
            detail: r.detail,
            next_due: r.next_due.map(timestamp),
        }
    }
}

impl From<ScheduledItem> for pb::ScheduledItem {
    fn from(i: ScheduledItem) -> Self {
        pb::ScheduledItem {
            item: i.item,
            target: i.target,
            kind: i.kind.as_str().to_string(),
            period: i.period_secs.map(|s| prost_types::Duration {
                seconds: s as i64,
                nanos: 0,
            }),
            window: i.window.unwrap_or_default(),
            last_rotated: i.last_rotated.map(timestamp),
            next_due: i.next_due.map(timestamp),
            current_kid: i.current_kid.unwrap_or_default(),
            next_kid: i.next_kid.unwrap_or_default(),
            retired: i
                .retired
                .into_iter()
                .map(|(kid, at)| pb::RetiredKey {
                    kid,
                    remove_at: Some(timestamp(at)),
                })
                .collect(),
        }
    }
}

#[tonic::async_trait]
impl Rotation for RotationService {
    #[tracing::instrument(skip_all, fields(request_id))]
    async fn run_due(
        &self,
        request: Request<pb::RunDueRequest>,
    ) -> Result<Response<pb::RotationReport>, Status> {
        let id = request_id();
        tracing::Span::current().record("request_id", id.as_str());
        let t = token(&request).map(str::to_string);
        let results = self
            .broker
            .run_due(RotationCaller::Token(t.as_deref()), &id)
            .await
            .map_err(|e| to_status(&e, &id))?;
        Ok(with_id(
            Response::new(pb::RotationReport {
                results: results.into_iter().map(Into::into).collect(),
            }),
            &id,
        ))
    }

    #[tracing::instrument(skip_all, fields(request_id))]
    async fn schedule(
        &self,
        request: Request<pb::ScheduleRequest>,
    ) -> Result<Response<pb::ScheduleResponse>, Status> {
        let id = request_id();
        tracing::Span::current().record("request_id", id.as_str());
        let t = token(&request).map(str::to_string);
        let items = self
            .broker
            .rotation_schedule(t.as_deref(), &id)
            .await
            .map_err(|e| to_status(&e, &id))?;
        Ok(with_id(
            Response::new(pb::ScheduleResponse {
                items: items.into_iter().map(Into::into).collect(),
            }),
            &id,
        ))
    }

    #[tracing::instrument(skip_all, fields(request_id))]
    async fn rotate(
        &self,
        request: Request<pb::RotateRequest>,
    ) -> Result<Response<pb::RotationReport>, Status> {
        let id = request_id();
        tracing::Span::current().record("request_id", id.as_str());
        let t = token(&request).map(str::to_string);
        let r = request.into_inner();
        if r.target.is_empty() || r.target.len() > crate::broker::limits::TARGET_LEN {
            return Err(Status::invalid_argument(
                "invalid request: target is required",
            ));
        }
        let result = self
            .broker
            .rotate_now(
                RotationCaller::Token(t.as_deref()),
                &r.target,
                Force {
                    root: r.root,
                    drop_old: r.drop_old,
                },
                &id,
            )
            .await
            .map_err(|e| to_status(&e, &id))?;
        Ok(with_id(
            Response::new(pb::RotationReport {
                results: vec![result.into()],
            }),
            &id,
        ))
    }
}
