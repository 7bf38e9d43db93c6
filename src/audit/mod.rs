//! Audit records and the hash chain.
//!
//! Every decision becomes one [`AuditEntry`]. The store assigns it a sequence number and
//! links it to the record before: `hash = SHA-256({"v":2,"seq":…,"prev_hash":…,
//! "entry_sha256":…})` over the SHA-256 of the entry's canonical JSON ([`chain_hash`];
//! records of older stores keep format 1, [`record_hash_v1`], and still verify). Any
//! edit, insertion, deletion or reordering breaks the chain, which
//! [`verify_chain`] detects and locates. Records never hold a token, key or password:
//! only SHA-256 fingerprints.

pub mod checkpoint;
pub mod verify;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Version of the chain-hash format new records are written in (see [`chain_hash`]).
/// Records written in version 1 (the whole entry inside the chain input, see
/// [`record_hash_v1`]) still verify: a log may hold both, version 1 before an upgrade.
pub const SCHEMA_VERSION: u32 = 2;

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

/// An entry ready to be chained, rendered on the caller's thread: its JSON-valued
/// columns (the canonical serde_json text the hash covers) and the SHA-256 of its
/// canonical JSON. A backend stores these columns and links the record with
/// [`chain_hash`]`(seq, prev_hash, &entry_sha256)`; it never renders or hashes an entry
/// its own way.
#[derive(Debug)]
pub struct PreparedEntry {
    /// The entry.
    pub entry: AuditEntry,
    /// [`entry_digest`] of its canonical JSON.
    pub entry_sha256: [u8; 32],
    /// `requested_scopes` as stored.
    pub requested_scopes: String,
    /// `granted_scopes` as stored.
    pub granted_scopes: String,
    /// `context` as stored.
    pub context: String,
    /// `claims` as stored.
    pub claims: String,
}

impl PreparedEntry {
    /// Renders the entry's columns and its digest (the claims are serialised once).
    pub fn new(entry: AuditEntry) -> PreparedEntry {
        let (requested_scopes, granted_scopes, context, claims) = (
            column_json(&entry.requested_scopes),
            column_json(&entry.granted_scopes),
            column_json(&entry.context),
            column_json(&entry.claims),
        );
        // The entry's canonical JSON from the columns just rendered (the same bytes as
        // `serde_json::to_vec(&entry)`), so the claims are not serialised a second time.
        let mut canonical = Vec::with_capacity(1024);
        stored_entry_json(
            &mut canonical,
            &StoredEntry::of(
                &entry,
                [&requested_scopes, &granted_scopes, &context, &claims],
            ),
        );
        PreparedEntry {
            entry_sha256: entry_digest(&canonical),
            requested_scopes,
            granted_scopes,
            context,
            claims,
            entry,
        }
    }
}

/// The stored text of a JSON-valued column: the canonical serde_json form the hash covers,
/// so reading it back reproduces the hash input exactly.
pub fn column_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

/// SHA-256 of an entry's canonical JSON (`serde_json::to_vec(&entry)`: fields in
/// declaration order, serde_json's escaping). Computed by the caller before the record's
/// place in the chain is known, so the one writer only hashes a short chain input.
pub fn entry_digest(entry_json: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, entry_json);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The hash of a record (format 2): SHA-256 of
/// `{"v":2,"seq":SEQ,"prev_hash":"PREV","entry_sha256":"HEX"}` where `HEX` is the
/// lowercase hex [`entry_digest`] of the entry's canonical JSON.
pub fn chain_hash(seq: i64, prev_hash: &[u8], entry_sha256: &[u8; 32]) -> String {
    crate::jose::hex(chain_digest(seq, prev_hash, entry_sha256).as_ref())
}

/// [`chain_hash`] as bytes, hashed piece by piece: nothing is allocated (it runs once per
/// record on the store's one writer thread, and in `verify`).
fn chain_digest(seq: i64, prev_hash: &[u8], entry_sha256: &[u8; 32]) -> ring::digest::Digest {
    let mut int = itoa::Buffer::new();
    let mut hex = [0u8; 64];
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"{\"v\":2,\"seq\":");
    ctx.update(int.format(seq).as_bytes());
    ctx.update(b",\"prev_hash\":");
    json_str_into(&mut ctx, prev_hash);
    ctx.update(b",\"entry_sha256\":\"");
    ctx.update(hex_into(entry_sha256, &mut hex));
    ctx.update(b"\"}");
    ctx.finish()
}

