"""The README's Quick Start, run as a program against the local registry."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import PYTHON_DIR


@pytest.mark.vm
def test_quickstart_offline_example(busybox_ref: str, tmp_path: Path) -> None:
    script = PYTHON_DIR / "examples" / "quickstart_offline.py"
    env = dict(os.environ)
    # A store of its own, empty: the kernel and agent come from the data dir.
    env["CC_CACHE_DIR"] = str(tmp_path / "cache")
    r = subprocess.run(
        [sys.executable, str(script), busybox_ref],
        env=env,
        capture_output=True,
        timeout=300,
    )
    # Bytes: text mode would turn the progress line's \r into newlines.
    stdout, stderr = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    lines = stdout.split("\n")
    assert lines[0] in ("Hypervisor available!", "No hypervisor - some features may be limited")
    assert lines[1] == "Architecture: x86_64"
    assert re.fullmatch(r"(\rDownloading: \d+%)+", lines[2]), repr(lines[2])
    assert lines[2].endswith("Downloading: 100%")
    assert lines[3] == "Image architecture: amd64"
    assert re.fullmatch(r"Instance ID: \S+", lines[4])
    assert lines[5:8] == ["Hello from VM!", "", "Read: Hello, World!"]
    entries = lines[8:-1]
    assert "  mydir (dir=True)" in entries
    assert "  test.txt (dir=False)" in entries
    assert lines[-1] == ""


def test_quickstart_offline_needs_an_image() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CC_QUICKSTART_IMAGE"}
    r = subprocess.run(
        [sys.executable, str(PYTHON_DIR / "examples" / "quickstart_offline.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "usage: quickstart_offline.py IMAGE" in r.stderr


CTRL_C_SCRIPT = """
import sys
import crumblecracker as cc

cc.init()
client = cc.OCIClient()
inst = cc.Instance(client.pull(sys.argv[1]), cc.InstanceOptions(memory_mb=256))
print("ready", flush=True)
inst.command("sleep", "100").run()  # no `with`: exit must clean up anyway
print("not reached", flush=True)
"""


@pytest.mark.vm
def test_ctrl_c_in_a_program_leaves_nothing_behind(busybox_ref: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = dict(os.environ)
    env["CC_CACHE_DIR"] = str(cache)
    proc = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_SCRIPT, busybox_ref],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline() == b"ready\n"
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read().decode()
    assert proc.returncode != 0 and "KeyboardInterrupt" in stderr, stderr
    assert took < 5, f"the program took {took:.1f}s to end after SIGINT"
    # No QEMU of that program's cache survives it.
    leftovers = subprocess.run(
        ["pgrep", "-f", f"qemu-system.*{cache}"], capture_output=True, text=True
    ).stdout
    assert leftovers == "", leftovers
