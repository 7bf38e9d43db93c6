//! Rotation of signing keys and upstream root credentials: the runner shared by the
//! `Rotation` service (a cron calling `RunDue`, an operator forcing `Rotate`) and the
//! in-process scheduler. Runs are exclusive through a lock in the store, whose lease
//! expires if its holder dies.
//!
//! A signing key moves next → current → retired → removed. The next key is published
//! (in the JWKS) at least `[rotation] jwks_cache` before it may sign, so a verifier
//! holding a cached JWKS never meets an unknown `kid`; a retired key stays published
//! until every token it signed has expired (`max_ttl` + leeway after it retired). A
//! forced rotation with `drop_old` (the key leaked) skips both waits and says so.

use super::{Broker, BrokerError};
use crate::audit::AuditEntry;
use crate::clock::rfc3339;
use crate::identity::WorkloadIdentity;
use crate::keys::{new_stored_key, plan_rotation, removable, KeyState, OldKey, RotationPlan};
use crate::policy::Role;
use crate::rotation::{
    item_name, jitter_for, next_due, ItemKind, ItemResult, Outcome, Schedule, ScheduledItem,
};
use crate::store::{KeyUpdate, RotationState, RotationStep, StoredKey};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// The rotation scheduler (`[rotation]`).
#[derive(Debug, Clone, PartialEq)]
pub struct RotationConfig {
    /// Whether the broker runs due rotations by itself (a cron can run them too).
    pub scheduler: bool,
    /// How often the in-process scheduler looks for due work.
    pub check_interval: Duration,
    /// How long verifiers may cache the JWKS: the `Cache-Control` of the JWKS, and how
    /// long a next key is published before it may sign.
    pub jwks_cache: Duration,
    /// How long a rotation run's lock lasts if its holder dies.
    pub lock_ttl: Duration,
    /// Spread of due times across items with the same period.
    pub jitter: Duration,
}

impl Default for RotationConfig {
    fn default() -> Self {
        RotationConfig {
            scheduler: true,
            check_interval: Duration::from_secs(60),
            jwks_cache: Duration::from_secs(300),
            lock_ttl: Duration::from_secs(300),
            jitter: Duration::ZERO,
        }
    }
}

/// The lock rotation runs hold.
const LOCK: &str = "rotation";
/// Clock skew allowed to verifiers of tokens signed by a retired key.
const RETIRE_LEEWAY_SECS: i64 = 60;
/// What a deferred forced rotation tells the operator.
const AGAIN: &str = "run it again then, or, if the current key leaked, force it with --drop-old (verifiers may refuse the new key's tokens until they fetch the JWKS again)";

/// Why a next key waits this long, for messages.
fn cache_reason(t: &crate::mint::TargetConfig, cache_secs: i64) -> String {
    let period = humantime::format_duration(Duration::from_secs(cache_secs.max(0) as u64));
    if t.kind.verifier_cache_floor().as_secs() as i64 >= cache_secs {
        format!(
            "{} verifiers cache the JWKS for up to {period}",
            t.kind.name()
        )
    } else {
        format!("[rotation] jwks_cache is {period}")
    }
}

/// Who asked for a rotation run.
#[derive(Debug, Clone, Copy)]
pub enum RotationCaller<'a> {
    /// The broker's own scheduler.
    Scheduler,
    /// A caller with a workload token (the cron, an operator); needs the `rotator` role.
    Token(Option<&'a str>),
}

/// What to force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Force {
    /// Rotate the upstream root credential instead of the signing key.
    pub root: bool,
    /// The old signing key leaked: remove it at once, and let the next key sign without
    /// waiting out the JWKS cache period.
    pub drop_old: bool,
}

struct Item {
    kind: ItemKind,
    target: String,
    schedule: Option<Schedule>,
}

impl Item {
    fn name(&self) -> String {
        item_name(self.kind, &self.target)
    }
}

impl Broker {
    fn rotation_items(&self) -> Vec<Item> {
        let mut out = Vec::new();
        let mut names: Vec<&String> = self.targets.keys().collect();
        names.sort();
        for name in names {
            let t = &self.targets[name];
            let jitter = |s: Option<Schedule>| {
                s.map(|s| Schedule {
                    jitter: self.rotation_cfg.jitter,
                    ..s
                })
            };
            if t.cfg.kind.signing_alg().is_some() {
                out.push(Item {
                    kind: ItemKind::SigningKey,
                    target: name.clone(),
                    schedule: jitter(t.cfg.rotation),
                });
            }
            if t.minter.rotates_root() {
                out.push(Item {
                    kind: ItemKind::Root,
                    target: name.clone(),
                    schedule: jitter(t.cfg.root_rotation),
                });
            }
        }
        out
    }

