#!/usr/bin/env python3
"""Build the OCI test images of crumblecracker (python3 standard library only).

Each image is an OCI image layout (oci-layout, index.json, blobs/sha256/...)
in its own directory under the output directory, built once and then reused
while its content key (this script, the input tree, the tools) is unchanged,
so a second run takes seconds. Prints one line per artefact on stdout:

    NAME PATH

Artefacts (``--only`` takes the names in the first column):

  busybox         layout; tag ``latest``: the busybox tree of
                  scripts/make-busybox-rootfs.sh in one gzip layer.
                  Also writes (and prints) its two archives:
  busybox-docker  busybox-docker.tar: classic ``docker save`` archive
                  (manifest.json, <config>.json, <id>/layer.tar, repositories).
  busybox-oci     busybox-oci.tar: the busybox layout as an OCI layout archive
                  (as ``skopeo copy oci-archive:`` / Docker 25+ ``docker save``).
  busybox-layers  layout; tag ``latest``: the same tree in three layers that
                  exercise whiteouts, opaque dirs, hard links, symlinks,
                  ownership, setuid, xattrs, a device node, zstd and an
                  uncompressed layer, and an Entrypoint/User/WorkingDir config.
  multiarch       layout; tag ``latest``: an image index with linux/amd64 (the
                  busybox image) and linux/arm64/v8 (one layer holding /ARCH).
  debian          layout; tag = the machine's release codename: a
                  ``debootstrap --variant=minbase`` tree in one gzip layer,
                  from the first mirror of the machine's apt configuration.
                  Slow the first time (minutes); progress goes to stderr.

Layers are deterministic tars: depth-first with sorted names, numeric owners
and modes as on disk, user names empty, mtimes clamped to SOURCE_DATE_EPOCH
(default 2024-01-01), gzip with mtime 0 and no file name.

Usage: make-test-images.py [--out DIR] [--only NAME[,NAME...]] [--force]
Default DIR: ${CC_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/crumblecracker}/test-images
Environment: CC_DEBIAN_MIRROR overrides the mirror read from apt's sources.
"""

import argparse
import contextlib
import fcntl
import glob
import gzip
import hashlib
import inspect
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time

SCRIPT = os.path.abspath(__file__)
HERE = os.path.dirname(SCRIPT)
EPOCH = int(os.environ.get("SOURCE_DATE_EPOCH", "1704067200"))  # 2024-01-01T00:00:00Z
CREATED = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(EPOCH))
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
REF_NAME = "org.opencontainers.image.ref.name"

ALL = ["busybox", "busybox-docker", "busybox-oci", "busybox-layers", "multiarch", "debian"]


def log(msg):
    print(f"make-test-images: {msg}", file=sys.stderr, flush=True)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def key_of(*parts):
    return hashlib.sha256("\0".join(str(p) for p in parts).encode()).hexdigest()


def source_hash(*funcs):
    """Hash of the source of some functions of this script (narrower than the whole file)."""
    return key_of(*(inspect.getsource(f) for f in funcs))


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def cache_dir():
    if os.environ.get("CC_CACHE_DIR"):
        return os.environ["CC_CACHE_DIR"]
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "crumblecracker")


