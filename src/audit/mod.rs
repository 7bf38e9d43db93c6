//! Audit records and the hash chain.
//!
//! Every decision becomes one [`AuditEntry`]. The store assigns it a sequence number and
//! links it to the record before: `hash = SHA-256(canonical JSON of {v, seq, prev_hash,
//! entry})`. Any edit, insertion, deletion or reordering breaks the chain, which
//! [`verify_chain`] detects and locates. Records never hold a token, key or password:
//! only SHA-256 fingerprints.

pub mod checkpoint;
pub mod verify;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::BTreeMap;

/// Version of the canonical encoding that the hash covers.
pub const SCHEMA_VERSION: u32 = 1;

/// `prev_hash` of the first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What was decided, before the store places it in the chain.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Milliseconds since the epoch.
    pub time_ms: i64,
    /// Request id (also returned to the caller and logged).
    pub request_id: String,
    /// `mint`, `explain`, ...
    pub action: String,
    /// `allowed`, `denied` or `error`.
    pub outcome: String,
    /// Configured issuer name, once known.
    pub issuer: Option<String>,
    /// Stable identity key.
    pub identity_key: Option<String>,
    /// `sub` of the caller's token.
    pub subject: Option<String>,
    /// Repository.
    pub repository: Option<String>,
    /// Branch or ref.
    pub git_ref: Option<String>,
    /// Deployment environment.
    pub environment: Option<String>,
    /// Pipeline/run.
    pub pipeline: Option<String>,
    /// SHA-256 of the presented token (never the token).
    pub token_fingerprint: Option<String>,
    /// Target asked for.
    pub target: Option<String>,
    /// Scopes asked for.
    pub requested_scopes: Vec<String>,
    /// Scopes granted.
    pub granted_scopes: Vec<String>,
    /// Granted TTL in seconds.
    pub ttl_secs: Option<i64>,
    /// Deciding rule.
    pub rule: Option<String>,
    /// Denial or error reason (stable message).
    pub reason: Option<String>,
    /// Lease id of the issued credential.
    pub lease_id: Option<String>,
    /// `jti` of the issued credential.
    pub credential_jti: Option<String>,
    /// SHA-256 of the issued credential (never the credential).
    pub credential_fingerprint: Option<String>,
    /// Caller-supplied context (bounded).
    pub context: BTreeMap<String, String>,
    /// The caller's verified claims (JSON object), or null when the token was not verified.
    pub claims: Value,
}

/// A record as stored: the entry, its place in the chain and its hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Sequence number, from 1, without gaps.
    pub seq: i64,
    /// Hash of the previous record ([`GENESIS_HASH`] for the first).
    pub prev_hash: String,
    /// The decision.
    #[serde(flatten)]
    pub entry: AuditEntry,
    /// This record's hash.
    pub hash: String,
}

#[derive(Serialize)]
struct ChainInput<'a> {
    v: u32,
    seq: i64,
    prev_hash: &'a str,
    entry: &'a AuditEntry,
}

/// The hash of a record with this place in the chain.
pub fn record_hash(seq: i64, prev_hash: &str, entry: &AuditEntry) -> String {
    let canonical = serde_json::to_vec(&ChainInput {
        v: SCHEMA_VERSION,
        seq,
        prev_hash,
        entry,
    })
    .unwrap_or_default();
    crate::jose::sha256_hex(canonical)
}

/// [`record_hash`] from the entry's canonical JSON (`serde_json::to_vec(&entry)`), which
/// a caller can render before the record's place in the chain is known.
pub fn record_hash_from_json(seq: i64, prev_hash: &str, entry_json: &[u8]) -> String {
    let mut head = Vec::with_capacity(128);
    head.extend_from_slice(
        format!("{{\"v\":{SCHEMA_VERSION},\"seq\":{seq},\"prev_hash\":").as_bytes(),
    );
    let _ = serde_json::to_writer(&mut head, prev_hash);
    head.extend_from_slice(b",\"entry\":");
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&head);
    ctx.update(entry_json);
    ctx.update(b"}");
    crate::jose::hex(ctx.finish().as_ref())
}

