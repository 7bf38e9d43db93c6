//! The broker's lease operations: renew, revoke, revoke by match, list, introspect.
//! Each one is audited like Mint: the record commits before the caller hears the answer.

use super::{limits, log_decision, truncate, Broker, BrokerError, Lease};
use crate::audit::AuditEntry;
use crate::identity::{jwt, IdentityError, WorkloadIdentity};
use crate::jose::Alg;
use crate::lease::{self, LeaseChange, LeaseFilter, LeaseRecord, LeaseState};
use crate::mint::{Credential, MintContext};
use crate::policy::{Denied, Request, Role};
use crate::secret::SecretString;
use crate::store::{Store, StoreError};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Leases revoked per transaction in a bulk revocation: small enough that a mint waiting
/// behind one commit waits milliseconds.
const REVOKE_PAGE: usize = 250;
/// Most leases one bulk revocation takes (run it again for more).
pub(super) const MAX_BULK: usize = 5_000_000;

/// A renewal request in domain form.
#[derive(Debug, Default)]
pub struct RenewRequest {
    /// The lease.
    pub lease_id: String,
    /// Lifetime wanted from now; `None` means the target's default. Clamped by policy.
    pub ttl: Option<Duration>,
    /// The lease secret from Mint, when the caller proves ownership with it.
    pub lease_secret: Option<SecretString>,
}

/// What Renew returns.
#[derive(Debug)]
pub struct Renewed {
    /// The lease, extended.
    pub lease: Lease,
    /// A fresh credential, for kinds whose credential carries its own expiry.
    pub credential: Option<Credential>,
}

/// How a caller proves a lease is theirs: the lease secret, else an identity token of
/// the same identity key.
#[derive(Debug, Clone, Copy)]
pub struct LeaseProof<'a> {
    /// The caller's identity token.
    pub token: Option<&'a str>,
    /// The lease secret.
    pub lease_secret: Option<&'a SecretString>,
}

/// What Revoke returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revoked {
    /// The lease is revoked (now or before).
    pub revoked: bool,
    /// The target could not be reached yet; the reaper retries.
    pub upstream_pending: bool,
}

/// A bulk revocation.
#[derive(Debug, Clone, Default)]
pub struct RevokeMatching {
    /// Which leases.
    pub filter: LeaseFilter,
    /// Recorded with every revocation.
    pub reason: String,
    /// Count only.
    pub dry_run: bool,
    /// Required when the filter is empty.
    pub all: bool,
}

/// What a bulk revocation did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevokeSummary {
    /// Live leases that matched.
    pub matched: u64,
    /// Leases this call revoked.
    pub revoked: u64,
    /// Revoked here, upstream revocation failed (lease id, reason); the reaper retries.
    pub failed: Vec<(String, String)>,
}

/// Whether a token this broker minted is still good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Introspection {
    /// Signature, expiry and lease all good.
    pub active: bool,
    /// The lease, when the token names one that exists.
    pub lease: Option<Lease>,
    /// Why not active.
    pub reason: String,
    /// The token's `sub`, when active.
    pub subject: Option<String>,
    /// The token's `aud`, when active.
    pub audience: Vec<String>,
}

/// Pages through leases matching a filter, for a caller already authorised.
#[derive(Debug)]
pub struct LeaseLister {
    store: Arc<dyn Store>,
    filter: LeaseFilter,
    now: i64,
    cursor: Option<(i64, String)>,
    remaining: usize,
    renewable: HashMap<String, bool>,
}

#[async_trait::async_trait]
impl super::Pages for LeaseLister {
    type Item = Lease;

    async fn next_page(&mut self) -> Result<Vec<Lease>, BrokerError> {
        if self.remaining == 0 {
            return Ok(Vec::new());
        }
        let page = self
            .store
            .leases(
                &self.filter,
                self.now,
                self.cursor.clone(),
                self.remaining.min(500),
            )
            .await
            .map_err(BrokerError::Store)?;
        self.remaining -= page.len();
        if page.is_empty() {
            self.remaining = 0;
        }
        self.cursor = page.last().map(|l| (l.issued_at, l.id.clone()));
        Ok(page
            .iter()
            .map(|l| {
                let r = self.renewable.get(&l.target).copied().unwrap_or(false);
                Lease::from_record(l, r, self.now)
            })
            .collect())
    }
}

