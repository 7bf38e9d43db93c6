//! Policy: plain-data rules over verified claims, and the pure functions that apply them.
//!
//! - [`Rule`]s name an issuer, claim matchers that must all hold, and grants (or, for deny
//!   rules, the targets they refuse). Built from configuration by [`crate::config`].
//! - [`Policy::decide`] answers a mint request; [`Policy::explain`] adds a trace line per rule
//!   considered. Both are pure: same inputs, same answer, no I/O, no clock.
//! - Deny rules win over allows; no match means deny; a request may narrow the granted scopes
//!   and TTL, never widen them.

mod matcher;
mod parse;

pub use matcher::{ClaimPath, Matcher, MatcherError};
pub use parse::{check_name, KnownTarget, RawGrant, RawRule, RuleError};

use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

/// Whether a rule grants or refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Grants what the rule lists.
    Allow,
    /// Refuses, whatever other rules say.
    Deny,
}

/// Roles the broker itself grants through policy (used by the rotation cron, the
/// security team, and admins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// May run and inspect rotations.
    Rotator,
    /// May query, tail and verify the audit log.
    Auditor,
    /// May do anything, including bulk revocation.
    Admin,
    /// May introspect tokens Latchkey minted.
    Introspect,
    /// Sees Explain's whole trace and the values in denial reasons (which reveal other
    /// rules' conditions); `auditor` and `admin` see them too.
    Explain,
}

impl Role {
    /// Parses a role name.
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "rotator" => Role::Rotator,
            "auditor" => Role::Auditor,
            "admin" => Role::Admin,
            "introspect" => Role::Introspect,
            "explain" => Role::Explain,
            _ => return None,
        })
    }

    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Rotator => "rotator",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
            Role::Introspect => "introspect",
            Role::Explain => "explain",
        }
    }
}

/// What an allow rule grants on one target.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    /// Target name.
    pub target: String,
    /// Scopes allowed there.
    pub scopes: Vec<String>,
    /// TTL cap for this grant; `None` means the target's own cap.
    pub max_ttl: Option<Duration>,
    /// Cap on a lease's total lifetime, renewals included; `None` means the target's.
    pub max_lifetime: Option<Duration>,
}

/// One policy rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Unique name, reported in decisions and the audit log.
    pub name: String,
    /// Name of the configured issuer whose tokens this rule applies to.
    pub issuer: String,
    /// Allow or deny.
    pub effect: Effect,
    /// Claim matchers; all must hold.
    pub claims: Vec<(ClaimPath, Matcher)>,
    /// Grants (allow rules).
    pub grants: Vec<Grant>,
    /// Targets refused (deny rules); empty means every target and role.
    pub deny_targets: Vec<String>,
    /// Broker roles granted (allow rules) .
    pub roles: Vec<Role>,
    /// Targets the roles are limited to, for roles that concern one target's tokens
    /// (`introspect`); empty means every target.
    pub role_targets: Vec<String>,
    /// Claim values are folded before matching ([`matcher::fold`]): case, width and
    /// invisible characters do not escape the rule. The default for deny rules.
    pub fold: bool,
}

/// What the target itself allows, independent of rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetLimits {
    /// TTL when the request names none.
    pub default_ttl: Duration,
    /// Hard cap.
    pub max_ttl: Duration,
    /// Longest total lifetime of a lease, renewals included.
    pub max_lifetime: Duration,
}

/// A request as policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Target name.
    pub target: &'a str,
    /// Scopes wanted; empty means all granted.
    pub scopes: &'a [String],
    /// TTL wanted; `None` means the target default.
    pub ttl: Option<Duration>,
}

/// An allow decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Allowed {
    /// The allow rules whose grants were used, comma-separated.
    pub rule: String,
    /// Scopes granted (sorted, unique).
    pub scopes: Vec<String>,
    /// Granted TTL.
    pub ttl: Duration,
    /// The cap that applied.
    pub max_ttl: Duration,
    /// Longest total lifetime of the lease, renewals included.
    pub max_lifetime: Duration,
}

