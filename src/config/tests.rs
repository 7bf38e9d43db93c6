use super::*;

const GOOD: &str = r#"
[server]
grpc_addr = "127.0.0.1:7443"
http_addr = "127.0.0.1:7480"
issuer_url = "http://127.0.0.1:7480"

[store]
path = "latchkey.db"

[[issuers]]
name = "bitbucket"
preset = "bitbucket"
issuer = "https://api.bitbucket.org/2.0/workspaces/acme/pipelines-config/identity/oidc"
audiences = ["ari:cloud:bitbucket::workspace/1234"]

[[targets]]
name = "orders-api"
kind = "jwt"
audience = "https://orders.example.com"
algorithm = "ES256"
default_ttl = "15m"
max_ttl = "1h"
subject = "bb:{repositoryUuid}"
claims = { team = "{workspaceUuid}" }

[[rules]]
name = "orders-release"
issuer = "bitbucket"
effect = "allow"
claims = { repositoryUuid = "{abc}", branchName = { glob = "release/*" }, "/kubernetes.io/namespace" = ["a", { regex = "b.*" }], env = { not = "prod" } }
grants = [{ target = "orders-api", scopes = ["orders:read", "orders:write"], max_ttl = "10m" }]

[[rules]]
name = "no-forks"
issuer = "bitbucket"
effect = "deny"
claims = { branchName = { glob = "fork/*" } }
targets = ["orders-api"]
"#;

#[test]
fn the_documented_example_parses() {
    let c = Config::parse(GOOD, "good.toml").unwrap();
    assert_eq!(c.issuers[0].leeway, Duration::from_secs(30));
    assert_eq!(c.targets[0].default_ttl, Duration::from_secs(900));
    assert_eq!(c.policy.rules().len(), 2);
    assert_eq!(c.server.issuer_url, "http://127.0.0.1:7480");
    assert!(c.target("orders-api").is_some());
}

/// Applies `edit` to the good config and expects an error naming `key` with `reason`.
fn rejects(edit: impl Fn(&str) -> String, key: &str, reason: &str) {
    let text = edit(GOOD);
    assert_ne!(text, GOOD, "edit did not apply for {key}");
    let e = Config::parse(&text, "bad.toml").unwrap_err();
    let shown = e.to_string();
    assert!(shown.starts_with("bad.toml: "), "{shown}");
    assert!(e.key.contains(key), "expected key {key:?} in {shown:?}");
    assert!(
        e.reason.contains(reason),
        "expected reason {reason:?} in {shown:?}"
    );
}

fn rep(from: &'static str, to: &'static str) -> impl Fn(&str) -> String {
    move |s: &str| s.replacen(from, to, 1)
}

