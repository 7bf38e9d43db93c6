//! Mint: verify → decide → mint → audit → answer; the credential leaves only after its audit record is committed.

use super::*;

/// A mint request in domain form.
#[derive(Debug, Clone, Default)]
pub struct MintRequest {
    /// Target name.
    pub target: String,
    /// Scopes wanted; empty means all granted.
    pub scopes: Vec<String>,
    /// TTL wanted.
    pub ttl: Option<Duration>,
    /// Context recorded in the audit record.
    pub context: BTreeMap<String, String>,
}

impl MintRequest {
    /// Checks the request's shape. Fails with a message naming the field.
    pub fn validate(&self) -> Result<(), BrokerError> {
        let bad = |m: String| Err(BrokerError::InvalidRequest(m));
        if self.target.is_empty() {
            return bad("target is required".into());
        }
        if self.target.len() > limits::TARGET_LEN
            || self
                .target
                .chars()
                .any(|c| c.is_control() || c.is_whitespace())
        {
            return bad("target is not a valid name".into());
        }
        if self.scopes.len() > limits::SCOPES {
            return bad(format!("at most {} scopes", limits::SCOPES));
        }
        for s in &self.scopes {
            if s.is_empty()
                || s.len() > limits::SCOPE_LEN
                || s.chars().any(|c| c.is_control() || c.is_whitespace())
            {
                return bad("scope is not valid (1-256 characters, no whitespace)".into());
            }
        }
        if let Some(t) = self.ttl {
            if t.is_zero() {
                return bad("ttl must be positive".into());
            }
            if t.as_secs() > limits::TTL_SECS {
                return bad("ttl is too large".into());
            }
        }
        if self.context.len() > limits::CONTEXT_ENTRIES {
            return bad(format!(
                "at most {} context entries",
                limits::CONTEXT_ENTRIES
            ));
        }
        let mut total = 0;
        for (k, v) in &self.context {
            if k.is_empty()
                || k.len() > limits::CONTEXT_KEY_LEN
                || v.len() > limits::CONTEXT_VALUE_LEN
            {
                return bad(format!(
                    "context keys are 1-{} bytes, values at most {} bytes",
                    limits::CONTEXT_KEY_LEN,
                    limits::CONTEXT_VALUE_LEN
                ));
            }
            total += k.len() + v.len();
        }
        if total > limits::CONTEXT_TOTAL {
            return bad(format!(
                "context larger than {} bytes",
                limits::CONTEXT_TOTAL
            ));
        }
        Ok(())
    }
}

/// What Mint returns.
#[derive(Debug)]
pub struct Minted {
    /// The credential.
    pub credential: Credential,
    /// Its lease.
    pub lease: Lease,
    /// Proves ownership of the lease to Renew and Revoke; the store keeps only its hash.
    pub lease_secret: SecretString,
    /// Where its audit record landed.
    pub audit_seq: i64,
}