/// Why a request was refused. Messages are stable and safe to show the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// A deny rule matched.
    #[error("denied by rule {rule}")]
    DenyRule {
        /// The deny rule.
        rule: String,
    },
    /// No allow rule grants this target to this caller.
    #[error("no rule grants target {target}{}", hint.as_ref().map(|h| format!(" ({h})")).unwrap_or_default())]
    NoRuleMatched {
        /// The target asked for.
        target: String,
        /// The first failing clause of the closest rule, if any rule was considered,
        /// with the values it compared (for the audit record and privileged callers).
        hint: Option<String>,
        /// The same clause by rule and claim name only, without values.
        names: Option<String>,
    },
    /// A requested scope is not granted.
    #[error("scope {scope} not granted on target {target}")]
    ScopeNotGranted {
        /// The scope.
        scope: String,
        /// The target.
        target: String,
    },
    /// A broker role is not granted.
    #[error("role {0} not granted")]
    RoleNotGranted(&'static str),
}

/// How much of a denial's reason a caller without the `explain`, `auditor` or `admin`
/// role is told (`[policy] denial_detail`). The audit record always holds all of it.
/// The values a failing clause compared are another team's rule conditions: a caller who
/// sees them can learn the policy clause by clause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DenialDetail {
    /// Nothing beyond the decision and the deny rule's name.
    None,
    /// The names of the rule and claim that refused, without values.
    #[default]
    Names,
    /// Everything, values included (development).
    Full,
}

impl DenialDetail {
    /// Parses the configured name.
    pub fn parse(s: &str) -> Option<DenialDetail> {
        Some(match s {
            "none" => DenialDetail::None,
            "names" => DenialDetail::Names,
            "full" => DenialDetail::Full,
            _ => return None,
        })
    }
}

impl Denied {
    /// The denial as a caller at `detail` may see it.
    pub fn for_caller(&self, detail: DenialDetail) -> Denied {
        match (self, detail) {
            (_, DenialDetail::Full) => self.clone(),
            (Denied::NoRuleMatched { target, names, .. }, d) => Denied::NoRuleMatched {
                target: target.clone(),
                hint: if d == DenialDetail::Names {
                    names.clone()
                } else {
                    None
                },
                names: None,
            },
            _ => self.clone(),
        }
    }
}

/// The outcome of [`Policy::decide`].
pub type Decision = Result<Allowed, Denied>;

/// Rules plus the index that makes decisions independent of the total rule count.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<Rule>,
    /// issuer -> target -> the rules that mention that target (allow grants or targeted
    /// denies).
    by_target: HashMap<String, HashMap<String, Bucket>>,
    /// issuer -> deny rules with no target list (they refuse everything).
    deny_all: HashMap<String, Vec<usize>>,
    /// issuer -> allow rules granting any role.
    with_roles: HashMap<String, Vec<usize>>,
    /// What unprivileged callers learn of a denial.
    denial_detail: DenialDetail,
}

/// The rules of one issuer that mention one target, indexed on their exact-valued claims:
/// a rule whose conditions include `claim = "value"` (or an any-of exact values) can only
/// match a caller carrying that value, so a decision looks it up instead of trying the
/// rule. Many rules per target (one per repository, say) then cost one hash lookup.
#[derive(Debug, Clone, Default)]
struct Bucket {
    /// Every rule, in configuration order (what `explain` walks).
    all: Vec<usize>,
    /// Rules without an exact-valued condition: always candidates.
    unkeyed: Vec<usize>,
    /// Claim path -> value -> rules whose first exact-valued condition is on that path
    /// and accepts that value.
    keyed: Vec<(ClaimPath, HashMap<String, Vec<usize>>)>,
}

impl Bucket {
    fn push(&mut self, i: usize, rule: &Rule) {
        self.all.push(i);
        // A folded rule compares folded values: the raw value is no index key.
        let indexed = if rule.fold { &[][..] } else { &rule.claims[..] };
        let key = indexed.iter().find_map(|(path, m)| {
            let values: Option<Vec<&str>> = match m {
                Matcher::Exact(v) => Some(vec![v.as_str()]),
                Matcher::AnyOf(items) => items
                    .iter()
                    .map(|m| match m {
                        Matcher::Exact(v) => Some(v.as_str()),
                        _ => None,
                    })
                    .collect(),
                _ => None,
            };
            values.map(|v| (path, v))
        });
        let Some((path, values)) = key else {
            self.unkeyed.push(i);
            return;
        };
        let slot = match self.keyed.iter().position(|(p, _)| p == path) {
            Some(at) => at,
            None => {
                self.keyed.push((path.clone(), HashMap::new()));
                self.keyed.len() - 1
            }
        };
        let by_value = &mut self.keyed[slot].1;
        for v in values {
            let rules = by_value.entry(v.to_string()).or_default();
            if rules.last() != Some(&i) {
                rules.push(i);
            }
        }
    }

