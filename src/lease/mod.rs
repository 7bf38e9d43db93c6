//! Leases: one record per issued credential, so every credential can be found, renewed
//! within policy, and revoked one by one or in bulk.
//!
//! - [`LeaseRecord`] is the row the store keeps; [`LeaseChange`] is a compare-and-set
//!   update of one row, so a renew racing a revoke cannot resurrect a lease.
//! - [`renewed_expiry`] and [`backoff`] are the pure arithmetic, property-tested.
//! - The reaper (a broker service) expires, retries upstream revocations and purges,
//!   driven by a clock, using these types.
//!
//! A lease's states: `live` → `revoked` (revoked here and, where the target has one,
//! upstream), `live` → `revoking` → `revoked` (upstream clean-up pending or retrying),
//! `live` → `expired` (its time ran out; the target expires it itself, or the reaper
//! revoked it upstream). Only `live` leases before their expiry are usable.

use crate::secret::{Secret, SecretString};
use ring::rand::{SecureRandom, SystemRandom};
use std::time::Duration;

/// Lease bookkeeping: the reaper's pace and how long finished leases are kept.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// How often the reaper runs.
    pub reap_interval: Duration,
    /// How long revoked and expired leases stay listable before they are purged.
    pub retain: Duration,
    /// Longest wait between retries of a failed upstream revocation.
    pub retry_max_backoff: Duration,
    /// After this many failed attempts a revocation is reported as stuck.
    pub stuck_after: u32,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig {
            reap_interval: Duration::from_secs(30),
            retain: Duration::from_secs(7 * 24 * 3600),
            retry_max_backoff: Duration::from_secs(3600),
            stuck_after: 8,
        }
    }
}

/// Where a lease is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeaseState {
    /// Issued; usable until `expires_at`.
    Live,
    /// Revoked here; the upstream revocation has not succeeded yet.
    Revoking,
    /// Revoked, upstream too.
    Revoked,
    /// Ran out of time.
    Expired,
}

impl LeaseState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseState::Live => "live",
            LeaseState::Revoking => "revoking",
            LeaseState::Revoked => "revoked",
            LeaseState::Expired => "expired",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<LeaseState> {
        Some(match s {
            "live" => LeaseState::Live,
            "revoking" => LeaseState::Revoking,
            "revoked" => LeaseState::Revoked,
            "expired" => LeaseState::Expired,
            _ => return None,
        })
    }
}

/// One issued credential, as the store keeps it. Holds no secret: the lease secret only
/// as its SHA-256, the upstream handle sealed under the master key.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseRecord {
    /// Lease id (a UUID; also the `jti` of minted JWTs).
    pub id: String,
    /// Configured issuer name of the caller.
    pub issuer: String,
    /// The caller's stable identity key.
    pub identity_key: String,
    /// `sub` of the caller's token.
    pub subject: String,
    /// Repository, where the platform names one.
    pub repository: Option<String>,
    /// Target name.
    pub target: String,
    /// Target kind at mint time.
    pub kind: String,
    /// The rule(s) that granted it.
    pub rule: String,
    /// Scopes granted.
    pub scopes: Vec<String>,
    /// Issue time (seconds since the epoch).
    pub issued_at: i64,
    /// Current expiry.
    pub expires_at: i64,
    /// No renewal reaches past this.
    pub max_expires_at: i64,
    /// Renewals so far.
    pub renew_count: u32,
    /// State.
    pub state: LeaseState,
    /// When it was revoked.
    pub revoked_at: Option<i64>,
    /// SHA-256 (hex) of the lease secret.
    pub secret_hash: String,
    /// The caller's verified claims at mint time, as JSON text (renewal re-decides policy
    /// on them; kept as text so listing and bulk revocation never parse it).
    pub claims_json: String,
    /// The target's handle on the credential, sealed under the master key.
    pub upstream: Option<Vec<u8>>,
    /// Failed upstream revocation attempts.
    pub attempts: u32,
    /// When the reaper next retries the upstream revocation.
    pub next_attempt_at: Option<i64>,
    /// Short reason of the last upstream failure (no secrets, no upstream bodies).
    pub last_error: Option<String>,
}

impl LeaseRecord {
    /// Whether the credential is still good at `now`.
    pub fn is_live(&self, now: i64) -> bool {
        self.state == LeaseState::Live && self.expires_at > now
    }

