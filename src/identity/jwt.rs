//! Compact JWS parsing, strict and allocation-light. Nothing here trusts the token: it
//! splits, decodes, and refuses dangerous headers; signature and claims are checked by
//! the verifier with the issuer's own key.

use super::IdentityError;
use crate::jose::b64_decode;
use serde_json::{Map, Value};

/// Largest token accepted, checked before any parsing.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// A parsed but unverified token.
#[derive(Debug)]
pub struct Parsed<'a> {
    /// `alg` header.
    pub alg: String,
    /// `kid` header.
    pub kid: Option<String>,
    /// The claims.
    pub claims: Map<String, Value>,
    /// `header.payload`, the bytes the signature covers.
    pub signing_input: &'a [u8],
    /// Decoded signature.
    pub signature: Vec<u8>,
}

/// Splits and decodes a compact JWS and checks the header. Fails for anything that is
/// not exactly three base64url parts with JSON object header and payload, and for
/// `none`/HMAC algorithms and key-carrying or critical headers.
pub fn parse(token: &str) -> Result<Parsed<'_>, IdentityError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(IdentityError::Oversized(MAX_TOKEN_BYTES));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(IdentityError::Malformed("not a compact JWS"));
    };
    if h.is_empty() || p.is_empty() {
        return Err(IdentityError::Malformed("not a compact JWS"));
    }
    let header_bytes = b64_decode(h).ok_or(IdentityError::Malformed("header is not base64url"))?;
    let header: Map<String, Value> = serde_json::from_slice(&header_bytes)
        .map_err(|_| IdentityError::Malformed("header is not a JSON object"))?;
    for forbidden in ["jku", "x5u", "jwk", "x5c", "crit"] {
        if header.contains_key(forbidden) {
            return Err(IdentityError::ForbiddenHeader(match forbidden {
                "jku" => "jku",
                "x5u" => "x5u",
                "jwk" => "jwk",
                "x5c" => "x5c",
                _ => "crit",
            }));
        }
    }
    let alg = match header.get("alg") {
        Some(Value::String(a)) => a.clone(),
        _ => return Err(IdentityError::Malformed("header has no alg")),
    };
    if alg.eq_ignore_ascii_case("none") {
        return Err(IdentityError::Algorithm("none".into()));
    }
    if alg.to_ascii_uppercase().starts_with("HS") {
        return Err(IdentityError::Algorithm(format!(
            "{} (HMAC)",
            sanitize(&alg)
        )));
    }
    if let Some(typ) = header.get("typ") {
        // Refuse explicitly typed non-JWTs (e.g. encrypted or logout tokens).
        let ok = typ.as_str().map(|t| {
            let t = t.to_ascii_lowercase();
            t == "jwt" || t == "application/jwt" || t.ends_with("+jwt")
        });
        if ok != Some(true) {
            return Err(IdentityError::Malformed("typ is not JWT"));
        }
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(IdentityError::Malformed("kid is not a string")),
    };
    let payload = b64_decode(p).ok_or(IdentityError::Malformed("payload is not base64url"))?;
    let claims: Map<String, Value> = serde_json::from_slice(&payload)
        .map_err(|_| IdentityError::Malformed("payload is not a JSON object"))?;
    let signature = b64_decode(s).ok_or(IdentityError::Malformed("signature is not base64url"))?;
    if signature.is_empty() {
        return Err(IdentityError::Malformed("signature is empty"));
    }
    Ok(Parsed {
        alg,
        kid,
        claims,
        signing_input: &token.as_bytes()[..h.len() + 1 + p.len()],
        signature,
    })
}

/// Keeps attacker-chosen header text short and printable before it reaches a message.
pub(crate) fn sanitize(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(16)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jose::b64;

    fn tok(header: &str, payload: &str, sig: &str) -> String {
        format!("{}.{}.{}", b64(header), b64(payload), sig)
    }

    #[test]
    fn parses_a_well_formed_token() {
        let t = tok(
            r#"{"alg":"RS256","kid":"k1","typ":"JWT"}"#,
            r#"{"iss":"x"}"#,
            "c2ln",
        );
        let p = parse(&t).unwrap();
        assert_eq!(p.alg, "RS256");
        assert_eq!(p.kid.as_deref(), Some("k1"));
        assert_eq!(p.claims["iss"], "x");
        assert_eq!(p.signature, b"sig");
        assert_eq!(p.signing_input, t.rsplit_once('.').unwrap().0.as_bytes());
    }

    #[test]
    fn refuses_each_bad_shape() {
        let good_h = r#"{"alg":"RS256"}"#;
        let cases: Vec<(String, IdentityError)> = vec![
            ("a.b".into(), IdentityError::Malformed("not a compact JWS")),
            (
                "a.b.c.d".into(),
                IdentityError::Malformed("not a compact JWS"),
            ),
            (".b.c".into(), IdentityError::Malformed("not a compact JWS")),
            (
                "!!!.e30.c2ln".into(),
                IdentityError::Malformed("header is not base64url"),
            ),
            (
                tok("[1]", "{}", "c2ln"),
                IdentityError::Malformed("header is not a JSON object"),
            ),
            (
                tok(r#"{"alg":"none"}"#, "{}", "c2ln"),
                IdentityError::Algorithm("none".into()),
            ),
            (
                tok(r#"{"alg":"NONE"}"#, "{}", "c2ln"),
                IdentityError::Algorithm("none".into()),
            ),
            (
                tok(r#"{"alg":"HS256"}"#, "{}", "c2ln"),
                IdentityError::Algorithm("HS256 (HMAC)".into()),
            ),
            (
                tok(r#"{"alg":"RS256","jku":"http://evil"}"#, "{}", "c2ln"),
                IdentityError::ForbiddenHeader("jku"),
            ),
            (
                tok(r#"{"alg":"RS256","x5u":"http://evil"}"#, "{}", "c2ln"),
                IdentityError::ForbiddenHeader("x5u"),
            ),
            (
                tok(r#"{"alg":"RS256","jwk":{}}"#, "{}", "c2ln"),
                IdentityError::ForbiddenHeader("jwk"),
            ),
            (
                tok(r#"{"alg":"RS256","crit":["exp"]}"#, "{}", "c2ln"),
                IdentityError::ForbiddenHeader("crit"),
            ),
            (
                tok("{}", "{}", "c2ln"),
                IdentityError::Malformed("header has no alg"),
            ),
            (
                tok(r#"{"alg":"RS256","typ":"JWE"}"#, "{}", "c2ln"),
                IdentityError::Malformed("typ is not JWT"),
            ),
            (
                tok(r#"{"alg":"RS256","kid":5}"#, "{}", "c2ln"),
                IdentityError::Malformed("kid is not a string"),
            ),
            (
                tok(good_h, "not json", "c2ln"),
                IdentityError::Malformed("payload is not a JSON object"),
            ),
            (
                tok(good_h, "{}", "c2ln="),
                IdentityError::Malformed("signature is not base64url"),
            ),
            (
                tok(good_h, "{}", ""),
                IdentityError::Malformed("signature is empty"),
            ),
            (
                "x".repeat(MAX_TOKEN_BYTES + 1),
                IdentityError::Oversized(MAX_TOKEN_BYTES),
            ),
        ];
        for (t, want) in cases {
            assert_eq!(parse(&t).unwrap_err(), want, "token {t:.60}");
        }
    }

    #[test]
    fn sanitize_bounds_attacker_text() {
        assert_eq!(
            sanitize("HS256\n<script>aaaaaaaaaaaaaaaaaaaa"),
            "HS256<script>aaa"
        );
    }
}