    /// The rules that can match `claims`, in configuration order.
    fn candidates(&self, claims: &Map<String, Value>) -> Vec<usize> {
        let mut out = self.unkeyed.clone();
        for (path, by_value) in &self.keyed {
            if let Some(Value::String(v)) = path.lookup(claims) {
                if let Some(rules) = by_value.get(v.as_str()) {
                    out.extend_from_slice(rules);
                }
            }
        }
        if out.len() > self.unkeyed.len() {
            out.sort_unstable();
        }
        out
    }
}

/// A decision with the reasoning behind it, for `Explain` and `policy test`.
#[derive(Debug, Clone)]
pub struct Explanation {
    /// The decision.
    pub decision: Decision,
    /// One line per rule considered.
    pub trace: Vec<String>,
}

impl Policy {
    /// The same rules, telling unprivileged callers `detail` of a denial.
    pub fn with_denial_detail(mut self, detail: DenialDetail) -> Policy {
        self.denial_detail = detail;
        self
    }

    /// What unprivileged callers learn of a denial.
    pub fn denial_detail(&self) -> DenialDetail {
        self.denial_detail
    }

    /// Builds the policy and its index. Rules are assumed checked by the config loader.
    pub fn new(rules: Vec<Rule>) -> Policy {
        let mut p = Policy {
            rules,
            ..Policy::default()
        };
        for (i, r) in p.rules.iter().enumerate() {
            let targets: Vec<&str> = match r.effect {
                Effect::Allow => r.grants.iter().map(|g| g.target.as_str()).collect(),
                Effect::Deny => r.deny_targets.iter().map(String::as_str).collect(),
            };
            if r.effect == Effect::Deny && targets.is_empty() {
                p.deny_all.entry(r.issuer.clone()).or_default().push(i);
            }
            let per_issuer = p.by_target.entry(r.issuer.clone()).or_default();
            let mut seen = BTreeSet::new();
            for t in targets {
                if seen.insert(t) {
                    per_issuer.entry(t.to_string()).or_default().push(i, r);
                }
            }
            if r.effect == Effect::Allow && !r.roles.is_empty() {
                p.with_roles.entry(r.issuer.clone()).or_default().push(i);
            }
        }
        p
    }

    /// The rules, in configuration order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Decides a mint request for a caller verified by `issuer` with `claims`.
    pub fn decide(
        &self,
        issuer: &str,
        claims: &Map<String, Value>,
        limits: TargetLimits,
        req: Request<'_>,
    ) -> Decision {
        self.evaluate(issuer, claims, limits, req, None)
    }

    /// Like [`Policy::decide`], with one trace line per rule considered.
    pub fn explain(
        &self,
        issuer: &str,
        claims: &Map<String, Value>,
        limits: TargetLimits,
        req: Request<'_>,
    ) -> Explanation {
        let mut trace = Vec::new();
        let decision = self.evaluate(issuer, claims, limits, req, Some(&mut trace));
        Explanation { decision, trace }
    }

    /// Whether the caller holds a broker role: an allow rule grants it and no untargeted
    /// deny rule matches. `Admin` implies every role.
    pub fn has_role(
        &self,
        issuer: &str,
        claims: &Map<String, Value>,
        role: Role,
    ) -> Result<(), Denied> {
        self.role_on(issuer, claims, role, None)
    }

    /// Whether the caller holds `role` for `target`: like [`Policy::has_role`], where the
    /// granting rule's `role_targets` must be empty or name `target`, and a deny rule
    /// refusing `target` also refuses the role there.
    pub fn has_role_for(
        &self,
        issuer: &str,
        claims: &Map<String, Value>,
        role: Role,
        target: &str,
    ) -> Result<(), Denied> {
        self.role_on(issuer, claims, role, Some(target))
    }

