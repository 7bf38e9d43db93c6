//! A rule from the configuration file: its raw form and the checks that make it a
//! [`Rule`] (claim matchers, grants against the configured targets, roles, what allow and
//! deny rules may say). The assembler (`config`) reads the file and adds the file name to
//! a [`RuleError`].

use super::*;
use crate::clock::Dur;
use serde::Deserialize;
use std::collections::BTreeMap;

/// A `[[rules]]` entry as written (unknown keys are refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    /// Rule name.
    pub name: String,
    /// Issuer name the rule applies to.
    pub issuer: String,
    /// `allow` (default) or `deny`.
    pub effect: Option<String>,
    /// Claim (name or JSON pointer) → matcher.
    #[serde(default)]
    pub claims: BTreeMap<String, toml::Value>,
    /// What an allow rule grants.
    #[serde(default)]
    pub grants: Vec<RawGrant>,
    /// Targets a deny rule refuses (empty: all).
    #[serde(default)]
    pub targets: Vec<String>,
    /// The broker roles an allow rule grants.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Targets the granted roles are narrowed to.
    #[serde(default)]
    pub role_targets: Vec<String>,
    /// Fold claim values (case, width, invisible characters) before matching; default
    /// true for deny rules, false for allow rules.
    pub fold: Option<bool>,
    /// Free text for humans; not used by the broker.
    #[allow(dead_code)]
    pub description: Option<String>,
}

/// One grant of a rule, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGrant {
    /// Target name.
    pub target: String,
    /// Scopes granted there.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// TTL cap of this grant.
    pub max_ttl: Option<Dur>,
    /// Lease lifetime cap of this grant.
    pub max_lifetime: Option<Dur>,
}

/// A configured target, as a rule is checked against it.
#[derive(Debug, Clone)]
pub struct KnownTarget<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its TTL cap.
    pub max_ttl: Duration,
    /// Its lease lifetime cap.
    pub max_lifetime: Duration,
    /// The scopes it maps to what it grants, when it maps them.
    pub known_scopes: Option<Vec<&'a str>>,
}

/// Why a rule was refused: the key (`rules[2].grants[0].max_ttl`) and a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    /// The offending key.
    pub key: String,
    /// Why.
    pub reason: String,
}

fn err(key: impl Into<String>, reason: impl Into<String>) -> RuleError {
    RuleError {
        key: key.into(),
        reason: reason.into(),
    }
}

/// Checks a name (of a rule, target or issuer): 1-64 letters, digits, '-', '_' or '.'.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} must be 1-64 characters of letters, digits, '-', '_' or '.'"
        ))
    }
}

