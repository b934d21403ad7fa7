"""Where the construct library finds the code it ships: the Lambda asset and the agent's files.

In a source checkout they are the repository's ``lambdas/`` and ``instance_assets/``
directories. In an installed wheel, ``spotguard_core`` and ``spotguard_functions`` are
ordinary packages next to this one, and the agent's files (``install.py``, ``bootstrap/``,
``systemd/``, ``spotguard_agent/``) are package data copied into ``spotguard_cdk/_assets/``
by the build (``setup.py``). Nothing here imports ``spotguard_tools``.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from types import ModuleType

import spotguard_core
import spotguard_functions

PACKAGE_DIR = Path(__file__).resolve().parent
#: In a wheel: the copy of ``instance_assets/`` the build puts inside this package.
PACKAGED_INSTANCE_ASSETS = PACKAGE_DIR / "_assets" / "instance_assets"
#: In a checkout: ``stacks/spotguard_cdk`` -> the repository root.
CHECKOUT_ROOT = PACKAGE_DIR.parents[1]
#: What marks a directory as the agent's files (the stage-1 user data template).
_INSTANCE_MARKER = Path("bootstrap") / "user-data.sh"
#: Never shipped: caches, tests, build leftovers.
EXCLUDED_DIRS = frozenset({"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache", "tests"})
EXCLUDED_SUFFIXES = (".pyc", ".pyo")


def instance_assets_dir() -> Path:
    """The directory holding ``install.py``, ``bootstrap/``, ``systemd/`` and ``spotguard_agent/``."""
    for candidate in (CHECKOUT_ROOT / "instance_assets", PACKAGED_INSTANCE_ASSETS):
        if (candidate / _INSTANCE_MARKER).is_file():
            return candidate
    raise FileNotFoundError(
        "spotguard's instance assets are missing: expected instance_assets/ in a checkout or "
        f"{PACKAGED_INSTANCE_ASSETS} in an installed wheel (reinstall spotguard)"
    )


def core_package_dir() -> Path:
    """``spotguard_core`` as imported (checkout or site-packages)."""
    return _package_dir(spotguard_core)


def _package_dir(package: ModuleType) -> Path:
    if package.__file__ is None:
        raise FileNotFoundError(f"{package.__name__} is not a regular package")
    return Path(package.__file__).resolve().parent


def _ignored(directory: str, names: list[str]) -> set[str]:
    return {
        n for n in names if n in EXCLUDED_DIRS or n.endswith(EXCLUDED_SUFFIXES) or n.endswith(".egg-info")
    }


def stage_lambda_source(target: Path) -> Path:
    """Copy the two packages the functions run (``spotguard_core``, ``spotguard_functions``)
    into ``target``: the Lambda code asset, the same from a checkout and from a wheel."""
    for package in (spotguard_core, spotguard_functions):
        source = _package_dir(package)
        shutil.copytree(source, target / source.name, ignore=_ignored)
    return target


@functools.cache
def lambda_source_dir() -> Path:
    """One staging directory per process with the Lambda asset (every fleet's functions share
    it; CDK copies it into the cloud assembly, and it is removed when the process ends)."""
    staging = Path(tempfile.mkdtemp(prefix="spotguard-lambda-"))
    atexit.register(shutil.rmtree, staging, ignore_errors=True)
    return stage_lambda_source(staging)
