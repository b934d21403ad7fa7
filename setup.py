"""Packaging hook (everything else is in pyproject.toml): the wheel carries the agent's
files (instance_assets/: installer, bootstrap, systemd units, agent) inside
``spotguard_cdk/_assets/instance_assets`` so that the construct library can build the agent
bundle from an installed copy. In a checkout (and an editable install) the library reads
instance_assets/ itself."""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", "*.egg-info", "tests", ".*_cache")


class BuildPyWithInstanceAssets(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads instance_assets/ from the checkout
        target = Path(self.build_lib) / "spotguard_cdk" / "_assets" / "instance_assets"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(ROOT / "instance_assets", target, ignore=_SKIP)


setup(cmdclass={"build_py": BuildPyWithInstanceAssets})
