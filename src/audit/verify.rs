//! Verifying a stored (or exported) audit log: the hash chain record by record, every
//! signed checkpoint, and any checkpoints a witness kept elsewhere.
//!
//! [`Walker`] is fed records in sequence order and stops at the first thing that is
//! wrong, saying where and how ([`Tamper`]). It never needs more than the record in
//! hand and the one before, so a log of any size is verified in constant memory; the
//! store feeds it straight from its rows ([`crate::store::sqlite::verify_file`]).

use super::checkpoint::{Checkpoint, CheckpointKeys};
use super::{AuditRecord, HashCheck, GENESIS_HASH};
use std::collections::BTreeMap;
use std::fmt;

/// The first thing found wrong with a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tamper {
    /// A record's content does not match its hash.
    Edited {
        /// The record.
        seq: i64,
    },
    /// Sequence numbers jump: records are missing.
    Removed {
        /// First missing sequence number.
        from: i64,
        /// Last missing sequence number.
        to: i64,
    },
    /// The record's hash belongs one position earlier: a record was inserted before it
    /// and the later ones renumbered.
    Inserted {
        /// The first record out of place.
        seq: i64,
    },
    /// The record's hash belongs one position later: a record before it was removed and
    /// the later ones renumbered (or it was swapped with its neighbour).
    Shifted {
        /// The first record out of place.
        seq: i64,
    },
    /// A record numbered at or below one already walked (a duplicate, or a row a forger
    /// numbered 0 or less).
    Misnumbered {
        /// Its number.
        seq: i64,
        /// The number expected there.
        expected: i64,
    },
    /// The record is intact but belongs elsewhere in the chain.
    Reordered {
        /// The record.
        seq: i64,
    },
    /// The record is intact but does not link to the one before: that one was rewritten
    /// with a recomputed hash, or this one was inserted.
    Unlinked {
        /// The record.
        seq: i64,
    },
    /// A signed checkpoint attests a record the log no longer has.
    Truncated {
        /// The checkpoint.
        checkpoint: i64,
        /// The record it attests.
        checkpoint_seq: i64,
        /// The last record the log has.
        head: i64,
    },
    /// The record at a checkpoint's position is not the one the checkpoint attests: the
    /// log up to there was rewritten.
    CheckpointMismatch {
        /// The checkpoint.
        checkpoint: i64,
        /// The record.
        seq: i64,
    },
    /// A checkpoint's signature does not verify (forged or altered), or its key is unknown.
    BadCheckpoint {
        /// The checkpoint.
        checkpoint: i64,
        /// Why.
        reason: String,
    },
    /// A checkpoint the witness holds is missing from, or different in, the store.
    WitnessMismatch {
        /// The witnessed checkpoint.
        checkpoint: i64,
        /// Why.
        reason: String,
    },
}

impl Tamper {
    /// Short stable name of the kind of problem.
    pub fn kind(&self) -> &'static str {
        match self {
            Tamper::Edited { .. } => "edited",
            Tamper::Removed { .. } => "removed",
            Tamper::Inserted { .. } => "inserted",
            Tamper::Shifted { .. } => "shifted",
            Tamper::Reordered { .. } => "reordered",
            Tamper::Misnumbered { .. } => "misnumbered",
            Tamper::Unlinked { .. } => "unlinked",
            Tamper::Truncated { .. } => "truncated",
            Tamper::CheckpointMismatch { .. } => "checkpoint_mismatch",
            Tamper::BadCheckpoint { .. } => "bad_checkpoint",
            Tamper::WitnessMismatch { .. } => "witness_mismatch",
        }
    }

    /// The record the problem is at (0 when it concerns a checkpoint only).
    pub fn seq(&self) -> i64 {
        match self {
            Tamper::Edited { seq }
            | Tamper::Inserted { seq }
            | Tamper::Shifted { seq }
            | Tamper::Reordered { seq }
            | Tamper::Unlinked { seq }
            | Tamper::CheckpointMismatch { seq, .. } => *seq,
            Tamper::Removed { from, .. } => *from,
            Tamper::Misnumbered { expected, .. } => *expected,
            Tamper::Truncated { head, .. } => head + 1,
            Tamper::BadCheckpoint { .. } | Tamper::WitnessMismatch { .. } => 0,
        }
    }
}

