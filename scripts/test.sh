#!/usr/bin/env bash
# All checks and tests: formatting, lints, unit tests, and — with
# CC_RUN_VM_TESTS=1 — the VM tests, which boot real VMs. Ends with one
# summary line counting every test run.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> cargo fmt --check"
cargo fmt --all --check
echo "==> cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "==> cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --locked --workspace 2>&1 | tee "$log"
# libtest prints "test result: ok. N passed; M failed; ..."; the VM test
# runner prints "vm: N passed, M failed".
awk '/^test result:|^vm: [0-9]+ passed/ {
        for (i = 1; i <= NF; i++) {
            if ($(i) ~ /^passed[;,]?$/) p += $(i-1)
            if ($(i) ~ /^failed[;,]?$/) f += $(i-1)
        }
     }
     END { printf "\nall tests: %d passed, %d failed\n", p, f }' "$log"