/// The change that revokes a live lease at `now`: straight to `revoked` when the
/// credential is self-contained, to `revoking` when the target must be told.
pub(crate) fn revocation_change(l: &LeaseRecord, now: i64) -> LeaseChange {
    let mut c = LeaseChange::new(&l.id, LeaseState::Live);
    c.revoked_at = Some(now);
    if l.upstream.is_some() {
        c.state = Some(LeaseState::Revoking);
        c.next_attempt_at = Some(Some(now));
    } else {
        c.state = Some(LeaseState::Revoked);
    }
    c
}

fn filter_context(f: &LeaseFilter) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for (k, v) in [
        ("filter.lease_id", &f.id),
        ("filter.identity_key", &f.identity_key),
        ("filter.issuer", &f.issuer),
        ("filter.repository", &f.repository),
        ("filter.target", &f.target),
        ("filter.rule", &f.rule),
    ] {
        if let Some(v) = v {
            m.insert(k.to_string(), truncate(v, limits::CONTEXT_VALUE_LEN));
        }
    }
    if let Some(t) = f.issued_before {
        m.insert("filter.issued_before".into(), t.to_string());
    }
    m
}

impl Broker {
    /// An audit entry about an existing lease: the lease holder's identity, the target.
    pub(super) fn lease_entry(
        &self,
        action: &str,
        request_id: &str,
        token: Option<&str>,
        l: &LeaseRecord,
    ) -> AuditEntry {
        let mut e = self.entry(action, request_id, token, &l.target, &l.scopes);
        e.issuer = Some(l.issuer.clone());
        e.identity_key = Some(l.identity_key.clone());
        e.subject = Some(l.subject.clone());
        e.repository = l.repository.clone();
        e.lease_id = Some(l.id.clone());
        e.credential_jti = Some(l.id.clone());
        e
    }

    async fn load_lease(&self, id: &str) -> Result<LeaseRecord, BrokerError> {
        if !lease::valid_id(id) {
            return Err(BrokerError::InvalidRequest(
                "lease_id is not a lease id".into(),
            ));
        }
        self.store
            .lease(id)
            .await
            .map_err(BrokerError::Store)?
            .ok_or(BrokerError::UnknownLease)
    }

    /// Checks that the caller holds the lease. A presented lease secret must match; else
    /// the identity token must verify and carry the lease's issuer and identity key.
    async fn prove_owner(
        &self,
        proof: LeaseProof<'_>,
        l: &LeaseRecord,
        entry: &mut AuditEntry,
    ) -> Result<(), BrokerError> {
        if let Some(s) = proof.lease_secret.filter(|s| !s.expose().is_empty()) {
            entry.context.insert("proof".into(), "lease_secret".into());
            return if lease::secret_matches(s.expose(), &l.secret_hash) {
                Ok(())
            } else {
                Err(BrokerError::NotLeaseOwner)
            };
        }
        entry
            .context
            .insert("proof".into(), "identity_token".into());
        let token = proof.token.ok_or(IdentityError::Missing)?;
        let id = self.verifier.verify(token).await?;
        if id.issuer_name == l.issuer && id.key == l.identity_key {
            Ok(())
        } else {
            entry
                .context
                .insert("caller_identity_key".into(), truncate(&id.key, 256));
            Err(BrokerError::NotLeaseOwner)
        }
    }

    /// Opens a lease's sealed upstream handle.
    fn open_upstream(&self, l: &LeaseRecord) -> Result<Option<SecretString>, BrokerError> {
        let Some(sealed) = &l.upstream else {
            return Ok(None);
        };
        let corrupt = || {
            BrokerError::Store(StoreError::Corrupt(format!(
                "lease {}: upstream handle",
                l.id
            )))
        };
        let bytes = self
            .master
            .open(sealed, &lease::upstream_aad(&l.id))
            .map_err(|_| corrupt())?;
        let s = String::from_utf8(bytes.expose().clone()).map_err(|_| corrupt())?;
        Ok(Some(SecretString::new(s)))
    }

    /// Loads the lease and proves the caller holds it; failures are audited.
    async fn owned_lease(
        &self,
        action: &str,
        lease_id: &str,
        proof: LeaseProof<'_>,
        request_id: &str,
        started: Instant,
    ) -> Result<(LeaseRecord, AuditEntry), BrokerError> {
        let mut entry = self.entry(action, request_id, proof.token, "", &[]);
        entry.lease_id = Some(truncate(lease_id, 64));
        let l = match self.load_lease(lease_id).await {
            Ok(l) => l,
            Err(e) => return self.fail(entry, e, started).await,
        };
        let mut entry = self.lease_entry(action, request_id, proof.token, &l);
        if let Err(e) = self.prove_owner(proof, &l, &mut entry).await {
            return self.fail(entry, e, started).await;
        }
        Ok((l, entry))
    }