impl AuditRecord {
    /// Places `entry` after the record with `prev_seq`/`prev_hash`.
    pub fn chain(prev_seq: i64, prev_hash: &str, entry: AuditEntry) -> AuditRecord {
        let seq = prev_seq + 1;
        let hash = record_hash(seq, prev_hash, &entry);
        AuditRecord {
            seq,
            prev_hash: prev_hash.to_string(),
            entry,
            hash,
        }
    }
}

/// Which records a query or tail wants. Every field set must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// At or after this time (milliseconds since the epoch).
    pub since_ms: Option<i64>,
    /// Before this time.
    pub until_ms: Option<i64>,
    /// Sequence numbers after this one (paging: the last one seen).
    pub after_seq: Option<i64>,
    /// Sequence numbers up to this one.
    pub until_seq: Option<i64>,
    /// Issuer name.
    pub issuer: Option<String>,
    /// Stable identity key.
    pub identity_key: Option<String>,
    /// Repository.
    pub repository: Option<String>,
    /// `sub` of the caller's token.
    pub subject: Option<String>,
    /// Target.
    pub target: Option<String>,
    /// `allowed`, `denied`, `error`.
    pub outcome: Option<String>,
    /// `mint`, `explain`, `renew`, ...
    pub action: Option<String>,
    /// Lease id.
    pub lease_id: Option<String>,
    /// Request id.
    pub request_id: Option<String>,
    /// Text the denial or error reason contains (case-insensitive).
    pub reason_contains: Option<String>,
}

impl AuditQuery {
    /// The filters as audit-record context (what the security team asked for is itself
    /// on the record).
    pub fn context(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        for (k, v) in [
            ("since_ms", self.since_ms),
            ("until_ms", self.until_ms),
            ("after_seq", self.after_seq),
            ("until_seq", self.until_seq),
        ] {
            if let Some(v) = v {
                m.insert(k.to_string(), v.to_string());
            }
        }
        for (k, v) in [
            ("issuer", &self.issuer),
            ("identity_key", &self.identity_key),
            ("repository", &self.repository),
            ("subject", &self.subject),
            ("target", &self.target),
            ("outcome", &self.outcome),
            ("action", &self.action),
            ("lease_id", &self.lease_id),
            ("request_id", &self.request_id),
            ("reason_contains", &self.reason_contains),
        ] {
            if let Some(v) = v {
                m.insert(format!("filter_{k}"), v.clone());
            }
        }
        m
    }
}

/// An entry as stored, borrowed column by column: serialises to exactly the bytes
/// [`AuditEntry`] does (same field names and order; the JSON columns hold the canonical
/// text written at append time), so verification hashes rows without decoding them.
#[derive(Debug, Serialize)]
pub struct RawEntry<'a> {
    /// See [`AuditEntry`].
    pub time_ms: i64,
    #[allow(missing_docs)]
    pub request_id: &'a str,
    #[allow(missing_docs)]
    pub action: &'a str,
    #[allow(missing_docs)]
    pub outcome: &'a str,
    #[allow(missing_docs)]
    pub issuer: Option<&'a str>,
    #[allow(missing_docs)]
    pub identity_key: Option<&'a str>,
    #[allow(missing_docs)]
    pub subject: Option<&'a str>,
    #[allow(missing_docs)]
    pub repository: Option<&'a str>,
    #[allow(missing_docs)]
    pub git_ref: Option<&'a str>,
    #[allow(missing_docs)]
    pub environment: Option<&'a str>,
    #[allow(missing_docs)]
    pub pipeline: Option<&'a str>,
    #[allow(missing_docs)]
    pub token_fingerprint: Option<&'a str>,
    #[allow(missing_docs)]
    pub target: Option<&'a str>,
    #[allow(missing_docs)]
    pub requested_scopes: &'a RawValue,
    #[allow(missing_docs)]
    pub granted_scopes: &'a RawValue,
    #[allow(missing_docs)]
    pub ttl_secs: Option<i64>,
    #[allow(missing_docs)]
    pub rule: Option<&'a str>,
    #[allow(missing_docs)]
    pub reason: Option<&'a str>,
    #[allow(missing_docs)]
    pub lease_id: Option<&'a str>,
    #[allow(missing_docs)]
    pub credential_jti: Option<&'a str>,
    #[allow(missing_docs)]
    pub credential_fingerprint: Option<&'a str>,
    #[allow(missing_docs)]
    pub context: &'a RawValue,
    #[allow(missing_docs)]
    pub claims: &'a RawValue,
}