impl Rule {
    /// Checks the raw rule at `key` (`rules[3]`) against the configured issuer names and
    /// targets. Fails naming the offending key and why.
    pub fn parse(
        key: &str,
        r: RawRule,
        issuers: &[&str],
        targets: &[KnownTarget<'_>],
    ) -> Result<Rule, RuleError> {
        check_name(&r.name).map_err(|e| err(format!("{key}.name"), e))?;
        if !issuers.iter().any(|i| *i == r.issuer) {
            return Err(err(
                format!("{key}.issuer"),
                format!("no issuer named {:?}", r.issuer),
            ));
        }
        let effect = match r.effect.as_deref() {
            None | Some("allow") => Effect::Allow,
            Some("deny") => Effect::Deny,
            Some(other) => {
                return Err(err(
                    format!("{key}.effect"),
                    format!("{other:?} is not \"allow\" or \"deny\""),
                ))
            }
        };
        let fold = r.fold.unwrap_or(effect == Effect::Deny);
        let mut claims = Vec::new();
        for (claim, v) in &r.claims {
            let ck = format!("{key}.claims.{claim}");
            let path = ClaimPath::parse(claim).map_err(|e| err(&ck, e.to_string()))?;
            let mut m = matcher(&ck, v)?;
            if fold {
                m = m.folded().map_err(|e| err(&ck, e.to_string()))?;
            }
            claims.push((path, m));
        }
        let mut grants = Vec::new();
        for (j, g) in r.grants.into_iter().enumerate() {
            let gk = format!("{key}.grants[{j}]");
            let Some(t) = targets.iter().find(|t| t.name == g.target) else {
                return Err(err(
                    format!("{gk}.target"),
                    format!("no target named {:?}", g.target),
                ));
            };
            for (s, scope) in g.scopes.iter().enumerate() {
                if scope.is_empty()
                    || scope.len() > 256
                    || scope.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(err(
                        format!("{gk}.scopes[{s}]"),
                        "a scope is 1-256 characters with no whitespace",
                    ));
                }
            }
            if let Some(cap) = g.max_ttl {
                if cap.0 > t.max_ttl {
                    return Err(err(
                        format!("{gk}.max_ttl"),
                        format!(
                            "{} exceeds target {}'s max_ttl {}",
                            humantime::format_duration(cap.0),
                            t.name,
                            humantime::format_duration(t.max_ttl)
                        ),
                    ));
                }
                if cap.0 < Duration::from_secs(1) {
                    return Err(err(format!("{gk}.max_ttl"), "must be at least 1s"));
                }
            }
            if let Some(cap) = g.max_lifetime {
                if cap.0 > t.max_lifetime || cap.0 < Duration::from_secs(1) {
                    return Err(err(
                        format!("{gk}.max_lifetime"),
                        format!(
                            "must be between 1s and target {}'s max_lifetime {}",
                            t.name,
                            humantime::format_duration(t.max_lifetime)
                        ),
                    ));
                }
            }
            if let Some(known) = t.known_scopes.as_ref() {
                if g.scopes.is_empty() {
                    return Err(err(
                        format!("{gk}.scopes"),
                        format!(
                            "target {} maps scopes to what it grants; list the scopes granted (known: {})",
                            t.name,
                            known.join(", ")
                        ),
                    ));
                }
                for (k, sc) in g.scopes.iter().enumerate() {
                    if !known.contains(&sc.as_str()) {
                        return Err(err(
                            format!("{gk}.scopes[{k}]"),
                            format!(
                                "target {} knows no scope {sc:?} (known: {})",
                                t.name,
                                known.join(", ")
                            ),
                        ));
                    }
                }
            }
            grants.push(Grant {
                target: g.target,
                scopes: g.scopes,
                max_ttl: g.max_ttl.map(|d| d.0),
                max_lifetime: g.max_lifetime.map(|d| d.0),
            });
        }
        for (j, t) in r.targets.iter().enumerate() {
            if !targets.iter().any(|x| x.name == t.as_str()) {
                return Err(err(
                    format!("{key}.targets[{j}]"),
                    format!("no target named {t:?}"),
                ));
            }
        }
        for (j, t) in r.role_targets.iter().enumerate() {
            if !targets.iter().any(|x| x.name == t.as_str()) {
                return Err(err(
                    format!("{key}.role_targets[{j}]"),
                    format!("no target named {t:?}"),
                ));
            }
        }
        let mut roles = Vec::new();
        for (j, role) in r.roles.iter().enumerate() {
            roles.push(Role::parse(role).ok_or_else(|| {
                err(
                    format!("{key}.roles[{j}]"),
                    format!(
                        "unknown role {role:?}; use rotator, auditor, admin, introspect or explain"
                    ),
                )
            })?);
        }
        match effect {
            Effect::Allow => {
                if !r.targets.is_empty() {
                    return Err(err(
                        format!("{key}.targets"),
                        "only deny rules list targets; allow rules use grants",
                    ));
                }
                if roles.is_empty() && !r.role_targets.is_empty() {
                    return Err(err(
                        format!("{key}.role_targets"),
                        "role_targets narrows the rule's roles; this rule grants none",
                    ));
                }
                if grants.is_empty() && roles.is_empty() {
                    return Err(err(
                        format!("{key}.grants"),
                        "an allow rule must grant at least one target or role",
                    ));
                }
            }
            Effect::Deny => {
                if !grants.is_empty() {
                    return Err(err(format!("{key}.grants"), "deny rules do not grant; list refused targets in `targets` (empty refuses everything)"));
                }
                if !roles.is_empty() || !r.role_targets.is_empty() {
                    return Err(err(format!("{key}.roles"), "deny rules do not grant roles"));
                }
            }
        }
        Ok(Rule {
            name: r.name,
            issuer: r.issuer,
            effect,
            claims,
            grants,
            deny_targets: r.targets,
            roles,
            role_targets: r.role_targets,
            fold,
        })
    }
}

/// A claim matcher as written: a string (exact), an array (any of), or a table with one
/// of `glob`, `regex`, `not`.
fn matcher(key: &str, v: &toml::Value) -> Result<Matcher, RuleError> {
    match v {
        toml::Value::String(s) => Ok(Matcher::Exact(s.clone())),
        toml::Value::Array(items) => {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                out.push(matcher(&format!("{key}[{i}]"), item)?);
            }
            Matcher::any_of(out).map_err(|e| err(key, e.to_string()))
        }
        toml::Value::Table(t) if t.len() == 1 => {
            let (op, arg) = t.iter().next().expect("len checked");
            let text = |a: &toml::Value| {
                a.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| err(format!("{key}.{op}"), "must be a string"))
            };
            match op.as_str() {
                "glob" => Matcher::glob(&text(arg)?)
                    .map_err(|e| err(format!("{key}.glob"), e.to_string())),
                "regex" => Matcher::regex(&text(arg)?)
                    .map_err(|e| err(format!("{key}.regex"), e.to_string())),
                "not" => Ok(Matcher::Not(Box::new(matcher(&format!("{key}.not"), arg)?))),
                other => Err(err(
                    format!("{key}.{other}"),
                    "unknown matcher; use glob, regex or not",
                )),
            }
        }
        toml::Value::Table(_) => Err(err(
            key,
            "a matcher table has exactly one of glob, regex, not",
        )),
        other => Err(err(
            key,
            format!(
                "a {} is not a matcher (claims are compared as strings: quote it)",
                other.type_str()
            ),
        )),
    }
}
