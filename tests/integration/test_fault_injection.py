"""The AWS fault injector against the moto server: seeded faults in each service's own wire
format, botocore retries recovering them, latency added per attempt, the count file."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from spotguard_core import aws, fault_injection
from spotguard_core.contracts import Env
from spotguard_core.fault_injection import FaultInjector, FaultSettings, total_counts

pytestmark = pytest.mark.integration


def bare_client(service: str, attempts: int = 1) -> Any:
    """A client without spotguard's factory (so only the injector under test is installed)."""
    config = Config(retries={"mode": "standard", "total_max_attempts": attempts})
    return boto3.session.Session(region_name="us-east-1").client(service, config=config)  # type: ignore[call-overload]


@pytest.fixture(autouse=True)
def _clean_process_injector():
    aws.reset_clients()
    yield
    aws.reset_clients()


@pytest.mark.parametrize(
    ("service", "call", "code"),
    [
        ("sqs", lambda c: c.list_queues(), "RequestThrottled"),
        ("dynamodb", lambda c: c.list_tables(), "ProvisionedThroughputExceededException"),
        ("ec2", lambda c: c.describe_instances(), "RequestLimitExceeded"),
        ("autoscaling", lambda c: c.describe_auto_scaling_groups(), "Throttling"),
        ("cloudwatch", lambda c: c.list_metrics(), "ThrottlingException"),
        ("events", lambda c: c.list_rules(), "ThrottlingException"),
        ("s3", lambda c: c.list_buckets(), "SlowDown"),
    ],
)
def test_throttling_is_answered_in_each_services_wire_format(moto_server, service, call, code):
    client = FaultInjector(FaultSettings(fault_rate=1.0), throttle_share=1.0).install(bare_client(service))
    with pytest.raises(ClientError) as raised:
        call(client)
    assert raised.value.response["Error"]["Code"] == code


def test_server_errors_are_bare_5xx(moto_server):
    client = FaultInjector(FaultSettings(fault_rate=1.0), throttle_share=0.0).install(bare_client("sqs"))
    with pytest.raises(ClientError) as raised:
        client.list_queues()
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] in (500, 503)


def test_a_seeded_fraction_fails_and_the_same_seed_fails_the_same_calls(moto_server):
    def pattern(seed: int) -> list[bool]:
        client = FaultInjector(FaultSettings(fault_rate=0.3, seed=seed)).install(bare_client("sqs"))
        outcome = []
        for _ in range(60):
            try:
                client.list_queues()
                outcome.append(False)
            except ClientError:
                outcome.append(True)
        return outcome

    first, again, other = pattern(11), pattern(11), pattern(12)
    # The decision is the seeded generator's first draw of each pair, nothing else.
    rng = random.Random(11)
    expected = []
    for _ in range(60):
        expected.append(rng.random() < 0.3)
        rng.random()
    assert first == expected == again
    assert first != other
    assert 8 <= sum(first) <= 30, "about 30 % of 60 calls"


def test_botocore_retries_recover_every_injected_fault(moto_server):
    injector = FaultInjector(FaultSettings(fault_rate=0.3, seed=3))
    client = injector.install(bare_client("dynamodb", attempts=10))
    for _ in range(40):
        assert "TableNames" in client.list_tables()
    counts = injector.counts()
    assert counts["faults_injected"] > 0
    assert counts["calls"] == 40 + counts["faults_injected"], "every fault cost exactly one retry"


def test_latency_is_added_to_every_attempt(moto_server):
    client = FaultInjector(FaultSettings(latency_ms=60)).install(bare_client("sqs"))
    client.list_queues()  # connection set-up outside the measurement
    started = time.perf_counter()
    for _ in range(3):
        client.list_queues()
    assert time.perf_counter() - started >= 0.18


def test_the_factory_installs_the_injector_from_the_environment_and_writes_the_count_file(
    moto_server, monkeypatch, tmp_path: Path
):
    monkeypatch.setenv(Env.AWS_FAULT_RATE.value, "0.25")
    monkeypatch.setenv(Env.AWS_FAULT_SEED.value, "5")
    monkeypatch.setenv(Env.AWS_FAULT_LOG_DIR.value, str(tmp_path))
    aws.reset_clients()
    sqs = aws.client("sqs")
    agent_side = aws.ClientFactory("us-east-1", retry_mode="standard").client("dynamodb")
    for _ in range(20):
        sqs.list_queues()
        agent_side.list_tables()
    injector = fault_injection.process_injector()
    assert injector is not None and injector.faults_injected > 0
    count_file = tmp_path / f"faults-{os.getpid()}.json"
    time.sleep(fault_injection.COUNT_FILE_INTERVAL_SECONDS * 2.5)
    written = json.loads(count_file.read_text())
    assert written == injector.counts()
    assert written["calls"] == 40 + written["faults_injected"]


def test_a_process_writes_its_final_counts_at_exit(moto_server, tmp_path: Path):
    script = "from spotguard_core import aws\nc = aws.client('sqs')\nfor _ in range(15): c.list_queues()\n"
    env = {
        **os.environ,
        **moto_server.environment(),
        Env.AWS_FAULT_RATE.value: "0.2",
        Env.AWS_FAULT_SEED.value: "9",
        Env.AWS_LATENCY_MS.value: "1",
        Env.AWS_FAULT_LOG_DIR.value: str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, timeout=60, check=False, capture_output=True
    )
    assert done.returncode == 0, done.stderr
    files = list(tmp_path.glob("faults-*.json"))
    assert len(files) == 1, files
    totals = total_counts(tmp_path)
    assert totals["faults_injected"] > 0
    assert totals["calls"] == 15 + totals["faults_injected"]