@contextlib.contextmanager
def file_lock(path):
    """An exclusive flock on PATH, so concurrent runs (parallel test binaries) serialize."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def rm_tree(path):
    """Remove PATH, first unmounting anything mounted below it (a failed debootstrap leaves /proc)."""
    if not os.path.lexists(path):
        return
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1].replace("\\040", " ") for line in f]
    except OSError:
        mounts = []
    for m in sorted((m for m in mounts if m == real or m.startswith(real + "/")), reverse=True):
        subprocess.run(["umount", "-l", m], check=False)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


# ----------------------------------------------------------------------------
# Deterministic tars


class HashingWriter:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, f):
        self.f = f
        self.h = hashlib.sha256()
        self.n = 0

    def write(self, b):
        self.h.update(b)
        self.n += len(b)
        self.f.write(b)
        return len(b)

    def tell(self):
        return self.n

    def flush(self):
        self.f.flush()

    def digest(self):
        return "sha256:" + self.h.hexdigest()


def sort_key(arcname):
    # Depth-first order: a directory before its contents, siblings by name.
    return arcname.split("/")


XATTR_SKIP = ("security.selinux", "system.")


def tarinfo_from_disk(path, arcname, hardlinks):
    """A TarInfo for PATH as it is on disk (None for sockets), hard links folded."""
    st = os.lstat(path)
    ti = tarfile.TarInfo(arcname)
    ti.mode = stat.S_IMODE(st.st_mode)
    ti.uid, ti.gid = st.st_uid, st.st_gid
    ti.uname = ti.gname = ""
    ti.mtime = min(int(st.st_mtime), EPOCH)
    m = st.st_mode
    if stat.S_ISREG(m):
        ino = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and ino in hardlinks:
            ti.type = tarfile.LNKTYPE
            ti.linkname = hardlinks[ino]
            ti.size = 0
        else:
            if st.st_nlink > 1:
                hardlinks[ino] = arcname
            ti.type = tarfile.REGTYPE
            ti.size = st.st_size
    elif stat.S_ISDIR(m):
        ti.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(m):
        ti.type = tarfile.SYMTYPE
        ti.linkname = os.readlink(path)
    elif stat.S_ISCHR(m) or stat.S_ISBLK(m):
        ti.type = tarfile.CHRTYPE if stat.S_ISCHR(m) else tarfile.BLKTYPE
        ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif stat.S_ISFIFO(m):
        ti.type = tarfile.FIFOTYPE
    else:
        log(f"skipping {arcname}: not representable in a tar (socket?)")
        return None
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        names = []
    for name in sorted(names):
        if name.startswith(XATTR_SKIP):
            continue
        value = os.getxattr(path, name, follow_symlinks=False)
        ti.pax_headers["SCHILY.xattr." + name] = value.decode("utf-8", "surrogateescape")
    return ti


def tree_members(root, exclude=()):
    """(arcname, path) of everything below ROOT, except the top-level names in EXCLUDE."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        rel = "" if rel == "." else rel + "/"
        if not rel:
            dirnames[:] = [d for d in dirnames if d not in exclude]
            filenames = [f for f in filenames if f not in exclude]
        for name in dirnames + filenames:
            out.append((rel + name, os.path.join(dirpath, name)))
    return out


def write_tar(fileobj, members):
    """Write a deterministic PAX tar of MEMBERS: (arcname, SRC) where SRC is a path on
    disk, a ready TarInfo without data, or a (TarInfo, bytes | content path) pair."""
    hardlinks = {}
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for arcname, src in sorted(members, key=lambda m: sort_key(m[0])):
            if isinstance(src, tarfile.TarInfo):
                tar.addfile(src)
            elif isinstance(src, tuple) and isinstance(src[1], bytes):
                ti, data = src
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
            elif isinstance(src, tuple):
                ti, path = src
                ti.size = os.path.getsize(path)
                with open(path, "rb") as f:
                    tar.addfile(ti, f)
            else:
                ti = tarinfo_from_disk(src, arcname, hardlinks)
                if ti is None:
                    continue
                if ti.type == tarfile.REGTYPE:
                    with open(src, "rb") as f:
                        tar.addfile(ti, f)
                else:
                    tar.addfile(ti)


def synthetic(name, type=tarfile.REGTYPE, mode=0o644, uid=0, gid=0, **attrs):
    """A TarInfo for an entry that exists only in the tar."""
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = type, mode, uid, gid, EPOCH
    ti.uname = ti.gname = ""
    for k, v in attrs.items():
        setattr(ti, k, v)
    return ti


# ----------------------------------------------------------------------------
# OCI layouts


