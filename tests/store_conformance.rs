//! The store conformance suite: every behaviour the broker relies on from its store,
//! written once against the [`Store`] interface and run against each backend.
//!
//! A backend joins by one line at the bottom (`conformance!(name, opener)`): the opener
//! answers a [`Backend`], which opens the same empty store as often as asked (a second
//! open after the first is dropped is a restart). A backend that needs a server it cannot
//! reach says `SKIPPED:` and answers `None`.

use latchkey::audit::verify::VerifyOptions;
use latchkey::audit::{verify_chain, AuditEntry, AuditQuery, GENESIS_HASH};
use latchkey::broker::checkpoint::load_audit_signer;
use latchkey::clock::{ManualClock, SharedClock};
use latchkey::keys::MasterKey;
use latchkey::lease::{LeaseChange, LeaseFilter, LeaseRecord, LeaseState, MintGuard, ReplayGuard};
use latchkey::store::{
    CommitError, KeyState, KeyUpdate, RotationState, RotationStep, Store, StoreError, StoredKey,
    StoredRootSecret,
};
use std::sync::Arc;
use std::time::Duration;

/// One backend's stores for one test.
pub trait Backend: Send + Sync {
    /// Opens the test's store (the same one each time).
    fn open(&self) -> Arc<dyn Store>;
}

/// SQLite: a file in a temporary directory.
struct Sqlite {
    dir: tempfile::TempDir,
}

impl Backend for Sqlite {
    fn open(&self) -> Arc<dyn Store> {
        Arc::new(
            latchkey::store::sqlite::SqliteStore::open(&latchkey::store::sqlite::Config {
                path: self.dir.path().join("conformance.db"),
                busy_timeout: Duration::from_millis(500),
            })
            .unwrap(),
        )
    }
}

fn sqlite() -> Option<Box<dyn Backend>> {
    Some(Box::new(Sqlite {
        dir: tempfile::tempdir().unwrap(),
    }))
}

fn entry(i: usize) -> AuditEntry {
    AuditEntry {
        time_ms: 1_000 + i as i64,
        request_id: format!("r{i}"),
        action: "mint".into(),
        outcome: "allowed".into(),
        requested_scopes: vec!["a".into()],
        context: [("k".to_string(), "v".to_string())].into(),
        claims: serde_json::json!({"sub": "x", "n": i}),
        ..Default::default()
    }
}

fn lease(id: &str, key: &str) -> LeaseRecord {
    LeaseRecord {
        id: id.into(),
        issuer: "bb".into(),
        identity_key: key.into(),
        subject: "s".into(),
        repository: Some("{r}".into()),
        target: "t".into(),
        kind: "jwt".into(),
        rule: "a,b_c".into(),
        scopes: vec!["x".into()],
        issued_at: 100,
        expires_at: 200,
        max_expires_at: 300,
        renew_count: 0,
        state: LeaseState::Live,
        revoked_at: None,
        secret_hash: "h".into(),
        claims_json: r#"{"sub":"s"}"#.into(),
        upstream: None,
        attempts: 0,
        next_attempt_at: None,
        last_error: None,
    }
}

fn key(kid: &str, state: KeyState) -> StoredKey {
    StoredKey {
        kid: kid.into(),
        target: "t".into(),
        alg: "ES256".into(),
        state,
        created_at: 5,
        sealed: vec![1, 2, 3],
        activated_at: (state == KeyState::Current).then_some(5),
        remove_at: None,
    }
}