#[test]
fn each_kind_of_bad_config_names_its_key() {
    rejects(
        rep("grpc_addr = \"127.0.0.1:7443\"", "grpc_addr = \"nope\""),
        "server.grpc_addr",
        "not an address",
    );
    rejects(
        rep(
            "grpc_addr = \"127.0.0.1:7443\"",
            "grpc_addr = \"0.0.0.0:7443\"",
        ),
        "server.grpc_addr",
        "not loopback",
    );
    rejects(
        rep(
            "http_addr = \"127.0.0.1:7480\"",
            "http_addr = \"10.0.0.1:7480\"",
        ),
        "server.http_addr",
        "[server.tls] is not configured",
    );
    rejects(
        rep(
            "issuer_url = \"http://127.0.0.1:7480\"",
            "issuer_url = \"http://example.com\"",
        ),
        "server.issuer_url",
        "https",
    );
    rejects(
        rep("[store]", "[store]\nbogus = 1"),
        "line",
        "unknown field `bogus`",
    );
    rejects(
        rep("preset = \"bitbucket\"", "preset = \"jenkins\""),
        "issuers[0].preset",
        "unknown preset",
    );
    rejects(
        rep(
            "audiences = [\"ari:cloud:bitbucket::workspace/1234\"]",
            "audiences = []",
        ),
        "issuers[0].audiences",
        "required",
    );
    rejects(
        rep("audiences = [", "algorithms = [\"HS256\"]\naudiences = ["),
        "issuers[0].algorithms[0]",
        "not accepted",
    );
    rejects(
        rep("audiences = [", "leeway = \"10m\"\naudiences = ["),
        "issuers[0].leeway",
        "at most 5m",
    );
    rejects(
        rep("audiences = [", "leeway = \"soon\"\naudiences = ["),
        "line",
        "invalid duration",
    );
    rejects(
        rep("kind = \"jwt\"", "kind = \"ldap\""),
        "targets[0].kind",
        "unknown kind",
    );
    rejects(
        rep("audience = \"https://orders.example.com\"\n", ""),
        "targets[0].audience",
        "required",
    );
    rejects(
        rep("algorithm = \"ES256\"", "algorithm = \"HS256\""),
        "targets[0].algorithm",
        "not supported",
    );
    rejects(
        rep("default_ttl = \"15m\"", "default_ttl = \"2h\""),
        "targets[0].default_ttl",
        "at most max_ttl",
    );
    rejects(
        rep("max_ttl = \"1h\"\nsubject", "max_ttl = \"48h\"\nsubject"),
        "targets[0].max_ttl",
        "between 1s and 24h",
    );
    rejects(
        rep(
            "subject = \"bb:{repositoryUuid}\"",
            "subject = \"bb:{repositoryUuid\"",
        ),
        "targets[0].subject",
        "unclosed",
    );
    rejects(
        rep("team = \"{workspaceUuid}\"", "exp = \"1\""),
        "targets[0].claims.exp",
        "cannot be overridden",
    );
    rejects(
        rep(
            "issuer = \"bitbucket\"\neffect = \"allow\"",
            "issuer = \"github\"\neffect = \"allow\"",
        ),
        "rules[0].issuer",
        "no issuer named",
    );
    rejects(
        rep("effect = \"allow\"", "effect = \"maybe\""),
        "rules[0].effect",
        "not \"allow\" or \"deny\"",
    );
    rejects(
        rep("{ glob = \"release/*\" }", "{ glob = \"release/[\" }"),
        "rules[0].claims.branchName.glob",
        "invalid glob",
    );
    rejects(
        rep("{ regex = \"b.*\" }", "{ regex = \"(b\" }"),
        "rules[0].claims./kubernetes.io/namespace[1].regex",
        "invalid regex",
    );
    rejects(
        rep("{ not = \"prod\" }", "{ fuzzy = \"prod\" }"),
        "rules[0].claims.env.fuzzy",
        "unknown matcher",
    );
    rejects(
        rep("env = { not = \"prod\" }", "env = 5"),
        "rules[0].claims.env",
        "quote it",
    );
    rejects(
        rep(
            "[{ target = \"orders-api\", scopes",
            "[{ target = \"billing\", scopes",
        ),
        "rules[0].grants[0].target",
        "no target named",
    );
    rejects(
        rep("max_ttl = \"10m\" }", "max_ttl = \"2h\" }"),
        "rules[0].grants[0].max_ttl",
        "exceeds target",
    );
    rejects(
        rep("\"orders:read\", \"orders:write\"", "\"orders read\""),
        "rules[0].grants[0].scopes[0]",
        "no whitespace",
    );
    rejects(
        rep("targets = [\"orders-api\"]", "targets = [\"billing\"]"),
        "rules[1].targets[0]",
        "no target named",
    );
    rejects(
        rep(
            "targets = [\"orders-api\"]",
            "grants = [{ target = \"orders-api\" }]",
        ),
        "rules[1].grants",
        "deny rules do not grant",
    );
    rejects(
        rep("name = \"no-forks\"", "name = \"orders-release\""),
        "rules[1].name",
        "duplicate rule",
    );
    rejects(
        rep("name = \"orders-api\"", "name = \"orders api\""),
        "targets[0].name",
        "must be 1-64",
    );
    rejects(
        |s: &str| {
            s.replacen("grants = [{ target = \"orders-api\", scopes = [\"orders:read\", \"orders:write\"], max_ttl = \"10m\" }]", "roles = [\"superuser\"]", 1)
        },
        "rules[0].roles[0]",
        "unknown role",
    );
    rejects(
        |s: &str| {
            s.replacen("grants = [{ target = \"orders-api\", scopes = [\"orders:read\", \"orders:write\"], max_ttl = \"10m\" }]", "", 1)
        },
        "rules[0].grants",
        "must grant at least one",
    );
}

#[test]
fn kubernetes_default_audience_is_refused() {
    let text = GOOD
        .replacen("preset = \"bitbucket\"", "preset = \"kubernetes\"", 1)
        .replacen(
            "ari:cloud:bitbucket::workspace/1234",
            "https://kubernetes.default.svc.cluster.local",
            1,
        );
    let e = Config::parse(&text, "k.toml").unwrap_err();
    assert_eq!(e.key, "issuers[0].audiences[0]");
}

#[test]
fn plaintext_on_a_public_address_needs_an_explicit_opt_in() {
    let text = GOOD.replacen(
        "grpc_addr = \"127.0.0.1:7443\"",
        "grpc_addr = \"0.0.0.0:7443\"\nallow_plaintext = true",
        1,
    );
    assert!(Config::parse(&text, "p.toml").is_ok());
}

