//! The `postgres` kind: one login role per lease.
//!
//! - Mint: `CREATE ROLE … LOGIN PASSWORD … VALID UNTIL …` and `GRANT <group> TO …` for
//!   the scopes' group roles, in one transaction. The password is random and sent only
//!   as a SCRAM-SHA-256 verifier, so it never appears in the server's statement log.
//! - Renew: `ALTER ROLE … VALID UNTIL`.
//! - Revoke: refuse new logins, terminate the role's sessions (`VALID UNTIL` never ends
//!   an open one), reassign and drop what it owns in every configured database, drop the
//!   role. Idempotent, and keeps going past a failed step.
//! - Ownership: every role gets the comment `latchkey store=<store id> target=<name>`
//!   in the transaction that creates it. The reconciler removes only roles carrying this
//!   broker's (this store's) marker for this target, and never one whose handle belongs
//!   to a live lease of any target in the store; roles of another target, another
//!   broker, an older version (no comment) or a person are left alone.
//! - Reconcile: our roles that no live lease owns are revoked the same way.
//! - Root rotation: the admin's password, two-phase (staged sealed in the store, set at
//!   the server, verified by logging in with it, then switched to).
//!
//! Identifiers are always quoted; nothing from a caller's claims reaches SQL text (role
//! names are made of the prefix, a timestamp and the lease id).

use super::check::{Check, CheckError};
use super::root::RootCredential;
use super::SecretRef;
use super::{random_secret, rfc3339, Credential, Deps, MintContext, MintError, Minter, RootStep};
use crate::secret::{Secret, SecretString};
use async_trait::async_trait;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

/// Roles younger than this are left alone by the reconciler: their lease may not be
/// committed yet.
const RECONCILE_GRACE_SECS: i64 = 600;

/// Mints PostgreSQL roles for one target.
#[derive(Debug)]
pub struct PostgresMinter {
    target: String,
    cfg: PostgresConfig,
    base: tokio_postgres::Config,
    tls: crate::pgtls::PgTls,
    password: Option<RootCredential>,
    /// The comment that marks a role as made by this broker for this target.
    marker: String,
}

