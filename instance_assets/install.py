#!/usr/bin/env python3
"""Stage 2 entry point: run the installer from the extracted bundle (see docs/agent.md).

Stage 1 starts this with whatever ``python3`` the image has. The agent needs Python >= 3.11:
when this interpreter is older, the first of python3.13 / 3.12 / 3.11 on PATH takes over,
installed with ``dnf`` when there is none (AL2023's python3 is 3.9). Keep this file valid
for old interpreters (no newer syntax before the version check).
"""
# ruff: noqa: UP036, S606, S607 - the version check is the point; fixed argv, found on PATH

import os
import shutil
import subprocess
import sys
from pathlib import Path

CANDIDATES = ("python3.13", "python3.12", "python3.11")
HERE = Path(__file__).resolve()


def _newer_python():  # type: ignore[no-untyped-def]
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    if shutil.which("dnf"):
        sys.stderr.write("installing python3.11 with dnf\n")
        subprocess.call(["dnf", "-y", "install", "python3.11", "python3.11-pip"])
    return shutil.which("python3.11")


if __name__ == "__main__":
    if sys.version_info < (3, 11):
        python = _newer_python()
        if not python:
            failure = Path(os.environ.get("SPOTGUARD_ROOT") or "/") / "opt/spotguard/install-failure"
            failure.parent.mkdir(parents=True, exist_ok=True)
            failure.write_text("no python >= 3.11 for the agent (dnf could not install python3.11)\n")
            sys.exit(1)
        os.execv(python, [python, str(HERE), *sys.argv[1:]])
    sys.path.insert(0, str(HERE.parent))
    from spotguard_agent.installer import main

    sys.exit(main())
