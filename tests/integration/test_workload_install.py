"""The user's workload: a directory packed like the CDK asset (tar.gz on S3), unpacked by the
real installer into a temporary root, its requirements installed from its wheelhouse into
the workload venv, and run by the agent."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from spotguard_agent.execution import WorkloadConfig
from spotguard_agent.installer import Installer, InstallError
from spotguard_core.contracts import WORKLOAD_DIR, Env, Metric
from spotguard_tools.imds_emulator import ImdsEmulator, running_imds

from tests.support.agent_sandbox import Sandbox
from tests.support.moto_server import free_port
from tests.support.workload_env import (
    Workers,
    World,
    agent_config,
    pack,
    wait_for,
    write_tree,
)

pytestmark = pytest.mark.integration
PARAMETER = "/spotguard/demo/agent-config"
ASSETS = "workload-assets"

TASKS = """
import json, os, sys
from helpers.text import shout


def handle(body, context):
    task = json.loads(body)
    result = {
        "shout": shout(task["word"]),
        "cwd": os.getcwd(),
        "message_id": context.message_id,
        "env_message_id": os.environ.get("SPOTGUARD_MESSAGE_ID"),
        "python": sys.executable,
    }
    try:
        import tinydep
        result["tinydep"] = tinydep.VALUE
    except ImportError:
        result["tinydep"] = None
    with open(task["path"], "w") as f:
        json.dump(result, f)
"""
HELPERS = {"helpers/__init__.py": "", "helpers/text.py": "def shout(word):\n    return word.upper() + '!'\n"}


@pytest.fixture
def world(world: World) -> World:
    """The shared world (conftest) and the agent bundle's assets bucket."""
    boto3.client("s3").create_bucket(Bucket=ASSETS)
    return world


def upload_workload(directory: Path, key: str = "workload.tar.gz") -> dict[str, str]:
    data, sha256 = pack(directory)
    boto3.client("s3").put_object(Bucket=ASSETS, Key=key, Body=data)
    return {Env.WORKLOAD_URL.value: f"s3://{ASSETS}/{key}", Env.WORKLOAD_SHA256.value: sha256}


