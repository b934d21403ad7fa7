"""The stage-1 user data, rendered like Fn::Sub renders it and run by bash in a sandbox.

The AWS CLI (awscli in .venv) talks to the moto server: the bundle is downloaded from a
moto S3 bucket, the failure record goes to a moto DynamoDB table, tags to a moto EC2
instance. systemctl, shutdown, logger, sleep and dnf are stand-ins on PATH
(tests/support/agent_sandbox.py); the installer and the agent are the real ones.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from spotguard_core.contracts import (
    BOOTSTRAP_REASON_TAG_KEY,
    BOOTSTRAP_TAG_KEY,
    Env,
)
from spotguard_tools.bundle import BundleInfo, build_bundle, render_user_data
from spotguard_tools.imds_emulator import ImdsEmulator
from spotguard_tools.local_tables import TableKind, create_table

from tests.support.agent_sandbox import Sandbox
from tests.support.moto_server import MOTO_INSTANCE_ARN_PREFIX, free_port, moto_fleet_key

pytestmark = pytest.mark.integration
BUCKET = "cdk-hnb659fds-assets-123456789012-us-east-1"
CONFIG_PARAMETER = "/spotguard/demo/agent-config"


def uptime_seconds() -> int:
    return int(float(Path("/proc/uptime").read_text().split()[0]))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> BundleInfo:
    return build_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture
def instance(moto_server: Any) -> Iterator[tuple[str, ImdsEmulator]]:
    ec2 = boto3.client("ec2")
    instance_id = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1, InstanceType="m5.large")[
        "Instances"
    ][0]["InstanceId"]
    emulator = ImdsEmulator(instance_id).start()
    yield instance_id, emulator
    emulator.stop()


@pytest.fixture
def world(moto_server: Any, bundle: BundleInfo) -> dict[str, Any]:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    key = f"{bundle.sha256}.tar.gz"
    dynamodb = boto3.client("dynamodb")
    create_table(dynamodb, TableKind.FLEET, "fleet")
    create_table(dynamodb, TableKind.LEASES, "leases")
    queue_url = boto3.client("sqs").create_queue(QueueName="work")["QueueUrl"]
    health_port = free_port()
    boto3.client("ssm").put_parameter(
        Name=CONFIG_PARAMETER,
        Type="String",
        Value=json.dumps(
            {
                Env.WORK_QUEUE_URL.value: queue_url,
                Env.LEASE_TABLE.value: "leases",
                Env.FLEET_TABLE.value: "fleet",
                Env.HEALTH_PORT.value: str(health_port),
                Env.IMDS_POLL_SECONDS.value: "0.5",
                Env.HANDLER.value: "spotguard_agent.sample_handler:handle",
            }
        ),
    )
    return {"key": key, "health_port": health_port, "bundle": bundle}


def values(
    bundle: BundleInfo, *, key: str, sha256: str | None = None, deadline: int | None = None
) -> dict[str, str]:
    """Realistic values. The deadline counts from boot, so the default is 20 min from now."""
    if deadline is None:
        deadline = uptime_seconds() + 1200
    return {
        "Fleet": "demo",
        "Region": "us-east-1",
        "BundleUrl": f"s3://{BUCKET}/{key}",
        "BundleSha256": sha256 or bundle.sha256,
        "DeadlineSeconds": str(deadline),
        "FleetTable": "fleet",
        "InstanceArnPrefix": MOTO_INSTANCE_ARN_PREFIX,
        "AsgName": "spotguard-demo",
        "LaunchHook": "spotguard-launch",
        "ConfigParameter": CONFIG_PARAMETER,
    }


def run_user_data(
    sandbox: Sandbox, imds: ImdsEmulator, rendered: str, timeout: float = 90, **env: str
) -> int:
    script = sandbox.base / "user-data.sh"
    script.write_text(rendered)
    # What cloud-init leaves before it runs user data: its copy of the instance id (read
    # from IMDS in its first stage) and /var/log.
    cloud_data = sandbox.root / "var/lib/cloud/data"
    cloud_data.mkdir(parents=True, exist_ok=True)
    (cloud_data / "instance-id").write_text(imds.instance_id + "\n")
    (sandbox.root / "var/log").mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["bash", str(script)],
        env=sandbox.env(SPOTGUARD_IMDS_URL=imds.url, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return result.returncode


def log_of(sandbox: Sandbox) -> str:
    path = sandbox.root / "var/log/spotguard-bootstrap.log"
    # The log is written through a process substitution that may finish a moment later.
    for _ in range(50):
        if path.exists() and ("FATAL" in path.read_text() or "bootstrap done" in path.read_text()):
            break
        time.sleep(0.05)
    return path.read_text() if path.exists() else ""


def fleet_record(instance_id: str) -> dict[str, Any]:
    return boto3.resource("dynamodb").Table("fleet").get_item(Key=moto_fleet_key(instance_id)).get("Item", {})


def tags(instance_id: str) -> dict[str, str]:
    described = boto3.client("ec2").describe_tags(Filters=[{"Name": "resource-id", "Values": [instance_id]}])
    return {tag["Key"]: tag["Value"] for tag in described["Tags"]}


def assert_failed_and_shut_down(sandbox: Sandbox, instance_id: str, code: int, reason: str) -> None:
    assert code == 1
    log = log_of(sandbox)
    assert f"FATAL: {reason}" in log
    assert sandbox.recorded("shutdown") == ["-h now"]
    record = fleet_record(instance_id)
    assert record["bootstrap_status"] == "failed"
    assert reason in record["bootstrap_reason"]
    assert record["fleet"] == "demo"
    instance_tags = tags(instance_id)
    assert instance_tags[BOOTSTRAP_TAG_KEY] == "failed"
    assert reason in instance_tags[BOOTSTRAP_REASON_TAG_KEY]
    assert sandbox.text("journal.log"), "the bootstrap also logs to the journal"


def test_download_retries_with_backoff_then_installs_and_reports_ready(sandbox, instance, world):
    instance_id, imds = instance
    bundle: BundleInfo = world["bundle"]

    def upload_after_two_failures() -> None:
        while len(sandbox.recorded("sleep")) < 2:
            time.sleep(0.02)
        boto3.client("s3").upload_file(str(bundle.path), BUCKET, world["key"])

    uploader = threading.Thread(target=upload_after_two_failures, daemon=True)
    uploader.start()
    rendered = render_user_data(values(bundle, key=world["key"]))
    code = run_user_data(sandbox, imds, rendered, FAKE_SLEEP_SCALE="0.02")
    log = log_of(sandbox)
    assert code == 0, log + sandbox.text("spotguard-agent.service.out")
    assert "bootstrap done" in log
    assert [int(s) for s in sandbox.recorded("sleep") if int(s) >= 10][:2] == [10, 20], "exponential backoff"
    assert log.count("retry in") == 2
    assert sandbox.recorded("shutdown") == []
    # Units active, health port listening, ready reported.
    assert "enable spotguard-agent.service" in sandbox.recorded("systemctl")
    health = json.loads(
        urllib.request.urlopen(f"http://127.0.0.1:{world['health_port']}/health", timeout=5).read()
    )
    assert health["instance_id"] == instance_id
    record = fleet_record(instance_id)
    assert record["bootstrap_status"] == "ready"
    assert record["state"] == "ready"
    assert tags(instance_id)[BOOTSTRAP_TAG_KEY] == "ready"
    env_file = (sandbox.root / "etc/spotguard/agent.env").read_text()
    assert f"{Env.LEASE_TABLE.value}=leases" in env_file
    assert (sandbox.root / "opt/spotguard/lib/spotguard_agent/worker.py").exists()


def test_download_gives_up_after_five_retries(sandbox, instance, world):
    instance_id, imds = instance
    rendered = render_user_data(values(world["bundle"], key="missing.tar.gz"))
    code = run_user_data(sandbox, imds, rendered)
    assert [int(s) for s in sandbox.recorded("sleep") if int(s) >= 10] == [10, 20, 40, 50, 50]
    assert_failed_and_shut_down(sandbox, instance_id, code, "download failed after 5 retries")


def test_deadline_stops_the_retries(sandbox, instance, world):
    instance_id, imds = instance
    # 40 s from boot: the retries' backoff (10+20+40+50+50 s) cannot fit, and no backoff may
    # sleep past the deadline (sleeps are scaled down, the deadline check is not).
    rendered = render_user_data(values(world["bundle"], key="missing.tar.gz", deadline=uptime_seconds() + 40))
    code = run_user_data(sandbox, imds, rendered, FAKE_SLEEP_SCALE="0.05")
    assert_failed_and_shut_down(sandbox, instance_id, code, "deadline passed in download")
    backoffs = [int(s) for s in sandbox.recorded("sleep") if int(s) >= 10]
    assert backoffs == [10, 20, 40, 50, 50][: len(backoffs)]
    assert sum(backoffs) < 40, "never sleeps past the deadline"


def test_hash_mismatch_is_fatal(sandbox, instance, world):
    instance_id, imds = instance
    boto3.client("s3").upload_file(str(world["bundle"].path), BUCKET, world["key"])
    rendered = render_user_data(values(world["bundle"], key=world["key"], sha256="0" * 64))
    code = run_user_data(sandbox, imds, rendered)
    assert_failed_and_shut_down(sandbox, instance_id, code, "bundle sha256 mismatch")
    assert not (sandbox.root / "opt/spotguard/staging/install.py").exists(), "nothing unverified is run"


def test_failed_verification_is_recorded_and_shuts_down(sandbox, instance, world):
    instance_id, imds = instance
    boto3.client("s3").upload_file(str(world["bundle"].path), BUCKET, world["key"])
    # The unit never becomes active; the installer gives up after its verification time.
    rendered = render_user_data(values(world["bundle"], key=world["key"]))
    code = run_user_data(
        sandbox, imds, rendered, FAKE_SYSTEMCTL_FAIL="start", **{Env.INSTALL_VERIFY_SECONDS.value: "3"}
    )
    assert_failed_and_shut_down(
        sandbox, instance_id, code, "install failed: verification failed: spotguard-agent.service not active"
    )


def test_rendered_user_data_is_under_2kb_with_realistic_names(world):
    """Issue 15's target with the longest legal asset bucket name and a CloudFormation
    table name (the infrastructure test checks the synthesized template the same way)."""
    bucket = "cdk-hnb659fds-assets-123456789012-ap-southeast-2"
    realistic = {
        **values(world["bundle"], key="0" * 64 + ".tar.gz"),
        "Fleet": "default",
        "Region": "ap-southeast-2",
        "BundleUrl": f"s3://{bucket + 'x' * (63 - len(bucket))}/{'0' * 64}.tar.gz",
        "FleetTable": "Spotguard-default-TablesFleet4F2B1A9C-1Q2W3E4R5T6Y7",
        "InstanceArnPrefix": "arn:aws:ec2:ap-southeast-2:123456789012:instance/",
        "AsgName": "spotguard-default",
        "ConfigParameter": "/spotguard/default/agent-config",
    }
    rendered = render_user_data(realistic)
    assert len(rendered.encode()) < 2048
    assert "base64" not in rendered and "gunzip" not in rendered, "readable shell"