impl fmt::Display for Tamper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tamper::Edited { seq } => {
                write!(f, "record {seq}: content does not match its hash (edited)")
            }
            Tamper::Removed { from, to } if from == to => {
                write!(f, "record {from} is missing (removed)")
            }
            Tamper::Removed { from, to } => {
                write!(f, "records {from} to {to} are missing (removed)")
            }
            Tamper::Inserted { seq } => write!(
                f,
                "record {seq}: belongs at {} (a record was inserted before it)",
                seq - 1
            ),
            Tamper::Shifted { seq } => write!(
                f,
                "record {seq}: belongs at {} (a record before it was removed and the rest renumbered, or it was reordered)",
                seq + 1
            ),
            Tamper::Misnumbered { seq, expected } => write!(
                f,
                "a record numbered {seq} stands where record {expected} was expected (inserted or duplicated)"
            ),
            Tamper::Reordered { seq } => write!(
                f,
                "record {seq}: does not follow record {} and belongs elsewhere (reordered)",
                seq - 1
            ),
            Tamper::Unlinked { seq } => write!(
                f,
                "record {seq}: does not follow record {} (record {} was rewritten with a recomputed hash, or {seq} was inserted)",
                seq - 1,
                seq - 1
            ),
            Tamper::Truncated {
                checkpoint,
                checkpoint_seq,
                head,
            } => write!(
                f,
                "truncated after checkpoint #{checkpoint}: it attests record {checkpoint_seq} but the log ends at record {head}"
            ),
            Tamper::CheckpointMismatch { checkpoint, seq } => write!(
                f,
                "record {seq}: differs from what checkpoint #{checkpoint} attests (the log was rewritten up to here)"
            ),
            Tamper::BadCheckpoint { checkpoint, reason } => {
                write!(f, "checkpoint #{checkpoint}: {reason}")
            }
            Tamper::WitnessMismatch { checkpoint, reason } => {
                write!(f, "witnessed checkpoint #{checkpoint}: {reason}")
            }
        }
    }
}

/// The outcome of a verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Records walked (up to the problem, if any).
    pub records: u64,
    /// Sequence number of the last good record.
    pub head_seq: i64,
    /// Its hash.
    pub head_hash: String,
    /// The newest checkpoint that verified.
    pub last_checkpoint: Option<Checkpoint>,
    /// Checkpoints checked.
    pub checkpoints: u64,
    /// Records after the newest checkpoint (not yet attested by a signature).
    pub unattested: u64,
    /// The first problem, if any.
    pub problem: Option<Tamper>,
}

impl Report {
    /// Whether nothing is wrong.
    pub fn intact(&self) -> bool {
        self.problem.is_none()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(p) = &self.problem {
            return write!(f, "TAMPERED: {p}");
        }
        write!(f, "{} records, chain intact", self.records)?;
        match &self.last_checkpoint {
            Some(c) => write!(
                f,
                ", last checkpoint #{} signed at {} (record {})",
                c.id,
                crate::clock::rfc3339(c.time_ms / 1000),
                c.seq
            )?,
            None => return write!(f, ", no signed checkpoint yet"),
        }
        if self.unattested > 0 {
            write!(f, "; {} records after it not yet attested", self.unattested)?;
        }
        Ok(())
    }
}

/// What a verification checks besides the chain itself.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Audit public keys to check checkpoints with. `None`: the keys stored in the same
    /// database (which an attacker with the file could replace: pin them for audits).
    pub keys: Option<CheckpointKeys>,
    /// Checkpoints a witness kept.
    pub witnessed: Vec<Checkpoint>,
}

/// Walks a chain in sequence order. Feed it with [`Walker::step`] (or
/// [`Walker::record`]), then call [`Walker::finish`].
#[derive(Debug)]
pub struct Walker {
    prev_seq: i64,
    prev_hash: String,
    records: u64,
    /// Checkpoints by the record they attest.
    at: BTreeMap<i64, Vec<Checkpoint>>,
    last_checkpoint: Option<Checkpoint>,
    checkpoints: u64,
    problem: Option<Tamper>,
    /// Which hash format to try first.
    check: HashCheck,
}

impl Walker {
    /// A walker starting after the record `(prev_seq, prev_hash)`; `(0, GENESIS_HASH)`
    /// for a whole log. Every checkpoint is checked against `keys` first (signature,
    /// ascending ids and positions); the first bad one is the problem.
    pub fn new(
        prev_seq: i64,
        prev_hash: &str,
        checkpoints: Vec<Checkpoint>,
        keys: &CheckpointKeys,
    ) -> Walker {
        let checked = check_checkpoints(&checkpoints, keys);
        let mut w = Walker::new_checked(prev_seq, prev_hash, checkpoints);
        if let Err(p) = checked {
            w.problem = Some(p);
        }
        w
    }