/// A quoted identifier.
fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A quoted literal (standard_conforming_strings is on by default since 9.1; the
/// values quoted here are generated, never taken from callers).
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl PostgresMinter {
    /// Parses the admin URL and loads the admin password (the rotated one from the store
    /// when there is one, finishing an interrupted rotation). Fails when the URL does not
    /// parse or the password cannot be read.
    pub(crate) async fn new(
        target: &str,
        cfg: PostgresConfig,
        deps: &Deps,
    ) -> Result<PostgresMinter, String> {
        let mut base: tokio_postgres::Config = cfg
            .url
            .parse()
            .map_err(|e| format!("url does not parse: {e}"))?;
        base.connect_timeout(cfg.timeout);
        let tls = crate::pgtls::PgTls::new(cfg.sslmode, cfg.ca_file.as_deref())?;
        tls.apply(&mut base);
        base.options(format!("-c statement_timeout={}", cfg.timeout.as_millis()));
        base.application_name("latchkey");
        let store_id = deps
            .store
            .store_id()
            .await
            .map_err(|e| format!("cannot read the store's id: {e}"))?;
        let mut m = PostgresMinter {
            target: target.to_string(),
            base,
            tls,
            password: None,
            cfg,
            marker: ownership_marker(&store_id, target),
        };
        if let Some(source) = m.cfg.password.clone() {
            let (root, pending) = RootCredential::load(target, &source, deps).await?;
            if let Some(p) = pending {
                // An interrupted rotation: the staged password is the server's if it logs in.
                if m.connect_with(Some(&p), None).await.is_ok() {
                    root.commit(p).await.map_err(|e| e.to_string())?;
                    tracing::warn!(target = %target, "finished an interrupted admin password rotation");
                } else {
                    root.discard().await.map_err(|e| e.to_string())?;
                }
            }
            m.password = Some(root);
        }
        Ok(m)
    }

    fn fail(&self, what: &str, e: &tokio_postgres::Error) -> MintError {
        let code = e.code().map(|c| c.code().to_string());
        match code.as_deref() {
            Some("28P01") | Some("28000") => MintError::Refused {
                target: self.target.clone(),
                reason: format!("{what}: the server refused the admin login"),
            },
            Some("42501") => MintError::Refused {
                target: self.target.clone(),
                reason: format!("{what}: the admin lacks the privilege (SQLSTATE 42501)"),
            },
            Some(c) => MintError::Upstream {
                target: self.target.clone(),
                reason: format!("{what} failed (SQLSTATE {c})"),
            },
            None => MintError::Upstream {
                target: self.target.clone(),
                reason: match tls_failure(e) {
                    Some(why) => format!("{what}: TLS with the server failed ({why})"),
                    None => format!("{what}: cannot reach the server"),
                },
            },
        }
    }

    async fn connect_with(
        &self,
        password: Option<&SecretString>,
        dbname: Option<&str>,
    ) -> Result<tokio_postgres::Client, MintError> {
        let mut c = self.base.clone();
        if let Some(p) = password {
            c.password(p.expose().as_bytes());
        }
        if let Some(db) = dbname {
            c.dbname(db);
        }
        let (client, conn) = c
            .connect(self.tls.connector())
            .await
            .map_err(|e| self.fail("connect", &e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "postgres connection ended");
            }
        });
        Ok(client)
    }

    async fn connect(&self, dbname: Option<&str>) -> Result<tokio_postgres::Client, MintError> {
        let pw = self.password.as_ref().map(|r| r.get());
        self.connect_with(pw.as_deref(), dbname).await
    }

    fn role_name(&self, now: i64, lease_id: &str) -> String {
        format!(
            "{}{}_{}",
            self.cfg.role_prefix,
            now.max(0),
            role_suffix(lease_id)
        )
    }

    /// When a role of ours was created, from its name.
    fn created_at(&self, role: &str) -> Option<i64> {
        role.strip_prefix(&self.cfg.role_prefix)?
            .split('_')
            .next()?
            .parse()
            .ok()
    }

    /// Revokes `role` everywhere; answers the failed steps.
    async fn drop_role(&self, role: &str) -> Result<(), MintError> {
        let client = self.connect(None).await?;
        let exists = client
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
            .await
            .map_err(|e| self.fail("look up role", &e))?;
        if exists.is_none() {
            return Ok(());
        }
        let mut failed: Vec<String> = Vec::new();
        let mut note = |what: &str, r: Result<(), MintError>| {
            if let Err(e) = r {
                failed.push(match e {
                    MintError::Upstream { reason, .. } | MintError::Refused { reason, .. } => {
                        reason
                    }
                    other => format!("{what}: {other}"),
                });
            }
        };
        let q = ident(role);
        let r = client
            .batch_execute(&format!("ALTER ROLE {q} NOLOGIN"))
            .await;
        note(
            "refuse logins",
            r.map_err(|e| self.fail("refuse logins", &e)),
        );
        let r = client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1 AND pid <> pg_backend_pid()",
                &[&role],
            )
            .await
            .map(|_| ());
        note(
            "terminate sessions",
            r.map_err(|e| self.fail("terminate sessions", &e)),
        );
        let owned = format!("REASSIGN OWNED BY {q} TO CURRENT_USER; DROP OWNED BY {q}");
        let r = client.batch_execute(&owned).await;
        note(
            "drop owned objects",
            r.map_err(|e| self.fail("drop owned objects", &e)),
        );
        for db in &self.cfg.databases {
            let what = format!("drop owned objects in {db}");
            let r = match self.connect(Some(db)).await {
                Ok(c) => c
                    .batch_execute(&owned)
                    .await
                    .map_err(|e| self.fail(&what, &e)),
                Err(e) => Err(e),
            };
            note(&what, r);
        }
        let r = client
            .batch_execute(&format!("DROP ROLE IF EXISTS {q}"))
            .await;
        note("drop role", r.map_err(|e| self.fail("drop role", &e)));
        if failed.is_empty() {
            Ok(())
        } else {
            Err(MintError::Upstream {
                target: self.target.clone(),
                reason: failed.join("; "),
            })
        }
    }
}

