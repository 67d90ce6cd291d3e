#!/usr/bin/env bash
# All checks and tests: formatting, lints, Rust tests, the C library's
# tests, the Python package's checks and tests, and — with
# CC_RUN_VM_TESTS=1 — the VM tests, which boot real VMs. Ends with one
# summary line counting every test run.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-$PWD/target}"

echo "==> cargo fmt --check"
cargo fmt --all --check
echo "==> cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "==> cargo test"
cargo test --locked --workspace 2>&1 | tee "$log"

echo "==> python: mypy, ruff, pytest"
cargo build --locked --release -p cc-capi
venv="$target/py-venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -e "./python[dev]"
export LIBCC_PATH="$target/release/libcc.so"
(
    cd python
    "$venv/bin/mypy" --strict src/crumblecracker
    "$venv/bin/ruff" check src tests examples
    "$venv/bin/pytest" -q
) 2>&1 | tee -a "$log"

# libtest prints "test result: ok. N passed; M failed; ...", the VM test
# runner "vm: N passed, M failed", pytest "N passed, M skipped in Ts".
awk '/^test result:|^vm: [0-9]+ passed|[0-9]+ passed.* in [0-9.]+s/ {
        for (i = 1; i <= NF; i++) {
            if ($(i) ~ /^passed[;,]?$/) p += $(i-1)
            if ($(i) ~ /^failed[;,]?$/) f += $(i-1)
        }
     }
     END { printf "\ntotal: %d passed, %d failed\n", p, f }' "$log"
