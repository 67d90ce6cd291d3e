#!/usr/bin/env bash
# One-command setup on a fresh Debian/Ubuntu machine: system packages, the
# `crumble` CLI, the static guest agent, the guest kernel (built once and
# cached by content hash) and the busybox test root filesystem.
# Idempotent: a second run checks everything and takes seconds.
#
# The agent and kernel are installed in the data dir beside the build,
# target/share/crumblecracker (CC_DATA_DIR overrides it), where
# target/release/crumble, target/release/libcc.so and the tests find them
# without any variable; the cache keeps only what can be rebuilt.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
target="${CARGO_TARGET_DIR:-$here/target}"
data="${CC_DATA_DIR:-$target/share/crumblecracker}"
step() { printf '\n==> %s\n' "$*" >&2; }

packages=(qemu-system-x86 qemu-utils e2fsprogs busybox-static cpio patch
          # QEMU's sandbox (namespaces)
          bubblewrap
          bison flex libelf-dev libssl-dev bc build-essential xz-utils bzip2
          # ISA-L (the layer inflater) is built from source by isal-sys
          nasm autoconf automake libtool
          # tests: a real registry, image tools, fsck.erofs for the erofs
          # images, the Debian test image, leak checks of the C library,
          # the Python package's venv
          docker-registry skopeo apache2-utils zstd debootstrap valgrind
          erofs-utils python3 python3-venv
          # the test registry's token server signs with it
          openssl
          # the containerd shim's tests start their own containerd (the
          # package's service is a systemd unit: nothing starts it here)
          containerd)
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
installed() { dpkg -s "$1" >/dev/null 2>&1; }

# Debian 12 ships the 6.1 kernel source the config is written for; elsewhere
# take the distribution's kernel source unless CC_KERNEL_SRC names one.
want_kernel_src=""
if [ -z "${CC_KERNEL_SRC:-}" ] && ! installed linux-source-6.1 && ! ls /usr/src/linux-source-*.tar.* >/dev/null 2>&1; then
    want_kernel_src=yes
fi
missing=()
for p in "${packages[@]}"; do
    installed "$p" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ] || [ -n "$want_kernel_src" ]; then
    step "installing system packages"
    $sudo apt-get update -qq
    if [ -n "$want_kernel_src" ]; then
        if apt-cache show linux-source-6.1 >/dev/null 2>&1; then missing+=(linux-source-6.1); else missing+=(linux-source); fi
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust from https://rustup.rs" >&2; exit 1; }

if [ -z "${CC_KERNEL_SRC:-}" ] && [ ! -e /usr/src/linux-source-6.1.tar.xz ]; then
    CC_KERNEL_SRC=$(ls -1 /usr/src/linux-source-*.tar.* 2>/dev/null | sort -V | tail -1)
    export CC_KERNEL_SRC
fi

step "building crumble"
cargo build --release --locked -p crumble --manifest-path "$here/Cargo.toml" >&2

step "building the static guest agent"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked -p cc-agent \
    --target x86_64-unknown-linux-gnu --manifest-path "$here/Cargo.toml" >&2
mkdir -p "$data"
# Copies a file into the data dir unless it is there already (atomically,
# so a running instance never sees half a file).
install_data() { # SRC NAME
    cmp -s "$1" "$data/$2" && return 0
    cp "$1" "$data/.$2.$$"
    mv "$data/.$2.$$" "$data/$2"
}
# Stripped: every boot loads it from the initramfs (6.7 MB → 1.6 MB).
strip -o "$data/.cc-agent.stripped.$$" "$target/x86_64-unknown-linux-gnu/release/cc-agent"
install_data "$data/.cc-agent.stripped.$$" cc-agent
rm "$data/.cc-agent.stripped.$$"

step "guest kernel"
# Built in the build cache, keyed by content hash; installed from there.
kernel=$("$here/scripts/build-kernel.sh")
for f in vmlinux config kernel.json; do
    install_data "$(dirname "$kernel")/$f" "$f"
done

step "busybox test root filesystem"
rootfs=$("$here/scripts/make-busybox-rootfs.sh")

cat >&2 <<MSG

Ready. Kernel and agent installed in $data. Try:
  $target/release/crumble run --rootfs $rootfs -- uname -a
  $target/release/crumble doctor
MSG