    /// The state as a caller sees it at `now` (a live lease past its expiry is expired,
    /// whether or not the reaper has marked it yet).
    pub fn effective_state(&self, now: i64) -> LeaseState {
        match self.state {
            LeaseState::Live if self.expires_at <= now => LeaseState::Expired,
            s => s,
        }
    }
}

/// Which leases an operation applies to. Every field set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseFilter {
    /// One lease.
    pub id: Option<String>,
    /// Identity key.
    pub identity_key: Option<String>,
    /// Issuer name.
    pub issuer: Option<String>,
    /// Repository.
    pub repository: Option<String>,
    /// Target name.
    pub target: Option<String>,
    /// A rule that granted the lease.
    pub rule: Option<String>,
    /// Issued strictly before this time.
    pub issued_before: Option<i64>,
    /// Include revoked and expired leases (listing only; revocation takes live ones).
    pub include_inactive: bool,
}

impl LeaseFilter {
    /// Whether no field narrows the match.
    pub fn is_unrestricted(&self) -> bool {
        self.id.is_none()
            && self.identity_key.is_none()
            && self.issuer.is_none()
            && self.repository.is_none()
            && self.target.is_none()
            && self.rule.is_none()
            && self.issued_before.is_none()
    }

    /// The same test the store applies, for the in-memory model in tests and for
    /// re-checking a row.
    pub fn matches(&self, l: &LeaseRecord, now: i64) -> bool {
        let eq = |f: &Option<String>, v: &str| f.as_deref().is_none_or(|f| f == v);
        eq(&self.id, &l.id)
            && eq(&self.identity_key, &l.identity_key)
            && eq(&self.issuer, &l.issuer)
            && self
                .repository
                .as_deref()
                .is_none_or(|r| l.repository.as_deref() == Some(r))
            && eq(&self.target, &l.target)
            && self
                .rule
                .as_deref()
                .is_none_or(|r| l.rule.split(',').any(|x| x == r))
            && self.issued_before.is_none_or(|t| l.issued_at < t)
            && (self.include_inactive || l.is_live(now))
    }
}

/// A compare-and-set update of one lease: applied only while the lease is in
/// `expect_state` (and, when set, at `expect_renew_count`). Unset fields keep their value.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseChange {
    /// The lease.
    pub id: String,
    /// Applied only in this state.
    pub expect_state: LeaseState,
    /// Applied only at this renew count (renewals use it against concurrent renewals).
    pub expect_renew_count: Option<u32>,
    /// New state.
    pub state: Option<LeaseState>,
    /// New expiry.
    pub expires_at: Option<i64>,
    /// New renew count.
    pub renew_count: Option<u32>,
    /// Revocation time.
    pub revoked_at: Option<i64>,
    /// Failed upstream attempts.
    pub attempts: Option<u32>,
    /// Next retry (outer `Some` sets it, inner `None` clears it).
    pub next_attempt_at: Option<Option<i64>>,
    /// Last upstream error (outer `Some` sets it, inner `None` clears it).
    pub last_error: Option<Option<String>>,
}

impl LeaseChange {
    /// A change of lease `id`, applied only in state `expect`, setting nothing yet.
    pub fn new(id: &str, expect: LeaseState) -> LeaseChange {
        LeaseChange {
            id: id.to_string(),
            expect_state: expect,
            expect_renew_count: None,
            state: None,
            expires_at: None,
            renew_count: None,
            revoked_at: None,
            attempts: None,
            next_attempt_at: None,
            last_error: None,
        }
    }
}

/// The limits checked, atomically with the lease insert, when a mint commits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MintGuard {
    /// Most live leases the identity key may hold on the target.
    pub max_live: Option<u32>,
    /// The replay guard for the caller's token.
    pub replay: Option<ReplayGuard>,
}

/// One identity token may mint at most `max_uses` times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayGuard {
    /// Issuer name.
    pub issuer: String,
    /// `jti`, else the SHA-256 of the token's signed content (header and payload).
    pub token_key: String,
    /// Allowed mints.
    pub max_uses: u32,
    /// The token's expiry: the counter can be forgotten after it.
    pub expires_at: i64,
}

/// Why a renewal cannot extend a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RenewRefused {
    /// The lease is no longer live.
    #[error("lease is {0}")]
    NotLive(&'static str),
    /// The lease reached its maximum lifetime.
    #[error("lease reached its maximum lifetime")]
    LifetimeReached,
}

