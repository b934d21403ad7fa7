"""Tar archives the agent unpacks (the workload, command-mode checkpoints): safely.

Only regular files and directories, no absolute names, no ``..``, no links or devices:
an archive can never write outside its target directory. Standard library only.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path, PurePosixPath


class UnsafeArchive(ValueError):
    """The archive holds an entry that could escape its directory (or is not a plain file)."""


def check_member(member: tarfile.TarInfo) -> None:
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts or member.name.startswith("/"):
        raise UnsafeArchive(f"unsafe path in archive: {member.name!r}")
    if not (member.isfile() or member.isdir()):
        raise UnsafeArchive(f"not a regular file or directory in archive: {member.name!r}")


def extract(archive: tarfile.TarFile, target: Path) -> int:
    """Check every member first (nothing is written from a bad archive), then extract.
    Returns the number of files."""
    members = archive.getmembers()
    for member in members:
        check_member(member)
    target.mkdir(parents=True, exist_ok=True)
    # Python >= 3.11.4 also applies its own "data" filter (defence in depth).
    options = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    for member in members:
        # Own modes only (no setuid), owner of the extracting process.
        member.mode = (member.mode & 0o755) | (0o700 if member.isdir() else 0o600)
        member.uid = member.gid = 0
        member.uname = member.gname = ""
        archive.extract(member, target, **options)  # type: ignore[arg-type]
    return sum(1 for member in members if member.isfile())


def extract_bytes(data: bytes, target: Path) -> int:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
        return extract(archive, target)


def directory_size(directory: Path) -> int:
    files = (path for path in directory.rglob("*") if path.is_file() and not path.is_symlink())
    return sum(path.stat().st_size for path in files)


def pack_directory(directory: Path) -> bytes:
    """The regular files and directories under ``directory`` as a tar.gz (links skipped)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as archive:
        for path in sorted(directory.rglob("*")):
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                continue
            archive.add(path, arcname=path.relative_to(directory).as_posix(), recursive=False)
    return raw.getvalue()