/// Lowercase hex of `bytes` (32 of them) in `out`.
fn hex_into<'a>(bytes: &[u8], out: &'a mut [u8; 64]) -> &'a [u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 15)];
    }
    &out[..bytes.len().min(32) * 2]
}

/// Hashes `s` as a JSON string (serde_json's escaping); a value that needs no escape (a
/// hash always) is hashed without copying.
fn json_str_into(ctx: &mut ring::digest::Context, s: &[u8]) {
    if s.iter().all(|&b| b >= 0x20 && b != b'"' && b != b'\\') {
        ctx.update(b"\"");
        ctx.update(s);
        ctx.update(b"\"");
    } else {
        let mut buf = Vec::with_capacity(s.len() + 8);
        put_json_str(&mut buf, s);
        ctx.update(&buf);
    }
}

/// Whether `digest` written as lowercase hex is `hash`.
fn hex_is(digest: &ring::digest::Digest, hash: &str) -> bool {
    let mut hex = [0u8; 64];
    hex_into(digest.as_ref(), &mut hex) == hash.as_bytes()
}

/// The hash of a record with this place in the chain, in the current format.
pub fn record_hash(seq: i64, prev_hash: &str, entry: &AuditEntry) -> String {
    let json = serde_json::to_vec(entry).unwrap_or_default();
    chain_hash(seq, prev_hash.as_bytes(), &entry_digest(&json))
}

/// The hash of a record in format 1: SHA-256 of the canonical JSON of
/// `{v: 1, seq, prev_hash, entry}`.
pub fn record_hash_v1(seq: i64, prev_hash: &str, entry: &AuditEntry) -> String {
    let json = serde_json::to_vec(entry).unwrap_or_default();
    crate::jose::hex(v1_digest(seq, prev_hash.as_bytes(), &json).as_ref())
}

/// [`record_hash_v1`] from the entry's canonical JSON, hashed piece by piece.
fn v1_digest(seq: i64, prev_hash: &[u8], entry_json: &[u8]) -> ring::digest::Digest {
    let mut int = itoa::Buffer::new();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"{\"v\":1,\"seq\":");
    ctx.update(int.format(seq).as_bytes());
    ctx.update(b",\"prev_hash\":");
    json_str_into(&mut ctx, prev_hash);
    ctx.update(b",\"entry\":");
    ctx.update(entry_json);
    ctx.update(b"}");
    ctx.finish()
}

/// Whether `hash` is the hash of this record in either format.
pub fn record_matches(seq: i64, prev_hash: &str, entry: &AuditEntry, hash: &str) -> bool {
    let json = serde_json::to_vec(entry).unwrap_or_default();
    HashCheck::default().matches(seq, prev_hash.as_bytes(), &json, hash)
}

/// Checks stored hashes against both formats. It remembers which format matched last and
/// tries that one first, so a log written in one format hashes each record once.
#[derive(Debug, Default, Clone)]
pub struct HashCheck {
    v1_first: bool,
}