/// The part of a role name taken from its lease id: the last 16 alphanumerics, the random
/// end of a UUIDv7 (its first 12 digits are the millisecond, the same for two leases
/// made in one millisecond).
fn role_suffix(lease_id: &str) -> String {
    let alnum: Vec<char> = lease_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    alnum[alnum.len().saturating_sub(16)..]
        .iter()
        .collect::<String>()
        .to_ascii_lowercase()
}

/// The comment on every role this broker (this store) makes for `target`.
fn ownership_marker(store_id: &str, target: &str) -> String {
    format!("latchkey store={store_id} target={target}")
}

/// A SCRAM-SHA-256 verifier of `password`, what the server stores.
fn verifier(password: &SecretString) -> String {
    postgres_protocol::password::scram_sha_256(password.expose().as_bytes())
}

#[async_trait]
impl Minter for PostgresMinter {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn renewable(&self) -> bool {
        true
    }

    async fn mint(&self, ctx: &MintContext<'_>) -> Result<Credential, MintError> {
        let role = self.role_name(ctx.now, ctx.lease_id);
        let expires_at = ctx.now + ctx.ttl.as_secs() as i64;
        let password = random_secret(&self.target, 24)?;
        let groups: BTreeSet<&String> = ctx
            .scopes
            .iter()
            .filter_map(|s| self.cfg.roles.get(s))
            .flatten()
            .collect();
        let sql = Secret::new(format!(
            "CREATE ROLE {} LOGIN INHERIT PASSWORD {} VALID UNTIL {}",
            ident(&role),
            literal(&verifier(&password)),
            literal(&rfc3339(expires_at))
        ));
        let mut client = self.connect(None).await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| self.fail("begin", &e))?;
        tx.batch_execute(sql.expose())
            .await
            .map_err(|e| self.fail("create role", &e))?;
        tx.batch_execute(&format!(
            "COMMENT ON ROLE {} IS {}",
            ident(&role),
            literal(&self.marker)
        ))
        .await
        .map_err(|e| self.fail("mark role", &e))?;
        // The admin becomes a member of the role it made, so revocation may reassign
        // and drop what the role owns (PostgreSQL requires that of non-superusers).
        tx.batch_execute(&format!("GRANT {} TO CURRENT_USER", ident(&role)))
            .await
            .map_err(|e| self.fail("grant role to admin", &e))?;
        for g in &groups {
            tx.batch_execute(&format!("GRANT {} TO {}", ident(g), ident(&role)))
                .await
                .map_err(|e| self.fail(&format!("grant {g}"), &e))?;
        }
        tx.commit().await.map_err(|e| self.fail("commit", &e))?;
        let mut fields = BTreeMap::new();
        if let Some(tokio_postgres::config::Host::Tcp(h)) = self.base.get_hosts().first() {
            fields.insert("host".to_string(), h.clone());
        }
        if let Some(p) = self.base.get_ports().first() {
            fields.insert("port".to_string(), p.to_string());
        }
        if let Some(db) = self.base.get_dbname() {
            fields.insert("database".to_string(), db.to_string());
        }
        fields.insert(
            "roles".to_string(),
            groups
                .iter()
                .map(|g| g.as_str())
                .collect::<Vec<_>>()
                .join(","),
        );
        Ok(Credential {
            kind: "postgres",
            token: None,
            username: Some(role.clone()),
            password: Some(password),
            fields,
            expires_at,
            id: role.clone(),
            upstream: Some(Secret::new(role)),
        })
    }

    async fn renew(
        &self,
        ctx: &MintContext<'_>,
        upstream: Option<&SecretString>,
    ) -> Result<Option<Credential>, MintError> {
        let Some(role) = upstream else {
            return Err(MintError::Invalid("lease has no role".into()));
        };
        let client = self.connect(None).await?;
        let n = client
            .execute(
                "SELECT 1 FROM pg_roles WHERE rolname = $1",
                &[role.expose()],
            )
            .await
            .map_err(|e| self.fail("look up role", &e))?;
        if n == 0 {
            return Err(MintError::Upstream {
                target: self.target.clone(),
                reason: "the lease's role no longer exists".into(),
            });
        }
        client
            .batch_execute(&format!(
                "ALTER ROLE {} VALID UNTIL {}",
                ident(role.expose()),
                literal(&rfc3339(ctx.now + ctx.ttl.as_secs() as i64))
            ))
            .await
            .map_err(|e| self.fail("extend role", &e))?;
        Ok(None)
    }

    async fn revoke(
        &self,
        _lease_id: &str,
        upstream: Option<&SecretString>,
        _expires_at: i64,
    ) -> Result<(), MintError> {
        match upstream {
            Some(role) => self.drop_role(role.expose()).await,
            None => Ok(()),
        }
    }

    fn reconciles(&self) -> bool {
        true
    }

    async fn reconcile(&self, live: &HashSet<String>, now: i64) -> Result<Vec<String>, MintError> {
        let client = self.connect(None).await?;
        let rows = client
            .query(
                "SELECT r.rolname::text, shobj_description(r.oid, 'pg_authid') FROM pg_roles r WHERE left(r.rolname, length($1)) = $1",
                &[&self.cfg.role_prefix],
            )
            .await
            .map_err(|e| self.fail("list roles", &e))?;
        let mut others = 0usize;
        let rows: Vec<String> = rows
            .into_iter()
            .filter_map(|r| {
                let name: String = r.get(0);
                let comment: Option<String> = r.get(1);
                if comment.as_deref() == Some(self.marker.as_str()) {
                    Some(name)
                } else {
                    // Another target's, another broker's, an older version's (no
                    // comment) or a person's: not provably ours.
                    others += 1;
                    None
                }
            })
            .collect();
        if others > 0 {
            tracing::debug!(target = %self.target, roles = others, "roles under the prefix without this target's ownership marker left alone");
        }
        let mut removed = Vec::new();
        let mut failed = None;
        for name in rows {
            if live.contains(&name) {
                continue;
            }
            // Only names we make; a role created by hand under the prefix is left alone.
            let Some(created) = self.created_at(&name) else {
                continue;
            };
            if now - created < RECONCILE_GRACE_SECS {
                continue;
            }
            match self.drop_role(&name).await {
                Ok(()) => removed.push(name),
                Err(e) => {
                    // The role may be gone though a step failed (another database).
                    let gone = client
                        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
                        .await
                        .map(|r| r.is_none())
                        .unwrap_or(false);
                    tracing::warn!(target = %self.target, role = %name, error = %e, "orphan role removal incomplete");
                    if gone {
                        removed.push(name);
                    }
                    failed = Some(e);
                }
            }
        }
        match (failed, removed.is_empty()) {
            (Some(e), true) => Err(e),
            _ => Ok(removed),
        }
    }

    fn rotates_root(&self) -> bool {
        self.password.is_some()
    }

    async fn rotate_root(&self, journal: &mut Vec<RootStep>) -> Result<String, MintError> {
        let Some(root) = &self.password else {
            return Err(MintError::Unsupported {
                kind: "postgres",
                action: "rotate an admin that logs in without a password",
            });
        };
        let old = root.get();
        let client = self.connect(None).await?;
        let next = random_secret(&self.target, 24)?;
        root.stage(&next).await?;
        let set = |pw: &SecretString| {
            format!(
                "ALTER ROLE CURRENT_USER PASSWORD {}",
                literal(&verifier(pw))
            )
        };
        if let Err(e) = client.batch_execute(&set(&next)).await {
            let _ = root.discard().await;
            return Err(self.fail("set admin password", &e));
        }
        journal.push(RootStep {
            phase: "create",
            detail: "new admin password staged (sealed) and set at the server".into(),
        });
        if let Err(e) = self.connect_with(Some(&next), None).await {
            let back = client.batch_execute(&set(&old)).await;
            let _ = root.discard().await;
            journal.push(RootStep {
                phase: "cleanup",
                detail: match back {
                    Ok(()) => "new password did not log in; old password restored".into(),
                    Err(_) => "new password did not log in and restoring the old one failed".into(),
                },
            });
            return Err(e);
        }
        journal.push(RootStep {
            phase: "verify",
            detail: "logged in with the new admin password".into(),
        });
        root.commit(next).await?;
        journal.push(RootStep {
            phase: "switch",
            detail: "new admin password in service; the old one no longer exists at the server"
                .into(),
        });
        let user = self.base.get_user().unwrap_or("admin").to_string();
        Ok(format!("password of {user} rotated"))
    }
}