/// Appends from many tasks at once form one gapless chain whose links verify, in the
/// order of their sequence numbers, and it survives a restart (the next append links
/// to the stored head). The head notification follows every append.
pub async fn append_order_and_links_under_concurrency(b: &dyn Backend) {
    let s = b.open();
    let mut head = s.subscribe_head();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let s = s.clone();
        tasks.push(tokio::spawn(
            async move { s.append(entry(i)).await.unwrap() },
        ));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap().seq);
    }
    seqs.sort();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>(), "gapless, no repeats");
    let recs = s.records(0, 1000).await.unwrap();
    assert_eq!(verify_chain(&recs, (0, GENESIS_HASH)).unwrap().0, 200);
    let (seq, hash) = s.audit_head().await.unwrap();
    assert_eq!((seq, hash.as_str()), (200, recs[199].hash.as_str()));
    tokio::time::timeout(Duration::from_secs(5), head.wait_for(|h| *h == 200))
        .await
        .expect("the head notification reached 200")
        .unwrap();
    // Paging: records after a sequence number, at most a limit.
    let page = s.records(150, 10).await.unwrap();
    assert_eq!(
        page.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (151..=160).collect::<Vec<_>>()
    );
    drop(head);
    drop(s);
    let s = b.open();
    assert_eq!(
        s.append(entry(999)).await.unwrap().seq,
        201,
        "head reloaded"
    );
    let recs = s.records(0, 1000).await.unwrap();
    assert!(verify_chain(&recs, (0, GENESIS_HASH)).is_ok());
}