impl HashCheck {
    /// Whether `hash` is the hash, in either format, of the entry whose canonical JSON is
    /// `entry_json`, placed at `seq` after `prev_hash`.
    pub fn matches(&mut self, seq: i64, prev_hash: &[u8], entry_json: &[u8], hash: &str) -> bool {
        let v2 = || {
            hex_is(
                &chain_digest(seq, prev_hash, &entry_digest(entry_json)),
                hash,
            )
        };
        let v1 = || hex_is(&v1_digest(seq, prev_hash, entry_json), hash);
        let (first, second): (&dyn Fn() -> bool, &dyn Fn() -> bool) = if self.v1_first {
            (&v1, &v2)
        } else {
            (&v2, &v1)
        };
        if first() {
            return true;
        }
        if second() {
            self.v1_first = !self.v1_first;
            return true;
        }
        false
    }
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

/// An entry as stored, borrowed column by column as bytes: text columns as their UTF-8
/// bytes, JSON columns as the canonical text written at append time. Verification hashes
/// rows through it without decoding or allocating anything per record:
/// [`stored_entry_json`] writes exactly the bytes `serde_json` writes for an
/// [`AuditEntry`] (same field names and order, same escaping). A text column an attacker
/// changed (even to invalid UTF-8) simply hashes differently. The JSON columns are
/// hashed as stored, so the caller must first check that each holds exactly one JSON
/// value: that is what keeps bytes from being moved from one into the next.
#[derive(Debug, Clone, Copy)]
#[allow(missing_docs)]
pub struct StoredEntry<'a> {
    pub time_ms: i64,
    pub request_id: &'a [u8],
    pub action: &'a [u8],
    pub outcome: &'a [u8],
    pub issuer: Option<&'a [u8]>,
    pub identity_key: Option<&'a [u8]>,
    pub subject: Option<&'a [u8]>,
    pub repository: Option<&'a [u8]>,
    pub git_ref: Option<&'a [u8]>,
    pub environment: Option<&'a [u8]>,
    pub pipeline: Option<&'a [u8]>,
    pub token_fingerprint: Option<&'a [u8]>,
    pub target: Option<&'a [u8]>,
    /// JSON.
    pub requested_scopes: &'a [u8],
    /// JSON.
    pub granted_scopes: &'a [u8],
    pub ttl_secs: Option<i64>,
    pub rule: Option<&'a [u8]>,
    pub reason: Option<&'a [u8]>,
    pub lease_id: Option<&'a [u8]>,
    pub credential_jti: Option<&'a [u8]>,
    pub credential_fingerprint: Option<&'a [u8]>,
    /// JSON.
    pub context: &'a [u8],
    /// JSON.
    pub claims: &'a [u8],
}

impl<'a> StoredEntry<'a> {
    /// The columns of `e` as the store writes them, given its JSON columns already
    /// rendered (`requested_scopes`, `granted_scopes`, `context`, `claims`, in that order).
    pub fn of(e: &'a AuditEntry, json: [&'a str; 4]) -> StoredEntry<'a> {
        fn b(v: &Option<String>) -> Option<&[u8]> {
            v.as_deref().map(str::as_bytes)
        }
        let [requested_scopes, granted_scopes, context, claims] = json;
        StoredEntry {
            time_ms: e.time_ms,
            request_id: e.request_id.as_bytes(),
            action: e.action.as_bytes(),
            outcome: e.outcome.as_bytes(),
            issuer: b(&e.issuer),
            identity_key: b(&e.identity_key),
            subject: b(&e.subject),
            repository: b(&e.repository),
            git_ref: b(&e.git_ref),
            environment: b(&e.environment),
            pipeline: b(&e.pipeline),
            token_fingerprint: b(&e.token_fingerprint),
            target: b(&e.target),
            requested_scopes: requested_scopes.as_bytes(),
            granted_scopes: granted_scopes.as_bytes(),
            ttl_secs: e.ttl_secs,
            rule: b(&e.rule),
            reason: b(&e.reason),
            lease_id: b(&e.lease_id),
            credential_jti: b(&e.credential_jti),
            credential_fingerprint: b(&e.credential_fingerprint),
            context: context.as_bytes(),
            claims: claims.as_bytes(),
        }
    }
}

/// A JSON string, escaped as `serde_json` escapes (`\"`, `\\`, the short escapes for
/// backspace, form feed, newline, carriage return and tab, `\u00xx` for the other control
/// characters; everything else as is).
fn put_json_str(buf: &mut Vec<u8>, s: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let plain = |b: u8| b >= 0x20 && b != b'"' && b != b'\\';
    buf.push(b'"');
    // Most values need no escape: checked 16 bytes at a time (vectorised), copied whole.
    if s.chunks(16)
        .all(|c| c.iter().fold(true, |ok, &b| ok & plain(b)))
    {
        buf.extend_from_slice(s);
    } else {
        let mut from = 0;
        for (i, &b) in s.iter().enumerate() {
            if plain(b) {
                continue;
            }
            buf.extend_from_slice(&s[from..i]);
            from = i + 1;
            let short = match b {
                b'"' => b'"',
                b'\\' => b'\\',
                0x08 => b'b',
                0x0c => b'f',
                b'\n' => b'n',
                b'\r' => b'r',
                b'\t' => b't',
                _ => {
                    buf.extend_from_slice(b"\\u00");
                    buf.push(HEX[usize::from(b >> 4)]);
                    buf.push(HEX[usize::from(b & 15)]);
                    continue;
                }
            };
            buf.push(b'\\');
            buf.push(short);
        }
        buf.extend_from_slice(&s[from..]);
    }
    buf.push(b'"');
}

