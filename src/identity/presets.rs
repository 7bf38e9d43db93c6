//! Platform presets: each knows its platform's claim names and builds the stable
//! identity key from the claims that cannot be chosen per run (see TARGETS.md).

use super::{IdentityError, WorkloadIdentity};
use serde_json::{Map, Value};
use std::sync::Arc;

/// The identity platform an issuer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// Bitbucket Pipelines (`oidc: true`).
    Bitbucket,
    /// GitHub Actions.
    Github,
    /// GitLab CI.
    Gitlab,
    /// Kubernetes projected service-account tokens.
    Kubernetes,
    /// Any OIDC issuer: identity is `sub`.
    Generic,
}

impl Preset {
    /// Parses a preset name.
    pub fn parse(s: &str) -> Option<Preset> {
        Some(match s {
            "bitbucket" => Preset::Bitbucket,
            "github" => Preset::Github,
            "gitlab" => Preset::Gitlab,
            "kubernetes" => Preset::Kubernetes,
            "generic" => Preset::Generic,
            _ => return None,
        })
    }

    /// The preset's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Preset::Bitbucket => "bitbucket",
            Preset::Github => "github",
            Preset::Gitlab => "gitlab",
            Preset::Kubernetes => "kubernetes",
            Preset::Generic => "generic",
        }
    }

    /// Normalises verified claims. Fails when a claim the stable key needs is absent.
    pub(crate) fn normalise(
        self,
        issuer_name: &str,
        claims: Map<String, Value>,
        token_fingerprint: String,
        key_environment: bool,
    ) -> Result<WorkloadIdentity, IdentityError> {
        let s = |k: &str| claims.get(k).and_then(Value::as_str).map(str::to_string);
        let sub = s("sub").ok_or(IdentityError::Claim("sub"))?;
        let iss = s("iss").ok_or(IdentityError::Claim("iss"))?;
        // The same reading of `exp` as verification's (fractional seconds included): the
        // replay guard keeps a token's counter until this time.
        let exp = claims
            .get("exp")
            .and_then(super::verifier::numeric_date)
            .unwrap_or(0);
        let (key, repository, git_ref, environment, pipeline, commit) = match self {
            Preset::Bitbucket => {
                let repo = s("repositoryUuid").ok_or(IdentityError::Claim("repositoryUuid"))?;
                let workspace = s("workspaceUuid").unwrap_or_default();
                let env_uuid = s("deploymentEnvironmentUuid");
                let mut key = format!("{issuer_name}:{workspace}/{repo}");
                if let Some(e) = env_uuid.as_ref().filter(|_| key_environment) {
                    key.push_str(&format!(":env:{e}"));
                }
                let env = s("deploymentEnvironment").or(env_uuid);
                (
                    key,
                    Some(repo),
                    s("branchName"),
                    env,
                    s("pipelineUuid"),
                    None,
                )
            }
            Preset::Github => {
                let repo_id = claim_id(&claims, "repository_id")
                    .ok_or(IdentityError::Claim("repository_id"))?;
                let owner_id = claim_id(&claims, "repository_owner_id").unwrap_or_default();
                let env = s("environment");
                let mut key = format!("{issuer_name}:{owner_id}/{repo_id}");
                if let Some(e) = env.as_ref().filter(|_| key_environment) {
                    key.push_str(&format!(":env:{e}"));
                }
                let run = s("run_id").map(|r| match s("run_attempt") {
                    Some(a) => format!("{r}/{a}"),
                    None => r,
                });
                (key, s("repository"), s("ref"), env, run, s("sha"))
            }
            Preset::Gitlab => {
                let project =
                    claim_id(&claims, "project_id").ok_or(IdentityError::Claim("project_id"))?;
                let env = s("environment");
                let mut key = format!("{issuer_name}:{project}");
                if let Some(e) = env.as_ref().filter(|_| key_environment) {
                    key.push_str(&format!(":env:{e}"));
                }
                (
                    key,
                    s("project_path"),
                    s("ref"),
                    env,
                    claim_id(&claims, "pipeline_id"),
                    s("sha"),
                )
            }
            Preset::Kubernetes => {
                let k = claims
                    .get("kubernetes.io")
                    .and_then(Value::as_object)
                    .ok_or(IdentityError::Claim("kubernetes.io"))?;
                let ns = k
                    .get("namespace")
                    .and_then(Value::as_str)
                    .ok_or(IdentityError::Claim("kubernetes.io"))?;
                let sa = k
                    .get("serviceaccount")
                    .and_then(|v| v.get("name"))
                    .and_then(Value::as_str)
                    .ok_or(IdentityError::Claim("kubernetes.io"))?;
                let pod = k
                    .get("pod")
                    .and_then(|v| v.get("name"))
                    .and_then(Value::as_str)
                    .map(str::to_string);
                (
                    format!("{issuer_name}:{ns}/{sa}"),
                    None,
                    None,
                    Some(ns.to_string()),
                    pod,
                    None,
                )
            }
            Preset::Generic => (format!("{issuer_name}:{sub}"), None, None, None, None, None),
        };
        Ok(WorkloadIdentity {
            issuer_name: issuer_name.to_string(),
            issuer: iss,
            subject: sub,
            key,
            repository,
            git_ref,
            environment,
            pipeline,
            commit,
            jti: s("jti"),
            expires_at: exp,
            token_fingerprint,
            content_fingerprint: String::new(),
            claims: Arc::new(claims),
        })
    }
}