    async fn rotation_who(
        &self,
        caller: RotationCaller<'_>,
        action: &str,
        target: &str,
        request_id: &str,
    ) -> Result<Option<WorkloadIdentity>, BrokerError> {
        match caller {
            RotationCaller::Scheduler => Ok(None),
            RotationCaller::Token(t) => self
                .require_role(
                    action,
                    Role::Rotator,
                    t,
                    target,
                    BTreeMap::new(),
                    request_id,
                )
                .await
                .map(Some),
        }
    }

    fn rotation_entry(
        &self,
        who: &Option<WorkloadIdentity>,
        request_id: &str,
        item: &Item,
        phase: &str,
        outcome: &str,
        reason: String,
    ) -> AuditEntry {
        let mut e = self.entry("rotation", request_id, None, &item.target, &[]);
        match who {
            Some(id) => {
                e.issuer = Some(id.issuer_name.clone());
                e.identity_key = Some(id.key.clone());
                e.subject = Some(id.subject.clone());
                e.repository = id.repository.clone();
            }
            None => {
                e.context.insert("by".into(), "scheduler".into());
            }
        }
        e.context.insert("item".into(), item.name());
        e.context.insert("phase".into(), phase.into());
        e.outcome = outcome.into();
        e.reason = Some(reason);
        e
    }