/// Whether `b` is one JSON value and nothing after it, as far as where it ends goes: an
/// object or array whose brackets close for the first time at its last byte (strings and
/// their escapes skipped), a string whose closing quote is its last byte, or a scalar with
/// no structural character. The JSON columns of a row are hashed side by side as stored;
/// this is what pins each one's end, so that no byte can move from one into the next
/// without changing the hash. Linear and allocation-free (full parsing would cost
/// verification a quarter of its speed); anything it lets through that is not the
/// canonical text written at append time changes the hash.
pub fn one_json_value(b: &[u8]) -> bool {
    let Some((&first, _)) = b.split_first() else {
        return false;
    };
    match first {
        b'{' | b'[' | b'"' => {
            let (mut depth, mut in_str, mut esc) = (0usize, false, false);
            for (i, &c) in b.iter().enumerate() {
                let closed = if in_str {
                    if esc {
                        esc = false;
                    } else if c == b'\\' {
                        esc = true;
                    } else if c == b'"' {
                        in_str = false;
                    }
                    !in_str && depth == 0
                } else {
                    match c {
                        b'"' => in_str = true,
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => depth = depth.wrapping_sub(1),
                        _ => {}
                    }
                    depth == 0 && !in_str
                };
                if closed {
                    return i == b.len() - 1;
                }
            }
            false
        }
        _ => !b
            .iter()
            .any(|c| matches!(c, b'{' | b'}' | b'[' | b']' | b'"' | b',' | b':')),
    }
}

