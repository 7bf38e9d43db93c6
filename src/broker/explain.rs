//! Explain: what Mint would decide, with a trace, minting nothing; audited like every decision.

use super::*;
use crate::policy::DenialDetail;

/// What Explain returns.
#[derive(Debug, Clone)]
pub struct Explained {
    /// Whether Mint would succeed.
    pub allowed: bool,
    /// Deciding rule.
    pub rule: String,
    /// Scopes Mint would grant.
    pub scopes: Vec<String>,
    /// TTL cap that applies.
    pub max_ttl: Duration,
    /// One line per rule considered (empty when withheld).
    pub trace: Vec<String>,
    /// The trace and the values in `reason` were withheld: the caller holds none of the
    /// `explain`, `auditor` and `admin` roles (the audit record has them).
    pub trace_withheld: bool,
    /// The caller's normalised identity.
    pub identity: Vec<(&'static str, String)>,
    /// Why not, when not allowed.
    pub reason: String,
}

impl Broker {
    /// What Mint would decide, with a trace; mints nothing. The explanation is audited.
    pub async fn explain(
        &self,
        token: Option<&str>,
        target: &str,
        scopes: &[String],
        request_id: &str,
    ) -> Result<Explained, BrokerError> {
        let started = Instant::now();
        let mut entry = self.entry("explain", request_id, token, target, scopes);
        let probe = MintRequest {
            target: target.to_string(),
            scopes: scopes.to_vec(),
            ..MintRequest::default()
        };
        if let Err(e) = probe.validate() {
            return self.fail(entry, e, started).await;
        }
        let identity = match self.identify(token, &mut entry).await {
            Ok(i) => i,
            Err(e) => return self.fail(entry, e, started).await,
        };
        let t = match self.target(target) {
            Ok(t) => t,
            Err(e) => return self.fail(entry, e, started).await,
        };
        let limits = t.cfg.limits();
        let ex = self.policy().explain(
            &identity.issuer_name,
            &identity.claims,
            limits,
            Request {
                target,
                scopes,
                ttl: None,
            },
        );
        // The trace shows other rules' conditions: only for those trusted to read the policy.
        let policy = self.policy();
        let privileged = policy.denial_detail() == DenialDetail::Full
            || [Role::Explain, Role::Auditor].into_iter().any(|r| {
                policy
                    .has_role(&identity.issuer_name, &identity.claims, r)
                    .is_ok()
            });
        let mut out = match &ex.decision {
            Ok(a) => Explained {
                allowed: true,
                rule: a.rule.clone(),
                scopes: a.scopes.clone(),
                max_ttl: a.max_ttl,
                trace: ex.trace.clone(),
                trace_withheld: false,
                identity: identity.fields(),
                reason: String::new(),
            },
            Err(d) => Explained {
                allowed: false,
                rule: match d {
                    Denied::DenyRule { rule } => rule.clone(),
                    _ => String::new(),
                },
                scopes: Vec::new(),
                max_ttl: Duration::ZERO,
                trace: ex.trace.clone(),
                trace_withheld: false,
                identity: identity.fields(),
                reason: d.to_string(),
            },
        };
        entry.outcome = if out.allowed { "allowed" } else { "denied" }.into();
        entry.rule = (!out.rule.is_empty()).then(|| out.rule.clone());
        entry.granted_scopes = out.scopes.clone();
        entry.reason = (!out.reason.is_empty()).then(|| out.reason.clone());
        if !privileged {
            out.trace.clear();
            out.trace_withheld = true;
            if let Err(d) = &ex.decision {
                out.reason = d.for_caller(policy.denial_detail()).to_string();
            }
        }
        log_decision(&entry, started, None);
        self.store.append(entry).await.map_err(BrokerError::Audit)?;
        Ok(out)
    }
}
