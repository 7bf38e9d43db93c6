//! Protobuf → domain at the gRPC edge: any bytes decode to a message that converts and
//! validates, or are refused; never a panic.
#![no_main]

use latchkey::transport::pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = pb::MintRequest::decode(data) {
        if let Ok(req) = latchkey::broker::MintRequest::try_from(m) {
            let _ = req.validate();
        }
    }
    if let Ok(r) = pb::AuditRecord::decode(data) {
        let _ = latchkey::audit::AuditRecord::try_from(r);
    }
    if let Ok(c) = pb::Checkpoint::decode(data) {
        let _ = latchkey::audit::checkpoint::Checkpoint::from(c);
    }
});
