use super::*;
use proptest::prelude::*;
use serde_json::json;

const LIMITS: TargetLimits = TargetLimits {
    default_ttl: Duration::from_secs(900),
    max_ttl: Duration::from_secs(3600),
    max_lifetime: Duration::from_secs(4 * 3600),
};

fn claims(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

fn allow(
    name: &str,
    m: Vec<(&str, Matcher)>,
    target: &str,
    scopes: &[&str],
    max_ttl: Option<u64>,
) -> Rule {
    Rule {
        name: name.into(),
        issuer: "bb".into(),
        effect: Effect::Allow,
        claims: m
            .into_iter()
            .map(|(k, m)| (ClaimPath::parse(k).unwrap(), m))
            .collect(),
        grants: vec![Grant {
            target: target.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            max_ttl: max_ttl.map(Duration::from_secs),
            max_lifetime: None,
        }],
        deny_targets: vec![],
        roles: vec![],
        role_targets: vec![],
        fold: false,
    }
}

fn deny(name: &str, m: Vec<(&str, Matcher)>, targets: &[&str]) -> Rule {
    Rule {
        name: name.into(),
        issuer: "bb".into(),
        effect: Effect::Deny,
        claims: m
            .into_iter()
            .map(|(k, m)| (ClaimPath::parse(k).unwrap(), m))
            .collect(),
        grants: vec![],
        deny_targets: targets.iter().map(|s| s.to_string()).collect(),
        roles: vec![],
        role_targets: vec![],
        fold: false,
    }
}

fn req<'a>(target: &'a str, scopes: &'a [String], ttl: Option<u64>) -> Request<'a> {
    Request {
        target,
        scopes,
        ttl: ttl.map(Duration::from_secs),
    }
}

fn exact(s: &str) -> Matcher {
    Matcher::Exact(s.into())
}

#[test]
fn allow_grants_all_scopes_when_none_requested() {
    let p = Policy::new(vec![allow(
        "r",
        vec![("repo", exact("a"))],
        "t",
        &["w", "r"],
        Some(600),
    )]);
    let c = claims(json!({"repo": "a"}));
    let a = p.decide("bb", &c, LIMITS, req("t", &[], None)).unwrap();
    assert_eq!(a.scopes, vec!["r", "w"]);
    assert_eq!(
        a.ttl,
        Duration::from_secs(600),
        "default 900 clamped to grant cap 600"
    );
    assert_eq!(a.rule, "r");
}

#[test]
fn deny_beats_allow_regardless_of_order() {
    for rules in [
        vec![
            allow("a", vec![], "t", &["s"], None),
            deny("d", vec![("branch", exact("main"))], &[]),
        ],
        vec![
            deny("d", vec![("branch", exact("main"))], &["t"]),
            allow("a", vec![], "t", &["s"], None),
        ],
    ] {
        let p = Policy::new(rules);
        let c = claims(json!({"branch": "main"}));
        assert_eq!(
            p.decide("bb", &c, LIMITS, req("t", &[], None)),
            Err(Denied::DenyRule { rule: "d".into() })
        );
        let c = claims(json!({"branch": "dev"}));
        assert!(p.decide("bb", &c, LIMITS, req("t", &[], None)).is_ok());
    }
}

#[test]
fn targeted_deny_leaves_other_targets_alone() {
    let p = Policy::new(vec![
        allow("a", vec![], "t", &["s"], None),
        allow("b", vec![], "u", &["s"], None),
        deny("d", vec![], &["t"]),
    ]);
    let c = claims(json!({}));
    assert!(p.decide("bb", &c, LIMITS, req("t", &[], None)).is_err());
    assert!(p.decide("bb", &c, LIMITS, req("u", &[], None)).is_ok());
}

/// A case proptest once found (its seed file was dropped in a cleanup; kept here): a lone
/// deny rule with no claim clauses, against empty claims, is a deny by that rule, and the
/// indexed decision agrees with explain's full scan.
#[test]
fn a_lone_deny_without_clauses_denies_and_the_index_agrees() {
    let p = Policy::new(vec![deny("r0", vec![], &["t"])]);
    let c = claims(json!({}));
    let d = p.decide("bb", &c, LIMITS, req("t", &[], None));
    assert!(
        matches!(&d, Err(Denied::DenyRule { rule }) if rule == "r0"),
        "{d:?}"
    );
    assert_eq!(d, p.explain("bb", &c, LIMITS, req("t", &[], None)).decision);
}

#[test]
fn no_match_means_deny_with_the_failing_clause() {
    let p = Policy::new(vec![allow(
        "r",
        vec![
            ("repo", exact("a")),
            ("branch", Matcher::glob("release/*").unwrap()),
        ],
        "t",
        &["s"],
        None,
    )]);
    let c = claims(json!({"repo": "a", "branch": "main"}));
    match p.decide("bb", &c, LIMITS, req("t", &[], None)) {
        Err(Denied::NoRuleMatched {
            target,
            hint: Some(h),
            ..
        }) => {
            assert_eq!(target, "t");
            assert!(h.contains("branch") && h.contains("release/*"), "{h}");
        }
        other => panic!("{other:?}"),
    }
    // Another issuer's rules never apply.
    let c = claims(json!({"repo": "a", "branch": "release/1"}));
    assert!(p.decide("gh", &c, LIMITS, req("t", &[], None)).is_err());
    assert!(p.decide("bb", &c, LIMITS, req("t", &[], None)).is_ok());
    // Unknown target: no rule.
    assert!(matches!(
        p.decide("bb", &c, LIMITS, req("nope", &[], None)),
        Err(Denied::NoRuleMatched { hint: None, .. })
    ));
}

#[test]
fn absent_or_non_string_claims_never_match_even_under_not() {
    let p = Policy::new(vec![allow(
        "r",
        vec![("env", Matcher::Not(Box::new(exact("prod"))))],
        "t",
        &[],
        None,
    )]);
    assert!(p
        .decide(
            "bb",
            &claims(json!({"env": "dev"})),
            LIMITS,
            req("t", &[], None)
        )
        .is_ok());
    assert!(p
        .decide(
            "bb",
            &claims(json!({"env": "prod"})),
            LIMITS,
            req("t", &[], None)
        )
        .is_err());
    assert!(p
        .decide("bb", &claims(json!({})), LIMITS, req("t", &[], None))
        .is_err());
    assert!(p
        .decide(
            "bb",
            &claims(json!({"env": 5})),
            LIMITS,
            req("t", &[], None)
        )
        .is_err());
    assert!(p
        .decide(
            "bb",
            &claims(json!({"env": ["dev"]})),
            LIMITS,
            req("t", &[], None)
        )
        .is_err());
}

#[test]
fn json_pointer_and_any_of_and_regex() {
    let p = Policy::new(vec![allow(
        "k8s",
        vec![
            (
                "/kubernetes.io/namespace",
                Matcher::any_of(vec![exact("ci"), exact("build")]).unwrap(),
            ),
            (
                "sub",
                Matcher::regex("system:serviceaccount:[a-z]+:runner").unwrap(),
            ),
        ],
        "t",
        &["s"],
        None,
    )]);
    let ok = claims(
        json!({"sub": "system:serviceaccount:ci:runner", "kubernetes.io": {"namespace": "ci"}}),
    );
    assert!(p.decide("bb", &ok, LIMITS, req("t", &[], None)).is_ok());
    let bad_ns = claims(
        json!({"sub": "system:serviceaccount:ci:runner", "kubernetes.io": {"namespace": "prod"}}),
    );
    assert!(p
        .decide("bb", &bad_ns, LIMITS, req("t", &[], None))
        .is_err());
    let unanchored = claims(
        json!({"sub": "x-system:serviceaccount:ci:runner", "kubernetes.io": {"namespace": "ci"}}),
    );
    assert!(p
        .decide("bb", &unanchored, LIMITS, req("t", &[], None))
        .is_err());
}

#[test]
fn scope_narrowing_and_refusal() {
    let p = Policy::new(vec![
        allow("read", vec![], "t", &["orders:read"], Some(3000)),
        allow("write", vec![], "t", &["orders:write"], Some(300)),
    ]);
    let c = claims(json!({}));
    let only_read = ["orders:read".to_string()];
    let a = p
        .decide("bb", &c, LIMITS, req("t", &only_read, Some(3600)))
        .unwrap();
    assert_eq!(a.scopes, only_read);
    assert_eq!(
        a.ttl,
        Duration::from_secs(3000),
        "only the read grant caps a read-only request"
    );
    assert_eq!(a.rule, "read");
    let a = p
        .decide("bb", &c, LIMITS, req("t", &[], Some(3600)))
        .unwrap();
    assert_eq!(
        a.ttl,
        Duration::from_secs(300),
        "the most restrictive contributing grant caps"
    );
    let admin = ["orders:admin".to_string()];
    assert_eq!(
        p.decide("bb", &c, LIMITS, req("t", &admin, None)),
        Err(Denied::ScopeNotGranted {
            scope: "orders:admin".into(),
            target: "t".into()
        })
    );
}

#[test]
fn ttl_is_clamped_to_target_cap() {
    let p = Policy::new(vec![allow("r", vec![], "t", &[], None)]);
    let c = claims(json!({}));
    assert_eq!(
        p.decide("bb", &c, LIMITS, req("t", &[], Some(99999)))
            .unwrap()
            .ttl,
        LIMITS.max_ttl
    );
    assert_eq!(
        p.decide("bb", &c, LIMITS, req("t", &[], Some(60)))
            .unwrap()
            .ttl,
        Duration::from_secs(60)
    );
    assert_eq!(
        p.decide("bb", &c, LIMITS, req("t", &[], None)).unwrap().ttl,
        LIMITS.default_ttl
    );
}

#[test]
fn explain_traces_every_rule_considered() {
    let p = Policy::new(vec![
        allow("a", vec![("repo", exact("x"))], "t", &["s"], None),
        allow("b", vec![("repo", exact("y"))], "t", &["s"], None),
        allow("other-target", vec![], "u", &["s"], None),
    ]);
    let e = p.explain(
        "bb",
        &claims(json!({"repo": "y"})),
        LIMITS,
        req("t", &[], None),
    );
    assert!(e.decision.is_ok());
    assert_eq!(e.trace.len(), 3, "{:?}", e.trace);
    assert!(e.trace[0].starts_with("rule a (allow): not matched: claim repo"));
    assert!(e.trace[1].starts_with("rule b (allow): matched"));
    assert!(e.trace[2].starts_with("granted by b"));
}

#[test]
fn roles_come_from_allow_rules_and_admin_implies_all() {
    let mut auditor = allow("aud", vec![("team", exact("sec"))], "t", &[], None);
    auditor.grants.clear();
    auditor.roles = vec![Role::Auditor];
    let mut admin = allow("adm", vec![("team", exact("ops"))], "t", &[], None);
    admin.grants.clear();
    admin.roles = vec![Role::Admin];
    let p = Policy::new(vec![
        auditor,
        admin,
        deny("no-forks", vec![("fork", exact("true"))], &[]),
    ]);
    assert!(p
        .has_role("bb", &claims(json!({"team": "sec"})), Role::Auditor)
        .is_ok());
    assert!(p
        .has_role("bb", &claims(json!({"team": "sec"})), Role::Rotator)
        .is_err());
    assert!(p
        .has_role("bb", &claims(json!({"team": "ops"})), Role::Rotator)
        .is_ok());
    assert!(p
        .has_role(
            "bb",
            &claims(json!({"team": "ops", "fork": "true"})),
            Role::Rotator
        )
        .is_err());
    assert!(Role::parse("superuser").is_none());
}

#[test]
fn target_roles_cover_only_their_targets_and_targeted_denies_refuse() {
    let mut intro = allow("intro", vec![("team", exact("ops"))], "t", &[], None);
    intro.grants.clear();
    intro.roles = vec![Role::Introspect];
    intro.role_targets = vec!["orders".into()];
    let p = Policy::new(vec![
        intro,
        deny(
            "no-forks-on-orders",
            vec![("fork", exact("true"))],
            &["orders"],
        ),
    ]);
    let ops = claims(json!({"team": "ops"}));
    assert!(p
        .has_role_for("bb", &ops, Role::Introspect, "orders")
        .is_ok());
    assert_eq!(
        p.has_role_for("bb", &ops, Role::Introspect, "billing"),
        Err(Denied::RoleNotGranted("introspect"))
    );
    assert!(
        p.has_role("bb", &ops, Role::Introspect).is_ok(),
        "holds the role somewhere"
    );
    assert!(p
        .has_role_for(
            "bb",
            &claims(json!({"team": "dev"})),
            Role::Introspect,
            "orders"
        )
        .is_err());
    assert_eq!(
        p.has_role_for(
            "bb",
            &claims(json!({"team": "ops", "fork": "true"})),
            Role::Introspect,
            "orders"
        ),
        Err(Denied::DenyRule {
            rule: "no-forks-on-orders".into()
        })
    );
}

// ---- properties ----

fn arb_claims() -> impl Strategy<Value = Map<String, Value>> {
    proptest::collection::btree_map("[abc]", "[xyz]{0,2}", 0..4)
        .prop_map(|m| m.into_iter().map(|(k, v)| (k, Value::String(v))).collect())
}

fn arb_matcher() -> impl Strategy<Value = Matcher> {
    let leaf = prop_oneof![
        "[xyz]{0,2}".prop_map(Matcher::Exact),
        "[xyz*?]{0,3}".prop_map(|g| Matcher::glob(&g).unwrap()),
        "[xyz.]{0,2}".prop_map(|r| Matcher::regex(&r).unwrap()),
    ];
    leaf.prop_recursive(2, 6, 3, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 1..3).prop_map(Matcher::AnyOf),
            inner.prop_map(|m| Matcher::Not(Box::new(m))),
        ]
    })
}