/// The live-lease quota and the replay guard hold under concurrent mints: a refused mint
/// leaves neither a lease nor an audit record; the check without writing agrees.
pub async fn quota_and_replay_guard_are_atomic(b: &dyn Backend) {
    let s = b.open();
    let guard = MintGuard {
        max_live: Some(5),
        replay: None,
    };
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (s, g) = (s.clone(), guard.clone());
        tasks.push(tokio::spawn(async move {
            s.commit_mint(lease(&format!("L{i}"), "k"), g, entry(i), 150)
                .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(CommitError::Quota { limit: 5 }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(ok, 5);
    assert_eq!(s.records(0, 100).await.unwrap().len(), 5);
    let all = LeaseFilter {
        include_inactive: true,
        ..Default::default()
    };
    assert_eq!(s.leases(&all, 150, None, 100).await.unwrap().len(), 5);
    assert!(matches!(
        s.check_mint_guard("k", "t", &guard, 150).await,
        Err(CommitError::Quota { limit: 5 })
    ));
    // Another target, or the same one past the leases' expiry, has room.
    assert!(s.check_mint_guard("k", "other", &guard, 150).await.is_ok());
    s.commit_mint(lease("late", "k"), guard.clone(), entry(99), 250)
        .await
        .unwrap();

    let replay = MintGuard {
        max_live: None,
        replay: Some(ReplayGuard {
            issuer: "bb".into(),
            token_key: "jti:1".into(),
            max_uses: 2,
            expires_at: 500,
        }),
    };
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (s, g) = (s.clone(), replay.clone());
        tasks.push(tokio::spawn(async move {
            s.commit_mint(lease(&format!("R{i}"), "other"), g, entry(i), 150)
                .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(CommitError::Replay { limit: 2 }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(ok, 2, "one token mints at most max_uses times");
    assert!(matches!(
        s.check_mint_guard("other", "t", &replay, 150).await,
        Err(CommitError::Replay { limit: 2 })
    ));
    // The counter is forgotten once the token has expired.
    s.purge(0, 501, 10).await.unwrap();
    assert!(s.check_mint_guard("other", "t", &replay, 501).await.is_ok());
}

/// Lease changes are compare-and-set: a stale change does not apply and is not
/// audited; concurrent changes of one lease apply once; filters match exactly.
pub async fn lease_changes_are_compare_and_set(b: &dyn Backend) {
    let s = b.open();
    s.commit_mint(lease("A", "k"), MintGuard::default(), entry(1), 150)
        .await
        .unwrap();
    let mut c = LeaseChange::new("A", LeaseState::Live);
    c.expect_renew_count = Some(0);
    c.renew_count = Some(1);
    c.expires_at = Some(250);
    let stale = c.clone();
    assert_eq!(
        s.commit_changes(vec![(c, Some(entry(2)))]).await.unwrap(),
        vec![true]
    );
    assert_eq!(
        s.commit_changes(vec![(stale, Some(entry(3)))])
            .await
            .unwrap(),
        vec![false]
    );
    assert_eq!(
        s.records(0, 10).await.unwrap().len(),
        2,
        "stale: not audited"
    );
    let l = s.lease("A").await.unwrap().unwrap();
    assert_eq!((l.renew_count, l.expires_at), (1, 250));

    // Ten revocations race: exactly one applies.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = LeaseChange::new("A", LeaseState::Live);
            c.state = Some(LeaseState::Revoked);
            c.revoked_at = Some(160);
            s.commit_changes(vec![(c, Some(entry(10 + i)))])
                .await
                .unwrap()[0]
        }));
    }
    let mut applied = 0;
    for t in tasks {
        applied += usize::from(t.await.unwrap());
    }
    assert_eq!(applied, 1);
    assert_eq!(s.records(0, 100).await.unwrap().len(), 3);
    assert_eq!(
        s.lease("A").await.unwrap().unwrap().state,
        LeaseState::Revoked
    );

    // Filters.
    for (i, k) in ["k1", "k2", "k3"].iter().enumerate() {
        let mut l = lease(&format!("F{i}"), k);
        l.issued_at = 100 + i as i64;
        l.target = if i == 2 { "u".into() } else { "t".into() };
        s.commit_mint(l, MintGuard::default(), entry(20 + i), 150)
            .await
            .unwrap();
    }
    let f = |edit: &dyn Fn(&mut LeaseFilter)| {
        let mut f = LeaseFilter::default();
        edit(&mut f);
        f
    };
    let ids = |v: Vec<LeaseRecord>| v.into_iter().map(|l| l.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.leases(&f(&|_| {}), 150, None, 10).await.unwrap()),
        ["F2", "F1", "F0"],
        "live only, newest first"
    );
    assert_eq!(
        ids(s
            .leases(&f(&|f| f.target = Some("u".into())), 150, None, 10)
            .await
            .unwrap()),
        ["F2"]
    );
    assert_eq!(
        ids(s
            .leases(&f(&|f| f.rule = Some("b_c".into())), 150, None, 10)
            .await
            .unwrap())
        .len(),
        3
    );
    for r in ["b", "b%", "_"] {
        assert!(s
            .leases(&f(&|f| f.rule = Some(r.into())), 150, None, 10)
            .await
            .unwrap()
            .is_empty());
    }
    assert_eq!(
        ids(s
            .leases(&f(&|_| {}), 150, Some((102, "F2".into())), 10)
            .await
            .unwrap()),
        ["F1", "F0"],
        "the cursor pages"
    );
    assert!(s
        .leases(&f(&|_| {}), 260, None, 10)
        .await
        .unwrap()
        .is_empty());
    let mut all_ids = s
        .lease_ids(&f(&|f| f.target = Some("t".into())), 150, 10)
        .await
        .unwrap();
    all_ids.sort();
    assert_eq!(all_ids, ["F0", "F1"]);
    let got = s
        .leases_by_id(&["F0".into(), "nope".into(), "F2".into()])
        .await
        .unwrap();
    let mut got = ids(got);
    got.sort();
    assert_eq!(got, ["F0", "F2"]);
    let counts = s.live_lease_counts(150).await.unwrap();
    let mut counts = counts;
    counts.sort();
    assert_eq!(counts, [("t".to_string(), 2), ("u".to_string(), 1)]);
    // Expired and due revocations.
    assert_eq!(s.expired_live(250, 10).await.unwrap().len(), 3);
    let mut c = LeaseChange::new("F0", LeaseState::Live);
    c.state = Some(LeaseState::Revoking);
    c.next_attempt_at = Some(Some(170));
    assert_eq!(s.commit_changes(vec![(c, None)]).await.unwrap(), [true]);
    assert!(s.due_revocations(160, 10).await.unwrap().is_empty());
    assert_eq!(ids(s.due_revocations(170, 10).await.unwrap()), ["F0"]);
}

/// Purge removes finished leases that ended, and whose expiry passed, before the bound;
/// never live ones, and never an audit record.
pub async fn purge_removes_only_finished_leases(b: &dyn Backend) {
    let s = b.open();
    for id in ["old", "live"] {
        s.commit_mint(lease(id, "k"), MintGuard::default(), entry(1), 150)
            .await
            .unwrap();
    }
    let mut c = LeaseChange::new("old", LeaseState::Live);
    c.state = Some(LeaseState::Revoked);
    c.revoked_at = Some(160);
    assert_eq!(s.commit_changes(vec![(c, None)]).await.unwrap(), [true]);
    assert_eq!(
        s.purge(150, 170, 10).await.unwrap(),
        0,
        "ended after the bound"
    );
    assert_eq!(
        s.purge(161, 170, 10).await.unwrap(),
        0,
        "revoked, but kept until the credential would have expired"
    );
    assert_eq!(s.purge(201, 210, 10).await.unwrap(), 1);
    assert!(s.lease("old").await.unwrap().is_none());
    assert!(s.lease("live").await.unwrap().is_some());
    assert_eq!(s.records(0, 10).await.unwrap().len(), 2, "audit stays");
}

/// A rotation step applies whole or not at all: a key in an unexpected state fails the
/// step and changes nothing (keys, state, audit records); of two racing steps one wins.
pub async fn rotation_steps_are_atomic_and_conflicts_fail(b: &dyn Backend) {
    let s = b.open();
    s.insert_signing_key(key("k1", KeyState::Current))
        .await
        .unwrap();
    assert_eq!(
        s.signing_keys().await.unwrap(),
        [key("k1", KeyState::Current)]
    );
    assert!(
        s.insert_signing_key(key("k1", KeyState::Next))
            .await
            .is_err(),
        "a kid is unique"
    );
    let step = |next: &str| RotationStep {
        insert: vec![key(next, KeyState::Next)],
        update: vec![KeyUpdate {
            kid: "k1".into(),
            expect_state: KeyState::Current,
            state: KeyState::Retired,
            activated_at: None,
            remove_at: Some(900),
        }],
        remove: vec![],
        state: Some(RotationState {
            item: "signing-key:t".into(),
            last_run: 600,
        }),
        audit: vec![entry(1), entry(2)],
    };
    let (a, b2) = tokio::join!(s.commit_rotation(step("k2")), s.commit_rotation(step("k3")));
    assert!(
        a.is_ok() != b2.is_ok(),
        "exactly one racing step applies: {a:?} {b2:?}"
    );
    let loser = if a.is_ok() { b2 } else { a };
    assert!(matches!(loser, Err(StoreError::Conflict(_))), "{loser:?}");
    let keys = s.signing_keys().await.unwrap();
    assert_eq!(keys.len(), 2, "the losing step inserted nothing: {keys:?}");
    assert_eq!(
        keys.iter().find(|k| k.kid == "k1").unwrap().state,
        KeyState::Retired
    );
    assert_eq!(
        s.records(0, 10).await.unwrap().len(),
        2,
        "one step's records"
    );
    assert_eq!(
        s.rotation_states().await.unwrap(),
        [RotationState {
            item: "signing-key:t".into(),
            last_run: 600
        }]
    );
    // Removal takes the key with it.
    let rm = RotationStep {
        remove: vec!["k1".into()],
        ..Default::default()
    };
    s.commit_rotation(rm).await.unwrap();
    assert!(s
        .signing_keys()
        .await
        .unwrap()
        .iter()
        .all(|k| k.kid != "k1"));
}

/// Locks: one holder at a time until the TTL runs out, then another may take it;
/// the holder may renew and release it; releasing someone else's lock does nothing.
pub async fn locks_have_one_holder_and_expire(b: &dyn Backend) {
    let s = b.open();
    assert!(s.try_lock("rotation", "a", 100, 60).await.unwrap());
    assert!(!s.try_lock("rotation", "b", 120, 60).await.unwrap());
    assert!(s.try_lock("other", "b", 120, 60).await.unwrap(), "per name");
    assert!(
        s.try_lock("rotation", "a", 130, 60).await.unwrap(),
        "renewed"
    );
    assert!(
        !s.try_lock("rotation", "b", 170, 60).await.unwrap(),
        "renewal held"
    );
    assert!(
        s.try_lock("rotation", "b", 191, 60).await.unwrap(),
        "expired"
    );
    s.unlock("rotation", "a").await.unwrap();
    assert!(
        !s.try_lock("rotation", "c", 192, 60).await.unwrap(),
        "not a's"
    );
    s.unlock("rotation", "b").await.unwrap();
    assert!(s.try_lock("rotation", "c", 192, 60).await.unwrap());
    // Racing takers: one wins.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.try_lock("race", &format!("h{i}"), 300, 60).await.unwrap()
        }));
    }
    let mut won = 0;
    for t in tasks {
        won += usize::from(t.await.unwrap());
    }
    assert_eq!(won, 1);
}