/// Ids arrive as strings on some platforms and numbers on others; accept both.
fn claim_id(claims: &Map<String, Value>, k: &str) -> Option<String> {
    match claims.get(k)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn norm(p: Preset, v: Value) -> Result<WorkloadIdentity, IdentityError> {
        p.normalise("x", v.as_object().unwrap().clone(), "fp".into(), true)
    }

    #[test]
    fn bitbucket_keys_on_repository_and_environment_not_sub() {
        let base = json!({"iss": "i", "sub": "{repo}:{step1}", "repositoryUuid": "{repo}", "workspaceUuid": "{ws}", "branchName": "main", "pipelineUuid": "{p}", "exp": 5});
        let a = norm(Preset::Bitbucket, base.clone()).unwrap();
        let mut other_step = base.clone();
        other_step["sub"] = json!("{repo}:{step2}");
        assert_eq!(a.key, norm(Preset::Bitbucket, other_step).unwrap().key);
        assert_eq!(a.key, "x:{ws}/{repo}");
        assert_eq!(a.git_ref.as_deref(), Some("main"));
        let mut with_env = base.clone();
        with_env["deploymentEnvironmentUuid"] = json!("{env}");
        with_env["deploymentEnvironment"] = json!("production");
        let e = norm(Preset::Bitbucket, with_env).unwrap();
        assert_eq!(e.key, "x:{ws}/{repo}:env:{env}");
        assert_eq!(e.environment.as_deref(), Some("production"));
        let mut missing = base;
        missing.as_object_mut().unwrap().remove("repositoryUuid");
        assert_eq!(
            norm(Preset::Bitbucket, missing).unwrap_err(),
            IdentityError::Claim("repositoryUuid")
        );
    }

    #[test]
    fn a_fractional_exp_is_the_token_expiry_not_zero() {
        let v = json!({"iss": "i", "sub": "s", "repositoryUuid": "{repo}", "workspaceUuid": "{ws}", "exp": 1_900_000_000.75});
        assert_eq!(
            norm(Preset::Bitbucket, v).unwrap().expires_at,
            1_900_000_000
        );
        let v = json!({"iss": "i", "sub": "s", "repositoryUuid": "{repo}", "exp": 1_900_000_000});
        assert_eq!(
            norm(Preset::Bitbucket, v).unwrap().expires_at,
            1_900_000_000
        );
    }

    #[test]
    fn github_prefers_ids() {
        let g = norm(Preset::Github, json!({"iss": "i", "sub": "repo:o/r:ref:refs/heads/main", "repository": "o/r", "repository_id": "42", "repository_owner_id": 7, "ref": "refs/heads/main", "sha": "abc", "run_id": "9", "run_attempt": "1"})).unwrap();
        assert_eq!(g.key, "x:7/42");
        assert_eq!(g.pipeline.as_deref(), Some("9/1"));
        assert_eq!(g.commit.as_deref(), Some("abc"));
        assert!(norm(Preset::Github, json!({"iss": "i", "sub": "s"})).is_err());
    }

    #[test]
    fn gitlab_and_kubernetes_and_generic() {
        let g = norm(Preset::Gitlab, json!({"iss": "i", "sub": "s", "project_id": "12", "project_path": "g/p", "ref": "main", "environment": "prod", "pipeline_id": 3})).unwrap();
        assert_eq!(g.key, "x:12:env:prod");
        assert_eq!(g.pipeline.as_deref(), Some("3"));
        // identity_key_environment = false: one key (one quota, one rate budget) however
        // many environments the pipeline names; the environment stays a field.
        let claims = json!({"iss": "i", "sub": "s", "project_id": "12", "environment": "prod-2"});
        let g = Preset::Gitlab
            .normalise("x", claims.as_object().unwrap().clone(), "fp".into(), false)
            .unwrap();
        assert_eq!(g.key, "x:12");
        assert_eq!(g.environment.as_deref(), Some("prod-2"));
        let claims = json!({"iss": "i", "sub": "s", "repository_id": "42", "repository_owner_id": "7", "environment": "e"});
        let g = Preset::Github
            .normalise("x", claims.as_object().unwrap().clone(), "fp".into(), false)
            .unwrap();
        assert_eq!(g.key, "x:7/42");
        let k = norm(Preset::Kubernetes, json!({"iss": "i", "sub": "system:serviceaccount:ci:runner", "kubernetes.io": {"namespace": "ci", "serviceaccount": {"name": "runner"}, "pod": {"name": "p1"}}})).unwrap();
        assert_eq!(k.key, "x:ci/runner");
        assert!(norm(Preset::Kubernetes, json!({"iss": "i", "sub": "s"})).is_err());
        assert_eq!(
            norm(Preset::Generic, json!({"iss": "i", "sub": "s"}))
                .unwrap()
                .key,
            "x:s"
        );
        assert_eq!(
            norm(Preset::Generic, json!({"iss": "i"})).unwrap_err(),
            IdentityError::Claim("sub")
        );
        assert!(Preset::parse("jenkins").is_none());
    }
}