#[test]
fn missing_file_is_a_clear_error() {
    let e = Config::load(Path::new("/nonexistent/latchkey.toml")).unwrap_err();
    assert_eq!(e.file, "/nonexistent/latchkey.toml");
    assert!(e.reason.contains("cannot read"));
}

#[test]
fn lease_settings_default_and_are_checked() {
    let c = Config::parse(GOOD, "good.toml").unwrap();
    let t = &c.targets[0];
    assert_eq!(t.max_lifetime, t.max_ttl, "lifetime defaults to max_ttl");
    assert_eq!(t.max_live_leases, None);
    assert_eq!(c.issuers[0].max_mints_per_token, None);
    assert!(c.issuers[0].key_environment);
    assert_eq!(c.leases.reap_interval, Duration::from_secs(30));
    let c = Config::parse(
        &(GOOD
            .replacen(
                "max_ttl = \"1h\"",
                "max_ttl = \"1h\"\nmax_lifetime = \"8h\"\nmax_live_leases = 5",
                1,
            )
            .replacen(
                "audiences = [",
                "max_mints_per_token = 3\nidentity_key_environment = false\naudiences = [",
                1,
            )
            + "\n[leases]\nreap_interval = \"10s\"\nstuck_after = 3\n"),
        "good.toml",
    )
    .unwrap();
    assert_eq!(c.targets[0].max_lifetime, Duration::from_secs(8 * 3600));
    assert_eq!(c.targets[0].max_live_leases, Some(5));
    assert_eq!(c.issuers[0].max_mints_per_token, Some(3));
    assert!(!c.issuers[0].key_environment);
    assert_eq!(c.leases.reap_interval, Duration::from_secs(10));
    assert_eq!(c.leases.stuck_after, 3);

    rejects(
        rep(
            "max_ttl = \"1h\"",
            "max_ttl = \"1h\"\nmax_lifetime = \"30m\"",
        ),
        "targets[0].max_lifetime",
        "at least max_ttl",
    );
    rejects(
        rep("max_ttl = \"1h\"", "max_ttl = \"1h\"\nmax_live_leases = 0"),
        "targets[0].max_live_leases",
        "at least 1",
    );
    rejects(
        rep("audiences = [", "max_mints_per_token = 0\naudiences = ["),
        "issuers[0].max_mints_per_token",
        "at least 1",
    );
    rejects(
        rep(
            "max_ttl = \"10m\" }",
            "max_ttl = \"10m\", max_lifetime = \"2h\" }",
        ),
        "rules[0].grants[0].max_lifetime",
        "max_lifetime",
    );
    rejects(
        |s: &str| format!("{s}\n[leases]\nreap_interval = \"0s\"\n"),
        "leases.reap_interval",
        "between 1s and 1h",
    );
    rejects(
        |s: &str| format!("{s}\n[leases]\nstuck_after = 0\n"),
        "leases.stuck_after",
        "at least 1",
    );
}

#[test]
fn audit_settings_default_and_are_checked() {
    use crate::audit::checkpoint::WitnessTarget;
    let c = Config::parse(GOOD, "good.toml").unwrap();
    assert_eq!(c.audit.checkpoint_every, 1000);
    assert_eq!(c.audit.checkpoint_interval, Duration::from_secs(60));
    assert_eq!(c.audit.witness, None);
    let text = format!(
        "{GOOD}\n[audit]\ncheckpoint_every = 10\ncheckpoint_interval = \"5s\"\nwitness_url = \"https://witness.example.com/cp\"\nredact_claims = [\"email\", \"/kubernetes.io/pod/name\"]\n"
    );
    let c = Config::parse(&text, "good.toml").unwrap();
    assert_eq!(c.audit.checkpoint_every, 10);
    assert_eq!(
        c.audit.witness,
        Some(WitnessTarget::Url("https://witness.example.com/cp".into()))
    );
    assert_eq!(c.audit.redact_claims.len(), 2);
    let with = |extra: &'static str| move |s: &str| format!("{s}\n[audit]\n{extra}\n");
    rejects(
        with("checkpoint_every = 0"),
        "audit.checkpoint_every",
        "between 1",
    );
    rejects(
        with("checkpoint_interval = \"2d\""),
        "audit.checkpoint_interval",
        "between 1s and 24h",
    );
    rejects(
        with("witness_url = \"http://witness.example.com/\""),
        "audit.witness_url",
        "https",
    );
    rejects(
        with("witness_file = \"/w.jsonl\"\nwitness_url = \"https://w.example.com/\""),
        "audit.witness_url",
        "not both",
    );
    rejects(
        with("redact_claims = [\"\"]"),
        "audit.redact_claims[0]",
        "claim name",
    );
    rejects(with("witness = \"x\""), "line", "unknown field");
}