/// Root secrets and audit keys round-trip; the store id is stable across restarts.
pub async fn secrets_keys_and_identity_round_trip(b: &dyn Backend) {
    let s = b.open();
    assert!(s.root_secret("t").await.unwrap().is_none());
    let r = StoredRootSecret {
        target: "t".into(),
        sealed: vec![9; 40],
        pending: Some(vec![8; 40]),
        updated_at: 7,
    };
    s.put_root_secret(r.clone()).await.unwrap();
    assert_eq!(s.root_secret("t").await.unwrap(), Some(r.clone()));
    let r2 = StoredRootSecret {
        pending: None,
        updated_at: 8,
        ..r
    };
    s.put_root_secret(r2.clone()).await.unwrap();
    assert_eq!(s.root_secret("t").await.unwrap(), Some(r2));
    let id = s.store_id().await.unwrap();
    assert!(id.len() >= 16, "{id}");
    drop(s);
    let s = b.open();
    assert_eq!(
        s.store_id().await.unwrap(),
        id,
        "the same store after a restart"
    );
}

/// Checkpoints: only the next id over a stored record's hash is accepted; verify walks
/// the chain and the checkpoints; the witness position is kept.
pub async fn checkpoints_and_verify(b: &dyn Backend) {
    let s = b.open();
    let clock: SharedClock = Arc::new(ManualClock::new(1_000));
    let master = MasterKey::generate();
    let signer = load_audit_signer(s.as_ref(), &master, &clock)
        .await
        .unwrap();
    assert_eq!(s.audit_keys().await.unwrap().len(), 1);
    for i in 0..10 {
        s.append(entry(i)).await.unwrap();
    }
    let recs = s.records(0, 100).await.unwrap();
    let c1 = signer.sign(1, 5, &recs[4].hash, 2_000);
    assert!(
        s.insert_checkpoint(signer.sign(2, 5, &recs[4].hash, 2_000))
            .await
            .is_err(),
        "ids start at 1, without gaps"
    );
    assert!(
        s.insert_checkpoint(signer.sign(1, 5, &recs[3].hash, 2_000))
            .await
            .is_err(),
        "the hash must be the record's"
    );
    s.insert_checkpoint(c1.clone()).await.unwrap();
    let c2 = signer.sign(2, 10, &recs[9].hash, 3_000);
    s.insert_checkpoint(c2.clone()).await.unwrap();
    assert_eq!(
        s.checkpoints(0, 10).await.unwrap(),
        [c1.clone(), c2.clone()]
    );
    assert_eq!(
        s.checkpoints(1, 10).await.unwrap(),
        std::slice::from_ref(&c2)
    );
    assert_eq!(s.checkpoints_newest().await.unwrap(), Some(c2.clone()));
    assert_eq!(s.witness_position().await.unwrap(), 0);
    s.set_witness_position(2).await.unwrap();
    assert_eq!(s.witness_position().await.unwrap(), 2);
    let report = s
        .verify_audit(VerifyOptions {
            keys: Some(signer.keys().clone()),
            witnessed: vec![c1],
        })
        .await
        .unwrap();
    assert!(report.intact(), "{report}");
    assert_eq!((report.records, report.checkpoints), (10, 2));
    assert_eq!(report.head_hash, recs[9].hash);
    // A key the auditor pinned that did not sign these: named.
    let other = {
        let b2 = sqlite().unwrap();
        let s2 = b2.open();
        let k = load_audit_signer(s2.as_ref(), &MasterKey::generate(), &clock)
            .await
            .unwrap();
        k.keys().clone()
    };
    let report = s
        .verify_audit(VerifyOptions {
            keys: Some(other),
            witnessed: vec![],
        })
        .await
        .unwrap();
    assert!(!report.intact());
}