#[derive(Serialize)]
struct RawChainInput<'a> {
    v: u32,
    seq: i64,
    prev_hash: &'a str,
    entry: &'a RawEntry<'a>,
}

/// [`record_hash`] of a borrowed row.
pub fn raw_record_hash(seq: i64, prev_hash: &str, entry: &RawEntry<'_>) -> String {
    let mut buf = Vec::with_capacity(1024);
    let _ = serde_json::to_writer(
        &mut buf,
        &RawChainInput {
            v: SCHEMA_VERSION,
            seq,
            prev_hash,
            entry,
        },
    );
    crate::jose::sha256_hex(&buf)
}

/// The first place a chain is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A record's content does not match its hash: edited.
    #[error("record {seq}: content does not match its hash (edited)")]
    Edited {
        /// The record.
        seq: i64,
    },
    /// A record does not link to the one before: inserted, removed or reordered.
    #[error("record {seq}: does not follow record {prev} (inserted, removed or reordered)")]
    Broken {
        /// The record.
        seq: i64,
        /// The record before it.
        prev: i64,
    },
}

/// Walks records in order from `start_prev` (seq, hash of the record before the first
/// one given; `(0, GENESIS_HASH)` for a full chain). Returns the count and head.
pub fn verify_chain<'a>(
    records: impl IntoIterator<Item = &'a AuditRecord>,
    start_prev: (i64, &str),
) -> Result<(u64, i64, String), ChainError> {
    let (mut prev_seq, mut prev_hash) = (start_prev.0, start_prev.1.to_string());
    let mut n = 0;
    for r in records {
        if r.seq != prev_seq + 1 || r.prev_hash != prev_hash {
            return Err(ChainError::Broken {
                seq: r.seq,
                prev: prev_seq,
            });
        }
        if record_hash(r.seq, &r.prev_hash, &r.entry) != r.hash {
            return Err(ChainError::Edited { seq: r.seq });
        }
        prev_seq = r.seq;
        prev_hash = r.hash.clone();
        n += 1;
    }
    Ok((n, prev_seq, prev_hash))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn entry(i: i64) -> AuditEntry {
        AuditEntry {
            time_ms: i,
            request_id: format!("r{i}"),
            action: "mint".into(),
            outcome: "allowed".into(),
            ..Default::default()
        }
    }

    /// A valid chain of `n` records.
    pub(crate) fn chain(n: i64) -> Vec<AuditRecord> {
        let mut v: Vec<AuditRecord> = Vec::new();
        for i in 0..n {
            let (s, h) = v
                .last()
                .map(|r| (r.seq, r.hash.clone()))
                .unwrap_or((0, GENESIS_HASH.into()));
            v.push(AuditRecord::chain(s, &h, entry(i)));
        }
        v
    }

    #[test]
    fn intact_chain_verifies() {
        let c = chain(5);
        let (n, head, h) = verify_chain(&c, (0, GENESIS_HASH)).unwrap();
        assert_eq!((n, head), (5, 5));
        assert_eq!(h, c[4].hash);
    }

    proptest! {
        #[test]
        fn any_edit_insert_delete_or_swap_is_detected(n in 2i64..30, pick in 0usize..1000, kind in 0u8..4) {
            let mut c = chain(n);
            let i = pick % c.len();
            match kind {
                0 => c[i].entry.outcome = "denied".into(),
                1 => { let extra = c[i].clone(); c.insert(i, extra); }
                2 => { c.remove(i); }
                _ => { let j = (i + 1) % c.len(); c.swap(i, j); }
            }
            if kind == 2 && i == c.len() {
                // Removing the last record is truncation: invisible to the chain alone
                // (signed checkpoints catch it); the remaining prefix is intact.
                prop_assert!(verify_chain(&c, (0, GENESIS_HASH)).is_ok());
            } else {
                let err = verify_chain(&c, (0, GENESIS_HASH)).unwrap_err();
                let at = match err { ChainError::Edited { seq } | ChainError::Broken { seq, .. } => seq };
                prop_assert!(at >= 1);
            }
        }
    }

    #[test]
    fn borrowed_rows_hash_exactly_like_entries() {
        let tricky = AuditEntry {
            time_ms: -5,
            request_id: "r\"q\\\u{1}é🙂".into(),
            action: "mint".into(),
            outcome: "allowed".into(),
            issuer: Some(String::new()),
            subject: None,
            repository: Some("{uuid}".into()),
            ttl_secs: Some(i64::MAX),
            requested_scopes: vec!["a b".into(), "ü".into()],
            context: [("k\n".to_string(), "<v>&".to_string())].into(),
            claims: serde_json::json!({"z": 1.5, "a": [true, null], "u": "\u{2028}"}),
            ..Default::default()
        };
        for e in [entry(1), tricky] {
            let (rs, gs, ctx, claims) = (
                j(&e.requested_scopes),
                j(&e.granted_scopes),
                j(&e.context),
                j(&e.claims),
            );
            fn raw(t: &str) -> &RawValue {
                serde_json::from_str(t).unwrap()
            }
            let r = RawEntry {
                time_ms: e.time_ms,
                request_id: &e.request_id,
                action: &e.action,
                outcome: &e.outcome,
                issuer: e.issuer.as_deref(),
                identity_key: e.identity_key.as_deref(),
                subject: e.subject.as_deref(),
                repository: e.repository.as_deref(),
                git_ref: e.git_ref.as_deref(),
                environment: e.environment.as_deref(),
                pipeline: e.pipeline.as_deref(),
                token_fingerprint: e.token_fingerprint.as_deref(),
                target: e.target.as_deref(),
                requested_scopes: raw(&rs),
                granted_scopes: raw(&gs),
                ttl_secs: e.ttl_secs,
                rule: e.rule.as_deref(),
                reason: e.reason.as_deref(),
                lease_id: e.lease_id.as_deref(),
                credential_jti: e.credential_jti.as_deref(),
                credential_fingerprint: e.credential_fingerprint.as_deref(),
                context: raw(&ctx),
                claims: raw(&claims),
            };
            assert_eq!(raw_record_hash(7, "p", &r), record_hash(7, "p", &e));
            assert_eq!(
                record_hash_from_json(7, "p", &serde_json::to_vec(&e).unwrap()),
                record_hash(7, "p", &e)
            );
        }
    }

    /// The JSON text the store writes for a column.
    fn j<T: Serialize>(v: &T) -> String {
        serde_json::to_string(v).unwrap()
    }

    #[test]
    fn edit_is_located() {
        let mut c = chain(4);
        c[2].entry.reason = Some("forged".into());
        assert_eq!(
            verify_chain(&c, (0, GENESIS_HASH)),
            Err(ChainError::Edited { seq: 3 })
        );
        let mut c = chain(4);
        c.remove(1);
        assert_eq!(
            verify_chain(&c, (0, GENESIS_HASH)),
            Err(ChainError::Broken { seq: 3, prev: 1 })
        );
    }
}