    /// Extends a lease within what policy allows now: the rules are re-evaluated against
    /// the claims recorded at mint time (a rule removed since stops renewal), and the
    /// lease never passes its maximum lifetime.
    pub async fn renew(
        &self,
        token: Option<&str>,
        req: RenewRequest,
        request_id: &str,
    ) -> Result<Renewed, BrokerError> {
        let started = Instant::now();
        let proof = LeaseProof {
            token,
            lease_secret: req.lease_secret.as_ref(),
        };
        let (l, mut entry) = self
            .owned_lease("renew", &req.lease_id, proof, request_id, started)
            .await?;
        if let Some(t) = req.ttl {
            if t.is_zero() || t.as_secs() > limits::TTL_SECS {
                let e =
                    BrokerError::InvalidRequest("ttl must be positive and at most a year".into());
                return self.fail(entry, e, started).await;
            }
        }
        let now = self.clock.now();
        let state = l.effective_state(now);
        if state != LeaseState::Live {
            let e = BrokerError::NotRenewable(format!("lease is {}", state.as_str()));
            return self.fail(entry, e, started).await;
        }
        let target = match self.target(&l.target) {
            Ok(t) => t,
            Err(e) => return self.fail(entry, e, started).await,
        };
        if !target.minter.renewable() {
            let e = BrokerError::NotRenewable(format!(
                "target kind {} cannot renew",
                target.minter.kind()
            ));
            return self.fail(entry, e, started).await;
        }
        let Some(claims) = lease::claims_from_text(&self.master, &l.id, &l.claims_json) else {
            let e = BrokerError::Store(StoreError::Corrupt(format!("lease {}: claims", l.id)));
            return self.fail(entry, e, started).await;
        };
        let allowed = match self.policy().decide(
            &l.issuer,
            &claims,
            target.cfg.limits(),
            Request {
                target: &l.target,
                scopes: &l.scopes,
                ttl: req.ttl,
            },
        ) {
            Ok(a) => a,
            Err(d) => return self.fail(entry, d.into(), started).await,
        };
        entry.rule = Some(allowed.rule.clone());
        let lifetime = i64::try_from(allowed.max_lifetime.as_secs()).unwrap_or(i64::MAX);
        let max_end = l.max_expires_at.min(l.issued_at.saturating_add(lifetime));
        let expires_at = match lease::renewed_expiry(now, l.expires_at, max_end, allowed.ttl) {
            Ok(e) => e,
            Err(r) => {
                return self
                    .fail(entry, BrokerError::NotRenewable(r.to_string()), started)
                    .await
            }
        };
        entry.granted_scopes = l.scopes.clone();
        entry.ttl_secs = Some(expires_at - now);
        let identity: WorkloadIdentity = match self.verifier.identity_from_claims(&l.issuer, claims)
        {
            Ok(i) => i,
            Err(e) => return self.fail(entry, e.into(), started).await,
        };
        let upstream = match self.open_upstream(&l) {
            Ok(u) => u,
            Err(e) => return self.fail(entry, e, started).await,
        };
        let ctx = MintContext {
            identity: &identity,
            scopes: &l.scopes,
            ttl: Duration::from_secs((expires_at - now) as u64),
            now,
            lease_id: &l.id,
        };
        let credential = match target.minter.renew(&ctx, upstream.as_ref()).await {
            Ok(c) => c,
            Err(e) => return self.fail(entry, e.into(), started).await,
        };
        entry.outcome = "allowed".into();
        entry.credential_fingerprint = credential.as_ref().and_then(Credential::fingerprint);
        entry
            .context
            .insert("renew_count".into(), (l.renew_count + 1).to_string());
        let mut change = LeaseChange::new(&l.id, LeaseState::Live);
        change.expect_renew_count = Some(l.renew_count);
        change.expires_at = Some(expires_at);
        change.renew_count = Some(l.renew_count + 1);
        match self
            .store
            .commit_changes(vec![(change, Some(entry.clone()))])
            .await
        {
            Ok(applied) if applied.first() == Some(&true) => {}
            Ok(_) => return self.fail(entry, BrokerError::Conflict, started).await,
            Err(e) => return Err(BrokerError::Audit(e)),
        }
        log_decision(&entry, started, None);
        let mut renewed = l;
        renewed.expires_at = expires_at;
        renewed.renew_count += 1;
        Ok(Renewed {
            lease: Lease::from_record(&renewed, true, now),
            credential,
        })
    }