/// Query filters select exactly the matching records, in sequence order, paged.
pub async fn query_filters_select_exactly(b: &dyn Backend) {
    let s = b.open();
    for i in 0..30 {
        let repo = ["alpha", "beta", "gamma"][i % 3];
        let e = AuditEntry {
            repository: Some(repo.into()),
            identity_key: Some(format!("id-{repo}")),
            issuer: Some("bb".into()),
            subject: Some(format!("{repo}:{i}")),
            target: Some(if i % 2 == 0 { "t" } else { "u" }.into()),
            outcome: if i % 5 == 0 { "denied" } else { "allowed" }.into(),
            reason: (i % 5 == 0).then(|| format!("No Rule Matched {i}")),
            lease_id: Some(format!("lease-{i}")),
            ..entry(i)
        };
        s.append(e).await.unwrap();
    }
    let seqs = |q: AuditQuery| {
        let s = s.clone();
        async move {
            s.query_audit(&q, 100)
                .await
                .unwrap()
                .iter()
                .map(|r| r.seq)
                .collect::<Vec<_>>()
        }
    };
    // Record i has sequence i + 1 and time 1000 + i.
    let expect = |f: &dyn Fn(usize) -> bool| {
        (0..30)
            .filter(|i| f(*i))
            .map(|i| i as i64 + 1)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        seqs(AuditQuery {
            repository: Some("beta".into()),
            ..Default::default()
        })
        .await,
        expect(&|i| i % 3 == 1)
    );
    assert_eq!(
        seqs(AuditQuery {
            repository: Some("beta".into()),
            target: Some("t".into()),
            ..Default::default()
        })
        .await,
        expect(&|i| i % 3 == 1 && i % 2 == 0)
    );
    assert_eq!(
        seqs(AuditQuery {
            outcome: Some("denied".into()),
            since_ms: Some(1_010),
            until_ms: Some(1_025),
            ..Default::default()
        })
        .await,
        expect(&|i| i % 5 == 0 && (10..25).contains(&i))
    );
    assert_eq!(
        seqs(AuditQuery {
            reason_contains: Some("no rule matched 2".into()),
            ..Default::default()
        })
        .await,
        expect(&|i| i == 20 || i == 25)
    );
    assert_eq!(
        seqs(AuditQuery {
            lease_id: Some("lease-7".into()),
            ..Default::default()
        })
        .await,
        [8]
    );
    assert_eq!(
        seqs(AuditQuery {
            subject: Some("gamma:5".into()),
            ..Default::default()
        })
        .await,
        [6]
    );
    assert_eq!(
        seqs(AuditQuery {
            after_seq: Some(25),
            until_seq: Some(28),
            ..Default::default()
        })
        .await,
        [26, 27, 28]
    );
    assert!(seqs(AuditQuery {
        repository: Some("BETA".into()),
        ..Default::default()
    })
    .await
    .is_empty());
    let first = s
        .query_audit(
            &AuditQuery {
                identity_key: Some("id-alpha".into()),
                ..Default::default()
            },
            3,
        )
        .await
        .unwrap();
    assert_eq!(
        first.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [1, 4, 7],
        "limit"
    );
}

/// Runs each check against one backend, one test each.
macro_rules! conformance {
    ($name:ident, $open:expr) => {
        mod $name {
            macro_rules! check {
                ($check:ident) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $check() {
                        let Some(b) = $open else { return };
                        super::$check(b.as_ref()).await;
                    }
                };
            }
            check!(append_order_and_links_under_concurrency);
            check!(quota_and_replay_guard_are_atomic);
            check!(lease_changes_are_compare_and_set);
            check!(purge_removes_only_finished_leases);
            check!(rotation_steps_are_atomic_and_conflicts_fail);
            check!(locks_have_one_holder_and_expire);
            check!(secrets_keys_and_identity_round_trip);
            check!(checkpoints_and_verify);
            check!(query_filters_select_exactly);
        }
    };
}

conformance!(sqlite_store, super::sqlite());
