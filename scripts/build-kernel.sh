#!/usr/bin/env bash
# Build the minimal guest kernel from kernel/microvm.config, with
# kernel/patches/*.patch applied, and cache it by content hash:
# $CACHE/kernel/<hash>/{vmlinux,config,kernel.json}, with
# $CACHE/kernel/current pointing at the newest build. A cached build is
# reused (seconds). This is a build cache: scripts/setup.sh and
# scripts/build-wheel.sh install the kernel from it, and instances boot the
# installed copy. kernel.json records the hash: {"hash": ..., "source": ...}.
#
#   CC_KERNEL_SRC   kernel source: a tree or a .tar.xz (default: Debian's
#                   /usr/src/linux-source-6.1.tar.xz). A tree is built as
#                   it is: the patches only save guest memory, and a tree
#                   is not ours to change.
#   CC_CACHE_DIR    cache root (default: ${XDG_CACHE_HOME:-~/.cache}/crumblecracker)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
config="$here/kernel/microvm.config"
cache="${CC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/crumblecracker}"
src="${CC_KERNEL_SRC:-/usr/src/linux-source-6.1.tar.xz}"

[ -e "$src" ] || { echo "kernel source not found: $src (apt-get install linux-source-6.1, or set CC_KERNEL_SRC)" >&2; exit 1; }

# The key covers the config and the exact source: a package version when the
# source is Debian's tarball, else the tarball's or tree's identity.
if [ -f "$src" ]; then
    src_id=$(dpkg-query -S "$src" >/dev/null 2>&1 && dpkg-query -W -f='${Package} ${Version}' "$(dpkg-query -S "$src" | cut -d: -f1)" || sha256sum "$src" | cut -d' ' -f1)
else
    src_id="$(realpath "$src") $(make -s -C "$src" kernelversion 2>/dev/null) $(git -C "$src" rev-parse HEAD 2>/dev/null || true)"
fi
patches=()
if [ -f "$src" ]; then
    for p in "$here"/kernel/patches/*.patch; do [ -e "$p" ] && patches+=("$p"); done
fi
hash=$( { cat "$config"; echo "$src_id"; [ ${#patches[@]} -eq 0 ] || cat "${patches[@]}"; } | sha256sum | cut -c1-16)
out="$cache/kernel/$hash"

# The hash and source as JSON (the source id escaped for a JSON string).
kernel_json() {
    printf '{"hash": "%s", "source": "%s"}\n' "$hash" "$(printf '%s' "$src_id" | sed 's/[\\"]/\\&/g')"
}

if [ -f "$out/vmlinux" ]; then
    # Builds cached before kernel.json existed get one.
    [ -f "$out/kernel.json" ] || kernel_json > "$out/kernel.json"
    ln -sfn "$hash" "$cache/kernel/current"
    echo "$out/vmlinux"
    exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/cc-kernel.XXXXXX")
trap 'rm -rf "$work"' EXIT
if [ -f "$src" ]; then
    echo "unpacking $src ..." >&2
    tar -xf "$src" -C "$work"
    tree=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -1)
    for p in "${patches[@]}"; do
        echo "applying $(basename "$p") ..." >&2
        patch -s -p1 -d "$tree" < "$p" >&2
    done
else
    echo "building the tree $src as it is, without kernel/patches" >&2
    tree="$src"
fi
build="$work/build"
mkdir -p "$build"
echo "configuring kernel ($hash) ..." >&2
make -s -C "$tree" O="$build" allnoconfig KCONFIG_ALLCONFIG="$config" >&2
# Every option we asked for must have survived Kconfig's dependency pass:
# a silently dropped option means a guest without a device we rely on.
missing=0
while IFS= read -r line; do
    case "$line" in CONFIG_*=*) ;; *) continue ;; esac
    grep -qx -- "$line" "$build/.config" || { echo "kernel option not applied: $line" >&2; missing=1; }
done < "$config"
[ "$missing" = 0 ] || exit 1
echo "building kernel with $(nproc) jobs (a few minutes, once) ..." >&2
make -s -C "$tree" O="$build" -j"$(nproc)" vmlinux >&2
mkdir -p "$out.tmp.$$"
strip --strip-debug -o "$out.tmp.$$/vmlinux" "$build/vmlinux"
cp "$config" "$out.tmp.$$/config"
echo "$src_id" > "$out.tmp.$$/source"
kernel_json > "$out.tmp.$$/kernel.json"
rm -rf "$out"
mv "$out.tmp.$$" "$out"
ln -sfn "$hash" "$cache/kernel/current"
echo "$out/vmlinux"