/// Writes the canonical JSON of a stored row's entry (what `serde_json::to_vec` writes
/// for the [`AuditEntry`] it was made from) into `buf`, replacing what was there: the
/// input of [`HashCheck::matches`]. `buf` is scratch space, reused across records.
pub fn stored_entry_json(buf: &mut Vec<u8>, e: &StoredEntry<'_>) {
    let mut int = itoa::Buffer::new();
    buf.clear();
    buf.extend_from_slice(b"{\"time_ms\":");
    buf.extend_from_slice(int.format(e.time_ms).as_bytes());
    let texts: [(&[u8], Option<&[u8]>); 12] = [
        (b",\"request_id\":", Some(e.request_id)),
        (b",\"action\":", Some(e.action)),
        (b",\"outcome\":", Some(e.outcome)),
        (b",\"issuer\":", e.issuer),
        (b",\"identity_key\":", e.identity_key),
        (b",\"subject\":", e.subject),
        (b",\"repository\":", e.repository),
        (b",\"git_ref\":", e.git_ref),
        (b",\"environment\":", e.environment),
        (b",\"pipeline\":", e.pipeline),
        (b",\"token_fingerprint\":", e.token_fingerprint),
        (b",\"target\":", e.target),
    ];
    let put = |buf: &mut Vec<u8>, fields: &[(&[u8], Option<&[u8]>)]| {
        for (name, v) in fields {
            buf.extend_from_slice(name);
            match v {
                Some(v) => put_json_str(buf, v),
                None => buf.extend_from_slice(b"null"),
            }
        }
    };
    put(buf, &texts);
    buf.extend_from_slice(b",\"requested_scopes\":");
    buf.extend_from_slice(e.requested_scopes);
    buf.extend_from_slice(b",\"granted_scopes\":");
    buf.extend_from_slice(e.granted_scopes);
    buf.extend_from_slice(b",\"ttl_secs\":");
    match e.ttl_secs {
        Some(t) => buf.extend_from_slice(int.format(t).as_bytes()),
        None => buf.extend_from_slice(b"null"),
    }
    put(
        buf,
        &[
            (b",\"rule\":", e.rule),
            (b",\"reason\":", e.reason),
            (b",\"lease_id\":", e.lease_id),
            (b",\"credential_jti\":", e.credential_jti),
            (b",\"credential_fingerprint\":", e.credential_fingerprint),
        ],
    );
    buf.extend_from_slice(b",\"context\":");
    buf.extend_from_slice(e.context);
    buf.extend_from_slice(b",\"claims\":");
    buf.extend_from_slice(e.claims);
    buf.push(b'}');
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
        if !record_matches(r.seq, &r.prev_hash, &r.entry, &r.hash) {
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
            request_id: "r\"q\\\u{1}\u{8}\u{c}\r\t\u{7f}é🙂".into(),
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
            stored_hash_matches(&e);
        }
    }

    proptest! {
        #[test]
        fn stored_rows_hash_like_entries_whatever_their_text(
            // Every character JSON escapes, and some it does not.
            text in proptest::collection::vec("[\\x00-\\x20\"\\\\/a-z\\x7f\u{e9}\u{1F642}\u{2028}]{0,16}", 6),
            absent in proptest::collection::vec(any::<bool>(), 3),
            time_ms in any::<i64>(),
            ttl in proptest::option::of(any::<i64>()),
        ) {
            let opt = |i: usize| (!absent[i]).then(|| text[i + 3].clone());
            let e = AuditEntry {
                time_ms,
                request_id: text[0].clone(),
                action: text[1].clone(),
                outcome: text[2].clone(),
                subject: opt(0),
                reason: opt(1),
                repository: opt(2),
                ttl_secs: ttl,
                requested_scopes: text.clone(),
                context: [(text[0].clone(), text[1].clone())].into(),
                claims: serde_json::json!({ "sub": text[2], "n": [text[3].clone()] }),
                ..Default::default()
            };
            stored_hash_matches(&e);
        }
    }

    #[test]
    fn one_json_value_pins_where_a_column_ends() {
        for ok in [
            r#"{"a":"b","claims":"x"}"#,
            r#"["a b","}\"]{"]"#,
            r#"{}"#,
            r#"[]"#,
            r#""x\"}""#,
            "null",
            "-1.5e3",
            r#"{"a":[{"b":{}}]}"#,
        ] {
            assert!(one_json_value(ok.as_bytes()), "{ok}");
        }
        for bad in [
            r#"{"a":"b""#,
            r#""x"},"claims":{"sub":"s"}"#,
            r#"[1],"b":[2]"#,
            r#"{"a":1}}"#,
            r#"{"a":"}"#,
            r#""x"y"#,
            r#"null,"claims":{}"#,
            "",
        ] {
            assert!(!one_json_value(bad.as_bytes()), "{bad}");
        }
    }

    /// The hash of a stored row equals the entry's, and so does the hash from its JSON.
    fn stored_hash_matches(e: &AuditEntry) {
        let (rs, gs, ctx, claims) = (
            j(&e.requested_scopes),
            j(&e.granted_scopes),
            j(&e.context),
            j(&e.claims),
        );
        let r = StoredEntry::of(e, [&rs, &gs, &ctx, &claims]);
        let mut buf = Vec::new();
        stored_entry_json(&mut buf, &r);
        assert_eq!(buf, serde_json::to_vec(e).unwrap());
        let mut check = HashCheck::default();
        assert!(check.matches(7, b"p\"\n", &buf, &record_hash(7, "p\"\n", e)));
        assert!(check.matches(7, b"p\"\n", &buf, &record_hash_v1(7, "p\"\n", e)));
        assert!(!check.matches(8, b"p\"\n", &buf, &record_hash(7, "p\"\n", e)));
    }

    /// Both formats pinned to fixed hashes: a change to either encoding (field order,
    /// escaping, the chain input) breaks every existing log, so it must fail here.
    #[test]
    fn hash_formats_are_pinned() {
        let e = AuditEntry {
            time_ms: 1_700_000_000_000,
            request_id: "req-1".into(),
            action: "mint".into(),
            outcome: "allowed".into(),
            repository: Some("{r\"1}".into()),
            granted_scopes: vec!["read".into()],
            ttl_secs: Some(600),
            context: [("k".to_string(), "v\n".to_string())].into(),
            claims: serde_json::json!({"sub": "s", "n": 1}),
            ..Default::default()
        };
        assert_eq!(
            record_hash_v1(3, GENESIS_HASH, &e),
            "9268fe0534f5dd8c946f83af4bce7f80dcd9a0855f3b601771da8f209557b03d"
        );
        assert_eq!(
            record_hash(3, GENESIS_HASH, &e),
            "8fdf2bf00c2f24307a61e6e0111a6d428f5e95f7def3a1a8efb88747f6f20366"
        );
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
