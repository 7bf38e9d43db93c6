//! Choosing and opening a backend: the one place that knows every adapter. The port
//! (`store`) does not; the server and the CLI open stores through [`open`].

use super::{sqlite, Location, Store, StoreError};
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