    /// Revokes one of the caller's own leases. Idempotent: a lease already revoked or
    /// expired answers `revoked` again (and that call is audited too).
    pub async fn revoke(
        &self,
        proof: LeaseProof<'_>,
        lease_id: &str,
        request_id: &str,
    ) -> Result<Revoked, BrokerError> {
        let started = Instant::now();
        let (l, mut entry) = self
            .owned_lease("revoke", lease_id, proof, request_id, started)
            .await?;
        let now = self.clock.now();
        entry.outcome = "allowed".into();
        if l.state != LeaseState::Live {
            entry.reason = Some(format!("already {}", l.state.as_str()));
            log_decision(&entry, started, None);
            self.store.append(entry).await.map_err(BrokerError::Audit)?;
            return Ok(Revoked {
                revoked: true,
                upstream_pending: l.state == LeaseState::Revoking,
            });
        }
        let applied = self
            .store
            .commit_changes(vec![(revocation_change(&l, now), Some(entry.clone()))])
            .await
            .map_err(BrokerError::Audit)?;
        if applied.first() != Some(&true) {
            // Someone else changed it first; answer from what it is now.
            let now_state = self.load_lease(lease_id).await?.state;
            if now_state == LeaseState::Live {
                return self.fail(entry, BrokerError::Conflict, started).await;
            }
            log_decision(&entry, started, Some("already_revoked"));
            return Ok(Revoked {
                revoked: true,
                upstream_pending: now_state == LeaseState::Revoking,
            });
        }
        log_decision(&entry, started, None);
        let mut upstream_pending = false;
        if l.upstream.is_some() {
            let mut revoking = l;
            revoking.state = LeaseState::Revoking;
            revoking.revoked_at = Some(now);
            upstream_pending = self.reaper.settle(&revoking, now).await.is_err();
        }
        Ok(Revoked {
            revoked: true,
            upstream_pending,
        })
    }

    /// Revokes every live lease matching the filter (`admin` role), a page at a time:
    /// one audit record per lease, each page one transaction, upstream revocations
    /// after each page. Answers what matched, what was revoked, what failed upstream.
    pub async fn revoke_matching(
        &self,
        token: Option<&str>,
        req: RevokeMatching,
        request_id: &str,
    ) -> Result<RevokeSummary, BrokerError> {
        let started = Instant::now();
        let mut entry = self.entry(
            "revoke_matching",
            request_id,
            token,
            req.filter.target.as_deref().unwrap_or(""),
            &[],
        );
        entry.context = filter_context(&req.filter);
        entry.context.insert(
            "reason".into(),
            truncate(&req.reason, limits::CONTEXT_VALUE_LEN),
        );
        if req.dry_run {
            entry.context.insert("dry_run".into(), "true".into());
        }
        let caller = match self.identify(token, &mut entry).await {
            Ok(i) => i,
            Err(e) => return self.fail(entry, e, started).await,
        };
        if let Err(d) = self
            .policy()
            .has_role(&caller.issuer_name, &caller.claims, Role::Admin)
        {
            return self.fail(entry, d.into(), started).await;
        }
        if req.reason.len() > limits::CONTEXT_VALUE_LEN {
            let e = BrokerError::InvalidRequest("reason is longer than 1024 bytes".into());
            return self.fail(entry, e, started).await;
        }
        if req.filter.is_unrestricted() && !req.all {
            let e = BrokerError::InvalidRequest(
                "refusing to revoke every lease: name a filter, or set all".into(),
            );
            return self.fail(entry, e, started).await;
        }
        let now = self.clock.now();
        let mut filter = req.filter.clone();
        filter.include_inactive = false;
        let mut summary = RevokeSummary::default();
        // One pass collects the ids; then pages, each one short transaction.
        let ids = self
            .store
            .lease_ids(&filter, now, MAX_BULK)
            .await
            .map_err(BrokerError::Store)?;
        summary.matched = ids.len() as u64;
        if !req.dry_run {
            let (revoked, failed) = self
                .revoke_ids(
                    &ids,
                    now,
                    |_| true,
                    |l| {
                        let mut e = self.lease_entry("revoke", request_id, None, l);
                        e.token_fingerprint = Some(caller.token_fingerprint.clone());
                        e.reason = Some(format!("revoked by {}", truncate(&caller.key, 256)));
                        e.context = BTreeMap::from([
                            ("actor".to_string(), truncate(&caller.key, 256)),
                            ("actor_issuer".to_string(), caller.issuer_name.clone()),
                            (
                                "reason".to_string(),
                                truncate(&req.reason, limits::CONTEXT_VALUE_LEN),
                            ),
                        ]);
                        e
                    },
                )
                .await?;
            summary.revoked = revoked;
            summary.failed = failed;
        }
        entry.outcome = "allowed".into();
        for (k, v) in [
            ("matched", summary.matched),
            ("revoked", summary.revoked),
            ("upstream_failed", summary.failed.len() as u64),
        ] {
            entry.context.insert(k.into(), v.to_string());
        }
        log_decision(&entry, started, None);
        self.store.append(entry).await.map_err(BrokerError::Audit)?;
        Ok(summary)
    }

