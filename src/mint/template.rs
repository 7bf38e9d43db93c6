//! `{claim}` templates over verified claims: `"bb:{repositoryUuid}"`,
//! `"{/kubernetes.io/namespace}"`. `{{` and `}}` are literal braces.

use crate::policy::ClaimPath;
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Claim(ClaimPath),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
    source: String,
}

impl Template {
    /// Parses a template. Fails for unbalanced braces, empty names or malformed pointers.
    pub fn parse(s: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some('{') | None => {
                                return Err(format!("unclosed '{{' in template {s:?}"))
                            }
                            Some(c) => name.push(c),
                        }
                    }
                    let name = name.trim();
                    if name.is_empty() {
                        return Err(format!("empty claim name in template {s:?}"));
                    }
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    parts.push(Part::Claim(
                        ClaimPath::parse(name).map_err(|e| e.to_string())?,
                    ));
                }
                '}' => {
                    return Err(format!(
                        "unmatched '}}' in template {s:?} (write '}}}}' for a literal brace)"
                    ))
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Ok(Template {
            parts,
            source: s.to_string(),
        })
    }

    /// Fills the template. Fails with the claim name when a claim is absent or is not a
    /// string or number.
    pub fn render(&self, claims: &Map<String, Value>) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(l) => out.push_str(l),
                Part::Claim(path) => match path.lookup(claims) {
                    Some(Value::String(s)) => out.push_str(s),
                    Some(Value::Number(n)) => out.push_str(&n.to_string()),
                    _ => return Err(path.to_string()),
                },
            }
        }
        Ok(out)
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_claims_pointers_and_literal_braces() {
        let c = json!({"repositoryUuid": "{abc}", "n": 7, "kubernetes.io": {"namespace": "ci"}});
        let c = c.as_object().unwrap();
        assert_eq!(
            Template::parse("bb:{repositoryUuid}")
                .unwrap()
                .render(c)
                .unwrap(),
            "bb:{abc}"
        );
        assert_eq!(
            Template::parse("{/kubernetes.io/namespace}-{n}")
                .unwrap()
                .render(c)
                .unwrap(),
            "ci-7"
        );
        assert_eq!(Template::parse("{{x}}").unwrap().render(c).unwrap(), "{x}");
        assert_eq!(
            Template::parse("{missing}").unwrap().render(c).unwrap_err(),
            "missing"
        );
        assert_eq!(
            Template::parse("{kubernetes.io}")
                .unwrap()
                .render(c)
                .unwrap_err(),
            "kubernetes.io"
        );
    }

    #[test]
    fn rejects_bad_templates() {
        for bad in ["{", "{a", "a}", "{}", "{ }", "{a{b}}", "{/a~9}"] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
    }
}