/// The expiry a renewal gives a live lease: `now + ttl`, never past `max_end`, never
/// earlier than the current expiry (a renewal does not shorten a credential already out).
pub fn renewed_expiry(
    now: i64,
    current: i64,
    max_end: i64,
    ttl: Duration,
) -> Result<i64, RenewRefused> {
    if current <= now {
        return Err(RenewRefused::NotLive("expired"));
    }
    if max_end <= now {
        return Err(RenewRefused::LifetimeReached);
    }
    let wanted = now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
    Ok(wanted.min(max_end).max(current.min(max_end)))
}

/// Wait before retry `attempts` (1-based) of an upstream revocation: 5 s doubling, capped.
pub fn backoff(attempts: u32, max: Duration) -> Duration {
    let secs = 5u64.saturating_mul(1u64 << attempts.saturating_sub(1).min(30));
    Duration::from_secs(secs).min(max)
}

/// A fresh lease secret and its SHA-256 (hex), which is all the store keeps.
pub fn new_secret() -> (SecretString, String) {
    let mut b = [0u8; 32];
    // SystemRandom fails only when the OS has no randomness source, which the broker
    // cannot run without (its keys come from the same source).
    if SystemRandom::new().fill(&mut b).is_err() {
        panic!("operating system randomness unavailable");
    }
    let s = format!("lks_{}", crate::jose::b64(b));
    let h = crate::jose::sha256_hex(s.as_bytes());
    (Secret::new(s), h)
}

/// Whether `secret` is the one whose hash is `hash`. Compares digests, so timing tells an
/// attacker nothing about the secret.
pub fn secret_matches(secret: &str, hash: &str) -> bool {
    !secret.is_empty() && crate::jose::sha256_hex(secret.as_bytes()) == hash
}

/// Associated data binding a sealed upstream handle to its lease.
pub fn upstream_aad(lease_id: &str) -> Vec<u8> {
    format!("latchkey/lease-upstream/v1/{lease_id}").into_bytes()
}

/// How a sealed claims text starts (JSON text never does).
const SEALED_CLAIMS: &str = "sealed:v1:";

/// The text a lease keeps the caller's verified claims in (renewal decides policy on
/// them again): JSON, or, when `seal` (the audit redacts claims), the JSON sealed under
/// the master key and bound to the lease, so a copy of the store shows no claim the
/// audit log hides.
pub fn claims_text(
    master: &crate::keys::MasterKey,
    lease_id: &str,
    claims: &serde_json::Map<String, serde_json::Value>,
    seal: bool,
) -> String {
    let json = serde_json::to_string(claims).unwrap_or_default();
    if !seal {
        return json;
    }
    let sealed = master.seal(json.as_bytes(), &claims_aad(lease_id));
    format!("{SEALED_CLAIMS}{}", crate::jose::b64(sealed))
}

/// The claims a lease keeps, from [`claims_text`]'s form. `None` when the text is
/// unreadable or sealed under another master key or for another lease.
pub fn claims_from_text(
    master: &crate::keys::MasterKey,
    lease_id: &str,
    text: &str,
) -> Option<serde_json::Map<String, serde_json::Value>> {
    match text.strip_prefix(SEALED_CLAIMS) {
        None => serde_json::from_str(text).ok(),
        Some(b64) => {
            let sealed = crate::jose::b64_decode(b64)?;
            let plain = master.open(&sealed, &claims_aad(lease_id)).ok()?;
            serde_json::from_slice(plain.expose()).ok()
        }
    }
}

fn claims_aad(lease_id: &str) -> Vec<u8> {
    format!("latchkey/lease-claims/v1/{lease_id}").into_bytes()
}

/// Checks a lease id's shape (a UUID) before it reaches the store.
pub fn valid_id(id: &str) -> bool {
    id.len() == 36 && uuid::Uuid::parse_str(id).is_ok()
}

