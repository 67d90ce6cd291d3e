#!/usr/bin/env bash
# All checks and tests: formatting, lints, unit tests, and — with
# CC_RUN_VM_TESTS=1 — the VM tests, which boot real VMs.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> cargo fmt --check"
cargo fmt --all --check
echo "==> cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "==> cargo test"
cargo test --locked --workspace