impl Broker {
    /// Verify → decide → mint → audit. The credential is returned only after its audit
    /// record is committed; if the record cannot be committed, the caller gets
    /// [`BrokerError::Audit`] and the credential is dropped.
    pub async fn mint(
        &self,
        token: Option<&str>,
        req: MintRequest,
        request_id: &str,
    ) -> Result<Minted, BrokerError> {
        let started = Instant::now();
        let mut entry = self.entry("mint", request_id, token, &req.target, &req.scopes);
        if let Err(e) = req.validate() {
            return self.fail(entry, e, started).await;
        }
        entry.context = req.context.clone();
        let stage = Instant::now();
        let identity = self.identify(token, &mut entry).await;
        self.metrics.stage("verify", stage.elapsed());
        let identity = match identity {
            Ok(i) => i,
            Err(e) => return self.fail(entry, e, started).await,
        };
        let target = match self.target(&req.target) {
            Ok(t) => t,
            Err(e) => return self.fail(entry, e, started).await,
        };
        let limits = target.cfg.limits();
        let stage = Instant::now();
        let decision = self.policy().decide(
            &identity.issuer_name,
            &identity.claims,
            limits,
            Request {
                target: &req.target,
                scopes: &req.scopes,
                ttl: req.ttl,
            },
        );
        self.metrics.stage("decide", stage.elapsed());
        let allowed = match decision {
            Ok(a) => a,
            Err(d) => return self.fail(entry, d.into(), started).await,
        };
        entry.rule = Some(allowed.rule.clone());
        entry.granted_scopes = allowed.scopes.clone();
        entry.ttl_secs = Some(allowed.ttl.as_secs() as i64);

        let now = self.clock.now();
        let guard = MintGuard {
            max_live: target.cfg.max_live_leases,
            replay: self
                .replay_limits
                .get(&identity.issuer_name)
                .map(|&n| ReplayGuard {
                    issuer: identity.issuer_name.clone(),
                    token_key: match &identity.jti {
                        Some(j) => format!("jti:{j}"),
                        // The signed content, not the token bytes: another valid signature
                        // over the same claims is the same token.
                        None => format!("signed:{}", identity.content_fingerprint),
                    },
                    max_uses: n,
                    expires_at: identity.expires_at,
                }),
        };
        // Refuse before anything is created upstream; the commit checks again atomically.
        if guard != MintGuard::default() {
            if let Err(e) = self
                .store
                .check_mint_guard(&identity.key, &req.target, &guard, now)
                .await
            {
                return self.fail(entry, e.into(), started).await;
            }
        }
        let lease_id = crate::clock::new_id();
        let ctx = MintContext {
            identity: &identity,
            scopes: &allowed.scopes,
            ttl: allowed.ttl,
            now,
            lease_id: &lease_id,
        };
        let stage = Instant::now();
        let credential = target.minter.mint(&ctx).await;
        self.metrics.stage("mint", stage.elapsed());
        let credential = match credential {
            Ok(c) => c,
            Err(e) => return self.fail(entry, e.into(), started).await,
        };
        entry.outcome = "allowed".into();
        entry.lease_id = Some(lease_id.clone());
        entry.credential_jti = Some(credential.id.clone());
        entry.credential_fingerprint = credential.fingerprint();
        let (lease_secret, secret_hash) = lease::new_secret();
        let record = LeaseRecord {
            id: lease_id.clone(),
            issuer: identity.issuer_name.clone(),
            identity_key: identity.key.clone(),
            // As the audit record has them: a redacted claim shows in neither.
            subject: entry.subject.clone().unwrap_or_default(),
            repository: entry.repository.clone(),
            target: req.target.clone(),
            kind: target.minter.kind().to_string(),
            rule: allowed.rule.clone(),
            scopes: allowed.scopes.clone(),
            issued_at: now,
            expires_at: credential.expires_at,
            max_expires_at: now.saturating_add(allowed.max_lifetime.as_secs() as i64),
            renew_count: 0,
            state: LeaseState::Live,
            revoked_at: None,
            secret_hash,
            claims_json: lease::claims_text(
                &self.master,
                &lease_id,
                &identity.claims,
                !self.audit.redact.is_empty(),
            ),
            upstream: credential.upstream.as_ref().map(|u| {
                self.master
                    .seal(u.expose().as_bytes(), &lease::upstream_aad(&lease_id))
            }),
            attempts: 0,
            next_attempt_at: None,
            last_error: None,
        };
        let lease = Lease::from_record(&record, target.minter.renewable(), now);
        let stage = Instant::now();
        let committed = self
            .store
            .commit_mint(record, guard, entry.clone(), now)
            .await;
        self.metrics.stage("audit_commit", stage.elapsed());
        match committed {
            Ok(appended) => {
                log_decision(&entry, started, None);
                self.metrics.mint(&req.target, "allowed");
                self.metrics.stage("total", started.elapsed());
                Ok(Minted {
                    lease,
                    credential,
                    lease_secret,
                    audit_seq: appended.seq,
                })
            }
            Err(e) => {
                // Nothing may stay behind upstream for a credential that was not issued.
                if credential.upstream.is_some() {
                    if let Err(u) = target
                        .minter
                        .revoke(
                            &lease_id,
                            credential.upstream.as_ref(),
                            credential.expires_at,
                        )
                        .await
                    {
                        tracing::error!(lease_id = %lease_id, target = %req.target, error = %u, "could not undo an upstream credential after a failed commit");
                    }
                }
                match e {
                    CommitError::Store(s) => {
                        log_decision(&entry, started, Some("audit_unavailable"));
                        self.metrics.denied("audit_unavailable");
                        self.metrics.mint(&req.target, "error");
                        Err(BrokerError::Audit(s))
                    }
                    other => {
                        entry.lease_id = None;
                        entry.credential_jti = None;
                        entry.credential_fingerprint = None;
                        self.fail(entry, other.into(), started).await
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_validation_names_the_field() {
        let ok = MintRequest {
            target: "t".into(),
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
        let cases = [
            MintRequest::default(),
            MintRequest {
                target: "a b".into(),
                ..ok.clone()
            },
            MintRequest {
                target: "x".repeat(200),
                ..ok.clone()
            },
            MintRequest {
                scopes: vec!["".into()],
                ..ok.clone()
            },
            MintRequest {
                scopes: vec!["a b".into()],
                ..ok.clone()
            },
            MintRequest {
                scopes: vec!["s".into(); 65],
                ..ok.clone()
            },
            MintRequest {
                ttl: Some(Duration::ZERO),
                ..ok.clone()
            },
            MintRequest {
                ttl: Some(Duration::from_secs(limits::TTL_SECS + 1)),
                ..ok.clone()
            },
            MintRequest {
                context: (0..33).map(|i| (format!("k{i}"), "v".into())).collect(),
                ..ok.clone()
            },
            MintRequest {
                context: [("k".to_string(), "v".repeat(2000))].into(),
                ..ok.clone()
            },
            MintRequest {
                context: (0..20)
                    .map(|i| (format!("k{i}"), "v".repeat(1000)))
                    .collect(),
                ..ok.clone()
            },
        ];
        for c in cases {
            assert!(
                matches!(c.validate(), Err(BrokerError::InvalidRequest(_))),
                "{c:?}"
            );
        }
    }
}