/// The lease id a credential's `jti` names: the id itself, or its 32 hex digits without
/// hyphens (Airflow tokens, whose revoked ids Airflow stores in 32 characters).
pub fn id_from_jti(jti: &str) -> Option<String> {
    if valid_id(jti) {
        return Some(jti.to_string());
    }
    if jti.len() == 32 && jti.bytes().all(|b| b.is_ascii_hexdigit()) {
        return uuid::Uuid::parse_str(jti)
            .ok()
            .map(|u| u.hyphenated().to_string());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn claims_are_sealed_when_asked_and_open_only_for_their_lease() {
        let master = crate::keys::MasterKey::generate();
        let claims: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"email":"dev@example.com","ref":"main"}"#).unwrap();
        let clear = claims_text(&master, "l1", &claims, false);
        assert!(clear.contains("dev@example.com"));
        assert_eq!(
            claims_from_text(&master, "l1", &clear),
            Some(claims.clone())
        );
        let sealed = claims_text(&master, "l1", &claims, true);
        assert!(!sealed.contains("dev@example") && !sealed.contains("main"));
        assert_eq!(claims_from_text(&master, "l1", &sealed), Some(claims));
        assert_eq!(
            claims_from_text(&master, "l2", &sealed),
            None,
            "another lease"
        );
        let other = crate::keys::MasterKey::generate();
        assert_eq!(claims_from_text(&other, "l1", &sealed), None);
        assert_eq!(claims_from_text(&master, "l1", "sealed:v1:!!"), None);
    }

    #[test]
    fn a_jti_names_its_lease_with_or_without_hyphens() {
        let id = "0190f3a2-7b1c-7d4e-8f00-123456789abc";
        assert_eq!(id_from_jti(id).as_deref(), Some(id));
        assert_eq!(
            id_from_jti("0190f3a27b1c7d4e8f00123456789abc").as_deref(),
            Some(id)
        );
        for bad in [
            "",
            "x",
            "0190f3a27b1c7d4e8f00123456789abz",
            "{0190f3a2-7b1c-7d4e-8f00-123456789abc}",
        ] {
            assert_eq!(id_from_jti(bad), None, "{bad}");
        }
    }

    #[test]
    fn renewal_extends_within_the_lifetime() {
        let d = Duration::from_secs;
        assert_eq!(renewed_expiry(100, 200, 1000, d(300)), Ok(400));
        assert_eq!(renewed_expiry(100, 200, 350, d(300)), Ok(350), "capped");
        assert_eq!(
            renewed_expiry(100, 500, 1000, d(10)),
            Ok(500),
            "never shortens"
        );
        assert_eq!(
            renewed_expiry(100, 100, 1000, d(10)),
            Err(RenewRefused::NotLive("expired"))
        );
        assert_eq!(
            renewed_expiry(1000, 1001, 1000, d(10)),
            Err(RenewRefused::LifetimeReached)
        );
        assert_eq!(renewed_expiry(0, 1, i64::MAX, d(u64::MAX)), Ok(i64::MAX));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let max = Duration::from_secs(60);
        let b: Vec<u64> = (1..=6).map(|a| backoff(a, max).as_secs()).collect();
        assert_eq!(b, vec![5, 10, 20, 40, 60, 60]);
        assert_eq!(backoff(0, max).as_secs(), 5);
        assert_eq!(backoff(u32::MAX, max), max);
    }

    #[test]
    fn secrets_are_random_and_checked_by_hash() {
        let (a, ha) = new_secret();
        let (b, _) = new_secret();
        assert_ne!(a.expose(), b.expose());
        assert!(secret_matches(a.expose(), &ha));
        assert!(!secret_matches(b.expose(), &ha));
        assert!(!secret_matches("", &crate::jose::sha256_hex(b"")));
        assert!(!format!("{a:?}").contains(a.expose().as_str()));
    }

    #[test]
    fn ids_must_be_uuids() {
        assert!(valid_id(&uuid::Uuid::new_v4().to_string()));
        assert!(valid_id(&crate::clock::new_id()));
        assert!(!valid_id("x"));
        assert!(!valid_id("'; DROP TABLE leases; --xxxxxxxxxxxxxxxxx"));
    }

    #[test]
    fn states_round_trip() {
        for s in [
            LeaseState::Live,
            LeaseState::Revoking,
            LeaseState::Revoked,
            LeaseState::Expired,
        ] {
            assert_eq!(LeaseState::parse(s.as_str()), Some(s));
        }
        assert_eq!(LeaseState::parse("zombie"), None);
    }

    proptest! {
        #[test]
        fn prop_renewal_never_passes_the_lifetime(
            now in 0i64..1_000_000, cur in 0i64..2_000_000, max_end in 0i64..2_000_000, ttl in 0u64..5_000_000
        ) {
            if let Ok(e) = renewed_expiry(now, cur, max_end, Duration::from_secs(ttl)) {
                prop_assert!(e <= max_end);
                prop_assert!(e > now);
                prop_assert!(e >= cur.min(max_end));
            }
        }
    }
}
