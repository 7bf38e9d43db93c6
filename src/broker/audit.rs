//! The security team's use cases (`auditor` role, `admin` implies it): query and tail
//! the audit log, verify it, read its signed checkpoints. Every call, allowed or
//! refused, is itself audited before anything is returned.

use super::{Broker, BrokerError, Pages};
use crate::audit::checkpoint::Checkpoint;
use crate::audit::verify::{Report, VerifyOptions};
use crate::audit::{AuditQuery, AuditRecord};
use crate::policy::Role;
use crate::store::Store;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Records read from the store per round trip.
const PAGE: usize = 500;

/// Pages through the records a query matches.
#[derive(Debug)]
pub struct AuditPager {
    store: Arc<dyn Store>,
    query: AuditQuery,
    remaining: usize,
}

#[async_trait::async_trait]
impl Pages for AuditPager {
    type Item = AuditRecord;

    async fn next_page(&mut self) -> Result<Vec<AuditRecord>, BrokerError> {
        if self.remaining == 0 {
            return Ok(Vec::new());
        }
        let page = self
            .store
            .query_audit(&self.query, self.remaining.min(PAGE))
            .await
            .map_err(BrokerError::Store)?;
        if let Some(last) = page.last() {
            self.query.after_seq = Some(last.seq);
        }
        self.remaining = if page.len() < self.remaining.min(PAGE) {
            0
        } else {
            self.remaining - page.len()
        };
        Ok(page)
    }
}

/// Follows the log: each call answers the next records matching the query, waiting
/// for new commits when there are none. It ends (an empty page) when the query's
/// `until_seq` is passed, when the caller's identity token expires, or when the broker
/// shuts down.
#[derive(Debug)]
pub struct AuditTail {
    store: Arc<dyn Store>,
    query: AuditQuery,
    until_seq: Option<i64>,
    head: watch::Receiver<i64>,
    stopping: watch::Receiver<bool>,
    token_expires_in: Duration,
}

#[async_trait::async_trait]
impl Pages for AuditTail {
    type Item = AuditRecord;

    /// The next records; never empty: waits for new commits instead. Fails when the
    /// store cannot be read or stops.
    async fn next_page(&mut self) -> Result<Vec<AuditRecord>, BrokerError> {
        let deadline = tokio::time::sleep(self.token_expires_in);
        tokio::pin!(deadline);
        loop {
            let head = *self.head.borrow_and_update();
            let head = self.until_seq.map_or(head, |u| head.min(u));
            let after = self.query.after_seq.unwrap_or(0);
            if *self.stopping.borrow() || self.until_seq.is_some_and(|u| after >= u) {
                return Ok(Vec::new());
            }
            if head > after {
                let q = AuditQuery {
                    until_seq: Some(head),
                    ..self.query.clone()
                };
                let page = self
                    .store
                    .query_audit(&q, PAGE)
                    .await
                    .map_err(BrokerError::Store)?;
                // Everything up to `head` has been looked at unless the page was full.
                self.query.after_seq = Some(match page.last() {
                    Some(l) if page.len() == PAGE => l.seq,
                    _ => head,
                });
                if !page.is_empty() {
                    return Ok(page);
                }
                continue;
            }
            tokio::select! {
                changed = self.head.changed() => if changed.is_err() {
                    return Err(BrokerError::Store(crate::store::StoreError::Unavailable(
                        "store stopped".into(),
                    )));
                },
                _ = self.stopping.wait_for(|v| *v) => return Ok(Vec::new()),
                // The caller proved who it is with a token that has now expired: it
                // reconnects with a fresh one to go on.
                _ = &mut deadline => return Ok(Vec::new()),
            }
        }
    }
}

/// Checkpoints and what verifies them.
#[derive(Debug, Clone)]
pub struct CheckpointList {
    /// The checkpoints asked for.
    pub checkpoints: Vec<Checkpoint>,
    /// JWKS of the audit public keys.
    pub keys_jwks: serde_json::Value,
    /// Checkpoints the witness does not have yet.
    pub witness_lag: i64,
}

impl Broker {
    async fn audit_access(
        &self,
        action: &str,
        token: Option<&str>,
        context: std::collections::BTreeMap<String, String>,
        request_id: &str,
    ) -> Result<(), BrokerError> {
        self.require_role(action, Role::Auditor, token, "", context, request_id)
            .await
            .map(|_| ())
    }

    /// Records matching `query`, at most `limit`, in sequence order.
    pub async fn query_audit(
        &self,
        token: Option<&str>,
        query: AuditQuery,
        limit: usize,
        request_id: &str,
    ) -> Result<AuditPager, BrokerError> {
        self.audit_access("audit_query", token, query.context(), request_id)
            .await?;
        Ok(AuditPager {
            store: self.store.clone(),
            query,
            remaining: limit,
        })
    }

    /// Follows new records matching `query` (from `after_seq` when set, else from now).
    pub async fn tail_audit(
        &self,
        token: Option<&str>,
        mut query: AuditQuery,
        request_id: &str,
    ) -> Result<AuditTail, BrokerError> {
        let head = self.store.subscribe_head();
        if query.after_seq.is_none() {
            let (seq, _) = self.store.audit_head().await.map_err(BrokerError::Store)?;
            query.after_seq = Some(seq);
        }
        let caller = self
            .require_role(
                "audit_tail",
                Role::Auditor,
                token,
                "",
                query.context(),
                request_id,
            )
            .await?;
        let left = caller.expires_at.saturating_sub(self.clock.now()).max(0) as u64;
        Ok(AuditTail {
            store: self.store.clone(),
            until_seq: query.until_seq.take(),
            query,
            head,
            stopping: self.stopping.subscribe(),
            token_expires_in: Duration::from_secs(left),
        })
    }

    /// Walks the whole chain and every checkpoint, with the audit keys this broker
    /// loaded at start (not whatever keys the file holds now).
    pub async fn verify_audit(
        &self,
        token: Option<&str>,
        request_id: &str,
    ) -> Result<Report, BrokerError> {
        self.audit_access("audit_verify", token, Default::default(), request_id)
            .await?;
        let report = self
            .store
            .verify_audit(VerifyOptions {
                keys: Some(self.audit.keys.clone()),
                witnessed: Vec::new(),
            })
            .await
            .map_err(BrokerError::Store)?;
        if let Some(p) = &report.problem {
            tracing::error!(problem = %p, "audit log verification failed");
        }
        Ok(report)
    }

    /// Checkpoints after `after_id`, at most `limit`, with the keys that verify them.
    pub async fn checkpoints(
        &self,
        token: Option<&str>,
        after_id: i64,
        limit: usize,
        request_id: &str,
    ) -> Result<CheckpointList, BrokerError> {
        self.audit_access("audit_checkpoints", token, Default::default(), request_id)
            .await?;
        Ok(CheckpointList {
            checkpoints: self
                .store
                .checkpoints(after_id, limit)
                .await
                .map_err(BrokerError::Store)?,
            keys_jwks: self.audit.keys.to_jwks(),
            witness_lag: self.audit.status.witness_lag(),
        })
    }
}
