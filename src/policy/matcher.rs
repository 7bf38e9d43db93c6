//! Claim matchers: exact, any-of, glob, anchored regex, negation; and claim paths.

use serde_json::{Map, Value};
use std::fmt;

/// Why a matcher or claim path could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MatcherError {
    /// The glob pattern does not compile.
    #[error("invalid glob {pattern:?}: {reason}")]
    Glob {
        /// The pattern.
        pattern: String,
        /// The glob library's reason.
        reason: String,
    },
    /// The regex does not compile.
    #[error("invalid regex {pattern:?}: {reason}")]
    Regex {
        /// The pattern.
        pattern: String,
        /// The regex library's reason.
        reason: String,
    },
    /// A JSON pointer is malformed.
    #[error("invalid JSON pointer {0:?}")]
    Pointer(String),
    /// An any-of list is empty (it would never match).
    #[error("an any-of list must not be empty")]
    EmptyAnyOf,
}

/// Where a matcher looks in the claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimPath {
    /// A top-level claim by name.
    Name(String),
    /// An RFC 6901 JSON pointer into nested claims (`/kubernetes.io/namespace`).
    Pointer(String),
}

impl ClaimPath {
    /// Parses a rule key: a leading `/` makes it a JSON pointer. Fails for malformed
    /// pointer escapes.
    pub fn parse(key: &str) -> Result<ClaimPath, MatcherError> {
        if let Some(rest) = key.strip_prefix('/') {
            // `~` must be followed by 0 or 1 (RFC 6901).
            let bytes = rest.as_bytes();
            for (i, b) in bytes.iter().enumerate() {
                if *b == b'~' && !matches!(bytes.get(i + 1), Some(b'0') | Some(b'1')) {
                    return Err(MatcherError::Pointer(key.to_string()));
                }
            }
            Ok(ClaimPath::Pointer(key.to_string()))
        } else {
            Ok(ClaimPath::Name(key.to_string()))
        }
    }

    /// Finds the value in `claims`.
    pub fn lookup<'a>(&self, claims: &'a Map<String, Value>) -> Option<&'a Value> {
        match self {
            ClaimPath::Name(n) => claims.get(n),
            ClaimPath::Pointer(p) => {
                let mut parts = p[1..].split('/');
                let first = unescape(parts.next()?);
                let mut v = claims.get(first.as_ref())?;
                for part in parts {
                    let part = unescape(part);
                    v = match v {
                        Value::Object(m) => m.get(part.as_ref())?,
                        Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
                        _ => return None,
                    };
                }
                Some(v)
            }
        }
    }
}

fn unescape(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('~') {
        s.replace("~1", "/").replace("~0", "~").into()
    } else {
        s.into()
    }
}

impl fmt::Display for ClaimPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClaimPath::Name(n) | ClaimPath::Pointer(n) => f.write_str(n),
        }
    }
}

/// A condition on one string claim value.
#[derive(Debug, Clone)]
pub enum Matcher {
    /// Equal to the string.
    Exact(String),
    /// Any of the matchers holds.
    AnyOf(Vec<Matcher>),
    /// Shell-style glob over the whole value; `*` also matches `/`.
    Glob(String, globset::GlobMatcher),
    /// Regular expression anchored to the whole value.
    Regex(String, regex::Regex),
    /// The inner matcher does not hold.
    Not(Box<Matcher>),
}

impl Matcher {
    /// A glob matcher. Fails when the pattern does not compile.
    pub fn glob(pattern: &str) -> Result<Matcher, MatcherError> {
        let g = globset::GlobBuilder::new(pattern)
            .literal_separator(false)
            .backslash_escape(true)
            .build()
            .map_err(|e| MatcherError::Glob {
                pattern: pattern.to_string(),
                reason: e.kind().to_string(),
            })?;
        Ok(Matcher::Glob(pattern.to_string(), g.compile_matcher()))
    }

    /// A regex matcher, always anchored to the whole value. Fails when the pattern does
    /// not compile.
    pub fn regex(pattern: &str) -> Result<Matcher, MatcherError> {
        let anchored = format!("^(?:{pattern})$");
        let r = regex::RegexBuilder::new(&anchored)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| MatcherError::Regex {
                pattern: pattern.to_string(),
                reason: e
                    .to_string()
                    .lines()
                    .last()
                    .unwrap_or("")
                    .trim()
                    .to_string(),
            })?;
        Ok(Matcher::Regex(pattern.to_string(), r))
    }

    /// An any-of matcher. Fails when empty.
    pub fn any_of(items: Vec<Matcher>) -> Result<Matcher, MatcherError> {
        if items.is_empty() {
            return Err(MatcherError::EmptyAnyOf);
        }
        Ok(Matcher::AnyOf(items))
    }

    /// The matcher for folded values ([`fold`]): exact strings and globs folded the same
    /// way, regexes case-insensitive. Fails when a folded glob does not compile.
    pub fn folded(self) -> Result<Matcher, MatcherError> {
        Ok(match self {
            Matcher::Exact(s) => Matcher::Exact(fold(&s)),
            Matcher::AnyOf(items) => Matcher::AnyOf(
                items
                    .into_iter()
                    .map(Matcher::folded)
                    .collect::<Result<_, _>>()?,
            ),
            Matcher::Glob(p, _) => Matcher::glob(&fold(&p))?,
            Matcher::Regex(p, _) => {
                let anchored = format!("^(?:{p})$");
                let r = regex::RegexBuilder::new(&anchored)
                    .size_limit(1 << 20)
                    .case_insensitive(true)
                    .build()
                    .map_err(|e| MatcherError::Regex {
                        pattern: p.clone(),
                        reason: e.to_string(),
                    })?;
                Matcher::Regex(p, r)
            }
            Matcher::Not(m) => Matcher::Not(Box::new(m.folded()?)),
        })
    }

    /// Whether `value` satisfies the matcher.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Matcher::Exact(s) => s == value,
            Matcher::AnyOf(items) => items.iter().any(|m| m.matches(value)),
            Matcher::Glob(_, g) => g.is_match(value),
            Matcher::Regex(_, r) => r.is_match(value),
            Matcher::Not(m) => !m.matches(value),
        }
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Matcher::Exact(s) => write!(f, "= {s:?}"),
            Matcher::AnyOf(items) => {
                f.write_str("any of [")?;
                for (i, m) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{m}")?;
                }
                f.write_str("]")
            }
            Matcher::Glob(p, _) => write!(f, "glob {p:?}"),
            Matcher::Regex(p, _) => write!(f, "regex {p:?}"),
            Matcher::Not(m) => write!(f, "not ({m})"),
        }
    }
}

