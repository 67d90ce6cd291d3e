#!/usr/bin/env bash
# Build a small root filesystem tree from Debian's busybox-static package:
# busybox with every applet linked, a root and two test users, the usual
# top-level directories, and `cc-netbench` (scripts/cc-netbench.c, static),
# the guest end of `crumble bench net`. Prints the tree's path.
#
#   scripts/make-busybox-rootfs.sh [OUT]   (default: $CACHE/trees/busybox)
set -euo pipefail

cache="${CC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/crumblecracker}"
out="${1:-$cache/trees/busybox}"
busybox=$(dpkg -L busybox-static 2>/dev/null | grep -m1 '/bin/busybox$' || true)
[ -n "$busybox" ] && [ -x "$busybox" ] || { echo "busybox-static is not installed (apt-get install busybox-static)" >&2; exit 1; }

netbench_src="$(dirname "$0")/cc-netbench.c"
stamp="$(dpkg-query -W -f='${Version}' busybox-static) $(cat "$0" "$netbench_src" | sha256sum | cut -c1-16)"
if [ -f "$out/.cc-stamp" ] && [ "$(cat "$out/.cc-stamp")" = "$stamp" ]; then
    echo "$out"
    exit 0
fi

tmp="$out.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"/{bin,sbin,usr/bin,usr/sbin,etc,root,home/alice,tmp,proc,sys,dev,run,var/tmp}
cp "$busybox" "$tmp/bin/busybox"
for applet in $("$busybox" --list-full); do
    [ "$applet" = bin/busybox ] && continue
    mkdir -p "$tmp/$(dirname "$applet")"
    ln -sf /bin/busybox "$tmp/$applet"
done
${CC:-cc} -static -O2 -s -o "$tmp/usr/bin/cc-netbench" "$netbench_src"
cat > "$tmp/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
alice:x:1000:1000:Alice:/home/alice:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat > "$tmp/etc/group" <<'GROUP'
root:x:0:
staff:x:50:alice
alice:x:1000:
nogroup:x:65534:
GROUP
chown 1000:1000 "$tmp/home/alice" 2>/dev/null || true
chmod 1777 "$tmp/tmp" "$tmp/var/tmp"
chmod 700 "$tmp/root"
echo "$stamp" > "$tmp/.cc-stamp"
rm -rf "$out"
mkdir -p "$(dirname "$out")"
mv "$tmp" "$out"
echo "$out"
