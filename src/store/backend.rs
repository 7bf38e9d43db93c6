//! Choosing and opening a backend: the one place that knows every adapter. The port
//! (`store`) does not; the server and the CLI open stores through [`open`].

use super::{sqlite, Location, Store, StoreError};
use crate::audit::verify::{Report, VerifyOptions};
use crate::audit::{AuditQuery, AuditRecord};
use std::sync::Arc;
use std::time::Duration;

/// How a store is opened, whatever its backend.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// How long a write waits for a lock held elsewhere before failing closed.
    pub busy_timeout: Duration,
}

/// Opens the store at `location`: the one place a backend is chosen. Fails when the
/// store cannot be opened or is not one this version can use.
pub fn open(location: &Location, opts: &OpenOptions) -> Result<Arc<dyn Store>, StoreError> {
    match location {
        Location::Sqlite(path) => Ok(Arc::new(sqlite::SqliteStore::open(&sqlite::Config {
            path: path.clone(),
            busy_timeout: opts.busy_timeout,
        })?)),
    }
}

/// Audit records of the store at `location` matching `q`, in sequence order, at most
/// `limit`, read without opening the store for writing (`latchkey audit export --db` on a
/// copy). Fails when it cannot be read as a Latchkey store.
pub fn query_offline(
    location: &Location,
    q: &AuditQuery,
    limit: usize,
) -> Result<Vec<AuditRecord>, StoreError> {
    match location {
        Location::Sqlite(path) => sqlite::audit::query_file(path, q, limit),
    }
}

/// Verifies the audit chain and checkpoints of the store at `location` without opening
/// it for writing (`latchkey audit verify --db`). Fails only when it cannot be read as a
/// Latchkey store; a tampered log is a [`Report`] with a problem.
pub fn verify_offline(location: &Location, opts: &VerifyOptions) -> Result<Report, StoreError> {
    match location {
        Location::Sqlite(path) => sqlite::audit::verify_file(path, opts),
    }
}
