#!/usr/bin/env bash
# Install the wheel as a new user would and use it: a fresh venv of the
# system's python3, a fresh HOME (so an empty cache and no data dir of the
# user's), PATH=/usr/bin:/bin (no cargo), no CC_* variable, `pip install
# --no-index dist/*.whl`; then, from Python, boot an instance of a local OCI
# image and run commands, and run the `crumble` the wheel put on PATH.
# Needs QEMU, and the busybox fixtures of the tests (built here if missing).
# Ends with one line: "wheel: N passed, M failed".
#
#   scripts/check-wheel.sh [WHEEL]   (default: the one in dist/)
set -uo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
wheel="${1:-$(ls "$here"/dist/crumblecracker-*.whl 2>/dev/null | tail -1)}"
[ -f "$wheel" ] || { echo "no wheel: run scripts/build-wheel.sh" >&2; exit 1; }
wheel=$(realpath "$wheel")
# Test fixtures, from the caller's cache: a root tree and an OCI layout.
rootfs=$("$here/scripts/make-busybox-rootfs.sh") || exit 1
layout=$("$here/scripts/make-test-images.py" --only busybox | awk '$1 == "busybox" { print $2 }') || exit 1

tmp=$(mktemp -d "${TMPDIR:-/tmp}/cc-check-wheel.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/home"
user=(env -i PATH=/usr/bin:/bin HOME="$tmp/home" LANG=C.UTF-8)
in_venv=(env -i PATH="$tmp/venv/bin:/usr/bin:/bin" HOME="$tmp/home" LANG=C.UTF-8)
passed=0
failed=0
check() { # NAME CMD...: runs CMD, output to the log, and counts it
    local name=$1
    shift
    if "$@" > "$tmp/out" 2>&1; then
        passed=$((passed + 1))
        echo "ok      $name"
    else
        failed=$((failed + 1))
        echo "FAILED  $name"
        sed 's/^/        /' "$tmp/out"
    fi
}

check "no cargo on the user's PATH" "${user[@]}" sh -c '! command -v cargo'
install() {
    "${user[@]}" python3 -m venv "$tmp/venv" &&
        "${user[@]}" "$tmp/venv/bin/pip" install --no-index --disable-pip-version-check \
            --quiet "$wheel"
}
check "pip install --no-index $(basename "$wheel")" install
check "python: boot a local OCI image and run commands" "${in_venv[@]}" python - "$layout" <<'PY'
import json
import sys
from pathlib import Path

import crumblecracker as cc

native = Path(cc.__file__).resolve().parent / "_native"
assert cc.library_path() == str(native / "lib" / "libcc.so"), cc.library_path()
cc.init()
caps = cc.query_capabilities()
want = json.loads((native / "share/crumblecracker/kernel.json").read_text())["hash"]
assert caps.kernel_hash == want, (caps.kernel_hash, want)
with cc.OCIClient() as client:
    source = client.load_dir(sys.argv[1])
    with cc.Instance(source) as inst:
        out = inst.command("uname", "-sr").output()
        assert out.startswith(b"Linux "), out
        inst.write_file("/tmp/x", b"from the wheel")
        assert inst.read_file("/tmp/x") == b"from the wheel"
print(caps.accelerator, caps.kernel_hash, out.decode().strip())
PY
check "crumble run --rootfs busybox -- true" "${in_venv[@]}" crumble run --rootfs "$rootfs" -- true
doctor() {
    "${in_venv[@]}" crumble doctor > "$tmp/doctor" || { cat "$tmp/doctor"; return 1; }
    cat "$tmp/doctor"
    grep -q "^kernel .*/crumblecracker/_native/share/crumblecracker/vmlinux (hash [0-9a-f]*)$" \
        "$tmp/doctor"
}
check "crumble doctor shows the bundled kernel and its hash" doctor
echo "wheel: $passed passed, $failed failed"
[ "$failed" = 0 ]
