#!/usr/bin/env bash
# All checks and tests: formatting, lints, Rust tests, the C library's
# tests, the Python package's checks and tests, and — with
# CC_RUN_VM_TESTS=1 — the VM tests, which boot real VMs. Without it the VM
# tests are reported skipped, not passed. Ends with one summary line
# counting every test:
#   total: N passed, M failed, K skipped
# A failing test suite does not stop the next one, so the summary counts
# them all; the script then exits non-zero. Formatting, lint and build
# errors stop it at once.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-$PWD/target}"

echo "==> cargo fmt --check"
cargo fmt --all --check
echo "==> cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
failed=()

# The VM and CLI tests read CC_RUN_VM_TESTS themselves. The C library's VM
# test is a plain #[ignore] test (libtest cannot ignore at run time), so it
# runs only when ignored tests are asked for.
test_args=()
if [ "${CC_RUN_VM_TESTS:-}" = 1 ]; then
    test_args=(--include-ignored)
fi
echo "==> cargo test"
cargo test --locked --workspace --no-fail-fast -- "${test_args[@]}" 2>&1 | tee "$log" ||
    failed+=("cargo test")

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
)
(cd python && "$venv/bin/pytest" -q) 2>&1 | tee -a "$log" || failed+=(pytest)

# The self-contained wheel, from the release builds above, installed and
# used as a new user would (scripts/check-wheel.sh): it boots VMs.
if [ "${CC_RUN_VM_TESTS:-}" = 1 ]; then
    echo "==> wheel: build and check"
    if scripts/build-wheel.sh >/dev/null; then
        scripts/check-wheel.sh 2>&1 | tee -a "$log" || failed+=(wheel)
    else
        echo "wheel: 0 passed, 1 failed" | tee -a "$log"
        failed+=("wheel build")
    fi
else
    echo "==> wheel: not built (its check boots VMs: CC_RUN_VM_TESTS=1)"
fi

if [ ${#failed[@]} -gt 0 ]; then
    echo
    echo "failed: ${failed[*]}"
fi
# libtest and libtest-mimic end each binary with "test result: ok. N
# passed; M failed; K ignored; ...", pytest -q with "N passed, K skipped,
# M failed, E errors in Ts" (only the non-zero counts, in any order: "N
# passed in Ts" alone when all passed).
# scripts/check-wheel.sh ends with "wheel: N passed, M failed".
# Ignored and skipped are the same thing here: tests that did not run.
awk '/^test result:/ || /^wheel: [0-9]+ passed, [0-9]+ failed$/ || /^=* *[0-9]+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed|warnings?)([, ].*)? in [0-9.]+s/ {
        for (i = 2; i <= NF; i++) {
            word = $(i)
            sub(/[;,]$/, "", word)
            if (word == "passed") p += $(i-1)
            if (word == "failed" || word == "error" || word == "errors") f += $(i-1)
            if (word == "ignored" || word == "skipped") s += $(i-1)
        }
     }
     END { printf "\ntotal: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
[ ${#failed[@]} -eq 0 ] || exit 1