fn append(extra: &'static str) -> impl Fn(&str) -> String {
    move |s: &str| format!("{s}\n{extra}")
}

#[test]
fn limits_are_checked_and_default_sensibly() {
    let c = Config::parse(GOOD, "good.toml").unwrap();
    assert_eq!(c.limits, LimitsConfig::default());
    let c = Config::parse(
        &format!(
            "{GOOD}\n[limits]\nidentity_rate = 2.5\nsource_ip_rate = 0\nrequest_timeout = \"5s\"\n"
        ),
        "good.toml",
    )
    .unwrap();
    assert_eq!(c.limits.rate.identity.rate, 2.5);
    assert_eq!(
        c.limits.rate.identity.burst, 5,
        "burst defaults to two seconds' worth"
    );
    assert_eq!(c.limits.rate.source_ip.rate, 0.0, "0 turns the limit off");
    assert_eq!(c.limits.request_timeout, std::time::Duration::from_secs(5));
    rejects(
        append("[limits]\nidentity_rate = -1"),
        "limits.identity_rate",
        "requests per second",
    );
    rejects(
        append("[limits]\nidentity_rate = 1e-20"),
        "limits.identity_rate",
        "at least 0.001",
    );
    rejects(
        append("[limits]\nsource_ip_rate = 5\nsource_ip_burst = 0"),
        "limits.source_ip_burst",
        "at least 1",
    );
    rejects(
        append("[limits]\nrequest_timeout = \"1ms\""),
        "limits.request_timeout",
        "between",
    );
    rejects(
        append("[limits]\nmax_connections = 0"),
        "limits.max_connections",
        "at least 1",
    );
    rejects(
        append("[limits]\nidentity_rte = 1"),
        "identity_rte",
        "unknown field",
    );
}

#[test]
fn role_targets_must_name_targets_and_need_roles() {
    rejects(
        append("[[rules]]\nname = \"i\"\nissuer = \"bitbucket\"\nclaims = { branchName = \"x\" }\nroles = [\"introspect\"]\nrole_targets = [\"nope\"]"),
        "role_targets[0]",
        "no target named",
    );
    rejects(
        append("[[rules]]\nname = \"i\"\nissuer = \"bitbucket\"\nclaims = { branchName = \"x\" }\ngrants = [{ target = \"orders-api\" }]\nrole_targets = [\"orders-api\"]"),
        "role_targets",
        "grants none",
    );
}

fn target(body: &str) -> String {
    format!("{GOOD}\n[[targets]]\nname = \"t\"\n{body}\n")
}

#[test]
fn every_target_kind_parses_with_secrets_by_reference() {
    for body in [
        "kind = \"pulsar\"\nroles = { p = \"producer\" }",
        "kind = \"pulsar\"\nalgorithm = \"HS256\"\nsecret_key_file = \"/run/pulsar.key\"\nrole_claim = \"role\"",
        "kind = \"pulsar\"\nadmin_url = \"https://pulsar:8443\"\nadmin_token_env = \"PULSAR_ADMIN\"\npermissions = { w = { resource = \"persistent://t/ns/topic\", actions = [\"produce\"] } }",
        "kind = \"airflow\"\nalgorithm = \"RS256\"\nrole = \"viewer\"",
        "kind = \"airflow\"\nalgorithm = \"ES256\"\nauth_manager = \"fab\"\nsubject = \"{user_id}\"",
        "kind = \"databricks\"\nmode = \"federation\"\nworkspace_url = \"https://dbc-1.cloud.databricks.com\"\nclient_id = \"sp\"",
        "kind = \"databricks\"\nmode = \"m2m\"\nworkspace_url = \"https://dbc-1.cloud.databricks.com\"\nclient_id = \"sp\"\nclient_secret_env = \"DBX\"",
        "kind = \"databricks\"\nmode = \"pat\"\nworkspace_url = \"https://dbc-1.cloud.databricks.com\"\ntoken_file = \"/run/dbx\"",
        "kind = \"vercel\"\ntoken_env = \"VERCEL_ROOT\"\nroot_rotation = \"720h\"",
        "kind = \"prefect\"\naccount_id = \"a\"\naccount_role_id = \"r\"\ntoken_env = \"PREFECT\"",
        "kind = \"bitbucket\"\nclient_id = \"key\"\nclient_secret_env = \"BB\"",
        "kind = \"postgres\"\nurl = \"postgres://latchkey@db:5432/app\"\npassword_env = \"PG\"\nroles = { read = [\"app_read\"] }\nroot_rotation = \"720h\"",
        "kind = \"oauth2\"\ngrant = \"client_credentials\"\ntoken_url = \"https://idp/token\"\nclient_id = \"c\"\nclient_secret_env = \"S\"",
        "kind = \"oauth2\"\ngrant = \"token_exchange\"\ntoken_url = \"https://idp/token\"\nsubject_audience = \"idp\"",
    ] {
        let text = target(body);
        if let Err(e) = Config::parse(&text, "t.toml") {
            panic!("{body}: {e}");
        }
    }
}

