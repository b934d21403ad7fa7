"""The agent bundle and the stage-1 user data, built exactly as CDK ships them.

``build_bundle`` packs ``instance_assets/`` plus the core modules the agent imports
(``CORE_FILES``: contracts, the stores, the one release path, the client factory; standard
library and boto3 only) into a deterministic ``tar.gz``: sorted entries, fixed mtimes and owners, gzip header mtime 0.
The same sources give the same bytes, so the S3 asset hash (and the ``BundleSha256`` the
user data checks) only changes when the agent changes.

``render_user_data`` does what ``Fn::Sub`` does to ``bootstrap/user-data.sh`` so tests run
exactly what an instance receives.

    python -m spotguard_cdk.bundle build OUTPUT_DIR   # prints BundleInfo as JSON

It lives on the CDK side (the construct library builds the bundle at synth);
``spotguard_tools.bundle`` re-exports it for the tests and the drill.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import sys
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from spotguard_core import contracts

from spotguard_cdk.assets import EXCLUDED_DIRS, core_package_dir, instance_assets_dir

INSTANCE_ASSETS = instance_assets_dir()
CORE_PACKAGE = core_package_dir()
#: The core modules the agent needs (standard library and boto3 only).
CORE_FILES = (
    "__init__.py",
    "aws.py",
    "contracts.py",
    "dynamo.py",
    "fault_injection.py",
    "fleet_store.py",
    "lease_store.py",
    "ports.py",
    "requeue.py",
)
BUNDLE_NAME = "spotguard-agent-bundle.tar.gz"
#: 2000-01-01T00:00:00Z: a fixed, valid mtime for every entry.
FIXED_MTIME = 946684800
_EXCLUDED_DIRS = EXCLUDED_DIRS
_EXCLUDED_SUFFIXES = (".pyc", ".pyo", ".egg-info")
_EXECUTABLE = {"install.py", "bootstrap/user-data.sh"}
_PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")


@dataclass(frozen=True)
class BundleInfo:
    """Where the built bundle is, its sha256 (checked by the user data) and its size."""

    path: Path
    sha256: str
    size_bytes: int

    def to_json(self) -> dict[str, object]:
        """As printed by ``python -m spotguard_cdk.bundle build``."""
        data = asdict(self)
        data["path"] = str(self.path)
        return data


def bundle_entries() -> Iterator[tuple[str, Path]]:
    """(name in the archive, source file), sorted by name."""
    entries: dict[str, Path] = {}
    for source in INSTANCE_ASSETS.rglob("*"):
        relative = source.relative_to(INSTANCE_ASSETS)
        if not source.is_file() or any(part in _EXCLUDED_DIRS for part in relative.parts):
            continue
        if source.name.endswith(_EXCLUDED_SUFFIXES) or any(
            part.endswith(".egg-info") for part in relative.parts
        ):
            continue
        entries[relative.as_posix()] = source
    for name in CORE_FILES:
        entries[f"spotguard_core/{name}"] = CORE_PACKAGE / name
    yield from sorted(entries.items())


def _tar_info(name: str, size: int, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = FIXED_MTIME
    info.mode = mode
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def deterministic_tar_gz(entries: Iterable[tuple[str, Path, int]]) -> bytes:
    """``(name, source, mode)`` entries, in the order given, as a reproducible tar.gz: fixed
    mtimes and owners, gzip header mtime 0 and no file name. The agent bundle and the user's
    workload are both packed with it, so an unchanged source gives an unchanged asset hash."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, source, mode in entries:
            data = source.read_bytes()
            archive.addfile(_tar_info(name, len(data), mode), io.BytesIO(data))
    compressed = io.BytesIO()
    # mtime=0 and no file name in the gzip header: identical input, identical bytes.
    with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=9) as gz:
        gz.write(raw.getvalue())
    return compressed.getvalue()


def bundle_bytes() -> bytes:
    """The agent bundle's bytes (deterministic: same sources, same bytes)."""
    return deterministic_tar_gz(
        (name, source, 0o755 if name in _EXECUTABLE else 0o644) for name, source in bundle_entries()
    )


def build_bundle(output_dir: Path) -> BundleInfo:
    """Write the agent bundle into ``output_dir`` and describe it."""
    output_dir.mkdir(parents=True, exist_ok=True)
    data = bundle_bytes()
    path = output_dir / BUNDLE_NAME
    path.write_bytes(data)
    return BundleInfo(path=path, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def user_data_template() -> str:
    """The stage-1 user data template (``Fn::Sub`` placeholders)."""
    return (INSTANCE_ASSETS / contracts.USER_DATA_TEMPLATE).read_text()


def template_placeholders(template: str) -> set[str]:
    """The ``${Name}`` placeholders a template uses."""
    return set(_PLACEHOLDER.findall(template))


def render_user_data(values: Mapping[str, str], template: str | None = None) -> str:
    """Substitute ``${Name}`` like ``Fn::Sub`` does.

    Every placeholder must be one of ``contracts.BOOTSTRAP_PLACEHOLDERS`` and have a value;
    an unknown ``${...}`` (a bash variable written with braces, say) raises, because
    CloudFormation would reject or mangle it.
    """
    text = user_data_template() if template is None else template

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in contracts.BOOTSTRAP_PLACEHOLDERS:
            raise ValueError(f"unknown placeholder ${{{name}}} in the user data template")
        if name not in values:
            raise KeyError(f"no value for placeholder ${{{name}}}")
        return str(values[name])

    return _PLACEHOLDER.sub(substitute, text)


def main(argv: list[str] | None = None) -> int:
    """``build OUTPUT_DIR``: write the bundle and print its description as JSON."""
    parser = argparse.ArgumentParser(description="Build the agent bundle.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write the bundle and print its path, sha256 and size")
    build.add_argument("output_dir", type=Path)
    args = parser.parse_args(argv)
    info = build_bundle(args.output_dir)
    sys.stdout.write(json.dumps(info.to_json()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