    /// [`Walker::new`] for checkpoints already checked with [`check_checkpoints`] (a log
    /// walked in parallel parts checks them once).
    pub fn new_checked(prev_seq: i64, prev_hash: &str, checkpoints: Vec<Checkpoint>) -> Walker {
        let mut w = Walker {
            prev_seq,
            prev_hash: prev_hash.to_string(),
            records: 0,
            at: BTreeMap::new(),
            last_checkpoint: None,
            checkpoints: checkpoints.len() as u64,
            problem: None,
            check: HashCheck::default(),
        };
        for c in checkpoints {
            if c.seq > prev_seq {
                w.at.entry(c.seq).or_default().push(c);
            } else {
                w.last_checkpoint = Some(c);
            }
        }
        w
    }

    /// Records a problem found outside [`Walker::step`] (a row that cannot be read as
    /// what was written); the first problem stays.
    pub fn fail(&mut self, p: Tamper) {
        if self.problem.is_none() {
            self.problem = Some(p);
        }
    }

    /// Marks records `prev_seq + 1 ..= hi` missing when the walk ended before `hi` (a
    /// part of a log walked in parallel must reach the end of its range).
    pub fn expect_through(&mut self, hi: i64) {
        if self.problem.is_none() && self.prev_seq < hi {
            self.problem = Some(Tamper::Removed {
                from: self.prev_seq + 1,
                to: hi,
            });
        }
    }

    /// A walker for a whole log.
    pub fn whole(checkpoints: Vec<Checkpoint>, keys: &CheckpointKeys) -> Walker {
        Walker::new(0, GENESIS_HASH, checkpoints, keys)
    }

    /// Whether a problem was found (feeding more records changes nothing then).
    pub fn failed(&self) -> bool {
        self.problem.is_some()
    }

    /// One record, given by its stored place and hash and a function telling whether its
    /// content, placed at a given position, has that hash. Answers false once a problem
    /// is found.
    pub fn step(
        &mut self,
        seq: i64,
        prev_hash: &str,
        hash: &str,
        mut hashes_at: impl FnMut(i64) -> bool,
    ) -> bool {
        if self.problem.is_some() {
            return false;
        }
        let expect = self.prev_seq + 1;
        if seq > expect {
            self.problem = Some(Tamper::Removed {
                from: expect,
                to: seq - 1,
            });
            return false;
        }
        if seq < expect {
            self.problem = Some(Tamper::Misnumbered {
                seq,
                expected: expect,
            });
            return false;
        }
        let linked = prev_hash == self.prev_hash;
        if !hashes_at(seq) {
            self.problem = Some(if !linked && hashes_at(seq - 1) {
                Tamper::Inserted { seq }
            } else if !linked && hashes_at(seq + 1) {
                Tamper::Shifted { seq }
            } else if linked {
                Tamper::Edited { seq }
            } else {
                Tamper::Reordered { seq }
            });
            return false;
        }
        if !linked {
            self.problem = Some(Tamper::Unlinked { seq });
            return false;
        }
        if let Some(cps) = self.at.remove(&seq) {
            for c in cps {
                if c.hash != hash {
                    self.problem = Some(Tamper::CheckpointMismatch {
                        checkpoint: c.id,
                        seq,
                    });
                    return false;
                }
                self.last_checkpoint = Some(c);
            }
        }
        self.prev_seq = seq;
        self.prev_hash.clear();
        self.prev_hash.push_str(hash);
        self.records += 1;
        true
    }

    /// One decoded record (exported files, gRPC).
    pub fn record(&mut self, r: &AuditRecord) -> bool {
        let json = serde_json::to_vec(&r.entry).unwrap_or_default();
        let mut check = std::mem::take(&mut self.check);
        let ok = self.step(r.seq, &r.prev_hash, &r.hash, |s| {
            check.matches(s, r.prev_hash.as_bytes(), &json, &r.hash)
        });
        self.check = check;
        ok
    }

    /// Ends the walk: checkpoints beyond the last record mean truncation.
    pub fn finish(mut self) -> Report {
        if self.problem.is_none() {
            if let Some((&seq, cps)) = self.at.iter().next_back() {
                let c = cps.last().map(|c| c.id).unwrap_or_default();
                self.problem = Some(Tamper::Truncated {
                    checkpoint: c,
                    checkpoint_seq: seq,
                    head: self.prev_seq,
                });
            }
        }
        let unattested = match &self.last_checkpoint {
            Some(c) => (self.prev_seq - c.seq).max(0) as u64,
            None => self.records,
        };
        Report {
            records: self.records,
            head_seq: self.prev_seq,
            head_hash: self.prev_hash,
            last_checkpoint: self.last_checkpoint,
            checkpoints: self.checkpoints,
            unattested,
            problem: self.problem,
        }
    }
}

