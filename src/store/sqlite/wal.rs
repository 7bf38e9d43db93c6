//! Folding the WAL back into the database, off the writer's commits.
//!
//! With SQLite's automatic checkpoint, the commit that crosses the threshold copies every
//! page of the WAL into the database file and fsyncs it before it returns, so every
//! caller waiting on that group commit (and so every Mint in it) waits tens of
//! milliseconds. Here the writer's connection never checkpoints by itself. A folder
//! thread looks at the log every [`FOLD_EVERY`] and runs a PASSIVE checkpoint on its own
//! connection each time the log grew by [`FOLD_FRAMES`]: PASSIVE never blocks the writer
//! or a reader, so folding runs beside the commits. A WAL starts over from its beginning only when a write transaction begins
//! with every frame folded, which under continuous writes never happens by itself; so
//! once the log reaches [`RESTART_FRAMES`] the writer folds the last few frames itself,
//! between two batches, and its next transaction starts the log over. Should the folder
//! be gone, that is also the bound: the writer then folds everything itself, as SQLite
//! would have.

use rusqlite::hooks::Wal;
use rusqlite::Connection;
use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How often the folder looks at the log.
const FOLD_EVERY: Duration = Duration::from_millis(25);
/// Frames the log grows by before the folder folds it: folding more often writes the same
/// hot pages (index and table tails) back again and again.
const FOLD_FRAMES: i64 = if cfg!(test) { 16 } else { 2048 };
/// Frames (pages) in the log at which the writer makes the log start over (32 MiB).
const RESTART_FRAMES: i64 = if cfg!(test) { 64 } else { 8192 };
/// Bytes the WAL file is cut back to whenever the log starts over (`journal_size_limit`).
pub(super) const JOURNAL_SIZE_LIMIT: i64 = if cfg!(test) { 64 * 1024 } else { 4 << 20 };

thread_local! {
    /// Frames in the log after the last commit on this thread's connection.
    static FRAMES: Cell<i64> = const { Cell::new(0) };
}

fn on_commit(_wal: &Wal, frames: std::ffi::c_int) -> rusqlite::Result<()> {
    FRAMES.with(|f| f.set(i64::from(frames)));
    Ok(())
}

/// The writer's side: counts the log's frames at each commit and publishes them to the
/// folder.
pub(super) struct WalWatch {
    frames: Arc<AtomicI64>,
}

impl WalWatch {
    /// Takes over checkpointing on `conn` (the writer's connection, on the thread that
    /// will commit with it) and starts the folder on its own connection to `path`.
    pub(super) fn start(conn: &Connection, path: &Path) -> WalWatch {
        // Replaces SQLite's automatic checkpoint, which is itself a WAL hook.
        conn.wal_hook(Some(on_commit));
        let frames = Arc::new(AtomicI64::new(0));
        let weak = Arc::downgrade(&frames);
        let path = path.to_path_buf();
        let started = std::thread::Builder::new()
            .name("latchkey-wal".into())
            .spawn(move || fold(&path, weak));
        if let Err(e) = started {
            tracing::warn!(error = %e, "cannot start the WAL folder; the writer folds the log itself");
        }
        WalWatch { frames }
    }

    /// After a commit: publishes the log's size, and when the log is long enough to start
    /// over, folds what the folder has not yet folded, so the next transaction starts it
    /// over.
    pub(super) fn committed(&self, conn: &Connection) {
        let frames = FRAMES.with(Cell::get);
        self.frames.store(frames, Ordering::Relaxed);
        if frames >= RESTART_FRAMES {
            match checkpoint(conn) {
                Ok(_) => FRAMES.with(|f| f.set(0)),
                Err(e) => tracing::warn!(error = %e, frames, "cannot fold the WAL"),
            }
        }
    }
}

fn checkpoint(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get(1)?, r.get(2)?))
    })
}

/// The folder thread: folds the log each time it grew by [`FOLD_FRAMES`], until the
/// writer is gone.
fn fold(path: &Path, frames: Weak<AtomicI64>) {
    let conn = match Connection::open(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot open the WAL folder's connection; the writer folds the log itself");
            return;
        }
    };
    let _ = conn.pragma_update(None, "synchronous", "FULL");
    let mut seen = 0;
    let mut failing = false;
    loop {
        std::thread::sleep(FOLD_EVERY);
        let Some(now) = frames.upgrade().map(|f| f.load(Ordering::Relaxed)) else {
            return;
        };
        // The log started over (`now < seen`), or has not grown enough to fold yet.
        if now < seen {
            seen = 0;
        }
        if now - seen < FOLD_FRAMES {
            continue;
        }
        match checkpoint(&conn) {
            Ok(_) => {
                seen = now;
                if std::mem::take(&mut failing) {
                    tracing::info!("WAL folding again");
                }
            }
            Err(e) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(error = %e, "cannot fold the WAL; retrying");
                }
            }
        }
    }
}