#[test]
fn target_kinds_refuse_what_their_systems_cannot_take() {
    let cases: &[(&str, &str, &str)] = &[
        ("kind = \"pulsar\"\nalgorithm = \"HS256\"", "secret_key_file", "tokenSecretKey"),
        ("kind = \"pulsar\"\nrotation = \"720h\"", "rotation", "exactly one public key"),
        ("kind = \"pulsar\"\naudience = \"x\"", "audience", "go together"),
        ("kind = \"pulsar\"\npermissions = { w = { resource = \"bad\", actions = [\"produce\"] } }\nadmin_url = \"https://p\"\nadmin_token_env = \"A\"", "resource", "tenant/namespace"),
        ("kind = \"pulsar\"\npermissions = { w = { resource = \"t/ns\", actions = [\"write\"] } }\nadmin_url = \"https://p\"\nadmin_token_env = \"A\"", "actions", "unknown action"),
        ("kind = \"airflow\"\nrole = \"viewer\"", "algorithm", "RS512"),
        ("kind = \"airflow\"\nalgorithm = \"RS256\"\nrole = \"superuser\"", "role", "answers 500"),
        ("kind = \"airflow\"\nalgorithm = \"RS256\"", "role", "needs a role"),
        ("kind = \"airflow\"\nalgorithm = \"RS256\"\nrole = \"op\"\napi_url = \"http://airflow.internal:8080\"", "api_url", "https"),
        ("kind = \"vercel\"\ntoken_env = \"V\"\ntoken_issuer = \"target\"", "token_issuer", "does not apply"),
        ("kind = \"jwt\"\naudience = \"a\"\ntoken_issuer = \"own\"", "token_issuer", "\"broker\" or \"target\""),
        ("kind = \"databricks\"\nmode = \"pat\"\nworkspace_url = \"https://w\"", "token_file", "never written in the config"),
        ("kind = \"databricks\"\nmode = \"pat\"\nworkspace_url = \"http://w.example.com\"\ntoken_env = \"T\"", "workspace_url", "https"),
        ("kind = \"databricks\"\nmode = \"m2m\"\nworkspace_url = \"https://w\"\nclient_id = \"c\"\nclient_secret_env = \"S\"\ntoken_env = \"T\"", "token_env", "does not apply"),
        ("kind = \"vercel\"\ntoken_file = \"/a\"\ntoken_env = \"B\"", "token_env", "only one"),
        ("kind = \"vercel\"\ntoken = \"literal-secret\"", "targets[1]", "unknown field"),
        ("kind = \"prefect\"\napi_url = \"https://prefect.internal/api\"\naccount_id = \"a\"\naccount_role_id = \"r\"\ntoken_env = \"P\"", "api_url", "one shared basic-auth credential"),
        ("kind = \"prefect\"\nauth_string_env = \"P\"", "auth_string_file", "self-hosted"),
        ("kind = \"bitbucket\"\nclient_id = \"k\"\nclient_secret_env = \"S\"\nroot_rotation = \"720h\"", "root_rotation", "cannot rotate"),
        ("kind = \"postgres\"\nurl = \"postgres://admin:pw@db/app\"\nroles = { r = [\"g\"] }", "url", "must not carry the password"),
        ("kind = \"postgres\"\nurl = \"postgres://admin@db/app\"\nroles = { r = [\"g\"] }\nroot_rotation = \"720h\"", "root_rotation", "without a password"),
        ("kind = \"postgres\"\nurl = \"postgres://admin@db/app\"\nroles = { r = [\"pg_read_all_data\"] }", "roles.r", "not pg_"),
        ("kind = \"postgres\"\nurl = \"postgres://admin@db/app\"\nroles = { r = [\"g\"] }\nrole_prefix = \"Bad-\"", "role_prefix", "a-z"),
        ("kind = \"postgres\"\nurl = \"postgres://admin@db.internal/app\"\nroles = { r = [\"g\"] }\nsslmode = \"disable\"", "sslmode", "plaintext to a server on another machine"),
        ("kind = \"postgres\"\nurl = \"postgres://admin@db.internal/app\"\nroles = { r = [\"g\"] }\nsslmode = \"prefer\"", "sslmode", "allow_plaintext"),
        ("kind = \"postgres\"\nurl = \"postgres://admin@127.0.0.1.nip.io/app\"\nroles = { r = [\"g\"] }\nsslmode = \"disable\"", "sslmode", "another machine"),
        ("kind = \"postgres\"\nurl = \"postgres://admin@db/app?sslmode=disable\"\nroles = { r = [\"g\"] }", "url", "sslmode and ca_file keys"),
        ("kind = \"postgres\"\nurl = \"postgres://admin@db/app\"\nroles = { r = [\"g\"] }\nsslmode = \"require\"\nca_file = \"/ca.pem\"", "ca_file", "checks no certificate"),
        ("kind = \"postgres\"\nurl = \"postgres://admin@db/app\"\nroles = { r = [\"g\"] }\nsslmode = \"allow\"", "sslmode", "not an sslmode"),
        ("kind = \"oauth2\"\ngrant = \"client_credentials\"\ntoken_url = \"https://idp/token\"", "client_id", "client_credentials needs"),
        ("kind = \"oauth2\"\ngrant = \"password\"\ntoken_url = \"https://idp/token\"", "grant", "not supported"),
        ("kind = \"smtp\"", "kind", "supported: jwt, pulsar"),
    ];
    for (body, key, reason) in cases {
        let e = Config::parse(&target(body), "bad.toml").unwrap_err();
        assert!(e.key.contains(key), "{body}: expected key {key:?}, got {e}");
        assert!(
            e.reason.contains(reason),
            "{body}: expected {reason:?}, got {e}"
        );
    }
    // A secret given literally never appears in the error.
    let e = Config::parse(
        &target("kind = \"vercel\"\ntoken = \"literal-secret\""),
        "b",
    )
    .unwrap_err();
    assert!(!e.to_string().contains("literal-secret"), "{e}");
}