/// Checks every checkpoint's signature, and that ids ascend and positions never go
/// back. Fails with the first bad one.
pub fn check_checkpoints(checkpoints: &[Checkpoint], keys: &CheckpointKeys) -> Result<(), Tamper> {
    let mut last: Option<&Checkpoint> = None;
    for c in checkpoints {
        if let Err(reason) = keys.verify(c) {
            return Err(Tamper::BadCheckpoint {
                checkpoint: c.id,
                reason,
            });
        }
        if let Some(l) = last {
            if c.id <= l.id || c.seq < l.seq {
                return Err(Tamper::BadCheckpoint {
                    checkpoint: c.id,
                    reason: format!("out of order after checkpoint #{}", l.id),
                });
            }
        }
        last = Some(c);
    }
    Ok(())
}

/// Joins the reports of consecutive parts of one log, walked in parallel: the first
/// problem (parts are in sequence order) and everything up to it.
pub fn join_reports(parts: Vec<Report>, checkpoints: u64) -> Report {
    let mut out = Report {
        records: 0,
        head_seq: 0,
        head_hash: GENESIS_HASH.to_string(),
        last_checkpoint: None,
        checkpoints,
        unattested: 0,
        problem: None,
    };
    for p in parts {
        out.records += p.records;
        if p.records > 0 || p.problem.is_some() {
            out.head_seq = p.head_seq;
            out.head_hash = p.head_hash;
        }
        if p.last_checkpoint.is_some() {
            out.last_checkpoint = p.last_checkpoint;
        }
        if p.problem.is_some() {
            out.problem = p.problem;
            break;
        }
    }
    out.unattested = match &out.last_checkpoint {
        Some(c) => (out.head_seq - c.seq).max(0) as u64,
        None => out.records,
    };
    out
}