    /// Revokes the leases among `ids` that are live and `keep` accepts, a page at a time:
    /// each page one transaction with one audit record per lease (`audit` makes it; its
    /// outcome is set here), then the page's upstream revocations. Answers how many were
    /// revoked and the upstream failures (lease id, reason), which the reaper retries.
    pub(super) async fn revoke_ids(
        &self,
        ids: &[String],
        now: i64,
        keep: impl Fn(&LeaseRecord) -> bool,
        audit: impl Fn(&LeaseRecord) -> AuditEntry,
    ) -> Result<(u64, Vec<(String, String)>), BrokerError> {
        let (mut revoked, mut failed) = (0, Vec::new());
        for chunk in ids.chunks(REVOKE_PAGE) {
            let page: Vec<LeaseRecord> = self
                .store
                .leases_by_id(chunk)
                .await
                .map_err(BrokerError::Store)?
                .into_iter()
                .filter(|l| l.is_live(now) && keep(l))
                .collect();
            let changes = page
                .iter()
                .map(|l| {
                    let mut e = audit(l);
                    e.outcome = "allowed".into();
                    (revocation_change(l, now), Some(e))
                })
                .collect();
            let applied = self
                .store
                .commit_changes(changes)
                .await
                .map_err(BrokerError::Audit)?;
            let mut upstream = Vec::new();
            for (l, ok) in page.into_iter().zip(applied) {
                if ok {
                    revoked += 1;
                    if l.upstream.is_some() {
                        upstream.push(LeaseRecord {
                            state: LeaseState::Revoking,
                            revoked_at: Some(now),
                            ..l
                        });
                    }
                }
            }
            failed.extend(self.reaper.settle_many(upstream, now).await);
        }
        Ok((revoked, failed))
    }

    /// Lists leases (`auditor` role; `admin` implies it). The listing itself is audited.
    pub async fn list_leases(
        &self,
        token: Option<&str>,
        filter: LeaseFilter,
        limit: usize,
        request_id: &str,
    ) -> Result<LeaseLister, BrokerError> {
        self.require_role(
            "list_leases",
            Role::Auditor,
            token,
            filter.target.as_deref().unwrap_or(""),
            filter_context(&filter),
            request_id,
        )
        .await?;
        Ok(LeaseLister {
            store: self.store.clone(),
            filter,
            now: self.clock.now(),
            cursor: None,
            remaining: limit,
            renewable: self
                .targets
                .iter()
                .map(|(k, t)| (k.clone(), t.minter.renewable()))
                .collect(),
        })
    }

