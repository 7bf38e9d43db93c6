//! The crate's layering, checked: every `crate::` path in `src/` is read and each module's
//! imports must point down (or sideways without a cycle), and only the assembling layer
//! (`server`, `cli`, `main`) may import `config`. `cargo test` runs it, so an import that
//! runs back up or closes a cycle fails the build's tests. CONTRIBUTING.md explains the
//! layers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each node and its layer: lower layers never import higher ones.
const LAYERS: &[(&str, u8)] = &[
    // base
    ("secret", 0),
    ("clock", 0),
    ("jose", 0),
    ("ratelimit", 0),
    ("metrics", 0),
    ("telemetry", 0),
    ("net", 0),
    ("pgtls", 0),
    ("devissuer", 1),
    // models
    ("identity", 1),
    ("policy", 1),
    ("audit", 1),
    ("lease", 1),
    ("keys", 1),
    ("rotation", 1),
    // the store's ports, then its adapters
    ("store", 2),
    ("store::sqlite", 3),
    ("store::backend", 4),
    // target kinds, services, the assembler, the edge, the starters
    ("mint", 5),
    ("broker", 6),
    ("config", 7),
    ("transport", 8),
    ("server", 9),
    ("cli", 10),
    ("main", 11),
];

/// Which may import `config`.
const ASSEMBLERS: &[&str] = &["server", "cli", "main"];

fn layer(node: &str) -> u8 {
    LAYERS
        .iter()
        .find(|(n, _)| *n == node)
        .map(|(_, l)| *l)
        .unwrap_or_else(|| panic!("module {node} has no layer: add it to LAYERS"))
}

/// The node a source file belongs to.
fn node_of(rel: &Path) -> String {
    let parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    match parts.as_slice() {
        [one] if one == "lib" || one == "layering" => String::new(),
        [one] => one.clone(),
        [store, sub, ..] if store == "store" && (sub == "sqlite" || sub == "backend") => {
            format!("store::{sub}")
        }
        [top, ..] => top.clone(),
        [] => String::new(),
    }
}

/// A node named by a path after `crate::`.
fn target_of(path: &str) -> String {
    let mut it = path.split("::");
    let top = it.next().unwrap_or_default();
    match (top, it.next()) {
        ("store", Some(sub @ ("sqlite" | "backend"))) => format!("store::{sub}"),
        _ => top.to_string(),
    }
}

/// The code of a line: without its comment and the contents of its string literals.
fn code_of(line: &str) -> String {
    let mut out = String::new();
    let mut in_str = false;
    let mut prev = ' ';
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if in_str {
            if c == '"' && prev != '\\' {
                in_str = false;
                out.push('"');
            }
            prev = if prev == '\\' && c == '\\' { ' ' } else { c };
            continue;
        }
        match c {
            '"' => {
                in_str = true;
                out.push('"');
            }
            '/' if chars.peek() == Some(&'/') => break,
            _ => out.push(c),
        }
        prev = c;
    }
    out
}

/// Every module path a line's code names through `crate::` (`use crate::a::{b, c}`
/// names `a`; `crate::{a, b}` names both).
fn crate_paths(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        let after = &rest[i + "crate::".len()..];
        rest = after;
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = after.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let item = item.trim();
                if !item.is_empty() {
                    found.push(item.to_string());
                }
            }
            continue;
        }
        let end = after
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(after.len());
        found.push(after[..end].to_string());
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Node → the nodes it imports, with one place each edge is made.
fn edges() -> BTreeMap<String, BTreeMap<String, String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let from = node_of(rel);
        if from.is_empty() {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = code_of(line);
            let mut paths: Vec<String> = crate_paths(&code);
            // The binary names the library by its crate name.
            if from == "main" {
                paths.extend(crate_paths(&code.replace("latchkey::", "crate::")));
            }
            // The port must not know an adapter, even by a relative path.
            if from == "store" && code.contains("sqlite::") {
                paths.push("store::sqlite".into());
            }
            for p in paths {
                let to = target_of(&p);
                if to.is_empty() || to == from || to == "self" {
                    continue;
                }
                edges
                    .entry(from.clone())
                    .or_default()
                    .entry(to)
                    .or_insert_with(|| format!("{}:{}", rel.display(), n + 1));
            }
        }
    }
    edges
}

#[test]
fn imports_point_down_and_only_the_assemblers_import_config() {
    let mut wrong = Vec::new();
    for (from, tos) in edges() {
        for (to, at) in tos {
            if to == "config" && !ASSEMBLERS.contains(&from.as_str()) {
                wrong.push(format!("{from} imports config ({at})"));
            } else if layer(&to) > layer(&from) {
                wrong.push(format!("{from} imports {to}, a layer above it ({at})"));
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

#[test]
fn no_import_cycles() {
    let edges = edges();
    let nodes: BTreeSet<&String> = edges.keys().collect();
    // Depth-first search for a back edge.
    fn visit<'a>(
        n: &'a str,
        edges: &'a BTreeMap<String, BTreeMap<String, String>>,
        stack: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| *s == n) {
            let mut cycle: Vec<String> = stack[i..].iter().map(|s| s.to_string()).collect();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n);
        for to in edges.get(n).into_iter().flat_map(|m| m.keys()) {
            if let Some(c) = visit(to, edges, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n);
        None
    }
    let mut done = BTreeSet::new();
    for n in nodes {
        if let Some(cycle) = visit(n, &edges, &mut Vec::new(), &mut done) {
            let at: Vec<String> = cycle
                .windows(2)
                .map(|w| format!("{} -> {} ({})", w[0], w[1], edges[&w[0]][&w[1]]))
                .collect();
            panic!("import cycle:\n{}", at.join("\n"));
        }
    }
}

#[test]
fn the_scanner_reads_paths_groups_and_skips_comments_and_strings() {
    assert_eq!(
        crate_paths(&code_of(
            "use crate::store::{Store, StoreError}; // crate::server"
        )),
        ["store::"]
    );
    assert_eq!(
        crate_paths(&code_of("use crate::{audit, lease::X};")),
        ["audit", "lease::X"]
    );
    assert_eq!(
        crate_paths(&code_of(
            r#"let s = "crate::server"; f(crate::mint::build)"#
        )),
        ["mint::build"]
    );
    assert!(crate_paths(&code_of("mycrate::server::X")).is_empty());
    assert_eq!(target_of("store::sqlite::SqliteStore"), "store::sqlite");
    assert_eq!(target_of("store::Store"), "store");
    assert_eq!(node_of(Path::new("store/sqlite/audit.rs")), "store::sqlite");
    assert_eq!(node_of(Path::new("broker/mod.rs")), "broker");
    assert_eq!(node_of(Path::new("server.rs")), "server");
}