class Layout:
    """An OCI image layout being written into DIR."""

    def __init__(self, path):
        self.path = path
        self.blobs = os.path.join(path, "blobs", "sha256")
        os.makedirs(self.blobs, exist_ok=True)

    def blob_path(self, digest):
        return os.path.join(self.blobs, digest.split(":", 1)[1])

    def _tmp(self):
        fd, tmp = tempfile.mkstemp(dir=self.blobs, prefix=".tmp-")
        os.close(fd)
        return tmp

    def _commit(self, tmp, digest):
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.blob_path(digest))

    def add_bytes(self, data, media_type):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        tmp = self._tmp()
        with open(tmp, "wb") as f:
            f.write(data)
        self._commit(tmp, digest)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def add_json(self, obj, media_type):
        return self.add_bytes(canonical_json(obj), media_type)

    def import_blob(self, other, desc):
        """Copy DESC's blob from layout OTHER."""
        src, dst = other.blob_path(desc["digest"]), self.blob_path(desc["digest"])
        if os.path.exists(dst):
            return dict(desc)
        # A copy, not a hard link: a test that corrupts one layout must not corrupt another.
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o644)
        return dict(desc)

    def add_layer(self, members, compression):
        """Write a layer blob; returns (descriptor, diff_id)."""
        tmp = self._tmp()
        if compression == "gzip":
            with open(tmp, "wb") as raw:
                blob = HashingWriter(raw)
                with gzip.GzipFile(filename="", mode="wb", fileobj=blob, mtime=0, compresslevel=6) as gz:
                    tar = HashingWriter(gz)
                    write_tar(tar, members)
            media_type, digest, size, diff_id = MT_LAYER_GZIP, blob.digest(), blob.n, tar.digest()
        elif compression == "zstd":
            plain = self._tmp()
            with open(plain, "wb") as raw:
                tar = HashingWriter(raw)
                write_tar(tar, members)
            subprocess.run(["zstd", "-q", "-f", "-T1", "-3", "--no-progress", plain, "-o", tmp], check=True)
            os.unlink(plain)
            media_type, digest, size, diff_id = MT_LAYER_ZSTD, "sha256:" + sha256_file(tmp), os.path.getsize(tmp), tar.digest()
        elif compression == "none":
            with open(tmp, "wb") as raw:
                tar = HashingWriter(raw)
                write_tar(tar, members)
            media_type, digest, size, diff_id = MT_LAYER_TAR, tar.digest(), tar.n, tar.digest()
        else:
            raise ValueError(compression)
        self._commit(tmp, digest)
        return {"mediaType": media_type, "digest": digest, "size": size}, diff_id

    def add_image(self, layers, config):
        """Write CONFIG (rootfs filled in from LAYERS) and a manifest; returns the manifest descriptor."""
        config = dict(config)
        config["rootfs"] = {"type": "layers", "diff_ids": [diff_id for _, diff_id in layers]}
        cfg = self.add_json(config, MT_CONFIG)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": cfg,
            "layers": [desc for desc, _ in layers],
        }
        return self.add_json(manifest, MT_MANIFEST)

    def finish(self, desc, tag):
        """Write oci-layout and an index.json naming DESC as TAG."""
        entry = dict(desc)
        entry["annotations"] = {REF_NAME: tag}
        index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [entry]}
        with open(os.path.join(self.path, "index.json"), "wb") as f:
            f.write(canonical_json(index))
        with open(os.path.join(self.path, "oci-layout"), "wb") as f:
            f.write(canonical_json({"imageLayoutVersion": "1.0.0"}))

    def read_json(self, digest):
        with open(self.blob_path(digest), "rb") as f:
            return json.load(f)

    def top(self):
        with open(os.path.join(self.path, "index.json"), "rb") as f:
            return json.load(f)["manifests"][0]