// ---- settings: what the minter is built from --------------------------------------

/// Why a connection failed in TLS, if it did: the rustls error's own words (what the
/// certificate lacked), never anything the server sent.
fn tls_failure(e: &tokio_postgres::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if let Some(t) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(t.to_string());
            }
        }
        if let Some(t) = s.downcast_ref::<rustls::Error>() {
            return Some(t.to_string());
        }
        source = s.source();
    }
    e.to_string()
        .contains("does not support TLS")
        .then(|| "the server does not accept TLS".to_string())
}

/// Settings of a `postgres` target.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// Admin connection URL, without a password.
    pub url: String,
    /// The admin's password, if it logs in with one (needed for root rotation).
    pub password: Option<SecretRef>,
    /// Prefix of every role the broker creates; the reconciler owns these names.
    pub role_prefix: String,
    /// Scope → group roles granted.
    pub roles: BTreeMap<String, Vec<String>>,
    /// Further databases where revocation drops what the role owns.
    pub databases: Vec<String>,
    /// Connect and statement timeout.
    pub timeout: Duration,
    /// libpq's `sslmode` for the admin connection.
    pub sslmode: crate::pgtls::SslMode,
    /// CA certificates (PEM) trusted for `verify-ca` and `verify-full`; else the system's.
    pub ca_file: Option<std::path::PathBuf>,
}

