//! The code's shape holds: the workspace's crates depend on each other only inwards (from the
//! resolved graph `cargo metadata` reports, features as built), and no function on the request
//! path grows past 60 lines.

use std::collections::{BTreeSet, HashMap};
use std::process::Command;

use serde_json::Value;

/// For each crate, what must never be in its (normal, non-dev, non-build) dependency closure.
const FORBIDDEN: &[(&str, &[&str])] = &[
    // (tonic's own router is axum, so axum is not forbidden here.)
    (
        "sluicegate-proto",
        &[
            "sluicegate",
            "sluicegate-core",
            "sluicegate-client",
            "redis",
            "clap",
        ],
    ),
    (
        "sluicegate-core",
        &[
            "sluicegate",
            "sluicegate-proto",
            "sluicegate-client",
            "tonic",
            "axum",
            "clap",
            "metrics-exporter-prometheus",
        ],
    ),
    ("sluicegate", &["sluicegate-client"]),
    // The client's binaries too (the `cli` feature is on by default): they call sluicegate like
    // any other program, never link it.
    ("sluicegate-client", &["sluicegate"]),
];

fn metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

/// Every forbidden crate in a crate's normal dependency closure, as `crate -> ... -> forbidden`.
fn forbidden_edges(metadata: &Value) -> Vec<String> {
    let name_of: HashMap<&str, &str> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    // Normal edges only: dev-dependencies (tests start a real server) and build scripts are not
    // what a crate links.
    let mut normal: HashMap<&str, Vec<&str>> = HashMap::new();
    for node in metadata["resolve"]["nodes"].as_array().unwrap() {
        let deps = node["deps"].as_array().unwrap().iter().filter(|d| {
            d["dep_kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["kind"].is_null())
        });
        normal.insert(
            node["id"].as_str().unwrap(),
            deps.map(|d| d["pkg"].as_str().unwrap()).collect(),
        );
    }
    let id_of = |name: &str| {
        name_of
            .iter()
            .find(|(_, n)| **n == name)
            .map(|(id, _)| *id)
            .unwrap_or_else(|| panic!("{name} is not in the workspace"))
    };
    let mut found = Vec::new();
    for (krate, forbidden) in FORBIDDEN {
        // Breadth first from the crate, remembering the path to each package.
        let start = id_of(krate);
        let mut path_to: HashMap<&str, Vec<&str>> = HashMap::from([(start, vec![*krate])]);
        let mut queue = vec![start];
        while let Some(id) = queue.pop() {
            for &dep in normal.get(id).into_iter().flatten() {
                if path_to.contains_key(dep) {
                    continue;
                }
                let mut path = path_to[id].clone();
                path.push(name_of[dep]);
                if forbidden.contains(&name_of[dep]) {
                    found.push(path.join(" -> "));
                }
                path_to.insert(dep, path);
                queue.push(dep);
            }
        }
    }
    found
}

#[test]
fn crates_depend_only_inwards() {
    let found = forbidden_edges(&metadata());
    assert!(found.is_empty(), "forbidden dependencies: {found:#?}");
}

#[test]
fn a_forbidden_edge_is_caught() {
    // The same graph with the client linking the server, as it once did.
    let mut m = metadata();
    let id = |m: &Value, name: &str| {
        m["packages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| p["id"].clone())
            .unwrap()
    };
    let (client, server) = (id(&m, "sluicegate-client"), id(&m, "sluicegate"));
    let node = m["resolve"]["nodes"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|n| n["id"] == client)
        .unwrap();
    node["deps"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "name": "sluicegate", "pkg": server, "dep_kinds": [{ "kind": null, "target": null }]
        }));
    let found = forbidden_edges(&m);
    assert!(
        found.iter().any(|p| p == "sluicegate-client -> sluicegate"),
        "{found:?}"
    );
}

/// The files a decision passes through, in the server and the core.
const REQUEST_PATH: &[&str] = &[
    "src/api",
    "core/src/backend",
    "core/src/bucket.rs",
    "core/src/rules/matcher.rs",
    "src/server/limits.rs",
    "src/server/conn.rs",
];
const MAX_FN_LINES: usize = 60;

/// Functions longer than `max` lines (signature to closing brace, tests excluded), by name.
fn long_functions(source: &str, max: usize) -> Vec<(String, usize)> {
    let lines: Vec<&str> = source.lines().collect();
    let mut long = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if line.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        let trimmed = line.trim_start();
        let is_fn = [
            "fn ",
            "pub fn ",
            "async fn ",
            "pub async fn ",
            "pub(super) fn ",
            "pub(crate) fn ",
            "pub(super) async fn ",
            "pub(crate) async fn ",
        ]
        .iter()
        .any(|p| trimmed.starts_with(p));
        if !is_fn {
            i += 1;
            continue;
        }
        let indent = line.len() - trimmed.len();
        let name: String = trimmed
            .split("fn ")
            .nth(1)
            .unwrap_or("")
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        // The body opens on the first line ending in `{`; a declaration ends in `;`.
        let mut open = i;
        while open < lines.len() && !lines[open].trim_end().ends_with('{') {
            if lines[open].trim_end().ends_with(';') {
                break;
            }
            open += 1;
        }
        if open == lines.len() || lines[open].trim_end().ends_with(';') {
            i = open + 1;
            continue;
        }
        let close = (open + 1..lines.len())
            .find(|&k| {
                let l = lines[k];
                l.len() - l.trim_start().len() == indent && l.trim_start().starts_with('}')
            })
            .unwrap_or(lines.len() - 1);
        let n = close - i + 1;
        if n > max {
            long.push((name, n));
        }
        i = close + 1;
    }
    long
}

fn rust_files(path: &std::path::Path, out: &mut BTreeSet<std::path::PathBuf>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            rust_files(&entry.unwrap().path(), out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        out.insert(path.to_path_buf());
    }
}

#[test]
fn request_path_functions_are_short() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = BTreeSet::new();
    for p in REQUEST_PATH {
        rust_files(&root.join(p), &mut files);
    }
    assert!(files.len() >= 15, "the request path's files: {files:?}");
    let mut long = Vec::new();
    for f in &files {
        for (name, n) in long_functions(&std::fs::read_to_string(f).unwrap(), MAX_FN_LINES) {
            long.push(format!("{}: {name} ({n} lines)", f.display()));
        }
    }
    assert!(long.is_empty(), "over {MAX_FN_LINES} lines: {long:#?}");
}

#[test]
fn a_long_function_is_caught() {
    let body = "    let x = 1;\n".repeat(61);
    let source = format!(
        "fn short() {{\n}}\n\n    pub async fn long(\n        a: u8,\n    ) -> u8 {{\n{body}    }}\n"
    );
    assert_eq!(long_functions(&source, 60), vec![("long".to_string(), 65)]);
    assert!(long_functions(&source, 65).is_empty());
}
