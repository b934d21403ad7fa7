"""The user's workload: ``Workload`` (the construct's prop) and its S3 asset.

The workload directory is packed like the agent bundle (sorted entries, fixed mtimes and
owners, gzip header mtime 0), so an unchanged directory keeps its asset hash. Its S3 URL and
sha256 go into the agent configuration (``Env.WORKLOAD_URL``/``WORKLOAD_SHA256``); the
installer fetches, verifies and unpacks it into ``contracts.WORKLOAD_DIR`` and builds its
virtual environment. Nothing of it goes into user data.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, Unpack

from aws_cdk import aws_s3_assets as s3_assets
from constructs import Construct

from spotguard_cdk.assets import EXCLUDED_DIRS, EXCLUDED_SUFFIXES
from spotguard_cdk.bundle import deterministic_tar_gz

WORKLOAD_ARCHIVE_NAME = "spotguard-workload.tar.gz"
#: Never packed: version control, caches, local virtual environments.
_SKIPPED_DIRS = EXCLUDED_DIRS - {"tests"} | {".git", ".hg", ".venv", "venv", "node_modules", "cdk.out"}


class WorkloadOptions(TypedDict, total=False):
    """What both modes of ``Workload`` take besides the directory (see its fields)."""

    stop_grace_seconds: int | None
    checkpoint_max_bytes: int | None


@dataclass(frozen=True)
class Workload:
    """What the fleet runs for each message: the user's directory and how to call it.

    Build it with ``Workload.python(...)`` or ``Workload.command(...)``; it is the construct
    front door of the ``fleet.workload.*`` and ``fleet.handler`` settings (validated the same
    way: a missing directory, a handler module outside it, or both/neither of handler and
    command fail at construction).
    """

    #: Local directory with the code (optional ``requirements.txt`` and ``wheelhouse/``).
    path: str
    #: Python mode: ``module:function`` importable from ``path``; ``handler(body, context)``.
    handler: str | None = None
    #: Command mode: a shell command line run in ``path`` per message (body on stdin).
    command_line: str | None = None
    #: SIGTERM -> SIGKILL grace when the agent gives a task back.
    stop_grace_seconds: int | None = None
    #: Largest checkpoint a task may save (bytes).
    checkpoint_max_bytes: int | None = None

    @classmethod
    def python(
        cls, path: str | os.PathLike[str], *, handler: str, **options: Unpack[WorkloadOptions]
    ) -> Workload:
        """Run ``handler`` (``module:function`` inside ``path``) for each message."""
        return cls(path=os.fspath(path), handler=handler, **options)

    @classmethod
    def command(
        cls, path: str | os.PathLike[str], *, command: str, **options: Unpack[WorkloadOptions]
    ) -> Workload:
        """Run ``command`` in ``path`` for each message: exit 0 = done, anything else = failure."""
        return cls(path=os.fspath(path), command_line=command, **options)

    def as_overrides(self) -> dict[str, Any]:
        """The dotted settings this workload sets (``fleet.workload.*``, ``fleet.handler``)."""
        overrides: dict[str, Any] = {
            "fleet.workload.path": self.path,
            "fleet.handler": self.handler,
            "fleet.workload.command": self.command_line,
        }
        if self.stop_grace_seconds is not None:
            overrides["fleet.workload.stop_grace_seconds"] = self.stop_grace_seconds
        if self.checkpoint_max_bytes is not None:
            overrides["fleet.workload.checkpoint_max_bytes"] = self.checkpoint_max_bytes
        return overrides


def workload_entries(directory: Path) -> Iterator[tuple[str, Path, int]]:
    """``(name, source, mode)`` of every file to pack, sorted by name; executables stay executable."""
    entries: dict[str, tuple[Path, int]] = {}
    for source in directory.rglob("*"):
        relative = source.relative_to(directory)
        if any(part in _SKIPPED_DIRS or part.endswith(".egg-info") for part in relative.parts[:-1]):
            continue
        if source.is_symlink() or not source.is_file() or source.name.endswith(EXCLUDED_SUFFIXES):
            continue
        executable = bool(source.stat().st_mode & stat.S_IXUSR)
        entries[relative.as_posix()] = (source, 0o755 if executable else 0o644)
    for name, (source, mode) in sorted(entries.items()):
        yield name, source, mode


def workload_bytes(directory: Path) -> bytes:
    """The workload directory as a deterministic tar.gz."""
    return deterministic_tar_gz(workload_entries(directory))


class WorkloadAsset(Construct):
    """The packed workload directory as an S3 asset, with the sha256 the installer checks."""

    def __init__(self, scope: Construct, construct_id: str, *, path: str) -> None:
        super().__init__(scope, construct_id)
        data = workload_bytes(Path(path))
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.size_bytes = len(data)
        # Private directory per synth; CDK stages (copies) the file when the asset is created.
        with tempfile.TemporaryDirectory(prefix="spotguard-workload-") as build_dir:
            archive = Path(build_dir) / WORKLOAD_ARCHIVE_NAME
            archive.write_bytes(data)
            self.asset = s3_assets.Asset(self, "Asset", path=str(archive))