    fn role_on(
        &self,
        issuer: &str,
        claims: &Map<String, Value>,
        role: Role,
        target: Option<&str>,
    ) -> Result<(), Denied> {
        let none = Vec::new();
        let targeted = target
            .and_then(|t| self.by_target.get(issuer).and_then(|m| m.get(t)))
            .map(|b| b.candidates(claims))
            .unwrap_or_default();
        let denies = self.deny_all.get(issuer).unwrap_or(&none).iter().chain(
            targeted
                .iter()
                .filter(|&&i| self.rules[i].effect == Effect::Deny),
        );
        for &i in denies {
            if self.rules[i].holds(claims) {
                return Err(Denied::DenyRule {
                    rule: self.rules[i].name.clone(),
                });
            }
        }
        for &i in self.with_roles.get(issuer).unwrap_or(&none) {
            let r = &self.rules[i];
            let covers = match target {
                Some(t) => r.role_targets.is_empty() || r.role_targets.iter().any(|x| x == t),
                None => true,
            };
            if covers
                && (r.roles.contains(&role) || r.roles.contains(&Role::Admin))
                && r.holds(claims)
            {
                return Ok(());
            }
        }
        Err(Denied::RoleNotGranted(role.as_str()))
    }

    fn evaluate(
        &self,
        issuer: &str,
        claims: &Map<String, Value>,
        limits: TargetLimits,
        req: Request<'_>,
        mut trace: Option<&mut Vec<String>>,
    ) -> Decision {
        let none = Vec::new();
        let deny_all = self.deny_all.get(issuer).unwrap_or(&none);
        let empty = Bucket::default();
        let bucket = self
            .by_target
            .get(issuer)
            .and_then(|m| m.get(req.target))
            .unwrap_or(&empty);
        // A trace shows every rule; a decision tries only those the index leaves.
        let targeted: Cow<'_, [usize]> = match trace {
            Some(_) => Cow::Borrowed(&bucket.all),
            None => Cow::Owned(bucket.candidates(claims)),
        };
        if let Some(t) = trace.as_deref_mut() {
            if deny_all.is_empty() && targeted.is_empty() {
                t.push(format!(
                    "no rule for issuer {issuer} mentions target {}",
                    req.target
                ));
            }
        }

        let mut denied_by: Option<&str> = None;
        let mut matched: Vec<&Rule> = Vec::new();
        for &i in deny_all.iter().chain(targeted.iter()) {
            let rule = &self.rules[i];
            let held = match trace.as_deref_mut() {
                None => rule.holds(claims),
                Some(t) => {
                    let outcome = rule.matches(claims);
                    let effect = match rule.effect {
                        Effect::Allow => "allow",
                        Effect::Deny => "deny",
                    };
                    t.push(match &outcome {
                        Ok(held) => format!(
                            "rule {} ({effect}): matched: {}",
                            rule.name,
                            held.join("; ")
                        ),
                        Err(failed) => {
                            format!("rule {} ({effect}): not matched: {failed}", rule.name)
                        }
                    });
                    outcome.is_ok()
                }
            };
            if held {
                match rule.effect {
                    Effect::Deny => {
                        denied_by.get_or_insert(&rule.name);
                    }
                    Effect::Allow => matched.push(rule),
                }
            }
        }
        if let Some(rule) = denied_by {
            return Err(Denied::DenyRule {
                rule: rule.to_string(),
            });
        }
        let grants: Vec<(&Rule, &Grant)> = matched
            .iter()
            .flat_map(|r| {
                r.grants
                    .iter()
                    .filter(|g| g.target == req.target)
                    .map(move |g| (*r, g))
            })
            .collect();
        if grants.is_empty() {
            // Every allow rule for this target failed: the hint is the first one's first
            // failing clause, in configuration order (found only now, on the denial path).
            let failed = bucket
                .all
                .iter()
                .map(|&i| &self.rules[i])
                .find(|r| r.effect == Effect::Allow)
                .and_then(|r| r.matches(claims).err().map(|f| (r, f)));
            return Err(Denied::NoRuleMatched {
                target: req.target.to_string(),
                hint: failed
                    .as_ref()
                    .map(|(r, f)| format!("rule {}: {f}", r.name)),
                names: failed
                    .as_ref()
                    .map(|(r, f)| format!("rule {}: claim {} did not match", r.name, f.claim)),
            });
        }