#[test]
fn a_postgres_target_verifies_tls_to_another_machine_unless_told_otherwise() {
    let pg = |rest: &str| {
        let text = target(&format!(
            "kind = \"postgres\"\nroles = {{ r = [\"g\"] }}\n{rest}"
        ));
        let c = Config::parse(&text, "t.toml").unwrap_or_else(|e| panic!("{rest}: {e}"));
        match &c.target("t").unwrap().kind {
            TargetKind::Postgres(p) => p.sslmode,
            _ => unreachable!(),
        }
    };
    use crate::pgtls::SslMode;
    assert_eq!(
        pg("url = \"postgres://a@db.internal/app\""),
        SslMode::VerifyFull
    );
    assert_eq!(pg("url = \"postgres://a@127.0.0.1/app\""), SslMode::Prefer);
    assert_eq!(
        pg("url = \"postgres://a@db.internal/app\"\nsslmode = \"disable\"\nallow_plaintext = true"),
        SslMode::Disable
    );
    assert_eq!(
        pg("url = \"postgres://a@db.internal/app\"\nsslmode = \"verify-ca\"\nca_file = \"/ca.pem\""),
        SslMode::VerifyCa
    );
}

#[test]
fn two_targets_a_verifier_could_not_tell_apart_are_refused() {
    let two = |a: &str, b: &str| {
        format!(
            "{GOOD}\n[[targets]]\nname = \"air-a\"\n{a}\n\n[[targets]]\nname = \"air-b\"\n{b}\n"
        )
    };
    let airflow = "kind = \"airflow\"\nalgorithm = \"ES256\"\nrole = \"admin\"";
    // Same kind, same (default) audience, both in the shared JWKS under one issuer.
    let e = Config::parse(&two(airflow, airflow), "b.toml").unwrap_err();
    assert!(e.key.contains("token_issuer"), "{e}");
    assert!(
        e.reason.contains("\"air-a\"") && e.reason.contains("\"apache-airflow\""),
        "{e}"
    );
    assert!(e.reason.contains("token_issuer = \"target\""), "{e}");
    // Across kinds too: a jwt target whose audience is the airflow one.
    let jwt = "kind = \"jwt\"\naudience = \"apache-airflow\"";
    assert!(Config::parse(&two(airflow, jwt), "b.toml").is_err());
    // Two exchange assertions (the broker presents them itself, no caller holds one)
    // may share an audience; a caller-held token beside one may not.
    let fed = "kind = \"databricks\"\nmode = \"federation\"\nworkspace_url = \"https://dbc-1.cloud.databricks.com\"\nclient_id = \"sp\"\naudience = \"apache-airflow\"";
    assert!(Config::parse(&two(fed, fed), "b.toml").is_ok());
    assert!(Config::parse(&two(fed, airflow), "b.toml").is_err());
    // Either target with its own issuer and JWKS, or its own audience, is fine.
    let own = format!("{airflow}\ntoken_issuer = \"target\"");
    let other_aud = format!("{airflow}\naudience = \"airflow-b\"");
    for (a, b) in [
        (airflow, own.as_str()),
        (own.as_str(), airflow),
        (airflow, other_aud.as_str()),
    ] {
        if let Err(e) = Config::parse(&two(a, b), "b.toml") {
            panic!("{a} / {b}: {e}");
        }
    }
    let c = Config::parse(&two(airflow, &own), "b.toml").unwrap();
    let b = c.target("air-b").unwrap();
    assert!(b.own_issuer);
    assert_eq!(
        b.issuer_url(&c.server.issuer_url),
        format!("{}/targets/air-b", c.server.issuer_url)
    );
    assert!(!c.target("air-a").unwrap().own_issuer);
}

