"""The agent bundle is deterministic and complete; the user data renders like Fn::Sub."""

from __future__ import annotations

import ast
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from spotguard_cdk.bundle import CORE_PACKAGE
from spotguard_core import contracts
from spotguard_tools.bundle import (
    build_bundle,
    render_user_data,
    template_placeholders,
    user_data_template,
)

#: What CDK will substitute, at realistic lengths (asset bucket, 64-hex asset hash, a
#: CloudFormation-generated table name).
REALISTIC = {
    "Fleet": "video-transcode-prod",
    "Region": "ap-southeast-2",
    "BundleUrl": "s3://cdk-hnb659fds-assets-123456789012-ap-southeast-2/"
    "4f9c2e1b7a3d5e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7.tar.gz",
    "BundleSha256": "4f9c2e1b7a3d5e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7",
    "DeadlineSeconds": "1200",
    "FleetTable": "SpotguardVideoTranscodeProd-FleetTableA1B2C3D4-1A2B3C4D5E6F7",
    "InstanceArnPrefix": "arn:aws:ec2:eu-west-1:123456789012:instance/",
    "AsgName": "spotguard-video-transcode-prod",
    "LaunchHook": "spotguard-launch",
    "ConfigParameter": "/spotguard/video-transcode-prod/agent-config",
}
USER_DATA_LIMIT = 16 * 1024


def _imported_modules(source: str) -> set[str]:
    """Absolute modules a Python file imports anywhere (``from a import b`` names a and a.b)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _core_file(module: str) -> str | None:
    """``spotguard_core.x`` -> its file in the bundle's layout (None: not a module)."""
    parts = module.split(".")[1:]
    candidates = ([Path(*parts).with_suffix(".py")] if parts else []) + [Path(*parts, "__init__.py")]
    for candidate in candidates:
        if (CORE_PACKAGE / candidate).is_file():
            return f"spotguard_core/{candidate.as_posix()}"
    return None


def _core_files_imported(bundled: dict[str, str]) -> set[str]:
    """The core files the bundle's own code reaches through its imports, transitively (read
    from the source tree when the bundle lacks one)."""
    pending = [name for name in bundled if not name.startswith("spotguard_core/")]
    reached: set[str] = set()
    while pending:
        name = pending.pop()
        source = bundled.get(name) or (CORE_PACKAGE / name.removeprefix("spotguard_core/")).read_text()
        for module in _imported_modules(source):
            core = _core_file(module) if module.split(".")[0] == "spotguard_core" else None
            if core is not None and core not in reached:
                reached.add(core)
                pending.append(core)
    return reached


def test_bundle_is_deterministic(tmp_path: Path):
    first = build_bundle(tmp_path / "a")
    second = build_bundle(tmp_path / "b")
    assert first.sha256 == second.sha256
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.size_bytes == first.path.stat().st_size


def test_bundle_contains_agent_installer_units_and_the_stdlib_core(tmp_path: Path):
    info = build_bundle(tmp_path)
    with tarfile.open(info.path) as archive:
        members = {m.name: m for m in archive.getmembers()}
        names = list(members)
        assert names == sorted(names)
        for required in (
            "install.py",
            "bootstrap/user-data.sh",
            "systemd/spotguard-agent.service",
            "spotguard_agent/cli.py",
            "spotguard_agent/worker.py",
            "spotguard_agent/sample_handler.py",
            "spotguard_core/__init__.py",
            "spotguard_core/contracts.py",
        ):
            assert required in members, required
        sources = {
            name: archive.extractfile(member).read().decode()  # type: ignore[union-attr]
            for name, member in members.items()
            if name.endswith(".py")
        }
        # Only the core modules the agent imports travel, and every one it imports does:
        # instances have the standard library and boto3, no pydantic/Powertools.
        assert {n for n in names if n.startswith("spotguard_core/")} == _core_files_imported(sources)
        third_party = {m.split(".")[0] for src in sources.values() for m in _imported_modules(src)}
        third_party -= set(sys.stdlib_module_names) | {"spotguard_agent", "spotguard_core"}
        assert third_party == {"boto3", "botocore"}
        assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
        assert {m.mtime for m in members.values()} == {members["install.py"].mtime}
        assert {(m.uid, m.gid) for m in members.values()} == {(0, 0)}
        assert members["install.py"].mode & 0o111
    raw = info.path.read_bytes()
    assert raw[4:8] == b"\0\0\0\0", "gzip header mtime is 0"


def test_bundled_agent_imports_from_the_bundle_alone(tmp_path: Path):
    """The extracted bundle is all the agent needs besides the stdlib and boto3."""
    info = build_bundle(tmp_path / "dist")
    with tarfile.open(info.path) as archive:
        archive.extractall(tmp_path / "x", filter="data")
    check = (
        "import sys; sys.path[:0] = [sys.argv[1]]; "
        "import spotguard_agent.cli, spotguard_agent.installer, spotguard_core.contracts as c; "
        "import spotguard_core.requeue, spotguard_core.fleet_store, spotguard_core.fault_injection; "
        "third = {m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names); "
        "extra = sorted(third - {'boto3', 'botocore', 'jmespath', 'dateutil', 'urllib3', 's3transfer', "
        "'six', 'certifi', 'spotguard_agent', 'spotguard_core', '__main__', '__mp_main__'} "
        "- {m for m in third if m.startswith(('__editable__', '_distutils_hack', 'sitecustomize'))}); "
        "assert not extra, extra; "
        "print(c.__file__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", check, str(tmp_path / "x")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(tmp_path / "x"))


def test_template_placeholders_are_exactly_the_contract():
    assert template_placeholders(user_data_template()) == set(contracts.BOOTSTRAP_PLACEHOLDERS)


def test_rendered_user_data_is_small_and_has_no_braces_left():
    rendered = render_user_data(REALISTIC)
    size = len(rendered.encode())
    assert "${" not in rendered
    assert size < USER_DATA_LIMIT
    # The target from the design: far under the seed's 3.6 KB. See docs/agent.md for why
    # 2 KB is not reached with every required step in plain, readable bash.
    assert size < 3 * 1024, size
    for value in REALISTIC.values():
        assert value in rendered


def test_rendered_user_data_is_valid_bash():
    result = subprocess.run(["bash", "-n"], input=render_user_data(REALISTIC), text=True, check=False)
    assert result.returncode == 0


def test_render_rejects_unknown_and_missing_placeholders():
    with pytest.raises(ValueError, match="unknown placeholder"):
        render_user_data(REALISTIC, template="echo ${HOME}")
    missing = dict(REALISTIC)
    del missing["Fleet"]
    with pytest.raises(KeyError, match="Fleet"):
        render_user_data(missing)


def test_user_data_uses_no_brace_variables():
    template = user_data_template()
    braces = set(re.findall(r"\$\{([^}]*)\}", template))
    assert braces <= set(contracts.BOOTSTRAP_PLACEHOLDERS)
    assert contracts.BOOTSTRAP_LOG_FILE in template
    assert contracts.INSTALL_ROOT in template


def test_bundle_cli_prints_info(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "spotguard_tools.bundle", "build", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    info = json.loads(result.stdout)
    assert Path(info["path"]).exists()
    assert len(info["sha256"]) == 64
    assert io.BytesIO(Path(info["path"]).read_bytes()).getbuffer().nbytes == info["size_bytes"]