    /// Whether `checked`, a token this broker minted, is still good (`introspect` role):
    /// signature by a published key, not expired, and its lease still live. Audited with
    /// the checked token's fingerprint, never the token.
    pub async fn introspect(
        &self,
        token: Option<&str>,
        checked: &str,
        request_id: &str,
    ) -> Result<Introspection, BrokerError> {
        let started = Instant::now();
        let mut entry = self.entry("introspect", request_id, token, "", &[]);
        let caller = match self.identify(token, &mut entry).await {
            Ok(i) => i,
            Err(e) => return self.fail(entry, e, started).await,
        };
        if let Err(d) =
            self.policy()
                .has_role(&caller.issuer_name, &caller.claims, Role::Introspect)
        {
            return self.fail(entry, d.into(), started).await;
        }
        entry.credential_fingerprint = Some(crate::jose::sha256_hex(checked.as_bytes()));
        // A caller whose role covers only some targets learns whether a token is active
        // and nothing else when it is not: a reason (or a lease) would tell a genuine
        // token of another target from a forged one. The audit record keeps the reason.
        let narrowed = self.targets.keys().any(|t| {
            self.policy()
                .has_role_for(&caller.issuer_name, &caller.claims, Role::Introspect, t)
                .is_err()
        });
        let mut out = self.check_own_token(checked).await?;
        if let Some(l) = &out.lease {
            entry.lease_id = Some(l.id.clone());
            entry.target = Some(l.target.clone());
            // The role may cover only some targets. A token of another target is reported
            // inactive with nothing about it (RFC 7662 section 4), and the refusal audited.
            if let Err(d) = self.policy().has_role_for(
                &caller.issuer_name,
                &caller.claims,
                Role::Introspect,
                &l.target,
            ) {
                entry.reason = Some(d.to_string());
                if let Denied::DenyRule { rule } = &d {
                    entry.rule = Some(rule.clone());
                }
                log_decision(&entry, started, Some("role_not_granted"));
                self.store.append(entry).await.map_err(BrokerError::Audit)?;
                return Ok(Introspection {
                    active: false,
                    lease: None,
                    reason: String::new(),
                    subject: None,
                    audience: Vec::new(),
                });
            }
        }
        if !out.active {
            out.subject = None;
            out.audience.clear();
        }
        entry.outcome = "allowed".into();
        entry.reason = (!out.reason.is_empty()).then(|| out.reason.clone());
        if narrowed && !out.active {
            out.reason.clear();
            out.lease = None;
        }
        entry
            .context
            .insert("active".into(), out.active.to_string());
        log_decision(&entry, started, None);
        self.store.append(entry).await.map_err(BrokerError::Audit)?;
        Ok(out)
    }

    async fn check_own_token(&self, t: &str) -> Result<Introspection, BrokerError> {
        let inactive = |reason: &str, lease: Option<Lease>| {
            Ok(Introspection {
                active: false,
                lease,
                reason: reason.to_string(),
                subject: None,
                audience: Vec::new(),
            })
        };
        let Ok(p) = jwt::parse(t) else {
            return inactive("malformed token", None);
        };
        let iss = p.claims.get("iss").and_then(Value::as_str).unwrap_or("");
        let ours = iss == self.issuer_url
            || iss
                .strip_prefix(self.issuer_url.as_str())
                .and_then(|rest| rest.strip_prefix("/targets/"))
                .is_some_and(|t| self.target_issuer(t).is_some_and(|(_, own)| own));
        if !ours {
            return inactive("not issued by this broker", None);
        }
        let (Some(alg), Some(kid)) = (Alg::parse(&p.alg), p.kid.as_deref()) else {
            return inactive("bad signature", None);
        };
        if !self.keys.verify(kid, alg, p.signing_input, &p.signature) {
            return inactive("bad signature", None);
        }
        let (Some(jti), Some(exp)) = (
            p.claims.get("jti").and_then(Value::as_str),
            p.claims.get("exp").and_then(Value::as_i64),
        ) else {
            return inactive("token lacks jti or exp", None);
        };
        let Some(lease_id) = lease::id_from_jti(jti) else {
            return inactive("unknown lease", None);
        };
        let Some(l) = self
            .store
            .lease(&lease_id)
            .await
            .map_err(BrokerError::Store)?
        else {
            return inactive("unknown lease", None);
        };
        if self
            .target_issuer(&l.target)
            .is_some_and(|(t_iss, _)| t_iss != iss)
        {
            return inactive("not issued for this lease's target", None);
        }
        let now = self.clock.now();
        let renewable = self
            .targets
            .get(&l.target)
            .map(|t| t.minter.renewable())
            .unwrap_or(false);
        let view = Lease::from_record(&l, renewable, now);
        if exp <= now {
            return inactive("token expired", Some(view));
        }
        if !l.is_live(now) {
            let reason = format!("lease {}", l.effective_state(now).as_str());
            return inactive(&reason, Some(view));
        }
        let audience = match p.claims.get("aud") {
            Some(Value::String(a)) => vec![a.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        };
        Ok(Introspection {
            active: true,
            lease: Some(view),
            reason: String::new(),
            subject: p
                .claims
                .get("sub")
                .and_then(Value::as_str)
                .map(str::to_string),
            audience,
        })
    }
}
