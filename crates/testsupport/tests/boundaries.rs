//! The crate boundaries ARCHITECTURE.md draws, checked: a crate that gains
//! a dependency its "must not" column forbids fails here, naming it.

use std::collections::BTreeMap;
use std::process::Command;

/// Each workspace crate and the workspace crates it may depend on (normal
/// and build dependencies; tests may use more).
const ALLOWED: &[(&str, &[&str])] = &[
    // Cancellation is a leaf every layer that blocks may use.
    ("cc-cancel", &[]),
    ("cc-protocol", &["cc-cancel"]),
    ("cc-erofs", &[]),
    ("cc-netpolicy", &[]),
    ("cc-testsupport", &[]),
    // The guest knows the wire format and nothing of the host.
    ("cc-agent", &["cc-protocol"]),
    // The engine never speaks the agent protocol.
    ("cc-engine", &["cc-netpolicy"]),
    ("cc-image", &["cc-erofs", "cc-cancel"]),
    (
        "crumblecracker",
        &[
            "cc-protocol",
            "cc-engine",
            "cc-image",
            "cc-netpolicy",
            "cc-cancel",
        ],
    ),
    // The containerd shim is a client of the core like the CLI.
    ("containerd-shim-crumble-v1", &["crumblecracker"]),
    // The C ABI maps the core 1:1.
    ("cc-capi", &["crumblecracker"]),
    // The engine only for the benchmark's bare-QEMU baseline.
    ("crumble", &["crumblecracker", "cc-engine"]),
];

/// `cargo metadata`'s packages: name → (dependency, kind) for workspace
/// dependencies.
fn workspace_deps() -> BTreeMap<String, Vec<(String, String)>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = meta["packages"].as_array().unwrap();
    let ours: Vec<&str> = packages
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    packages
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| ours.contains(&d["name"].as_str().unwrap()))
                .map(|d| {
                    let kind = d["kind"].as_str().unwrap_or("normal").to_string();
                    (d["name"].as_str().unwrap().to_string(), kind)
                })
                .collect();
            (p["name"].as_str().unwrap().to_string(), deps)
        })
        .collect()
}

#[test]
fn every_crate_depends_only_on_what_its_layer_allows() {
    let deps = workspace_deps();
    let mut wrong = Vec::new();
    for (krate, list) in &deps {
        let allowed = ALLOWED
            .iter()
            .find(|(name, _)| name == krate)
            .unwrap_or_else(|| panic!("{krate} is not in ALLOWED: add its layer"))
            .1;
        for (dep, kind) in list {
            if kind != "dev" && !allowed.contains(&dep.as_str()) {
                wrong.push(format!("{krate} -> {dep}"));
            }
        }
    }
    assert!(wrong.is_empty(), "forbidden dependencies: {wrong:?}");
    for (name, _) in ALLOWED {
        assert!(
            deps.contains_key(*name),
            "{name} is no longer a workspace crate"
        );
    }
}

#[test]
fn test_support_is_only_ever_a_dev_dependency() {
    for (krate, list) in workspace_deps() {
        for (dep, kind) in list {
            assert!(
                dep != "cc-testsupport" || kind == "dev",
                "{krate} ships cc-testsupport as a {kind} dependency"
            );
        }
    }
}