fn arb_rule(i: usize) -> impl Strategy<Value = Rule> {
    (
        any::<bool>(),
        proptest::collection::vec(("[abc]", arb_matcher()), 0..3),
        proptest::collection::vec("[rw]", 0..3),
        proptest::option::of(1u64..5000),
        any::<bool>(),
    )
        .prop_map(move |(is_deny, m, scopes, cap, targeted)| {
            let m: Vec<(&str, Matcher)> = m
                .into_iter()
                .map(|(k, m)| (&*Box::leak(k.into_boxed_str()), m))
                .collect();
            let name = format!("r{i}");
            if is_deny {
                deny(&name, m, if targeted { &["t"] } else { &[] })
            } else {
                let s: Vec<&str> = scopes
                    .iter()
                    .map(|s| &*Box::leak(s.clone().into_boxed_str()))
                    .collect();
                allow(&name, m, "t", &s, cap)
            }
        })
}

fn arb_rules() -> impl Strategy<Value = Vec<Rule>> {
    (0usize..6).prop_flat_map(|n| (0..n).map(arb_rule).collect::<Vec<_>>())
}

proptest! {
    #[test]
    fn prop_matching_deny_rule_always_wins(rules in arb_rules(), c in arb_claims()) {
        let p = Policy::new(rules.clone());
        let any_deny = rules.iter().any(|r| r.effect == Effect::Deny && r.matches(&c).is_ok());
        let d = p.decide("bb", &c, LIMITS, req("t", &[], None));
        if any_deny {
            let is_deny = matches!(d, Err(Denied::DenyRule { .. }));
            prop_assert!(is_deny);
        }
    }

    #[test]
    fn prop_the_index_decides_as_a_full_scan(rules in arb_rules(), c in arb_claims(), pick in proptest::collection::vec("[rwx]", 0..3)) {
        // `explain` tries every rule in order; `decide` only those its exact-value index
        // leaves. Same decision, same hint, always.
        let p = Policy::new(rules);
        let pick: Vec<String> = pick;
        for scopes in [&[][..], &pick[..]] {
            let d = p.decide("bb", &c, LIMITS, req("t", scopes, None));
            let e = p.explain("bb", &c, LIMITS, req("t", scopes, None));
            prop_assert_eq!(d, e.decision);
        }
    }

    #[test]
    fn prop_no_matching_allow_means_deny(rules in arb_rules(), c in arb_claims()) {
        let p = Policy::new(rules.clone());
        let any_allow = rules.iter().any(|r| r.effect == Effect::Allow && r.matches(&c).is_ok());
        if !any_allow {
            prop_assert!(p.decide("bb", &c, LIMITS, req("t", &[], None)).is_err());
        }
    }

    #[test]
    fn prop_narrowing_never_widens(rules in arb_rules(), c in arb_claims(), pick in proptest::collection::vec("[rwx]", 0..3), ttl in proptest::option::of(1u64..10000)) {
        let p = Policy::new(rules);
        let pick: Vec<String> = pick;
        let full = p.decide("bb", &c, LIMITS, req("t", &[], None));
        let narrowed = p.decide("bb", &c, LIMITS, req("t", &pick, ttl));
        if let Ok(n) = narrowed {
            let f = full.expect("a narrowed request is allowed only if the full one is");
            for s in &n.scopes {
                prop_assert!(f.scopes.contains(s));
            }
            prop_assert!(n.ttl <= n.max_ttl);
            prop_assert!(n.max_ttl <= LIMITS.max_ttl);
            prop_assert!(n.ttl <= LIMITS.max_ttl);
            if let Some(t) = ttl { prop_assert!(n.ttl.as_secs() <= t); }
            prop_assert!(n.max_ttl >= f.max_ttl, "fewer scopes never tighten less than the full set");
        }
    }
}