class Builder:
    """Builds artefacts into OUT, each reused while its key is unchanged."""

    def __init__(self, out, force):
        self.out = out
        self.force = force
        self.keys = os.path.join(out, ".keys")
        os.makedirs(self.keys, exist_ok=True)
        self.script_hash = sha256_file(SCRIPT)
        self._busybox = None

    def cached(self, name, key, build, check=None):
        """Return OUT/NAME, (re)built by BUILD(tmp_path) unless its key file says KEY."""
        path = os.path.join(self.out, name)
        key_file = os.path.join(self.keys, name)
        ok = os.path.exists(path) and (check is None or check(path))
        if ok and not self.force and os.path.exists(key_file):
            with open(key_file) as f:
                if f.read().strip() == key:
                    return path
        tmp = os.path.join(self.out, f".{name}.tmp-{os.getpid()}")
        rm_tree(tmp)
        started = time.monotonic()
        log(f"building {name}")
        build(tmp)
        if os.path.exists(key_file):
            os.unlink(key_file)
        rm_tree(path)
        os.replace(tmp, path)
        with open(key_file, "w") as f:
            f.write(key + "\n")
        log(f"built {name} in {time.monotonic() - started:.1f}s")
        return path

    # -- busybox ---------------------------------------------------------------

    def busybox_tree(self):
        if self._busybox is None:
            res = subprocess.run([os.path.join(HERE, "make-busybox-rootfs.sh")], check=True,
                                 stdout=subprocess.PIPE, text=True)
            tree = res.stdout.strip().splitlines()[-1]
            with open(os.path.join(tree, ".cc-stamp")) as f:
                stamp = f.read().strip()
            self._busybox = (tree, key_of(self.script_hash, stamp, EPOCH))
        return self._busybox

    def busybox(self):
        tree, key = self.busybox_tree()

        def build(tmp):
            layout = Layout(tmp)
            layer = layout.add_layer(tree_members(tree, exclude={".cc-stamp"}), "gzip")
            config = {
                "created": CREATED,
                "architecture": "amd64",
                "os": "linux",
                "config": {
                    "Env": [PATH_ENV, "CC_IMAGE=busybox"],
                    "Cmd": ["sh"],
                    "WorkingDir": "/",
                    "Labels": {"org.example.test": "busybox"},
                },
                "history": [
                    {"created": CREATED, "created_by": "make-busybox-rootfs.sh", "comment": "busybox-static tree"},
                    {"created": CREATED, "created_by": 'CMD ["sh"]', "empty_layer": True},
                ],
            }
            layout.finish(layout.add_image([layer], config), "latest")

        return self.cached("busybox", key, build, check=layout_ok)

    def busybox_archives(self, layout_dir):
        _, key = self.busybox_tree()
        layout = Layout(layout_dir)
        docker = self.cached("busybox-docker.tar", key, lambda tmp: write_docker_archive(layout, tmp))
        oci = self.cached("busybox-oci.tar", key, lambda tmp: write_oci_archive(layout, tmp))
        return docker, oci

    # -- busybox-layers ----------------------------------------------------------

    def busybox_layers(self):
        tree, bkey = self.busybox_tree()
        zstd = subprocess.run(["zstd", "--version"], check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
        key = key_of(bkey, zstd)

        def build(tmp):
            stage = tmp + ".stage"
            rm_tree(stage)
            os.makedirs(stage)
            try:
                build_layers(Layout(tmp), tree, stage)
            finally:
                rm_tree(stage)

        return self.cached("busybox-layers", key, build, check=layout_ok)

    # -- multiarch ----------------------------------------------------------------

    def multiarch(self, busybox_dir):
        _, key = self.busybox_tree()

        def build(tmp):
            layout = Layout(tmp)
            src = Layout(busybox_dir)
            amd64 = src.top()
            amd64 = {k: amd64[k] for k in ("mediaType", "digest", "size")}
            manifest = src.read_json(amd64["digest"])
            for desc in [manifest["config"]] + manifest["layers"]:
                layout.import_blob(src, desc)
            layout.import_blob(src, amd64)
            layer = layout.add_layer([("ARCH", (synthetic("ARCH"), b"arm64"))], "gzip")
            config = {
                "created": CREATED,
                "architecture": "arm64",
                "variant": "v8",
                "os": "linux",
                "config": {"Env": [PATH_ENV, "CC_IMAGE=multiarch-arm64"], "Cmd": ["cat", "/ARCH"]},
                "history": [{"created": CREATED, "created_by": "make-test-images.py", "comment": "/ARCH only"}],
            }
            arm64 = layout.add_image([layer], config)
            index = {
                "schemaVersion": 2,
                "mediaType": MT_INDEX,
                "manifests": [
                    dict(amd64, platform={"architecture": "amd64", "os": "linux"}),
                    dict(arm64, platform={"architecture": "arm64", "os": "linux", "variant": "v8"}),
                ],
            }
            layout.finish(layout.add_json(index, MT_INDEX), "latest")

        return self.cached("multiarch", key, build, check=layout_ok)

    # -- debian -------------------------------------------------------------------

    def debian(self):
        codename = os_codename()
        mirror = os.environ.get("CC_DEBIAN_MIRROR") or apt_mirror(codename)
        tree, tree_key = debian_tree(codename, mirror)
        key = key_of(self.script_hash, tree_key, EPOCH)

        def build(tmp):
            layout = Layout(tmp)
            log(f"writing the debian layer from {tree}")
            layer = layout.add_layer(tree_members(tree), "gzip")
            config = {
                "created": CREATED,
                "architecture": "amd64",
                "os": "linux",
                "config": {"Env": [PATH_ENV], "Cmd": ["bash"]},
                "history": [
                    {"created": CREATED, "created_by": f"debootstrap --variant=minbase {codename} {mirror}"},
                    {"created": CREATED, "created_by": 'CMD ["bash"]', "empty_layer": True},
                ],
            }
            layout.finish(layout.add_image([layer], config), codename)

        return self.cached("debian", key, build, check=layout_ok)




def layout_ok(path):
    """Whether the layout at PATH is whole: every blob matches its name, the index's target exists."""
    try:
        blobs = os.path.join(path, "blobs", "sha256")
        for name in os.listdir(blobs):
            if sha256_file(os.path.join(blobs, name)) != name:
                log(f"{path}: blob {name} is corrupt; rebuilding")
                return False
        with open(os.path.join(path, "index.json"), "rb") as f:
            for desc in json.load(f)["manifests"]:
                if not os.path.exists(os.path.join(blobs, desc["digest"].split(":", 1)[1])):
                    return False
        return os.path.exists(os.path.join(path, "oci-layout"))
    except (OSError, ValueError, KeyError):
        return False


def write_file(path, data, mode=0o644):
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def make_dir(path, mode=0o755):
    os.makedirs(path, exist_ok=True)
    os.chmod(path, mode)


def build_layers(layout, tree, stage):
    """The three layers and config of busybox-layers, staged under STAGE."""
    # Layer 1 (gzip): the busybox tree plus /data fixtures that layer 2 changes.
    l1 = os.path.join(stage, "l1")
    subprocess.run(["cp", "-a", tree, l1], check=True)
    os.unlink(os.path.join(l1, ".cc-stamp"))
    data = os.path.join(l1, "data")
    make_dir(data)
    make_dir(os.path.join(data, "opaque"))
    write_file(os.path.join(data, "keep"), b"keep\n")
    write_file(os.path.join(data, "remove-me"), b"remove me\n")
    write_file(os.path.join(data, "opaque", "old-file"), b"old\n")
    write_file(os.path.join(data, "hardlink-a"), b"hard linked\n")
    os.link(os.path.join(data, "hardlink-a"), os.path.join(data, "hardlink-b"))
    os.symlink("keep", os.path.join(data, "symlink"))
    layer1 = layout.add_layer(tree_members(l1), "gzip")

    # Layer 2 (zstd): a whiteout, an opaque directory, ownership, setuid, an xattr, a device.
    l2 = os.path.join(stage, "l2")
    data = os.path.join(l2, "data")
    make_dir(l2)
    make_dir(data)
    make_dir(os.path.join(data, "opaque"))
    write_file(os.path.join(data, ".wh.remove-me"), b"")
    write_file(os.path.join(data, "opaque", ".wh..wh..opq"), b"")
    write_file(os.path.join(data, "opaque", "new-file"), b"new\n")
    owned = os.path.join(data, "owned")
    write_file(owned, b"owned by 1234:5678\n", 0o640)
    setuid = os.path.join(data, "setuid")
    write_file(setuid, b"#!/bin/sh\necho setuid\n")
    xattr = os.path.join(data, "xattr")
    write_file(xattr, b"has user.cc.test\n")
    members = tree_members(l2)
    try:
        os.chown(owned, 1234, 5678)
        os.chown(setuid, 0, 0)
    except PermissionError:
        members = [(a, s) for a, s in members if a not in ("data/owned", "data/setuid")]
        members.append(("data/owned", (synthetic("data/owned", mode=0o640, uid=1234, gid=5678), owned)))
        members.append(("data/setuid", (synthetic("data/setuid", mode=0o4755), setuid)))
    os.chmod(setuid, 0o4755)  # after chown, which clears setuid
    try:
        os.setxattr(xattr, "user.cc.test", b"hello")
    except OSError as e:
        log(f"cannot set user.cc.test on the staged file ({e}); writing the PAX header only")
        ti = synthetic("data/xattr")
        ti.pax_headers["SCHILY.xattr.user.cc.test"] = "hello"
        members = [(a, s) for a, s in members if a != "data/xattr"] + [("data/xattr", (ti, xattr))]
    members.append(("data/null", synthetic("data/null", tarfile.CHRTYPE, 0o666, devmajor=1, devminor=3)))
    layer2 = layout.add_layer(members, "zstd")

    # Layer 3 (uncompressed): one more file.
    l3 = os.path.join(stage, "l3")
    make_dir(l3)
    make_dir(os.path.join(l3, "data"))
    write_file(os.path.join(l3, "data", "layer3"), b"layer3\n")
    layer3 = layout.add_layer(tree_members(l3), "none")

    config = {
        "created": CREATED,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": [PATH_ENV, "CC_IMAGE=busybox-layers"],
            "Entrypoint": ["/bin/echo", "entry:"],
            "Cmd": ["default-arg"],
            "User": "alice",
            "WorkingDir": "/data",
            "Labels": {"org.example.test": "busybox-layers"},
        },
        "history": [
            {"created": CREATED, "created_by": "busybox tree + /data fixtures", "comment": "layer 1, gzip"},
            {"created": CREATED, "created_by": "whiteout, opaque dir, owner, setuid, xattr, device",
             "comment": "layer 2, zstd"},
            {"created": CREATED, "created_by": "/data/layer3", "comment": "layer 3, uncompressed"},
            {"created": CREATED, "created_by": 'ENTRYPOINT ["/bin/echo", "entry:"]', "empty_layer": True},
        ],
    }
    layout.finish(layout.add_image([layer1, layer2, layer3], config), "latest")