def make_wheel(wheelhouse: Path, name: str = "tinydep", version: str = "1.0") -> Path:
    """A dependency-free pure-Python wheel, built by hand (no build tools, no index)."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": "VALUE = 'from the wheelhouse'\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    wheelhouse.mkdir(parents=True, exist_ok=True)
    wheel = wheelhouse / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


# ---------------------------------------------------------------------- the whole path
@pytest.fixture
def imds() -> Iterator[ImdsEmulator]:
    with running_imds("i-0workload0install") as emulator:
        yield emulator


def test_the_installed_agent_runs_the_users_own_module_and_package(
    world: World, sandbox: Sandbox, staging: Path, imds: ImdsEmulator, tmp_path: Path
):
    directory = write_tree(tmp_path / "my-worker", {"tasks.py": TASKS, **HELPERS})
    config = {
        Env.WORK_QUEUE_URL.value: world.queue_url,
        Env.LEASE_TABLE.value: world.lease_table,
        Env.FLEET_TABLE.value: world.fleet_table,
        Env.HEALTH_PORT.value: str(free_port()),
        Env.HANDLER.value: "tasks:handle",
        **upload_workload(directory),
    }
    boto3.client("ssm").put_parameter(Name=PARAMETER, Type="String", Value=json.dumps(config))
    result = subprocess.run(
        [sys.executable, str(staging / "install.py"), "--deadline-epoch", str(time.time() + 120)],
        env=sandbox.env(
            **{
                Env.AGENT_CONFIG_PARAMETER.value: PARAMETER,
                Env.FLEET_NAME.value: "demo",
                Env.IMDS_URL.value: imds.url,
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    installed = sandbox.root / WORKLOAD_DIR.lstrip("/")
    assert sorted(p.relative_to(installed).as_posix() for p in installed.rglob("*.py")) == [
        "helpers/__init__.py",
        "helpers/text.py",
        "tasks.py",
    ]
    env_file = (sandbox.root / "etc/spotguard/agent.env").read_text().splitlines()
    assert f"{Env.WORKLOAD_DIR.value}={installed.resolve()}" in env_file
    assert any(line.startswith(f"{Env.WORKLOAD_PYTHON.value}=") for line in env_file)
    assert not (sandbox.root / "opt/spotguard/install-failure").exists()

    output = tmp_path / "result.json"
    message_id = world.send({"word": "hello", "path": str(output)})
    done = json.loads(wait_for(lambda: output.exists() and output.read_text(), timeout=40))
    assert done["shout"] == "HELLO!"
    assert done["cwd"] == str(installed.resolve())
    assert done["message_id"] == done["env_message_id"] == message_id
    wait_for(lambda: world.receive() == [] and world.leases(imds.instance_id) == [])


def test_requirements_come_from_the_wheelhouse_into_the_workload_venv(
    world: World, workers: Workers, tmp_path: Path, moto_server: Any
):
    directory = write_tree(
        tmp_path / "my-worker", {"tasks.py": TASKS, **HELPERS, "requirements.txt": "tinydep==1.0\n"}
    )
    make_wheel(directory / "wheelhouse")
    root = tmp_path / "root"
    installer = Installer(root=root, bundle=tmp_path, environ={})
    env = {Env.REGION.value: "us-east-1", **upload_workload(directory)}
    installer.install_workload(env)
    python = env[Env.WORKLOAD_PYTHON.value]
    assert python == str((root / "opt/spotguard/workload-venv").resolve() / "bin/python")
    check = subprocess.run(
        [python, "-c", "import tinydep, sys; print(tinydep.VALUE, sys.prefix)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert check.stdout.startswith("from the wheelhouse ")
    # And the worker runs the handler under that python.
    output = tmp_path / "result.json"
    world.send({"word": "venv", "path": str(output)})
    workload = WorkloadConfig(workload_dir=Path(env[Env.WORKLOAD_DIR.value]), python=python)
    running = workers.start(agent_config(world, handler="tasks:handle"), workload, "i-0workload0venv01")
    wait_for(lambda: running.worker.counters[Metric.TASKS_COMPLETED] == 1, timeout=30)
    done = json.loads(output.read_text())
    assert done["tinydep"] == "from the wheelhouse"
    assert done["python"].startswith(str((root / "opt/spotguard/workload-venv").resolve()))


def test_a_workload_archive_that_could_escape_its_directory_is_rejected(world: World, tmp_path: Path):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as archive:
        for name in ("tasks.py", "../escaped.py"):
            info = tarfile.TarInfo(name)
            info.size = 2
            archive.addfile(info, io.BytesIO(b"x\n"))
    data = raw.getvalue()
    boto3.client("s3").put_object(Bucket=ASSETS, Key="evil.tar.gz", Body=data)
    root = tmp_path / "root"
    installer = Installer(root=root, bundle=tmp_path, environ={})
    env = {
        Env.WORKLOAD_URL.value: f"s3://{ASSETS}/evil.tar.gz",
        Env.WORKLOAD_SHA256.value: hashlib.sha256(data).hexdigest(),
    }
    with pytest.raises(
        InstallError, match=r"workload archive rejected: unsafe path in archive: '\.\./escaped\.py'"
    ):
        installer.install_workload(env)
    assert not (root / "opt/spotguard/escaped.py").exists()
    assert not (root / WORKLOAD_DIR.lstrip("/")).exists()
    env[Env.WORKLOAD_SHA256.value] = "0" * 64
    with pytest.raises(InstallError, match="workload sha256 mismatch"):
        installer.install_workload(env)


def test_a_handler_that_cannot_be_imported_fails_the_install_with_the_import_error(tmp_path: Path):
    directory = write_tree(tmp_path / "my-worker", {"tasks.py": "import numpy_not_in_requirements\n"})
    installer = Installer(root=tmp_path / "root", bundle=tmp_path, environ={})
    env = {Env.WORKLOAD_DIR.value: str(directory), Env.HANDLER.value: "tasks:handle"}
    with pytest.raises(
        InstallError,
        match="cannot load handler tasks:handle: ModuleNotFoundError: "
        "No module named 'numpy_not_in_requirements'",
    ):
        installer.check_handler(env)
    write_tree(directory, {"tasks.py": TASKS, **HELPERS})
    installer.check_handler(env)  # imports now: no error
