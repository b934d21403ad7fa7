"""The installer run for real in a temporary root (systemctl is the sandbox's stand-in)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from spotguard_agent.installer import Installer
from spotguard_core.contracts import Env
from spotguard_tools.imds_emulator import ImdsEmulator, running_imds
from spotguard_tools.local_tables import TableKind, create_table

from tests.support.agent_sandbox import Sandbox
from tests.support.moto_server import free_port, moto_fleet_key

pytestmark = pytest.mark.integration
PARAMETER = "/spotguard/demo/agent-config"


@pytest.fixture
def imds() -> Iterator[ImdsEmulator]:
    with running_imds("i-0installer000001") as emulator:
        yield emulator


@pytest.fixture
def agent_config(moto_server: Any) -> dict[str, str]:
    dynamodb = boto3.client("dynamodb")
    create_table(dynamodb, TableKind.FLEET, "fleet")
    create_table(dynamodb, TableKind.LEASES, "leases")
    config = {
        Env.WORK_QUEUE_URL.value: boto3.client("sqs").create_queue(QueueName="work")["QueueUrl"],
        Env.LEASE_TABLE.value: "leases",
        Env.FLEET_TABLE.value: "fleet",
        Env.HEALTH_PORT.value: str(free_port()),
        Env.HANDLER.value: "spotguard_agent.sample_handler:handle",
    }
    boto3.client("ssm").put_parameter(Name=PARAMETER, Type="String", Value=json.dumps(config))
    return config


def install(sandbox: Sandbox, staging: Path, imds: ImdsEmulator) -> subprocess.CompletedProcess[str]:
    env = sandbox.env(
        **{
            Env.AGENT_CONFIG_PARAMETER.value: PARAMETER,
            Env.FLEET_NAME.value: "demo",
            Env.IMDS_URL.value: imds.url,
            "AWS_DEFAULT_REGION": "us-east-1",  # what stage 1 exports
        }
    )
    return subprocess.run(
        [
            sys.executable,
            str(staging / "install.py"),
            "--root",
            str(sandbox.root),
            "--bundle",
            str(staging),
            "--instance-id",
            imds.instance_id,
            "--deadline-epoch",
            str(time.time() + 120),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def snapshot(root: Path) -> dict[str, str]:
    """Every file and link under the root with its content hash (or link target)."""
    result = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if "__pycache__" in relative or relative.endswith(".lock"):
            continue
        if path.is_symlink():
            result[relative] = "-> " + str(path.readlink())
        elif path.is_file():
            result[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def test_installing_twice_gives_the_same_result_and_no_duplicate_units(sandbox, staging, imds, agent_config):
    first = install(sandbox, staging, imds)
    assert first.returncode == 0, first.stderr
    after_first = snapshot(sandbox.root)
    first_pid = (sandbox.state / "spotguard-agent.service.pid").read_text()

    second = install(sandbox, staging, imds)
    assert second.returncode == 0, second.stderr
    after_second = snapshot(sandbox.root)

    assert after_second == after_first
    units = sorted(p.name for p in (sandbox.root / "etc/systemd/system").rglob("*.service"))
    assert units == ["spotguard-agent.service", "spotguard-agent.service"]  # the unit + its wants/ link
    assert (sandbox.root / "etc/systemd/system/multi-user.target.wants/spotguard-agent.service").is_symlink()
    # The unit points at the installed code and the env file under the root.
    unit = (sandbox.root / "etc/systemd/system/spotguard-agent.service").read_text()
    assert f"EnvironmentFile={sandbox.root.resolve()}/etc/spotguard/agent.env" in unit
    assert "Restart=on-failure" in unit
    assert "@" not in unit.split("[Unit]", 1)[1].replace("network-online", "")
    env_file = (sandbox.root / "etc/spotguard/agent.env").read_text()
    for name, value in agent_config.items():
        assert f"{name}={value}" in env_file
    # systemd gives the agent nothing but this file: the region must be in it.
    assert "AWS_DEFAULT_REGION=us-east-1" in env_file.splitlines()
    assert f"{Env.REGION.value}=us-east-1" in env_file.splitlines()
    assert (sandbox.root / "usr/local/bin/spotguard-agent").stat().st_mode & 0o111
    # Re-running restarted the one agent (a new process), it did not start a second one.
    assert (sandbox.state / "spotguard-agent.service.pid").read_text() != first_pid
    assert sandbox.recorded("systemctl").count("restart spotguard-agent.service") == 2
    health = urllib.request.urlopen(
        f"http://127.0.0.1:{agent_config[Env.HEALTH_PORT.value]}/health", timeout=5
    ).read()
    assert json.loads(health)["instance_id"] == imds.instance_id
    record = boto3.resource("dynamodb").Table("fleet").get_item(Key=moto_fleet_key(imds.instance_id))["Item"]
    assert record["bootstrap_status"] == "ready"


def test_unreadable_config_fails_with_a_reason(sandbox, staging, imds, moto_server):
    result = install(sandbox, staging, imds)
    assert result.returncode == 1
    reason = (sandbox.root / "opt/spotguard/install-failure").read_text()
    assert "agent config parameter /spotguard/demo/agent-config unreadable" in reason
    assert sandbox.recorded("systemctl") == []


def test_waits_for_cloud_init_earlier_stages(tmp_path: Path):
    status = tmp_path / "run/cloud-init/status.json"
    status.parent.mkdir(parents=True)
    status.write_text(json.dumps({"v1": {"stage": "modules-config"}}))
    installer = Installer(root=tmp_path, bundle=tmp_path, environ={})

    def finish_config_stage() -> None:
        time.sleep(0.5)
        status.write_text(json.dumps({"v1": {"stage": "modules-final"}}))

    threading.Thread(target=finish_config_stage, daemon=True).start()
    started = time.monotonic()
    installer.wait_for_cloud_init(poll_seconds=0.05)
    assert 0.4 <= time.monotonic() - started < 5


def test_invalid_agent_config_fails_before_any_unit_is_started(sandbox, staging, imds, moto_server):
    boto3.client("ssm").put_parameter(
        Name=PARAMETER, Type="String", Value=json.dumps({Env.LEASE_TABLE.value: "leases"})
    )
    result = install(sandbox, staging, imds)
    assert result.returncode == 1
    reason = (sandbox.root / "opt/spotguard/install-failure").read_text()
    assert "agent configuration invalid" in reason
    assert Env.WORK_QUEUE_URL.value in reason, "the reason says what to change"
    assert sandbox.recorded("systemctl") == []
