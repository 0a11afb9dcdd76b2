//! The architecture's layering, checked on the workspace's manifests and sources (ARCHITECTURE.md,
//! "Invariants"): each crate depends only on what its layer may know, and only `api` (with the fake
//! upstream) spells OpenAI's wire format.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

fn crates_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The crate's normal dependencies (not dev-dependencies).
fn dependencies(krate: &str) -> Vec<String> {
    let text = std::fs::read_to_string(crates_dir().join(krate).join("Cargo.toml")).unwrap();
    let manifest: toml::Table = toml::from_str(&text).unwrap();
    manifest.get("dependencies").and_then(|d| d.as_table()).map(|d| d.keys().cloned().collect()).unwrap_or_default()
}

#[test]
fn each_layer_depends_only_on_what_it_may_know() {
    let http = ["axum", "hyper", "hyper-util", "reqwest", "tower", "tower-http"];
    let sql = ["sqlx", "ledger"];
    let candle = ["candle-core", "candle-nn", "candle-transformers", "engine", "kernels"];
    let json = ["serde", "serde_json"];
    let rules: [(&str, &str, Vec<&str>); 7] = [
        ("domain", "no serde, HTTP, SQL or candle", [&json[..], &http, &sql, &candle, &["tokio"]].concat()),
        ("api", "no SQL or candle", [&sql[..], &candle].concat()),
        ("pricing", "no HTTP, SQL or candle", [&http[..], &sql, &candle].concat()),
        ("ledger", "no HTTP, candle or prices", [&http[..], &candle, &["pricing", "api"]].concat()),
        ("providers", "no SQL", sql.to_vec()),
        ("engine", "no HTTP, SQL, prices or OpenAI", [&http[..], &sql, &["pricing", "api", "tokio"]].concat()),
        ("kernels", "no HTTP, SQL, async or models", [&http[..], &sql, &["tokio", "engine"]].concat()),
    ];
    for (krate, why, forbidden) in rules {
        let deps = dependencies(krate);
        assert!(!deps.is_empty() || krate == "domain", "{krate}: no dependencies read");
        for f in forbidden {
            assert!(!deps.iter().any(|d| d == f), "{krate} depends on {f}: {krate} knows {why}");
        }
    }
}

/// Names only code that reads or writes OpenAI's JSON needs.
const WIRE_NAMES: [&str; 6] = [
    "\"input_tokens_details\"",
    "\"output_tokens_details\"",
    "\"partial_image_index\"",
    "image_generation.completed",
    "image_edit.partial_image",
    "\"revised_prompt\"",
];

#[test]
fn only_api_spells_the_openai_wire_format() {
    let allowed = ["api", "fake-openai"];
    let mut offenders = Vec::new();
    for entry in std::fs::read_dir(crates_dir()).unwrap() {
        let dir = entry.unwrap().path();
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        if allowed.contains(&name.as_str()) || !dir.join("src").is_dir() {
            continue;
        }
        let mut stack = vec![dir.join("src")];
        while let Some(d) = stack.pop() {
            for f in std::fs::read_dir(&d).unwrap() {
                let p = f.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&p).unwrap();
                    for w in WIRE_NAMES {
                        if text.contains(w) {
                            offenders.push(format!("{} spells {w}", p.display()));
                        }
                    }
                }
            }
        }
    }
    assert!(offenders.is_empty(), "only the api crate may know OpenAI's JSON:\n{}", offenders.join("\n"));
}