#[test]
fn grants_on_targets_that_map_scopes_must_name_known_scopes() {
    let text = format!(
        "{}\n[[rules]]\nname = \"pg\"\nissuer = \"bitbucket\"\ngrants = [{{ target = \"t\", scopes = [\"write\"] }}]\n",
        target("kind = \"postgres\"\nurl = \"postgres://a@db/app\"\nroles = { read = [\"g\"] }")
    );
    let e = Config::parse(&text, "b").unwrap_err();
    assert!(e.reason.contains("knows no scope \"write\""), "{e}");
    assert!(e.key.contains("rules[2].grants[0].scopes[0]"), "{e}");
}

#[test]
fn secret_refs_read_files_and_variables_and_never_show_values() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s");
    std::fs::write(&p, "file-secret-value\n").unwrap();
    let r = SecretRef::File(p.clone());
    assert_eq!(r.load().unwrap().expose(), "file-secret-value");
    std::fs::write(&p, "\n").unwrap();
    assert!(r.load().unwrap_err().contains("is empty"));
    let missing = SecretRef::File(dir.path().join("nope"));
    assert!(missing.load().unwrap_err().contains("cannot read file"));
    let var = SecretRef::Env("LATCHKEY_TEST_SURELY_UNSET_VAR".into());
    assert_eq!(
        var.load().unwrap_err(),
        "environment variable LATCHKEY_TEST_SURELY_UNSET_VAR is not set"
    );
}

#[test]
fn two_postgres_targets_with_one_prefix_on_one_server_are_refused() {
    let pg = |name: &str, url: &str, prefix: &str| {
        format!(
            "\n[[targets]]\nname = \"{name}\"\nkind = \"postgres\"\nurl = \"{url}\"\nroles = {{ read = [\"g\"] }}\nrole_prefix = \"{prefix}\"\n"
        )
    };
    let text = format!(
        "{GOOD}{}{}",
        pg("db-a", "postgres://admin@db.internal/app", "lk_"),
        pg("db-b", "postgres://other@DB.internal:5432/reports", "lk_")
    );
    let e = Config::parse(&text, "t.toml").unwrap_err();
    assert!(e.key.contains("role_prefix"), "{e}");
    assert!(e.reason.contains("\"db-a\""), "{e}");
    assert!(e.reason.contains("own role_prefix"), "{e}");
    // Another prefix, or another server, is fine.
    for (url, prefix) in [
        ("postgres://admin@db.internal/app", "lk_b_"),
        ("postgres://admin@db2.internal/app", "lk_"),
        ("postgres://admin@db.internal:5433/app", "lk_"),
    ] {
        let text = format!(
            "{GOOD}{}{}",
            pg("db-a", "postgres://admin@db.internal/app", "lk_"),
            pg("db-b", url, prefix)
        );
        if let Err(e) = Config::parse(&text, "t.toml") {
            panic!("{url} {prefix}: {e}");
        }
    }
}

#[test]
fn connection_admission_limits_parse_and_are_bounded() {
    let c = Config::parse(
        &format!("{GOOD}\n[limits]\nmax_connections_per_source = 8\nhandshake_timeout = \"2s\"\n"),
        "t.toml",
    )
    .unwrap();
    assert_eq!(c.limits.max_connections_per_source, 8);
    assert_eq!(
        c.limits.handshake_timeout,
        std::time::Duration::from_secs(2)
    );
    let d = Config::parse(GOOD, "t.toml").unwrap();
    assert_eq!(d.limits.max_connections_per_source, 256);
    assert_eq!(
        d.limits.handshake_timeout,
        std::time::Duration::from_secs(10)
    );
    for (extra, key) in [
        (
            "max_connections_per_source = 0",
            "limits.max_connections_per_source",
        ),
        ("handshake_timeout = \"10ms\"", "limits.handshake_timeout"),
        ("handshake_timeout = \"5m\"", "limits.handshake_timeout"),
    ] {
        let e = Config::parse(&format!("{GOOD}\n[limits]\n{extra}\n"), "t.toml").unwrap_err();
        assert_eq!(e.key, key, "{extra}: {e}");
    }
}

