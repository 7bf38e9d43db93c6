//! What `latchkey audit verify --file` reads: JSON lines of audit records walked as a
//! chain, and checkpoint keys and checkpoints as the witness file holds them. Any input
//! is a verdict (intact or the first tampered record), never a panic.
#![no_main]

use latchkey::audit::checkpoint::{Checkpoint, CheckpointKeys};
use latchkey::audit::AuditRecord;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let records: Vec<AuditRecord> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let report = latchkey::cli::audit::verify_slice(&records);
    let _ = report.to_string();
    let checkpoints: Vec<Checkpoint> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    if let Ok(doc) = serde_json::from_str::<serde_json::Value>(text) {
        if let Ok(keys) = CheckpointKeys::from_jwks(&doc) {
            let _ = latchkey::audit::verify::check_checkpoints(&checkpoints, &keys);
        }
    }
    let keys = CheckpointKeys::default();
    let _ = latchkey::audit::verify::check_checkpoints(&checkpoints, &keys);
});