def decompress_blob(layout, desc, dest):
    """Write DESC's layer uncompressed to DEST."""
    src = layout.blob_path(desc["digest"])
    mt = desc["mediaType"]
    if mt.endswith("+gzip"):
        with gzip.open(src, "rb") as fin, open(dest, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    elif mt.endswith("+zstd"):
        subprocess.run(["zstd", "-q", "-d", "-f", src, "-o", dest], check=True)
    else:
        shutil.copyfile(src, dest)
    os.chmod(dest, 0o644)


def write_docker_archive(layout, dest):
    """A classic `docker save` archive of LAYOUT's image: manifest.json, <config>.json,
    <id>/{VERSION,json,layer.tar}, repositories."""
    manifest = layout.read_json(layout.top()["digest"])
    cfg_hex = manifest["config"]["digest"].split(":", 1)[1]
    with open(layout.blob_path(manifest["config"]["digest"]), "rb") as f:
        cfg_bytes = f.read()
    config = json.loads(cfg_bytes)
    work = dest + ".d"
    rm_tree(work)
    os.makedirs(work)
    try:
        members, layer_paths, parent = [], [], ""
        for desc, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"]):
            v1 = hashlib.sha256(f"{parent} {diff_id}".encode()).hexdigest()
            plain = os.path.join(work, v1)
            decompress_blob(layout, desc, plain)
            v1json = {"id": v1, "created": CREATED, "os": config["os"], "architecture": config["architecture"]}
            if parent:
                v1json["parent"] = parent
            members += [
                (v1, synthetic(v1, tarfile.DIRTYPE, 0o755)),
                (f"{v1}/VERSION", (synthetic(f"{v1}/VERSION"), b"1.0")),
                (f"{v1}/json", (synthetic(f"{v1}/json"), canonical_json(v1json))),
                (f"{v1}/layer.tar", (synthetic(f"{v1}/layer.tar"), plain)),
            ]
            layer_paths.append(f"{v1}/layer.tar")
            parent = v1
        docker_manifest = [{"Config": f"{cfg_hex}.json", "RepoTags": ["busybox:latest"], "Layers": layer_paths}]
        members += [
            (f"{cfg_hex}.json", (synthetic(f"{cfg_hex}.json"), cfg_bytes)),
            ("manifest.json", (synthetic("manifest.json"), canonical_json(docker_manifest))),
            ("repositories", (synthetic("repositories"), canonical_json({"busybox": {"latest": parent}}))),
        ]
        with open(dest, "wb") as f:
            write_tar(f, members)
    finally:
        rm_tree(work)


def write_oci_archive(layout, dest):
    """LAYOUT as an OCI image layout tar archive."""
    members = [
        ("oci-layout", (synthetic("oci-layout"), os.path.join(layout.path, "oci-layout"))),
        ("index.json", (synthetic("index.json"), os.path.join(layout.path, "index.json"))),
        ("blobs", synthetic("blobs", tarfile.DIRTYPE, 0o755)),
        ("blobs/sha256", synthetic("blobs/sha256", tarfile.DIRTYPE, 0o755)),
    ]
    for name in os.listdir(layout.blobs):
        arc = f"blobs/sha256/{name}"
        members.append((arc, (synthetic(arc), os.path.join(layout.blobs, name))))
    with open(dest, "wb") as f:
        write_tar(f, members)


# ----------------------------------------------------------------------------
# Debian


class Failure(Exception):
    pass


def os_codename():
    fields = {}
    with open("/etc/os-release") as f:
        for line in f:
            k, sep, v = line.strip().partition("=")
            if sep:
                fields[k] = v.strip().strip('"').strip("'")
    codename = fields.get("VERSION_CODENAME")
    if not codename:
        raise Failure("/etc/os-release has no VERSION_CODENAME")
    return codename


def apt_sources(root="/etc/apt"):
    """(types, uris, suites) of each enabled apt source, in apt's reading order."""
    files = []
    if os.path.isfile(os.path.join(root, "sources.list")):
        files.append(os.path.join(root, "sources.list"))
    for f in sorted(glob.glob(os.path.join(root, "sources.list.d", "*"))):
        base = os.path.basename(f)
        if ".disabled" in base:
            continue
        if base.endswith(".list") or base.endswith(".sources"):
            files.append(f)
    out = []
    for path in files:
        with open(path, errors="replace") as f:
            text = f.read()
        if path.endswith(".sources"):
            for para in deb822_paragraphs(text):
                if para.get("enabled", "yes").lower() in ("no", "false", "0"):
                    continue
                out.append((para.get("types", "").split(), para.get("uris", "").split(),
                            para.get("suites", "").split()))
        else:
            for line in text.splitlines():
                tokens = line.split("#", 1)[0].split()
                if len(tokens) < 3:
                    continue
                kind, rest = tokens[0], tokens[1:]
                if rest[0].startswith("["):
                    while rest and not rest[0].endswith("]"):
                        rest = rest[1:]
                    rest = rest[1:]
                if len(rest) >= 2:
                    out.append(([kind], [rest[0]], [rest[1]]))
    return out


def deb822_paragraphs(text):
    paras, cur, last = [], {}, None
    for line in text.splitlines() + [""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if cur:
                paras.append(cur)
            cur, last = {}, None
        elif line[0] in " \t" and last:
            cur[last] += " " + line.strip()
        elif ":" in line:
            k, v = line.split(":", 1)
            last = k.strip().lower()
            cur[last] = v.strip()
    return paras


def apt_mirror(codename):
    """The first `deb` URI of the machine's apt sources serving CODENAME (not the security archive)."""
    for types, uris, suites in apt_sources():
        if "deb" not in types or codename not in suites:
            continue
        for uri in uris:
            if "security" not in uri:
                return uri
    raise Failure(f"no apt source in /etc/apt serves {codename}; set CC_DEBIAN_MIRROR")


def clean_debian_tree(tree):
    """Drop what only makes the tree bigger: downloaded .debs and apt's lists."""
    for deb in glob.glob(os.path.join(tree, "var/cache/apt/archives/*.deb")):
        os.unlink(deb)
    lists = os.path.join(tree, "var/lib/apt/lists")
    for name in os.listdir(lists) if os.path.isdir(lists) else []:
        path = os.path.join(lists, name)
        if name not in ("partial", "lock"):
            rm_tree(path)


def debian_tree(codename, mirror):
    """A `debootstrap --variant=minbase` tree, cached by codename, mirror, debootstrap and this code."""
    trees = os.path.join(cache_dir(), "trees")
    os.makedirs(trees, exist_ok=True)
    tree = os.path.join(trees, f"debian-{codename}")
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "debootstrap"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True).stdout.strip()
    if not version or shutil.which("debootstrap") is None:
        raise Failure("debootstrap is not installed (apt-get install debootstrap)")
    key = key_of(codename, mirror, version, source_hash(debian_tree, clean_debian_tree))
    key_file = tree + ".key"
    with file_lock(os.path.join(trees, ".lock-debian")):
        if os.path.isdir(tree) and os.path.exists(key_file):
            with open(key_file) as f:
                if f.read().strip() == key:
                    return tree, key
        tmp = tree + ".tmp"
        rm_tree(tmp)
        log(f"debootstrap --variant=minbase {codename} {tmp} {mirror} (a few minutes)")
        started = time.monotonic()
        res = subprocess.run(["debootstrap", "--variant=minbase", codename, tmp, mirror],
                             stdout=sys.stderr, stderr=sys.stderr)
        if res.returncode != 0:
            logfile = os.path.join(tmp, "debootstrap", "debootstrap.log")
            tail = ""
            if os.path.exists(logfile):
                with open(logfile, errors="replace") as f:
                    tail = "".join(f.readlines()[-30:])
            raise Failure(f"debootstrap failed with status {res.returncode}\n{tail}")
        clean_debian_tree(tmp)
        if os.path.exists(key_file):
            os.unlink(key_file)
        rm_tree(tree)
        os.replace(tmp, tree)
        with open(key_file, "w") as f:
            f.write(key + "\n")
        log(f"debootstrap done in {time.monotonic() - started:.0f}s")
        return tree, key


# ----------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--out", help="output directory (default: $CACHE/test-images)")
    parser.add_argument("--only", help="comma-separated artefacts to build (default: all)")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args()
    only = ALL if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in only if n not in ALL]
    if unknown:
        parser.error(f"unknown artefact(s) {', '.join(unknown)}; known: {', '.join(ALL)}")
    if "busybox" in only:
        only += ["busybox-docker", "busybox-oci"]
    out = os.path.abspath(args.out or os.path.join(cache_dir(), "test-images"))
    os.makedirs(out, exist_ok=True)
    builder = Builder(out, args.force)
    built = {}
    try:
        if any(n != "debian" for n in only):
            with file_lock(os.path.join(cache_dir(), "trees", ".lock-busybox")):
                builder.busybox_tree()
            with file_lock(os.path.join(out, ".lock")):
                built["busybox"] = builder.busybox()
                if "busybox-docker" in only or "busybox-oci" in only:
                    built["busybox-docker"], built["busybox-oci"] = builder.busybox_archives(built["busybox"])
                if "busybox-layers" in only:
                    built["busybox-layers"] = builder.busybox_layers()
                if "multiarch" in only:
                    built["multiarch"] = builder.multiarch(built["busybox"])
        if "debian" in only:
            with file_lock(os.path.join(out, ".lock-debian")):
                built["debian"] = builder.debian()
    except (Failure, subprocess.CalledProcessError, OSError) as e:
        print(f"make-test-images: error: {e}", file=sys.stderr)
        return 1
    for name in ALL:
        if name in only and name in built:
            print(f"{name} {built[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