// ---- configuration: the raw form and its checks ----------------------------------

/// The `[[targets]]` keys of this kind, as written (unknown keys are refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPostgres {
    url: String,
    password_file: Option<String>,
    password_env: Option<String>,
    role_prefix: Option<String>,
    roles: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    databases: Vec<String>,
    timeout: Option<crate::clock::Dur>,
    sslmode: Option<String>,
    ca_file: Option<String>,
    allow_plaintext: Option<bool>,
}

impl Check {
    pub(super) fn postgres(&self, key: &str, r: RawPostgres) -> Result<PostgresConfig, CheckError> {
        let u = reqwest::Url::parse(&r.url)
            .map_err(|e| self.err(format!("{key}.url"), format!("not a URL ({e})")))?;
        if !matches!(u.scheme(), "postgres" | "postgresql") {
            return Err(self.err(format!("{key}.url"), "must be a postgres:// URL"));
        }
        if u.password().is_some() || r.url.contains("password=") {
            return Err(self.err(
                format!("{key}.url"),
                "must not carry the password: set password_file or password_env",
            ));
        }
        if u.username().is_empty() {
            return Err(self.err(format!("{key}.url"), "must name the admin user"));
        }
        if u.query_pairs()
            .any(|(k, _)| k.starts_with("ssl") || k == "channel_binding")
        {
            return Err(self.err(
                format!("{key}.url"),
                "write TLS settings as the target's sslmode and ca_file keys, not in the URL",
            ));
        }
        let parsed: tokio_postgres::Config = r
            .url
            .parse()
            .map_err(|e| self.err(format!("{key}.url"), format!("does not parse: {e}")))?;
        let local = crate::pgtls::is_local(&parsed);
        let sslmode = match r.sslmode.as_deref() {
            None => crate::pgtls::SslMode::default_for(local),
            Some(m) => crate::pgtls::SslMode::parse(m).ok_or_else(|| {
                self.err(
                    format!("{key}.sslmode"),
                    format!("{m:?} is not an sslmode; use disable, prefer, require, verify-ca or verify-full"),
                )
            })?,
        };
        if let Some(why) = sslmode.refusal(local, r.allow_plaintext.unwrap_or(false)) {
            return Err(self.err(format!("{key}.sslmode"), why));
        }
        if r.ca_file.is_some()
            && !matches!(
                sslmode,
                crate::pgtls::SslMode::VerifyCa | crate::pgtls::SslMode::VerifyFull
            )
        {
            return Err(self.err(
                format!("{key}.ca_file"),
                format!(
                    "sslmode {} checks no certificate; ca_file applies to verify-ca and verify-full",
                    sslmode.as_str()
                ),
            ));
        }
        let role_prefix = r.role_prefix.unwrap_or_else(|| "lk_".into());
        if role_prefix.len() < 2
            || role_prefix.len() > 20
            || !role_prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            || role_prefix.starts_with("pg_")
        {
            return Err(self.err(
                format!("{key}.role_prefix"),
                "must be 2-20 characters of a-z, 0-9 and '_', not starting with pg_",
            ));
        }
        if r.roles.is_empty() {
            return Err(self.err(
                format!("{key}.roles"),
                "map at least one scope to the group roles it grants",
            ));
        }
        for (scope, groups) in &r.roles {
            for g in groups {
                if g.is_empty()
                    || g.len() > 63
                    || g.starts_with("pg_")
                    || g.starts_with(&role_prefix)
                {
                    return Err(self.err(
                        format!("{key}.roles.{scope}"),
                        format!("{g:?} must be an existing group role (1-63 bytes, not pg_*, not under role_prefix)"),
                    ));
                }
            }
        }
        for d in &r.databases {
            if d.is_empty() || d.len() > 63 {
                return Err(self.err(format!("{key}.databases"), "names must be 1-63 bytes"));
            }
        }
        Ok(PostgresConfig {
            url: r.url,
            password: self.secret_ref_opt(key, "password", r.password_file, r.password_env)?,
            role_prefix,
            roles: r.roles,
            databases: r.databases,
            timeout: self.timeout(key, r.timeout)?,
            sslmode,
            ca_file: r.ca_file.map(std::path::PathBuf::from),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_differ_for_leases_made_in_one_millisecond() {
        // Two UUIDv7 of one millisecond share their first 12 digits.
        let a = "0193ab2c-7d3e-7001-8a2b-3c4d5e6f7081";
        let b = "0193ab2c-7d3e-7002-9f1e-0d2c3b4a5968";
        assert_ne!(role_suffix(a), role_suffix(b));
        assert_eq!(role_suffix(a), "8a2b3c4d5e6f7081");
        assert_eq!(role_suffix("x"), "x");
    }

    #[test]
    fn the_marker_names_store_and_target() {
        assert_eq!(
            ownership_marker("abc", "db-a"),
            "latchkey store=abc target=db-a"
        );
        assert_ne!(
            ownership_marker("abc", "db-a"),
            ownership_marker("abc", "db-b")
        );
        assert_ne!(
            ownership_marker("abc", "db-a"),
            ownership_marker("abd", "db-a")
        );
    }

    #[test]
    fn quoting_doubles_the_quote_character() {
        assert_eq!(ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(ident("lk_1_abc"), "\"lk_1_abc\"");
    }
}
