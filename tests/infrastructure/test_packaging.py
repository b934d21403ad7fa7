"""Packaging: the wheel carries the construct library with its Lambda and agent assets.

Build the wheel from a copy of the sources, install it (``--no-deps``) into a fresh virtual
environment and synthesize the user's two-fleet app from a directory outside the checkout.
The fresh environment borrows the third-party dependencies (aws-cdk-lib, cdk-nag, pydantic …)
from the test's own environment through a path entry, so nothing is downloaded; spotguard
itself comes only from the wheel (the test checks where each package is imported from).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.infrastructure.conftest import REPO_ROOT, TWO_FLEETS_APP, synth_environment

pytestmark = [pytest.mark.infrastructure]

SOURCES = ("lambdas", "instance_assets", "tools", "stacks", "pyproject.toml", "setup.py", "README.md")
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".*_cache", "_assets")


def build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    source.mkdir()
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=_IGNORE)
        else:
            shutil.copy2(path, source / name)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(dist), str(source)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    (wheel,) = dist.glob("spotguard-*.whl")
    return wheel


def fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # Third-party dependencies only: a plain path entry (its .pth files, such as this
    # checkout's editable install, are not processed).
    (purelib / "zz-borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet", str(wheel)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return python


def test_wheel_has_the_library_and_its_assets_and_synthesizes_a_user_app(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "spotguard_cdk/__init__.py",
        "spotguard_cdk/construct.py",
        "spotguard_cdk/_assets/instance_assets/bootstrap/user-data.sh",
        "spotguard_cdk/_assets/instance_assets/install.py",
        "spotguard_cdk/_assets/instance_assets/systemd/spotguard-agent.service",
        "spotguard_cdk/_assets/instance_assets/spotguard_agent/worker.py",
        "spotguard_core/contracts.py",
        "spotguard_core/runtime_env.py",
        "spotguard_functions/dispatcher.py",
    ):
        assert required in names, required
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]

    python = fresh_venv(tmp_path, wheel)
    app_dir = tmp_path / "user-app"
    shutil.copytree(TWO_FLEETS_APP.parent, app_dir, ignore=shutil.ignore_patterns("__pycache__"))
    where = subprocess.run(
        [
            str(python),
            "-c",
            "import json, spotguard_cdk, spotguard_core, spotguard_functions, spotguard_cdk.bundle as b;"
            "print(json.dumps([spotguard_cdk.__file__, spotguard_core.__file__, "
            "spotguard_functions.__file__, str(b.INSTANCE_ASSETS)]))",
        ],
        cwd=app_dir,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    venv = tmp_path / "venv"
    for path in json.loads(where.stdout):
        assert Path(path).is_relative_to(venv), path  # not the checkout

    outdir = tmp_path / "cdk.out"
    env = synth_environment(outdir, {})
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [str(python), "two_fleets.py"],
        cwd=app_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((outdir / "validation-report.json").read_text())
    assert [v for p in report["pluginReports"] for v in p["violations"]] == []
    template = json.loads((outdir / "MediaPipeline.template.json").read_text())
    groups = [r for r in template["Resources"].values() if r["Type"] == "AWS::AutoScaling::AutoScalingGroup"]
    assert len(groups) == 2

    # The staged assets: the agent bundle (from the packaged instance assets) and the Lambda code.
    bundles = [p for p in outdir.glob("asset.*.tar.gz") if _has(p, "spotguard_agent/worker.py")]
    assert len(bundles) == 1
    assert _has(bundles[0], "spotguard_core/contracts.py") and _has(bundles[0], "bootstrap/user-data.sh")
    lambda_assets = [
        p for p in outdir.glob("asset.*") if (p / "spotguard_functions" / "dispatcher.py").is_file()
    ]
    assert len(lambda_assets) == 1
    assert not list(lambda_assets[0].rglob("__pycache__"))
    workloads = [p for p in outdir.glob("asset.*.tar.gz") if _has(p, "tasks.py") or _has(p, "encode.sh")]
    assert len(workloads) == 2


def _has(archive: Path, name: str) -> bool:
    with tarfile.open(archive) as tar:
        return name in tar.getnames()
