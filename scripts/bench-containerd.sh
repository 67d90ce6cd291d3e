#!/usr/bin/env bash
# Container start through containerd against `crumble run` of the same
# busybox tree, in one invocation (issue 19: within 1.5x), plus a pod
# member's start in a running pod VM. Starts its own containerd (as the
# shim's tests do: own root, state and socket under a temp dir, no CRI),
# imports the test image, and prints the median wall time of each over
# N runs (default 7) and the ratio. Needs root, containerd, ctr, and
# scripts/setup.sh run (shim built: cargo build --release -p
# containerd-shim-crumble-v1).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
target="${CARGO_TARGET_DIR:-$here/target}"
runs="${1:-7}"
shim="$target/release/containerd-shim-crumble-v1"
crumble="$target/release/crumble"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/crumblecracker"
tree="$cache/trees/busybox"
image_tar="$cache/test-images/busybox-docker.tar"
for f in "$shim" "$crumble" "$tree" "$image_tar"; do
    [ -e "$f" ] || { echo "missing $f: run scripts/setup.sh and build the shim" >&2; exit 1; }
done

dir=$(mktemp -d /tmp/cc-bench-containerd.XXXXXX)
containerd_pid=""
cleanup() {
    if [ -n "$containerd_pid" ]; then
        ctr_ tasks ls -q 2>/dev/null | while read -r t; do
            ctr_ tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true
            ctr_ tasks delete "$t" >/dev/null 2>&1 || true
        done
        ctr_ containers ls -q 2>/dev/null | while read -r c; do
            ctr_ containers rm "$c" >/dev/null 2>&1 || true
        done
        kill "$containerd_pid" 2>/dev/null || true
        wait "$containerd_pid" 2>/dev/null || true
    fi
    # Snapshots are unmounted with their containers; anything left is
    # reported rather than removed through.
    if grep -q " $dir" /proc/self/mountinfo; then
        echo "mounts left under $dir" >&2
    else
        rm -rf "$dir"
    fi
}
trap cleanup EXIT
ctr_() { ctr -a "$dir/c.sock" -n bench "$@"; }

cat > "$dir/config.toml" <<EOF
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$dir/c.sock"
[ttrpc]
  address = "$dir/c.sock.ttrpc"
EOF
PATH="$(dirname "$shim"):$PATH" containerd --config "$dir/config.toml" > "$dir/containerd.log" 2>&1 &
containerd_pid=$!
for _ in $(seq 100); do ctr_ version >/dev/null 2>&1 && break; sleep 0.1; done
ctr_ images import "$image_tar" >/dev/null
image=$(ctr_ images ls -q | head -1)

now_ms() { date +%s%3N; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
runtime=io.containerd.crumble.v1
member=(--annotation io.kubernetes.cri.container-type=container
        --annotation io.kubernetes.cri.sandbox-id=benchpod)

# One warm-up of each: the image's erofs and the warm-start template are
# built once, as on any node after its first container.
"$crumble" run --rootfs "$tree" -- true
ctr_ run --runtime "$runtime" --rm "$image" warmup true
ctr_ run --runtime "$runtime" -d \
    --annotation io.kubernetes.cri.container-type=sandbox \
    --annotation io.kubernetes.cri.sandbox-id=benchpod "$image" benchpod sleep 3600
ctr_ run --runtime "$runtime" --rm "${member[@]}" "$image" memberwarm true

: > "$dir/crumble" ; : > "$dir/ctr" ; : > "$dir/member"
for i in $(seq "$runs"); do
    t=$(now_ms); "$crumble" run --rootfs "$tree" -- true; echo $(( $(now_ms) - t )) >> "$dir/crumble"
    t=$(now_ms); ctr_ run --runtime "$runtime" --rm "$image" "b$i" true; echo $(( $(now_ms) - t )) >> "$dir/ctr"
    t=$(now_ms); ctr_ run --runtime "$runtime" --rm "${member[@]}" "$image" "m$i" true
    echo $(( $(now_ms) - t )) >> "$dir/member"
done
crumble_ms=$(median < "$dir/crumble")
ctr_ms=$(median < "$dir/ctr")
member_ms=$(median < "$dir/member")
printf 'runs: %s (medians, wall ms)\n' "$runs"
printf 'crumble run --rootfs busybox -- true   %6s ms  (baseline)\n' "$crumble_ms"
printf 'ctr run (own VM) busybox true          %6s ms  %sx\n' "$ctr_ms" \
    "$(awk -v a="$ctr_ms" -v b="$crumble_ms" 'BEGIN {printf "%.2f", a/b}')"
printf 'ctr run (pod member, running VM) true  %6s ms  %sx\n' "$member_ms" \
    "$(awk -v a="$member_ms" -v b="$crumble_ms" 'BEGIN {printf "%.2f", a/b}')"
