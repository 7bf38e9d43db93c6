//! Rotation: the pure schedule math ([`schedule`]) and the report types. The runner that
//! both `RunDue` (the cron) and the in-process scheduler use is
//! `Broker::run_due` (`src/broker/rotation.rs`): one code path, one lock in the store.

pub mod schedule;

pub use schedule::{jitter_for, next_due, Schedule, Window};

/// What kind of thing rotates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemKind {
    /// A target's signing key (two-phase: next → current → retired → removed).
    SigningKey,
    /// A target's upstream root credential (create, verify, switch, delete).
    Root,
}

impl ItemKind {
    /// The item name prefix.
    pub fn as_str(self) -> &'static str {
        match self {
            ItemKind::SigningKey => "signing-key",
            ItemKind::Root => "root",
        }
    }
}

/// The name of a rotatable item: `signing-key:<target>` or `root:<target>`.
pub fn item_name(kind: ItemKind, target: &str) -> String {
    format!("{}:{target}", kind.as_str())
}

/// What happened to one item in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Rotated now.
    Rotated,
    /// Not due; see `next_due`.
    NotDue,
    /// Due, but waiting (a next key not yet published for a whole JWKS cache period).
    Deferred,
    /// Tried and failed; the old credential stays in service.
    Failed,
}

impl Outcome {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Rotated => "rotated",
            Outcome::NotDue => "not_due",
            Outcome::Deferred => "deferred",
            Outcome::Failed => "failed",
        }
    }
}

/// One item's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemResult {
    /// `signing-key:<target>` or `root:<target>`.
    pub item: String,
    /// What happened.
    pub outcome: Outcome,
    /// A sentence for humans (new key id, why deferred, why it failed).
    pub detail: String,
    /// When it is next due (seconds since the epoch), if it has a schedule.
    pub next_due: Option<i64>,
}

/// One rotatable item as `Schedule` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledItem {
    /// Item name.
    pub item: String,
    /// Its target.
    pub target: String,
    /// Its kind.
    pub kind: ItemKind,
    /// Rotation period in seconds; `None`: only forced rotations.
    pub period_secs: Option<u64>,
    /// Window, as configured.
    pub window: Option<String>,
    /// Last rotation (seconds since the epoch).
    pub last_rotated: Option<i64>,
    /// Next due time.
    pub next_due: Option<i64>,
    /// Signing keys: the key that signs now.
    pub current_kid: Option<String>,
    /// Signing keys: the key that signs next.
    pub next_kid: Option<String>,
    /// Signing keys: retired keys still published, with when each goes.
    pub retired: Vec<(String, i64)>,
}