/// Compares what a witness holds with the store's own checkpoints and records: every
/// witnessed checkpoint must verify, be in the store unchanged, and attest a record the
/// store still has with the same hash (`record_hash_at` answers the stored hash at a
/// sequence number, or `None` when the store has no such record).
pub fn check_witness(
    witnessed: &[Checkpoint],
    stored: &[Checkpoint],
    keys: &CheckpointKeys,
    record_hash_at: impl Fn(i64) -> Option<String>,
) -> Option<Tamper> {
    let by_id: BTreeMap<i64, &Checkpoint> = stored.iter().map(|c| (c.id, c)).collect();
    for w in witnessed {
        let bad = |reason: String| {
            Some(Tamper::WitnessMismatch {
                checkpoint: w.id,
                reason,
            })
        };
        if let Err(reason) = keys.verify(w) {
            return bad(format!("does not verify: {reason}"));
        }
        match by_id.get(&w.id) {
            None => return bad("missing from the store (checkpoints were deleted)".into()),
            Some(s) if *s != w => return bad("differs from the store's copy".into()),
            Some(_) => {}
        }
        match record_hash_at(w.seq) {
            None => {
                return bad(format!(
                    "attests record {} which the store no longer has (truncated)",
                    w.seq
                ))
            }
            Some(h) if h != w.hash => {
                return bad(format!(
                    "attests record {} but the store's record differs (rewritten)",
                    w.seq
                ))
            }
            Some(_) => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::super::checkpoint::tests::{keys_and_signer, sign};
    use super::super::tests::{chain, entry};
    use super::*;
    use crate::audit::record_hash;
    use proptest::prelude::*;

    fn walk(c: &[AuditRecord], cps: Vec<Checkpoint>, keys: &CheckpointKeys) -> Report {
        let mut w = Walker::whole(cps, keys);
        for r in c {
            if !w.record(r) {
                break;
            }
        }
        w.finish()
    }

    /// Renumbers records from index `i` on by `by`, as an attacker with the file would
    /// after inserting or removing a row (seq is the primary key).
    fn renumber(c: &mut [AuditRecord], from: usize, by: i64) {
        for r in &mut c[from..] {
            r.seq += by;
        }
    }

    #[test]
    fn intact_log_reports_counts_and_last_checkpoint() {
        let (keys, signer) = keys_and_signer();
        let c = chain(10);
        let cps = vec![
            sign(&signer, 1, &c[4], 5_000),
            sign(&signer, 2, &c[7], 6_000),
        ];
        let r = walk(&c, cps, &keys);
        assert!(r.intact(), "{r}");
        assert_eq!((r.records, r.head_seq, r.unattested), (10, 10, 2));
        assert_eq!(r.last_checkpoint.as_ref().map(|c| c.id), Some(2));
        let text = r.to_string();
        assert!(
            text.starts_with("10 records, chain intact, last checkpoint #2 signed at"),
            "{text}"
        );
    }

    /// A log whose first records are in hash format 1 (an upgraded store) walks intact,
    /// and each kind of tampering is named exactly as in a format 2 log.
    #[test]
    fn a_log_begun_in_format_1_walks_and_tampering_is_named_the_same() {
        let (keys, _) = keys_and_signer();
        let v2 = chain(8);
        let mut mixed = v2.clone();
        let mut prev = GENESIS_HASH.to_string();
        for r in &mut mixed {
            r.prev_hash = prev;
            r.hash = if r.seq <= 5 {
                crate::audit::record_hash_v1(r.seq, &r.prev_hash, &r.entry)
            } else {
                record_hash(r.seq, &r.prev_hash, &r.entry)
            };
            prev = r.hash.clone();
        }
        assert_ne!(mixed[0].hash, v2[0].hash);
        let r = walk(&mixed, Vec::new(), &keys);
        assert!(r.intact(), "{r}");
        assert_eq!(r.records, 8);
        type Tampering = fn(&mut Vec<AuditRecord>);
        let tampers: [(&str, Tampering); 4] = [
            ("edited", |c| c[2].entry.outcome = "denied".into()),
            ("removed and renumbered", |c| {
                c.remove(2);
                renumber(c, 2, -1);
            }),
            ("inserted and renumbered", |c| {
                let extra = c[1].clone();
                c.insert(2, extra);
                renumber(c, 3, 1);
            }),
            ("swapped", |c| c.swap(2, 3)),
        ];
        for (name, tamper) in tampers {
            let (mut a, mut b) = (mixed.clone(), v2.clone());
            tamper(&mut a);
            tamper(&mut b);
            let (pa, pb) = (
                walk(&a, Vec::new(), &keys).problem,
                walk(&b, Vec::new(), &keys).problem,
            );
            assert!(pa.is_some(), "{name} undetected");
            assert_eq!(pa, pb, "{name}");
        }
    }

    #[test]
    fn each_kind_of_tampering_is_named() {
        let (keys, signer) = keys_and_signer();
        let base = chain(8);
        let cp = |c: &[AuditRecord]| vec![sign(&signer, 1, &c[6], 9_000)];

        // Edited in place.
        let mut c = base.clone();
        c[3].entry.outcome = "denied".into();
        assert_eq!(
            walk(&c, cp(&base), &keys).problem,
            Some(Tamper::Edited { seq: 4 })
        );

        // Removed without renumbering: a gap.
        let mut c = base.clone();
        c.remove(2);
        assert_eq!(
            walk(&c, cp(&base), &keys).problem,
            Some(Tamper::Removed { from: 3, to: 3 })
        );

        // Removed and renumbered.
        let mut c = base.clone();
        c.remove(2);
        renumber(&mut c, 2, -1);
        assert_eq!(
            walk(&c, cp(&base), &keys).problem,
            Some(Tamper::Shifted { seq: 3 })
        );

        // Inserted (a forged record that links correctly) and the rest renumbered.
        let mut c = base.clone();
        let forged = AuditRecord::chain(c[2].seq, &c[2].hash, entry(99));
        c.insert(3, forged);
        renumber(&mut c, 4, 1);
        let p = walk(&c, cp(&base), &keys).problem;
        assert_eq!(p, Some(Tamper::Inserted { seq: 5 }), "{p:?}");

        // Two records swapped (content moved, sequence numbers kept).
        let mut c = base.clone();
        let (a, b) = (c[2].clone(), c[5].clone());
        c[2] = AuditRecord { seq: 3, ..b };
        c[5] = AuditRecord { seq: 6, ..a };
        assert_eq!(
            walk(&c, cp(&base), &keys).problem,
            Some(Tamper::Reordered { seq: 3 })
        );

        // Edited with the hash recomputed: the next record no longer links.
        let mut c = base.clone();
        c[3].entry.reason = Some("nothing to see".into());
        c[3].hash = record_hash(4, &c[3].prev_hash, &c[3].entry);
        assert_eq!(
            walk(&c, cp(&base), &keys).problem,
            Some(Tamper::Unlinked { seq: 5 })
        );

        // Truncated after the checkpoint.
        let mut c = base.clone();
        c.truncate(5);
        let p = walk(&c, cp(&base), &keys).problem.unwrap();
        assert_eq!(
            p,
            Tamper::Truncated {
                checkpoint: 1,
                checkpoint_seq: 7,
                head: 5
            }
        );
        assert!(
            p.to_string().contains("truncated after checkpoint #1"),
            "{p}"
        );

        // The whole log rewritten consistently: only the signed checkpoint notices.
        let mut c: Vec<AuditRecord> = Vec::new();
        for (i, r) in base.iter().enumerate() {
            let mut e = r.entry.clone();
            if i == 1 {
                e.outcome = "denied".into();
            }
            let (s, h) = c
                .last()
                .map(|r| (r.seq, r.hash.clone()))
                .unwrap_or((0, GENESIS_HASH.into()));
            c.push(AuditRecord::chain(s, &h, e));
        }
        assert_eq!(
            walk(&c, cp(&base), &keys).problem,
            Some(Tamper::CheckpointMismatch {
                checkpoint: 1,
                seq: 7
            })
        );

        // A forged checkpoint (signed by another key).
        let (_, other) = keys_and_signer();
        let forged = vec![sign(&other, 1, &base[6], 9_000)];
        assert_eq!(
            walk(&base, forged, &keys).problem.unwrap().kind(),
            "bad_checkpoint"
        );
    }

    #[test]
    fn witness_catches_deleted_checkpoints_and_rewrites() {
        let (keys, signer) = keys_and_signer();
        let c = chain(6);
        let witnessed = vec![sign(&signer, 1, &c[2], 1), sign(&signer, 2, &c[4], 2)];
        let hash_at = |c: &[AuditRecord]| {
            let m: BTreeMap<i64, String> = c.iter().map(|r| (r.seq, r.hash.clone())).collect();
            move |s: i64| m.get(&s).cloned()
        };
        assert_eq!(
            check_witness(&witnessed, &witnessed, &keys, hash_at(&c)),
            None
        );
        // The attacker deleted checkpoint 2 and truncated the log.
        let p = check_witness(&witnessed, &witnessed[..1], &keys, hash_at(&c[..3])).unwrap();
        assert!(p.to_string().contains("missing from the store"), "{p}");
        let p = check_witness(&witnessed, &witnessed, &keys, hash_at(&c[..3])).unwrap();
        assert!(p.to_string().contains("truncated"), "{p}");
    }

    proptest! {
        /// Any single edit, insertion, deletion, reordering or truncation of a random
        /// chain with a checkpoint at its head is detected, at or before the place of
        /// the change.
        #[test]
        fn any_single_change_is_detected_and_located(n in 3i64..40, pick in 0usize..1000, kind in 0u8..6) {
            let (keys, signer) = keys_and_signer();
            let base = chain(n);
            let cps = vec![sign(&signer, 1, base.last().unwrap(), 1)];
            let mut c = base.clone();
            let i = pick % c.len();
            let changed_at = (i + 1) as i64;
            match kind {
                0 => c[i].entry.request_id.push('x'),
                1 => {
                    let forged = AuditRecord::chain(i as i64, if i == 0 { GENESIS_HASH } else { &base[i - 1].hash }, entry(500));
                    c.insert(i, forged);
                    renumber(&mut c, i + 1, 1);
                }
                2 => { c.remove(i); }
                3 => { c.remove(i); renumber(&mut c, i, -1); }
                4 => {
                    let j = (i + 1) % c.len();
                    let (a, b) = (c[i].clone(), c[j].clone());
                    c[i] = AuditRecord { seq: a.seq, ..b };
                    c[j] = AuditRecord { seq: b.seq, ..a };
                }
                _ => { c.truncate(i); }
            }
            let r = walk(&c, cps, &keys);
            let p = r.problem.clone();
            prop_assert!(p.is_some(), "undetected: kind {kind} at {i}");
            let p = p.unwrap();
            if p.seq() != 0 {
                let first_changed = if kind == 4 { changed_at.min(((i + 1) % base.len()) as i64 + 1) } else { changed_at };
                prop_assert!(p.seq() >= first_changed.min(n), "{p} reported before the change at {first_changed}");
                prop_assert!(p.seq() <= n + 1, "{p}");
            }
        }
    }
}
