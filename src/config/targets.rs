//! Kind-specific target settings: each kind's raw form and checks live beside its minter
//! in `mint`; this adds the file name to what they refuse.

use super::{Checker, ConfigError};
use crate::mint::{Check, TargetKind};

impl Checker<'_> {
    /// Checks the kind-specific keys of target `key` (everything but the common ones).
    pub(super) fn target_kind(
        &self,
        key: &str,
        kind: &str,
        rest: toml::Table,
    ) -> Result<TargetKind, ConfigError> {
        Check
            .target_kind(key, kind, rest)
            .map_err(|e| self.err(e.key, e.reason))
    }
}
