//! Signing keys, rotation state and rotated root secrets: the `Keys` and `RootSecrets` ports.

use super::*;

pub(super) fn read_keys(conn: &Connection) -> Result<Vec<StoredKey>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT kid, target, alg, state, created_at, sealed, activated_at, remove_at FROM signing_keys ORDER BY created_at, kid")
        .map_err(unavailable)?;
    let rows = stmt
        .query_map([], |r| {
            let state: String = r.get(3)?;
            Ok((
                StoredKey {
                    kid: r.get(0)?,
                    target: r.get(1)?,
                    alg: r.get(2)?,
                    state: crate::keys::KeyState::Next,
                    created_at: r.get(4)?,
                    sealed: r.get(5)?,
                    activated_at: r.get(6)?,
                    remove_at: r.get(7)?,
                },
                state,
            ))
        })
        .map_err(unavailable)?;
    rows.map(|r| {
        let (mut k, state) = r.map_err(unavailable)?;
        k.state = crate::keys::KeyState::parse(&state).ok_or_else(|| {
            StoreError::Corrupt(format!("signing key {} has state {state:?}", k.kid))
        })?;
        Ok(k)
    })
    .collect()
}

#[async_trait]
impl Keys for SqliteStore {
    async fn signing_keys(&self) -> Result<Vec<StoredKey>, StoreError> {
        self.read(read_keys).await
    }

    async fn insert_signing_key(&self, key: StoredKey) -> Result<(), StoreError> {
        self.call(|r| Cmd::InsertKey(Box::new(key), r)).await
    }

    async fn commit_rotation(&self, step: crate::store::RotationStep) -> Result<(), StoreError> {
        let audit = step.audit.iter().cloned().map(Prepared::new).collect();
        let p = PreparedStep { step, audit };
        self.call(|r| Cmd::Write(Write::Rotation(Box::new(p), r)))
            .await
    }

    async fn rotation_states(&self) -> Result<Vec<crate::store::RotationState>, StoreError> {
        self.read(|c| {
            let mut st = c
                .prepare_cached("SELECT item, last_run FROM rotation_state ORDER BY item")
                .map_err(unavailable)?;
            let rows = st
                .query_map([], |r| {
                    Ok(crate::store::RotationState {
                        item: r.get(0)?,
                        last_run: r.get(1)?,
                    })
                })
                .map_err(unavailable)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(unavailable)
        })
        .await
    }
}

#[async_trait]
impl RootSecrets for SqliteStore {
    async fn root_secret(&self, target: &str) -> Result<Option<StoredRootSecret>, StoreError> {
        let target = target.to_string();
        self.read(move |c| {
            c.query_row(
                "SELECT target, sealed, pending, updated_at FROM root_secrets WHERE target = ?1",
                params![target],
                |r| {
                    Ok(StoredRootSecret {
                        target: r.get(0)?,
                        sealed: r.get(1)?,
                        pending: r.get(2)?,
                        updated_at: r.get(3)?,
                    })
                },
            )
            .optional()
            .map_err(unavailable)
        })
        .await
    }

    async fn put_root_secret(&self, secret: StoredRootSecret) -> Result<(), StoreError> {
        self.read(move |c| {
            c.execute(
                "INSERT INTO root_secrets (target, sealed, pending, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(target) DO UPDATE SET sealed = excluded.sealed,
                     pending = excluded.pending, updated_at = excluded.updated_at",
                params![secret.target, secret.sealed, secret.pending, secret.updated_at],
            )
            .map(|_| ())
            .map_err(unavailable)
        })
        .await
    }
}
