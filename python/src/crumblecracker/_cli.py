"""The ``crumble`` command a wheel install puts on ``PATH``: it runs the
``crumble`` binary bundled in the package (``_native/bin/crumble``), which
finds the guest kernel and agent in the package's data dir."""

from __future__ import annotations

import os
import sys
from pathlib import Path

BUNDLED = Path(__file__).resolve().parent / "_native" / "bin" / "crumble"


def main() -> None:
    if not os.access(BUNDLED, os.X_OK):
        sys.exit(
            f"crumble: {BUNDLED} is missing: this install of crumblecracker bundles no "
            "crumble binary (an editable install?); build it with "
            "`cargo build --release -p crumble` and run target/release/crumble"
        )
    # Replaces this process: signals, stdin and the exit status are crumble's own.
    os.execv(BUNDLED, ["crumble", *sys.argv[1:]])