#[test]
fn lifetime_cap_is_the_smallest_contributing_and_bounds_the_ttl() {
    let mut r = allow("a", vec![], "t", &["read"], None);
    r.grants[0].max_lifetime = Some(Duration::from_secs(7200));
    let p = Policy::new(vec![r, allow("b", vec![], "t", &["write"], None)]);
    let c = claims(json!({}));
    let a = p.decide("bb", &c, LIMITS, req("t", &[], None)).unwrap();
    assert_eq!(a.max_lifetime, Duration::from_secs(7200));
    let w = p
        .decide("bb", &c, LIMITS, req("t", &["write".to_string()], None))
        .unwrap();
    assert_eq!(
        w.max_lifetime, LIMITS.max_lifetime,
        "rule a did not contribute"
    );
    let mut short = allow("s", vec![], "t", &[], None);
    short.grants[0].max_lifetime = Some(Duration::from_secs(60));
    let a = Policy::new(vec![short])
        .decide("bb", &c, LIMITS, req("t", &[], Some(3000)))
        .unwrap();
    assert_eq!(
        a.ttl,
        Duration::from_secs(60),
        "ttl never exceeds the lifetime"
    );
    assert_eq!(a.max_ttl, Duration::from_secs(60));
}

#[test]
fn exact_valued_rules_are_indexed_without_changing_decisions() {
    let mut rules: Vec<Rule> = (0..1000)
        .map(|i| {
            allow(
                &format!("repo{i}"),
                vec![
                    ("branch", Matcher::glob("*").unwrap()),
                    ("repo", exact(&format!("{{r{i}}}"))),
                ],
                "t",
                &["read"],
                None,
            )
        })
        .collect();
    rules.push(allow(
        "release",
        vec![("branch", Matcher::glob("release/*").unwrap())],
        "t",
        &["write"],
        None,
    ));
    rules.push(allow(
        "pair",
        vec![(
            "/ctx/repo",
            Matcher::any_of(vec![exact("{r7}"), exact("{r8}"), exact("{r7}")]).unwrap(),
        )],
        "t",
        &["admin"],
        Some(60),
    ));
    rules.push(deny("frozen", vec![("repo", exact("{r9}"))], &["t"]));
    let p = Policy::new(rules);

    let c = claims(json!({"repo": "{r7}", "branch": "release/2", "ctx": {"repo": "{r7}"}}));
    let a = p.decide("bb", &c, LIMITS, req("t", &[], None)).unwrap();
    assert_eq!(a.rule, "repo7,release,pair", "configuration order");
    assert_eq!(a.scopes, ["admin", "read", "write"]);
    assert_eq!(a.max_ttl, Duration::from_secs(60));

    let c = claims(json!({"repo": "{r999}", "branch": "main"}));
    assert_eq!(
        p.decide("bb", &c, LIMITS, req("t", &[], None))
            .unwrap()
            .rule,
        "repo999"
    );

    let c = claims(json!({"repo": "{r9}", "branch": "main"}));
    assert_eq!(
        p.decide("bb", &c, LIMITS, req("t", &[], None)),
        Err(Denied::DenyRule {
            rule: "frozen".into()
        })
    );

    // No rule holds: the hint is still the first rule's first failing clause.
    let c = claims(json!({"repo": "{nope}", "branch": "main"}));
    let d = p.decide("bb", &c, LIMITS, req("t", &[], None));
    assert_eq!(d, p.explain("bb", &c, LIMITS, req("t", &[], None)).decision);
    match d {
        Err(Denied::NoRuleMatched { hint: Some(h), .. }) => {
            assert!(h.starts_with("rule repo0: claim repo"), "{h}")
        }
        other => panic!("{other:?}"),
    }
    // A non-string value under an indexed claim matches nothing.
    let c = claims(json!({"repo": 7, "branch": "release/1"}));
    assert_eq!(
        p.decide("bb", &c, LIMITS, req("t", &[], None))
            .unwrap()
            .rule,
        "release"
    );
}