    async fn lock_rotation(&self, holder: &str) -> Result<(), BrokerError> {
        let ttl = self.rotation_cfg.lock_ttl;
        let give_up = Instant::now() + ttl;
        loop {
            let taken = self
                .store
                .try_lock(LOCK, holder, self.clock.now(), ttl.as_secs() as i64)
                .await
                .map_err(BrokerError::Store)?;
            if taken {
                return Ok(());
            }
            if Instant::now() >= give_up {
                return Err(BrokerError::Busy(
                    "another rotation run holds the lock".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn unlock_rotation(&self, holder: &str) {
        if let Err(e) = self.store.unlock(LOCK, holder).await {
            tracing::warn!(error = %e, "rotation lock not released; it expires by itself");
        }
    }

    /// Runs every rotation that is due (and removes retired keys whose tokens have all
    /// expired). Two runs at once, from any number of callers or replicas sharing the
    /// store, do the work once: the second waits for the first, then finds nothing due.
    /// Answers one result per item; failures are results, not errors.
    pub async fn run_due(
        &self,
        caller: RotationCaller<'_>,
        request_id: &str,
    ) -> Result<Vec<ItemResult>, BrokerError> {
        let who = self
            .rotation_who(caller, "rotation_run", "", request_id)
            .await?;
        self.lock_rotation(request_id).await?;
        let mut out = Vec::new();
        for item in self.rotation_items() {
            out.push(self.run_item(&who, request_id, &item, None).await);
        }
        self.unlock_rotation(request_id).await;
        Ok(out)
    }

    /// Rotates one target's signing key (or, with `force.root`, its upstream root
    /// credential) now, due or not.
    pub async fn rotate_now(
        &self,
        caller: RotationCaller<'_>,
        target: &str,
        force: Force,
        request_id: &str,
    ) -> Result<ItemResult, BrokerError> {
        let who = self
            .rotation_who(caller, "rotation_force", target, request_id)
            .await?;
        let kind = if force.root {
            ItemKind::Root
        } else {
            ItemKind::SigningKey
        };
        let item = self
            .rotation_items()
            .into_iter()
            .find(|i| i.target == target && i.kind == kind)
            .ok_or_else(|| match self.targets.contains_key(target) {
                true => BrokerError::InvalidRequest(format!(
                    "target {target} has no {} to rotate",
                    if force.root {
                        "upstream root credential"
                    } else {
                        "signing key"
                    }
                )),
                false => BrokerError::UnknownTarget(target.to_string()),
            })?;
        self.lock_rotation(request_id).await?;
        let r = self.run_item(&who, request_id, &item, Some(force)).await;
        self.unlock_rotation(request_id).await;
        Ok(r)
    }

    /// Every rotatable item with its last and next rotation (`rotator` role; audited).
    pub async fn rotation_schedule(
        &self,
        token: Option<&str>,
        request_id: &str,
    ) -> Result<Vec<ScheduledItem>, BrokerError> {
        self.rotation_who(
            RotationCaller::Token(token),
            "rotation_schedule",
            "",
            request_id,
        )
        .await?;
        self.scheduled_items().await.map_err(BrokerError::Store)
    }

    /// The schedule without authorisation (metrics, the scheduler).
    pub(crate) async fn scheduled_items(
        &self,
    ) -> Result<Vec<ScheduledItem>, crate::store::StoreError> {
        let now = self.clock.now();
        let states = self.rotation_last_runs().await?;
        let keys = self.store.signing_keys().await?;
        let mut out = Vec::new();
        for item in self.rotation_items() {
            let name = item.name();
            let mine: Vec<&StoredKey> = keys.iter().filter(|k| k.target == item.target).collect();
            let last = last_run(&states, &name, item.kind, &mine);
            let signing = item.kind == ItemKind::SigningKey;
            let kid = |state: KeyState| {
                mine.iter()
                    .find(|k| k.state == state)
                    .map(|k| k.kid.clone())
                    .filter(|_| signing)
            };
            out.push(ScheduledItem {
                target: item.target.clone(),
                kind: item.kind,
                period_secs: item.schedule.map(|s| s.period.as_secs()),
                window: item.schedule.and_then(|s| s.window).map(|w| w.to_string()),
                last_rotated: last,
                next_due: item
                    .schedule
                    .map(|s| next_due(&s, last, now, jitter_for(&name, s.jitter))),
                current_kid: kid(KeyState::Current),
                next_kid: kid(KeyState::Next),
                retired: mine
                    .iter()
                    .filter(|k| signing && k.state == KeyState::Retired)
                    .map(|k| (k.kid.clone(), k.remove_at.unwrap_or(now)))
                    .collect(),
                item: name,
            });
        }
        Ok(out)
    }

    async fn rotation_last_runs(&self) -> Result<HashMap<String, i64>, crate::store::StoreError> {
        Ok(self
            .store
            .rotation_states()
            .await?
            .into_iter()
            .map(|s| (s.item, s.last_run))
            .collect())
    }

    async fn run_item(
        &self,
        who: &Option<WorkloadIdentity>,
        request_id: &str,
        item: &Item,
        force: Option<Force>,
    ) -> ItemResult {
        let r = match item.kind {
            ItemKind::SigningKey => self.rotate_signing_key(who, request_id, item, force).await,
            ItemKind::Root => self.rotate_root(who, request_id, item, force).await,
        };
        let r = r.unwrap_or_else(|e| ItemResult {
            item: item.name(),
            outcome: Outcome::Failed,
            detail: e.to_string(),
            next_due: None,
        });
        self.metrics.rotation(&r.item, r.outcome.as_str());
        match r.outcome {
            Outcome::Rotated => {
                tracing::info!(item = %r.item, detail = %r.detail, "rotated")
            }
            Outcome::Failed => {
                tracing::error!(item = %r.item, detail = %r.detail, "rotation failed; the old credential stays in service")
            }
            Outcome::Deferred => {
                tracing::info!(item = %r.item, detail = %r.detail, "rotation deferred")
            }
            Outcome::NotDue => {}
        }
        r
    }

    async fn commit_step(&self, step: RotationStep) -> Result<(), BrokerError> {
        self.store
            .commit_rotation(step)
            .await
            .map_err(BrokerError::Audit)?;
        super::keys::reload_key_ring(&self.keys, self.store.as_ref(), &self.master)
            .await
            .map_err(|e| BrokerError::Mint(crate::mint::MintError::Signing(e.to_string())))
    }

    async fn rotate_signing_key(
        &self,
        who: &Option<WorkloadIdentity>,
        request_id: &str,
        item: &Item,
        force: Option<Force>,
    ) -> Result<ItemResult, BrokerError> {
        let name = item.name();
        let now = self.clock.now();
        let target = &self.targets[&item.target];
        let Some(alg) = target.cfg.kind.signing_alg() else {
            return Err(BrokerError::InvalidRequest(format!(
                "target {} does not sign",
                item.target
            )));
        };
        let keys: Vec<StoredKey> = self
            .store
            .signing_keys()
            .await
            .map_err(BrokerError::Store)?
            .into_iter()
            .filter(|k| k.target == item.target)
            .collect();

        // Housekeeping on every run: retired keys whose tokens have all expired go.
        let gone = removable(&keys, now);
        if !gone.is_empty() {
            let step = RotationStep {
                remove: gone.iter().map(|k| k.kid.clone()).collect(),
                audit: gone
                    .iter()
                    .map(|k| {
                        let mut e = self.rotation_entry(
                            who,
                            request_id,
                            item,
                            "remove",
                            "allowed",
                            format!(
                                "retired key {} removed: every token it signed has expired",
                                k.kid
                            ),
                        );
                        e.context.insert("kid".into(), k.kid.clone());
                        e
                    })
                    .collect(),
                ..Default::default()
            };
            self.commit_step(step).await?;
        }

        let states = self
            .rotation_last_runs()
            .await
            .map_err(BrokerError::Store)?;
        let refs: Vec<&StoredKey> = keys.iter().collect();
        let last = last_run(&states, &name, item.kind, &refs);
        let offset = offset_of(item);
        if force.is_none() {
            if let Some(r) = not_due(item, last, now, "rotate with --now") {
                return Ok(r);
            }
        }
        let drop_old = force.is_some_and(|f| f.drop_old);
        let cache_secs = self.verifier_cache(&target.cfg).as_secs() as i64;
        let token_secs = target.cfg.max_ttl.as_secs() as i64 + RETIRE_LEEWAY_SECS;
        let (next_kid, current, ready) = match plan_rotation(
            &keys, now, cache_secs, token_secs, drop_old,
        ) {
            RotationPlan::PublishNext { ready } => {
                // No key published ahead (a store from before rotation): publish one
                // now; it may sign once verifiers' cached JWKS have expired.
                let k = new_stored_key(&self.master, &item.target, alg, KeyState::Next, now)
                    .map_err(|e| {
                        BrokerError::Mint(crate::mint::MintError::Signing(e.to_string()))
                    })?;
                let mut e = self.rotation_entry(
                    who,
                    request_id,
                    item,
                    "publish",
                    "allowed",
                    format!("next key {} published", k.kid),
                );
                e.context.insert("kid".into(), k.kid.clone());
                let kid = k.kid.clone();
                self.commit_step(RotationStep {
                    insert: vec![k],
                    audit: vec![e],
                    ..Default::default()
                })
                .await?;
                return Ok(ItemResult {
                    item: name,
                    outcome: Outcome::Deferred,
                    detail: format!(
                        "published next key {kid}; it may sign from {} ({}); {}",
                        rfc3339(ready),
                        cache_reason(&target.cfg, cache_secs),
                        AGAIN
                    ),
                    next_due: Some(ready),
                });
            }
            RotationPlan::Wait { next, ready } => {
                return Ok(ItemResult {
                        item: name,
                        outcome: Outcome::Deferred,
                        detail: format!(
                            "next key {next} has been published for less than the verifiers' cache period; it may sign from {} ({}); {}",
                            rfc3339(ready),
                            cache_reason(&target.cfg, cache_secs),
                            AGAIN
                        ),
                        next_due: Some(ready),
                    });
            }
            RotationPlan::Activate {
                next,
                current,
                ready,
            } => (next, current, ready),
        };

        let fresh = new_stored_key(&self.master, &item.target, alg, KeyState::Next, now)
            .map_err(|e| BrokerError::Mint(crate::mint::MintError::Signing(e.to_string())))?;
        let mut step = RotationStep {
            update: vec![KeyUpdate {
                kid: next_kid.clone(),
                expect_state: KeyState::Next,
                state: KeyState::Current,
                activated_at: Some(now),
                remove_at: None,
            }],
            state: Some(RotationState {
                item: name.clone(),
                last_run: now,
            }),
            ..Default::default()
        };
        let mut audit = Vec::new();
        let mut phase = |phase: &str, kid: &str, reason: String| {
            let mut e = self.rotation_entry(who, request_id, item, phase, "allowed", reason);
            e.context.insert("kid".into(), kid.to_string());
            if force.is_some() {
                e.context.insert("forced".into(), "true".into());
            }
            audit.push(e);
        };
        phase("activate", &next_kid, format!("key {next_kid} now signs"));
        let mut detail = format!("now signing with {next_kid}");
        if matches!(target.cfg.kind, crate::mint::TargetKind::Pulsar(_)) {
            // Pulsar trusts one fixed public key and never reads the JWKS.
            detail.push_str(&format!(
                "; Pulsar does not read the JWKS: set its tokenPublicKey to {next_kid} (latchkey keys export --target {} --format pulsar) and restart its brokers, or it refuses the new tokens",
                item.target
            ));
        }
        match current.clone() {
            Some((cur, OldKey::Drop)) => {
                step.remove.push(cur.clone());
                let cached = humantime::format_duration(Duration::from_secs(cache_secs as u64));
                phase(
                    "drop",
                    &cur,
                    format!(
                        "key {cur} removed at once (forced): the broker no longer publishes it; verifiers that cached the JWKS (up to {cached}) still accept what it signs until they fetch it again"
                    ),
                );
                detail.push_str(&format!(
                    "; {cur} removed at once: verifiers that cached the JWKS (up to {cached}) accept tokens it signed, and tokens forged with it, until they fetch the JWKS again (restart them to stop that now)"
                ));
                if ready > now {
                    detail.push_str(&format!(
                        "; {next_kid} signs before the verifiers' cache period has passed: they may refuse its tokens until {}",
                        rfc3339(ready)
                    ));
                }
            }
            Some((cur, OldKey::Retire { remove_at })) => {
                step.update.push(KeyUpdate {
                    kid: cur.clone(),
                    expect_state: KeyState::Current,
                    state: KeyState::Retired,
                    activated_at: None,
                    remove_at: Some(remove_at),
                });
                phase(
                    "retire",
                    &cur,
                    format!(
                        "key {cur} retired; published until {}, when every token it signed has expired",
                        rfc3339(remove_at)
                    ),
                );
                detail.push_str(&format!("; {cur} retired until {}", rfc3339(remove_at)));
            }
            None => {}
        }
        phase(
            "publish",
            &fresh.kid,
            format!("next key {} published", fresh.kid),
        );
        detail.push_str(&format!("; next key {}", fresh.kid));
        step.insert.push(fresh);
        step.audit = audit;
        let dropped = match &current {
            Some((cur, OldKey::Drop)) => Some(
                keys.iter()
                    .find(|k| &k.kid == cur)
                    .and_then(|k| k.activated_at)
                    .unwrap_or(0),
            ),
            _ => None,
        };
        self.commit_step(step).await?;
        if let (Some(since), Some((cur, _))) = (dropped, &current) {
            detail.push_str(
                &self
                    .revoke_signed_by(who, request_id, item, cur, since)
                    .await?,
            );
        }
        Ok(ItemResult {
            next_due: item.schedule.map(|s| next_due(&s, Some(now), now, offset)),
            item: name,
            outcome: Outcome::Rotated,
            detail,
        })
    }

    /// How long the target's verifiers may cache its JWKS: `[rotation] jwks_cache`, and
    /// never less than what the target kind is known to cache (Airflow reads a JWKS at
    /// most hourly and never refetches on an unknown `kid`).
    fn verifier_cache(&self, t: &crate::mint::TargetConfig) -> Duration {
        self.rotation_cfg
            .jwks_cache
            .max(t.kind.verifier_cache_floor())
    }

    /// After a forced drop of key `kid` (current since `since`): revokes every live lease
    /// of the target whose credential that key may have signed (issued since, or renewed),
    /// one audit record each. Their tokens no longer verify here; where the target can
    /// revoke (an airflow target with `api_url`), the revocation reaches it too, retried
    /// by the reaper until it does. Answers a note for the report.
    async fn revoke_signed_by(
        &self,
        who: &Option<WorkloadIdentity>,
        request_id: &str,
        item: &Item,
        kid: &str,
        since: i64,
    ) -> Result<String, BrokerError> {
        let target = &self.targets[&item.target];
        if !target.cfg.kind.credential_is_signed() {
            return Ok(String::new());
        }
        let now = self.clock.now();
        let filter = crate::lease::LeaseFilter {
            target: Some(item.target.clone()),
            ..Default::default()
        };
        let ids = self
            .store
            .lease_ids(&filter, now, super::leases::MAX_BULK)
            .await
            .map_err(BrokerError::Store)?;
        let reason = format!("signing key {kid} dropped (forced rotation)");
        let (revoked, failed) = self
            .revoke_ids(
                &ids,
                now,
                |l| l.issued_at >= since || l.renew_count > 0,
                |l| {
                    let mut e = self.lease_entry("revoke", request_id, None, l);
                    e.reason = Some(reason.clone());
                    e.context.insert("kid".into(), kid.to_string());
                    match who {
                        Some(id) => {
                            e.context.insert("actor".into(), id.key.clone());
                            e.context
                                .insert("actor_issuer".into(), id.issuer_name.clone());
                        }
                        None => {
                            e.context.insert("by".into(), "scheduler".into());
                        }
                    }
                    e
                },
            )
            .await?;
        let mut note = format!("; {revoked} live lease(s) it signed revoked");
        if !failed.is_empty() {
            note.push_str(&format!(
                ", {} not yet revoked at the target (the reaper retries)",
                failed.len()
            ));
        }
        Ok(note)
    }

    async fn rotate_root(
        &self,
        who: &Option<WorkloadIdentity>,
        request_id: &str,
        item: &Item,
        force: Option<Force>,
    ) -> Result<ItemResult, BrokerError> {
        let name = item.name();
        let now = self.clock.now();
        let states = self
            .rotation_last_runs()
            .await
            .map_err(BrokerError::Store)?;
        let last = states.get(&name).copied();
        let offset = offset_of(item);
        if force.is_none() {
            if let Some(r) = not_due(item, last, now, "rotate with --now --root") {
                return Ok(r);
            }
        }
        let minter = self.targets[&item.target].minter.clone();
        let mut journal = Vec::new();
        let result = minter.rotate_root(&mut journal).await;
        // One record per step the upstream went through, then the outcome.
        let mut audit: Vec<AuditEntry> = journal
            .iter()
            .map(|step| {
                self.rotation_entry(
                    who,
                    request_id,
                    item,
                    step.phase,
                    "allowed",
                    step.detail.clone(),
                )
            })
            .collect();
        match result {
            Ok(summary) => {
                audit.push(self.rotation_entry(
                    who,
                    request_id,
                    item,
                    "rotate_root",
                    "allowed",
                    format!("root credential rotated: {summary}"),
                ));
                self.commit_step(RotationStep {
                    state: Some(RotationState {
                        item: name.clone(),
                        last_run: now,
                    }),
                    audit,
                    ..Default::default()
                })
                .await?;
                Ok(ItemResult {
                    next_due: item.schedule.map(|s| next_due(&s, Some(now), now, offset)),
                    item: name,
                    outcome: Outcome::Rotated,
                    detail: summary,
                })
            }
            Err(err) => {
                audit.push(self.rotation_entry(
                    who,
                    request_id,
                    item,
                    "rotate_root",
                    "error",
                    format!("root rotation failed, the old credential stays in service: {err}"),
                ));
                self.commit_step(RotationStep {
                    audit,
                    ..Default::default()
                })
                .await?;
                Ok(ItemResult {
                    item: name,
                    outcome: Outcome::Failed,
                    detail: format!("{err}; the old credential stays in service"),
                    next_due: Some(now),
                })
            }
        }
    }
}

fn offset_of(item: &Item) -> i64 {
    item.schedule
        .map(|s| jitter_for(&item.name(), s.jitter))
        .unwrap_or(0)
}

/// The answer for an item that is not due (or has no schedule); `None` when it is due.
fn not_due(item: &Item, last: Option<i64>, now: i64, how_to_force: &str) -> Option<ItemResult> {
    let (detail, next) = match item.schedule {
        None => (format!("no schedule; {how_to_force}"), None),
        Some(s) => {
            let due = next_due(&s, last, now, offset_of(item));
            if due <= now {
                return None;
            }
            ("not due".to_string(), Some(due))
        }
    };
    Some(ItemResult {
        item: item.name(),
        outcome: Outcome::NotDue,
        detail,
        next_due: next,
    })
}

/// When an item last rotated: its recorded state, else (signing keys) when the current
/// key started signing.
fn last_run(
    states: &HashMap<String, i64>,
    name: &str,
    kind: ItemKind,
    keys: &[&StoredKey],
) -> Option<i64> {
    states.get(name).copied().or_else(|| match kind {
        ItemKind::SigningKey => keys
            .iter()
            .find(|k| k.state == KeyState::Current)
            .map(|k| k.activated_at.unwrap_or(k.created_at)),
        ItemKind::Root => None,
    })
}