/// A claim value as a folded rule compares it: Unicode NFKC (full-width and compatibility
/// forms become plain ones), invisible format characters removed (zero-width spaces and
/// joiners, bidirectional marks, soft hyphens, variation selectors, tags), lower case.
/// `Experimental/x`, `experimental\u{200b}/x` and `ｅｘｐｅｒｉｍｅｎｔａｌ/x` all fold to
/// `experimental/x`.
pub fn fold(value: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    value
        .nfkc()
        .filter(|c| !invisible(*c))
        .flat_map(char::to_lowercase)
        .collect()
}

/// Characters that render as nothing (Unicode's default-ignorable code points and the
/// format controls among them).
fn invisible(c: char) -> bool {
    matches!(c as u32,
        0x00AD | 0x034F | 0x061C | 0x115F | 0x1160 | 0x17B4 | 0x17B5 | 0x180B..=0x180F
        | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x206F | 0x3164 | 0xFE00..=0xFE0F
        | 0xFEFF | 0xFFA0 | 0xFFF0..=0xFFF8 | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A
        | 0xE0000..=0xE0FFF)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn glob_spans_slashes_and_is_whole_value() {
        let g = Matcher::glob("release/*").unwrap();
        assert!(g.matches("release/1.2"));
        assert!(g.matches("release/a/b"));
        assert!(!g.matches("xrelease/1"));
        assert!(!g.matches("release"));
    }

    #[test]
    fn regex_is_anchored() {
        let r = Matcher::regex("main|release/.*").unwrap();
        assert!(r.matches("main"));
        assert!(r.matches("release/x"));
        assert!(!r.matches("not-main"));
        assert!(!r.matches("mainx"));
        assert!(!r.matches("x-release/1"));
    }

    #[test]
    fn bad_patterns_are_rejected() {
        assert!(matches!(
            Matcher::regex("(unclosed"),
            Err(MatcherError::Regex { .. })
        ));
        assert!(matches!(
            Matcher::glob("a[b"),
            Err(MatcherError::Glob { .. })
        ));
        assert_eq!(
            Matcher::any_of(vec![]).unwrap_err(),
            MatcherError::EmptyAnyOf
        );
        assert!(ClaimPath::parse("/a~2b").is_err());
    }

    #[test]
    fn not_and_any_of_compose() {
        let m = Matcher::Not(Box::new(
            Matcher::any_of(vec![
                Matcher::Exact("a".into()),
                Matcher::glob("b*").unwrap(),
            ])
            .unwrap(),
        ));
        assert!(!m.matches("a"));
        assert!(!m.matches("bee"));
        assert!(m.matches("c"));
    }

    #[test]
    fn pointers_walk_nested_claims() {
        let claims = json!({"kubernetes.io": {"namespace": "ci", "serviceaccount": {"name": "x"}}, "a/b": "slash", "list": ["z"]});
        let claims = claims.as_object().unwrap();
        let p = ClaimPath::parse("/kubernetes.io/namespace").unwrap();
        assert_eq!(p.lookup(claims), Some(&json!("ci")));
        let p = ClaimPath::parse("/kubernetes.io/serviceaccount/name").unwrap();
        assert_eq!(p.lookup(claims), Some(&json!("x")));
        assert_eq!(
            ClaimPath::parse("/a~1b").unwrap().lookup(claims),
            Some(&json!("slash"))
        );
        assert_eq!(
            ClaimPath::parse("/list/0").unwrap().lookup(claims),
            Some(&json!("z"))
        );
        assert_eq!(ClaimPath::parse("/missing/x").unwrap().lookup(claims), None);
        assert_eq!(
            ClaimPath::parse("kubernetes.io")
                .unwrap()
                .lookup(claims)
                .map(|v| v.is_object()),
            Some(true)
        );
    }

    #[test]
    fn folding_sees_through_case_width_and_invisible_characters() {
        for v in [
            "Experimental/x",
            "EXPERIMENTAL/x",
            "experimental\u{200b}/x",
            "exper\u{00ad}imental/x",
            "\u{feff}experimental/x",
            "ｅｘｐｅｒｉｍｅｎｔａｌ/x",
            "experimental\u{202e}/x",
        ] {
            assert_eq!(fold(v), "experimental/x", "{v:?}");
        }
        let g = Matcher::glob("Experimental/*").unwrap().folded().unwrap();
        assert!(g.matches(&fold("EXPERIMENTAL\u{2060}/1")));
        let r = Matcher::regex("exp.*").unwrap().folded().unwrap();
        assert!(r.matches(&fold("Exp-1")));
        let e = Matcher::any_of(vec![Matcher::Exact("Main".into())])
            .unwrap()
            .folded()
            .unwrap();
        assert!(e.matches(&fold("MAIN")));
        assert!(!e.matches(&fold("main2")));
    }
}