        let granted: BTreeSet<&str> = grants
            .iter()
            .flat_map(|(_, g)| g.scopes.iter().map(String::as_str))
            .collect();
        let wanted: BTreeSet<&str> = if req.scopes.is_empty() {
            granted.clone()
        } else {
            let mut w = BTreeSet::new();
            for s in req.scopes {
                if !granted.contains(s.as_str()) {
                    return Err(Denied::ScopeNotGranted {
                        scope: s.clone(),
                        target: req.target.to_string(),
                    });
                }
                w.insert(s.as_str());
            }
            w
        };

        // Every grant that contributes a wanted scope (or, for a scope-less target, every
        // grant) caps the TTL: the most restrictive cap wins.
        let mut max_ttl = limits.max_ttl;
        let mut max_lifetime = limits.max_lifetime;
        let mut rules: Vec<&str> = Vec::new();
        for (rule, g) in &grants {
            let contributes = g.scopes.is_empty() && wanted.is_empty()
                || g.scopes.iter().any(|s| wanted.contains(s.as_str()));
            if contributes {
                if let Some(cap) = g.max_ttl {
                    max_ttl = max_ttl.min(cap);
                }
                if let Some(cap) = g.max_lifetime {
                    max_lifetime = max_lifetime.min(cap);
                }
                if !rules.contains(&rule.name.as_str()) {
                    rules.push(&rule.name);
                }
            }
        }
        // No single credential outlives the lease it belongs to.
        let max_ttl = max_ttl.min(max_lifetime);
        let ttl = req.ttl.unwrap_or(limits.default_ttl).min(max_ttl);
        if let Some(t) = trace {
            t.push(format!(
                "granted by {}: scopes [{}], ttl {}s (cap {}s)",
                rules.join(","),
                wanted.iter().copied().collect::<Vec<_>>().join(" "),
                ttl.as_secs(),
                max_ttl.as_secs()
            ));
        }
        Ok(Allowed {
            rule: rules.join(","),
            scopes: wanted.into_iter().map(str::to_string).collect(),
            ttl,
            max_ttl,
            max_lifetime,
        })
    }
}

impl Rule {
    /// Whether every claim matcher holds (what [`Rule::matches`] decides, without the
    /// descriptions).
    pub fn holds(&self, claims: &Map<String, Value>) -> bool {
        self.claims
            .iter()
            .all(|(path, m)| match path.lookup(claims) {
                Some(Value::String(v)) if self.fold => m.matches(&matcher::fold(v)),
                Some(Value::String(v)) => m.matches(v),
                _ => false,
            })
    }

    /// Checks every claim matcher. `Ok` lists what held; `Err` names the first clause that
    /// failed and why.
    pub fn matches(&self, claims: &Map<String, Value>) -> Result<Vec<String>, ClauseFailed> {
        let mut held = Vec::with_capacity(self.claims.len());
        for (path, m) in &self.claims {
            let folded;
            let value = match path.lookup(claims) {
                Some(Value::String(v)) if self.fold => {
                    folded = Value::String(matcher::fold(v));
                    Some(&folded)
                }
                other => other,
            };
            let why = match value {
                Some(Value::String(v)) if m.matches(v) => {
                    held.push(format!("{path} {m}"));
                    continue;
                }
                Some(Value::String(v)) => format!("claim {path} = {v:?} does not match {m}"),
                Some(_) => format!("claim {path} is not a string"),
                None => format!("claim {path} is absent"),
            };
            return Err(ClauseFailed {
                claim: path.to_string(),
                why,
            });
        }
        if held.is_empty() {
            held.push("no claim conditions".into());
        }
        Ok(held)
    }
}

/// The first clause of a rule that did not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClauseFailed {
    /// The claim it is about.
    pub claim: String,
    /// Why, with the values compared.
    pub why: String,
}

impl std::fmt::Display for ClauseFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

#[cfg(test)]
mod tests;
