"""The bundled Powertools layer (``control_plane.powertools_layer = "bundled"``).

Instead of the public Powertools layer (an ARN in Powertools' own account, which does not exist
in every partition or region, nor in a local emulator), the functions get a layer built from
this repository's ``requirements.lock``: the same pinned Powertools, pydantic and X-Ray SDK the
tests ran with. It is built at synth without Docker: pip downloads manylinux x86_64 wheels for
the functions' Python version (``--only-binary=:all:``, so nothing is compiled on this machine)
into ``<dir>/python`` (where Lambda puts a layer on ``sys.path``).

The result is cached outside the repository, by a hash of everything that goes into it (the
pins, platform, Python version and this builder's format), in
``$SPOTGUARD_LAYER_CACHE`` or ``~/.cache/spotguard/layers/<hash>``: a synth with a warm cache
needs no network and produces the same asset hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement

from spotguard_cdk.assets import CHECKOUT_ROOT

REPO_ROOT = CHECKOUT_ROOT
LOCK_FILE = REPO_ROOT / "requirements.lock"

#: What the functions import beyond the standard library and the runtime's boto3, by
#: distribution name: Powertools with its ``parser`` and ``tracer`` extras and their
#: dependencies, and pydantic-settings (the migration settings model). A test checks this set
#: is closed under the installed packages' requirements.
LAYER_DISTRIBUTIONS: tuple[str, ...] = (
    "aws-lambda-powertools",
    "jmespath",
    "typing-extensions",
    "aws-xray-sdk",
    "wrapt",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "pydantic-settings",
    "python-dotenv",
)
#: Powertools extras whose requirements the layer satisfies.
POWERTOOLS_EXTRAS: tuple[str, ...] = ("parser", "tracer")
#: The Lambda Python runtime ships the AWS SDK; the layer does not repeat it.
RUNTIME_PROVIDED: frozenset[str] = frozenset({"boto3", "botocore", "s3transfer", "urllib3"})
PLATFORM = "manylinux2014_x86_64"
#: Bump when the layout of the built directory changes (invalidates every cache entry).
BUILD_FORMAT = 1
_COMPLETE_MARKER = ".spotguard-layer.json"


class LayerBuildError(RuntimeError):
    """The layer could not be built (the message says what to do)."""


def normalize(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(lock_file: Path = LOCK_FILE) -> dict[str, str]:
    """``name -> version`` of every ``name==version`` line of a pip lock file."""
    pins: dict[str, str] = {}
    for raw in lock_file.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;]+)", line)
        if match:
            pins[normalize(match.group(1))] = match.group(3)
    return pins


@dataclass(frozen=True)
class LayerSpec:
    """Everything that determines the layer's content."""

    requirements: tuple[str, ...]  # "name==version", sorted
    python_version: str  # "3.13"
    platform: str = PLATFORM

    @classmethod
    def from_lock(cls, python_version: str, lock_file: Path = LOCK_FILE) -> LayerSpec:
        pins = read_pins(lock_file)
        missing = [name for name in LAYER_DISTRIBUTIONS if normalize(name) not in pins]
        if missing:
            raise LayerBuildError(
                f"{lock_file.name} does not pin {', '.join(missing)}; the bundled Powertools layer "
                "is built from those pins (regenerate the lock file, or set "
                "control_plane.powertools_layer = public)"
            )
        requirements = tuple(sorted(f"{normalize(n)}=={pins[normalize(n)]}" for n in LAYER_DISTRIBUTIONS))
        return cls(requirements=requirements, python_version=python_version)

    @property
    def digest(self) -> str:
        payload = json.dumps(
            {
                "requirements": self.requirements,
                "python": self.python_version,
                "platform": self.platform,
                "format": BUILD_FORMAT,
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:32]


def cache_root(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get("SPOTGUARD_LAYER_CACHE"):
        return Path(env["SPOTGUARD_LAYER_CACHE"])
    base = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "spotguard" / "layers"


def pip_command(spec: LayerSpec, target: Path) -> list[str]:
    """The pip call that fills ``target`` (the layer's ``python/`` directory)."""
    return [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-deps",  # the set is closed (tested); nothing else may slip in
        "--no-compile",  # no .pyc: the same bytes, so the same asset hash, on every machine
        "--only-binary=:all:",
        "--platform",
        spec.platform,
        "--implementation",
        "cp",
        "--python-version",
        spec.python_version,
        "--target",
        str(target),
        *spec.requirements,
    ]


def build_layer(spec: LayerSpec, *, cache: Path | None = None) -> Path:
    """The layer directory (containing ``python/``) for ``spec``: from the cache, or built into
    it. Concurrent builds are safe: each builds in its own temporary directory and the first
    to finish renames it into place."""
    root = cache if cache is not None else cache_root()
    final = root / spec.digest
    if (final / _COMPLETE_MARKER).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.digest}-", dir=root))
    try:
        target = staging / "python"
        command = pip_command(spec, target)  # this interpreter's pip, pinned requirements only
        result = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
        if result.returncode != 0:
            raise LayerBuildError(
                "building the bundled Powertools layer failed (pip needs the package index the "
                "first time; later synths use the cache in "
                f"{root}):\n{result.stderr.strip() or result.stdout.strip()}"
            )
        _strip_machine_specific(target)
        (staging / _COMPLETE_MARKER).write_text(
            json.dumps(
                {"requirements": spec.requirements, "python": spec.python_version, "platform": spec.platform},
                indent=1,
            )
        )
        try:
            staging.rename(final)
        except OSError:
            if not (final / _COMPLETE_MARKER).is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def _strip_machine_specific(target: Path) -> None:
    """Console scripts carry this machine's interpreter path and are never run from a layer."""
    shutil.rmtree(target / "bin", ignore_errors=True)
    for pycache in list(target.rglob("__pycache__")):
        shutil.rmtree(pycache, ignore_errors=True)


def closure_gaps(
    requires: Mapping[str, Iterable[str]], extras: Mapping[str, Iterable[str]] | None = None
) -> dict[str, set[str]]:
    """For each layer distribution, the requirements (by normalised name) that neither the
    layer nor the runtime provides. ``requires`` maps a distribution to its requirement
    strings (``importlib.metadata.requires``); ``extras`` the extras the layer enables."""
    provided = {normalize(n) for n in LAYER_DISTRIBUTIONS} | set(RUNTIME_PROVIDED)
    gaps: dict[str, set[str]] = {}
    for dist, lines in requires.items():
        active = set((extras or {}).get(dist, ()))
        for line in lines:
            req = Requirement(line)
            if req.marker is not None:
                environments = [{"extra": extra} for extra in active] or [{"extra": ""}]
                if not any(req.marker.evaluate(env) for env in environments):
                    continue
            name = normalize(req.name)
            if name not in provided:
                gaps.setdefault(dist, set()).add(name)
    return gaps
