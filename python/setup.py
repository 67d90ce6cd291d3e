"""Build hooks: compile libcc.so, the ``crumble`` CLI and the static guest
agent with cargo and bundle them with the guest kernel in the wheel, laid
out as an install prefix under ``crumblecracker/_native/``::

    lib/libcc.so                      stripped
    bin/crumble                       stripped; the ``crumble`` console script execs it
    share/crumblecracker/cc-agent     static, stripped
    share/crumblecracker/vmlinux      with its config and kernel.json (content hash)

libcc.so and crumble find the data dir as ``<their dir>/../share/crumblecracker``.
The kernel is ``CC_KERNEL`` when set, else the one ``scripts/setup.sh``
installed (``$CARGO_TARGET_DIR/share/crumblecracker/vmlinux``); its
``config`` and ``kernel.json`` are taken from beside it.

The Cargo workspace is the parent of this directory (``CC_WORKSPACE``
overrides it, for builds from an unpacked sdist); ``CARGO_TARGET_DIR`` is
honoured. Editable installs (``pip install -e``) build nothing: the package
then finds libcc through ``LIBCC_PATH`` or the workspace's
``target/release/libcc.so``. ``scripts/build-wheel.sh`` builds the wheel and
gives it its manylinux tag.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
AGENT_TARGET = "x86_64-unknown-linux-gnu"


def workspace() -> Path:
    root = Path(os.environ.get("CC_WORKSPACE", HERE.parent)).resolve()
    if not (root / "Cargo.toml").is_file() or not (root / "crates" / "capi").is_dir():
        sys.exit(
            f"crumblecracker: no Cargo workspace with crates/capi at {root}; build from the "
            "repository (pip install ./python) or set CC_WORKSPACE=/path/to/the/workspace"
        )
    return root


def cargo(args: list[str], root: Path, env: dict[str, str]) -> None:
    cmd = ["cargo", *args, "--manifest-path", str(root / "Cargo.toml")]
    print("crumblecracker:", " ".join(cmd), file=sys.stderr, flush=True)
    try:
        subprocess.run(cmd, check=True, env=env)
    except FileNotFoundError:
        sys.exit("crumblecracker: cargo not found: install Rust from https://rustup.rs")
    except subprocess.CalledProcessError as e:
        sys.exit(f"crumblecracker: {' '.join(cmd)} failed with status {e.returncode}")


def copy_stripped(src: Path, dst: Path) -> None:
    if not src.is_file():
        sys.exit(f"crumblecracker: cargo finished but {src} is missing")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    strip = shutil.which("strip")
    if strip and subprocess.run([strip, "-o", str(tmp), str(src)]).returncode == 0:
        os.replace(tmp, dst)
    else:
        shutil.copy2(src, dst)
    dst.chmod(0o755)


class BuildPyWithNative(build_py):
    """build_py, plus libcc.so and cc-agent built by cargo."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        root = workspace()
        target = Path(os.environ.get("CARGO_TARGET_DIR", root / "target")).resolve()
        env = dict(os.environ)
        env["CARGO_TARGET_DIR"] = str(target)
        # One package a call, as scripts/setup.sh and scripts/test.sh build
        # them: the same feature sets, so nothing is rebuilt.
        cargo(["build", "--release", "--locked", "-p", "cc-capi"], root, env)
        cargo(["build", "--release", "--locked", "-p", "crumble"], root, env)
        agent_env = dict(env)
        agent_env["RUSTFLAGS"] = "-C target-feature=+crt-static"
        cargo(
            ["build", "--release", "--locked", "-p", "cc-agent", "--target", AGENT_TARGET],
            root,
            agent_env,
        )
        native = Path(self.build_lib) / "crumblecracker" / "_native"
        data = native / "share" / "crumblecracker"
        copy_stripped(target / "release" / "libcc.so", native / "lib" / "libcc.so")
        copy_stripped(target / "release" / "crumble", native / "bin" / "crumble")
        copy_stripped(target / AGENT_TARGET / "release" / "cc-agent", data / "cc-agent")
        kernel = Path(
            os.environ.get("CC_KERNEL") or target / "share" / "crumblecracker" / "vmlinux"
        )
        if not kernel.is_file():
            sys.exit(
                f"crumblecracker: guest kernel not found at {kernel}: run scripts/setup.sh "
                "(or scripts/build-kernel.sh), or set CC_KERNEL"
            )
        # Kept whole: it is stripped of debug info already, and its symbols
        # are the kernel's own.
        data.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kernel, data / "vmlinux")
        for name in ("config", "kernel.json"):
            if (kernel.parent / name).is_file():
                shutil.copyfile(kernel.parent / name, data / name)


class BinaryDistribution(Distribution):
    """The wheel holds native code: a platform wheel."""

    def has_ext_modules(self) -> bool:
        return True


class PlatformWheel(bdist_wheel):  # type: ignore[misc,valid-type]
    """Tagged py3-none-<platform>: ctypes needs no particular Python ABI."""

    def get_tag(self) -> Any:
        _, _, platform = super().get_tag()
        return "py3", "none", platform


setup(
    distclass=BinaryDistribution,
    cmdclass={"build_py": BuildPyWithNative, "bdist_wheel": PlatformWheel},
)