#[test]
fn the_store_is_chosen_by_url_and_path_stays_an_alias() {
    use crate::store::Location;
    let with = |store: &str| GOOD.replace("[store]\npath = \"latchkey.db\"", store);
    let loc = |store: &str| Config::parse(&with(store), "t.toml").map(|c| c.store.location);
    assert_eq!(
        loc("[store]\nurl = \"sqlite:///var/lib/latchkey/l.db\"").unwrap(),
        Location::Sqlite("/var/lib/latchkey/l.db".into())
    );
    assert_eq!(
        loc("[store]\nurl = \"sqlite://data/l.db\"").unwrap(),
        Location::Sqlite("data/l.db".into())
    );
    assert_eq!(
        loc("[store]\npath = \"/srv/l.db\"").unwrap(),
        Location::Sqlite("/srv/l.db".into())
    );
    assert_eq!(
        loc("[store]").unwrap(),
        Location::Sqlite("latchkey.db".into())
    );
    assert_eq!(
        Location::Sqlite("/srv/l.db".into()).to_string(),
        "sqlite:///srv/l.db"
    );
    for (store, key, reason) in [
        (
            "[store]\nurl = \"sqlite:///a.db\"\npath = \"b.db\"",
            "store.path",
            "not both",
        ),
        (
            "[store]\nurl = \"postgres://db/latchkey\"",
            "store.url",
            "not supported by this version",
        ),
        (
            "[store]\nurl = \"mysql://db/latchkey\"",
            "store.url",
            "unsupported store URL scheme",
        ),
        ("[store]\nurl = \"sqlite://\"", "store.url", "names no file"),
        ("[store]\npath = \"\"", "store.path", "must not be empty"),
    ] {
        let e = loc(store).unwrap_err();
        assert_eq!(e.key, key, "{store}: {e}");
        assert!(e.reason.contains(reason), "{store}: {e}");
    }
}

#[test]
fn issuer_document_caps_parse_with_safe_defaults_and_bounds() {
    let with = |extra: &str| {
        GOOD.replace(
            "audiences = [\"ari:cloud:bitbucket::workspace/1234\"]",
            &format!("audiences = [\"ari:cloud:bitbucket::workspace/1234\"]\n{extra}"),
        )
    };
    let d = Config::parse(&with(""), "t.toml").unwrap();
    assert_eq!(
        (d.issuers[0].jwks_max_bytes, d.issuers[0].jwks_max_keys),
        (262_144, 100)
    );
    let c = Config::parse(&with("jwks_max_bytes = 4096\njwks_max_keys = 5"), "t.toml").unwrap();
    assert_eq!(
        (c.issuers[0].jwks_max_bytes, c.issuers[0].jwks_max_keys),
        (4096, 5)
    );
    for (extra, key) in [
        ("jwks_max_bytes = 10", "issuers[0].jwks_max_bytes"),
        ("jwks_max_bytes = 100000000", "issuers[0].jwks_max_bytes"),
        ("jwks_max_keys = 0", "issuers[0].jwks_max_keys"),
    ] {
        let e = Config::parse(&with(extra), "t.toml").unwrap_err();
        assert_eq!(e.key, key, "{extra}: {e}");
    }
}

#[test]
fn plain_http_is_allowed_only_to_addresses_that_are_loopback() {
    for (url, ok) in [
        ("http://127.0.0.1:8080/keys", true),
        ("http://127.9.9.9/keys", true),
        ("http://localhost:9/keys", true),
        ("http://[::1]:9/keys", true),
        ("http://127.attacker.example/keys", false),
        ("http://127.0.0.1.nip.io/keys", false),
        ("http://localhost.example/keys", false),
    ] {
        let text = GOOD.replace(
            "audiences = [\"ari:cloud:bitbucket::workspace/1234\"]",
            &format!("audiences = [\"ari:cloud:bitbucket::workspace/1234\"]\njwks_url = \"{url}\""),
        );
        let r = Config::parse(&text, "t.toml");
        assert_eq!(r.is_ok(), ok, "{url}: {r:?}");
        if !ok {
            let e = r.unwrap_err();
            assert!(e.reason.contains("must use https"), "{url}: {e}");
        }
    }
}
