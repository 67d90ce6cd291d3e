"""Fixtures: the VM-test gate, a real local registry with the busybox test
image, an image store, and booted instances shared where isolation allows.

VM tests (marked ``vm``) boot real VMs and run only with
``CC_RUN_VM_TESTS=1``; without it they are skipped (on purpose: the unit
tests need no VM, no registry and no images).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

import crumblecracker as cc

RUN_VM_TESTS = os.environ.get("CC_RUN_VM_TESTS") == "1"
VM_SKIP_REASON = "VM test: set CC_RUN_VM_TESTS=1 to boot real VMs (QEMU, guest kernel, agent)"

PYTHON_DIR = Path(__file__).resolve().parent.parent
WORKSPACE = PYTHON_DIR.parent
REGISTRY_BIN = os.environ.get("CC_REGISTRY_BIN", "/usr/bin/docker-registry")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: boots real VMs; runs only with CC_RUN_VM_TESTS=1")
    # A shell without job control starts a background program (`cmd &`)
    # with SIGINT ignored, and Python then installs no handler for it: the
    # Ctrl-C tests would wait forever for a KeyboardInterrupt. Python's own
    # handler is put back (the programs they start get the default then).
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if RUN_VM_TESTS:
        return
    skip = pytest.mark.skip(reason=VM_SKIP_REASON)
    for item in items:
        if "vm" in item.keywords:
            item.add_marker(skip)


def cache_dir() -> Path:
    """The crumblecracker cache root, as the Rust core computes it."""
    if os.environ.get("CC_CACHE_DIR"):
        return Path(os.environ["CC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "crumblecracker"


def data_dir() -> Path:
    """The data dir the loaded library uses: ``CC_DATA_DIR``, else
    ``<library dir>/../share/crumblecracker`` (where ``scripts/setup.sh``
    installs the kernel and agent for ``target/release/libcc.so``)."""
    if os.environ.get("CC_DATA_DIR"):
        return Path(os.environ["CC_DATA_DIR"])
    return Path(cc.library_path()).resolve().parent.parent / "share" / "crumblecracker"


def kernel_path() -> Path:
    return Path(os.environ.get("CC_KERNEL") or data_dir() / "vmlinux")


def kernel_has_9p() -> bool:
    """Whether the guest kernel was built with 9p (host directory mounts)."""
    config = kernel_path().with_name("config")
    try:
        return "CONFIG_9P_FS=y" in config.read_text().splitlines()
    except OSError:
        return False


# -- test images ---------------------------------------------------------------


@pytest.fixture(scope="session")
def test_images() -> dict[str, Path]:
    """The test images of scripts/make-test-images.py (built once, cached)."""
    script = WORKSPACE / "scripts" / "make-test-images.py"
    out = subprocess.run(
        [
            sys.executable,
            str(script),
            "--out",
            str(cache_dir() / "test-images"),
            "--only",
            "busybox,busybox-layers",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert out.returncode == 0, f"{script} failed ({out.returncode}); stderr is above"
    images = {}
    for line in out.stdout.splitlines():
        name, _, path = line.partition(" ")
        images[name] = Path(path)
    for name in ("busybox", "busybox-layers", "busybox-docker"):
        assert name in images, f"make-test-images.py did not report {name}: {out.stdout}"
    return images


# -- a real registry -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: the registry dies with the test process.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)


@dataclass
class Registry:
    """A running ``docker-registry serve`` on 127.0.0.1 (plain HTTP)."""

    proc: subprocess.Popen[bytes]
    addr: str
    dir: Path

    def log(self) -> str:
        try:
            return (self.dir / "registry.log").read_text(errors="replace")
        except OSError:
            return ""

    def push(self, layout: Path, tag_in_layout: str, repo_and_tag: str) -> str:
        """Pushes an OCI layout's tag with skopeo; returns the pull reference."""
        skopeo = shutil.which("skopeo")
        assert skopeo, "skopeo not found: apt-get install skopeo (scripts/setup.sh does)"
        out = subprocess.run(
            [
                skopeo,
                "--insecure-policy",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                "--dest-no-creds",
                f"oci:{layout}:{tag_in_layout}",
                f"docker://{self.addr}/{repo_and_tag}",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, (
            f"skopeo copy failed ({out.returncode}):\n{out.stdout}{out.stderr}\n"
            f"--- registry log ---\n{self.log()}"
        )
        return f"{self.addr}/{repo_and_tag}"


def _start_registry() -> Registry:
    assert Path(REGISTRY_BIN).exists(), (
        f"{REGISTRY_BIN} not found: install the docker-registry package "
        "(scripts/setup.sh does: apt-get install docker-registry skopeo)"
    )
    tmp = Path(tempfile.mkdtemp(prefix="cc-py-registry-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    last_log = ""
    for _ in range(5):
        addr = f"127.0.0.1:{_free_port()}"
        (tmp / "config.yml").write_text(
            "version: 0.1\n"
            "log:\n  level: info\n  formatter: text\n  accesslog:\n    disabled: true\n"
            f'storage:\n  filesystem:\n    rootdirectory: "{tmp / "storage"}"\n'
            "  delete:\n    enabled: true\n"
            "  maintenance:\n    uploadpurging:\n      enabled: false\n"
            f"http:\n  addr: {addr}\n  secret: cc-python-tests-{os.getpid()}\n"
        )
        log = open(tmp / "registry.log", "wb")  # handed to the child
        proc = subprocess.Popen(
            [REGISTRY_BIN, "serve", str(tmp / "config.yml")],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            preexec_fn=_die_with_parent,
        )
        log.close()
        registry = Registry(proc, addr, tmp)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if f"listening on {addr}" in registry.log():
                try:
                    with urllib.request.urlopen(f"http://{addr}/v2/", timeout=5) as r:
                        if r.status == 200:
                            return registry
                except (urllib.error.URLError, OSError):
                    pass
            time.sleep(0.05)
        last_log = registry.log()
        proc.kill()
        proc.wait()
        if "address already in use" not in last_log:
            break
    shutil.rmtree(tmp, ignore_errors=True)
    raise AssertionError(f"docker-registry did not start\n--- registry log ---\n{last_log}")


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    reg = _start_registry()
    try:
        yield reg
    finally:
        reg.proc.kill()
        reg.proc.wait()
        shutil.rmtree(reg.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def busybox_ref(registry: Registry, test_images: dict[str, Path]) -> str:
    """``127.0.0.1:PORT/test/busybox:latest`` in the session's registry."""
    return registry.push(test_images["busybox"], "latest", "test/busybox:latest")


# -- library, store, instances -------------------------------------------------


@pytest.fixture(scope="session")
def lib() -> Iterator[None]:
    """The library, initialized for the session."""
    cc.init()
    yield
    cc.shutdown()


@pytest.fixture(scope="session")
def store_dir() -> Iterator[Path]:
    """A fresh image store for the session."""
    d = Path(tempfile.mkdtemp(prefix="cc-py-store-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def client(lib: None, store_dir: Path) -> Iterator[cc.OCIClient]:
    with cc.OCIClient(store_dir) as c:
        yield c


@pytest.fixture(scope="session")
def source(client: cc.OCIClient, busybox_ref: str) -> Iterator[cc.ImageSource]:
    """The busybox image pulled from the session's registry."""
    with client.pull(busybox_ref) as s:
        yield s


@pytest.fixture(scope="session")
def inst(source: cc.ImageSource) -> Iterator[cc.Instance]:
    """One booted instance shared by the tests that leave it usable."""
    with cc.Instance(source, cc.InstanceOptions(memory_mb=256)) as i:
        yield i


@pytest.fixture
def fresh(source: cc.ImageSource) -> Iterator[cc.Instance]:
    """An instance of its own, for tests that end or break it."""
    with cc.Instance(source, cc.InstanceOptions(memory_mb=256)) as i:
        yield i


@pytest.fixture
def guest_dir(inst: cc.Instance, request: pytest.FixtureRequest) -> Iterator[str]:
    """An empty directory in the shared instance, removed afterwards."""
    path = f"/tmp/pytest-{request.node.name}"
    inst.remove_all(path)
    inst.mkdir_all(path)
    yield path
    if inst.is_running:
        inst.remove_all(path)


def wait_until(pred: object, timeout: float = 10.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(pred) and pred():
            return True
        time.sleep(step)
    return False


def image_json(layout: Path) -> Optional[dict[str, object]]:
    """The index.json of an OCI layout, or None."""
    try:
        data: dict[str, object] = json.loads((layout / "index.json").read_text())
        return data
    except OSError:
        return None
