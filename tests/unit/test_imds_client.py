"""The IMDSv2 client and the emulator, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from spotguard_agent.imds import SPOT_ACTION_PATH, ImdsClient, ImdsError
from spotguard_tools.imds_emulator import ImdsEmulator, running_imds


@pytest.fixture
def imds():
    with running_imds("i-0123456789abcdef0") as emulator:
        yield emulator


def test_emulator_refuses_imdsv1_and_expired_tokens(imds: ImdsEmulator):
    with pytest.raises(urllib.error.HTTPError) as no_token:
        urllib.request.urlopen(f"{imds.url}/latest/meta-data/instance-id", timeout=2)
    assert no_token.value.code == 401

    put = urllib.request.Request(
        f"{imds.url}/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}
    )
    token = urllib.request.urlopen(put, timeout=2).read().decode()
    get = urllib.request.Request(
        f"{imds.url}/latest/meta-data/instance-id", headers={"X-aws-ec2-metadata-token": token}
    )
    assert urllib.request.urlopen(get, timeout=2).read().decode() == "i-0123456789abcdef0"

    imds.expire_tokens()
    with pytest.raises(urllib.error.HTTPError) as expired:
        urllib.request.urlopen(get, timeout=2)
    assert expired.value.code == 401

    bad_ttl = urllib.request.Request(
        f"{imds.url}/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "0"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(bad_ttl, timeout=2)
    assert refused.value.code == 400


def test_notices_are_404_until_published_then_json(imds: ImdsEmulator):
    client = ImdsClient(imds.url)
    assert client.instance_id() == "i-0123456789abcdef0"
    assert client.spot_instance_action() is None
    assert client.rebalance_recommendation() is None
    assert client.target_lifecycle_state() == "InService"

    published = imds.set_spot_action("terminate")
    imds.set_rebalance()
    imds.set_target_lifecycle_state("Terminated")
    assert client.spot_instance_action() == published
    assert published["time"].endswith("Z")
    assert set(client.rebalance_recommendation() or {}) == {"noticeTime"}
    assert client.target_lifecycle_state() == "Terminated"
    document = client.get("/latest/dynamic/instance-identity/document").json()
    assert document["instanceId"] == "i-0123456789abcdef0"

    imds.clear()
    assert client.spot_instance_action() is None


def test_token_is_reused_and_refetched_after_401(imds: ImdsEmulator):
    client = ImdsClient(imds.url)
    for _ in range(5):
        client.spot_instance_action()
    assert client.tokens_fetched == 1
    imds.expire_tokens()
    assert client.instance_id() == "i-0123456789abcdef0"
    assert client.tokens_fetched == 2


def test_token_refreshed_before_its_ttl_ends(imds: ImdsEmulator):
    client = ImdsClient(imds.url, token_ttl_seconds=2)
    client.instance_id()
    time.sleep(1.7)  # past 80 % of the TTL: the client must not send the old token
    client.instance_id()
    assert client.tokens_fetched == 2


def test_server_errors_are_retried_then_raised(imds: ImdsEmulator):
    client = ImdsClient(imds.url, attempts=3, retry_delay_seconds=0.01)
    imds.fail_next(2, status=503)
    assert client.get(SPOT_ACTION_PATH).status == 404  # third attempt answers
    imds.fail_next(10, status=500)
    with pytest.raises(ImdsError, match="500"):
        client.spot_instance_action()


def test_timeouts_raise_imds_error(imds: ImdsEmulator):
    client = ImdsClient(imds.url, timeout_seconds=0.2, attempts=2, retry_delay_seconds=0.01)
    imds.set_delay(0.5)
    with pytest.raises(ImdsError):
        client.instance_id()
    imds.set_delay(0)
    assert client.instance_id() == "i-0123456789abcdef0"


def test_unreachable_imds_raises_imds_error():
    with running_imds() as emulator:
        url = emulator.url
    client = ImdsClient(url, timeout_seconds=0.2, attempts=2, retry_delay_seconds=0.01)
    with pytest.raises(ImdsError):
        client.instance_id()


def test_standalone_emulator_is_driven_over_its_control_api():
    process = subprocess.Popen(
        [sys.executable, "-m", "spotguard_tools.imds_emulator", "--instance-id", "i-0standalone00001"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        started = json.loads(process.stdout.readline())
        client = ImdsClient(started["url"])
        assert client.instance_id() == "i-0standalone00001"
        assert client.spot_instance_action() is None
        control = urllib.request.Request(
            f"{started['url']}/_emulator/spot-action",
            data=b'{"action": "stop", "in_seconds": 60}',
            method="POST",
        )
        published = json.loads(urllib.request.urlopen(control, timeout=2).read())
        assert client.spot_instance_action() == published
        assert published["action"] == "stop"
    finally:
        process.terminate()
        process.wait(timeout=5)


def test_scheduled_maintenance_is_listed_the_way_imds_lists_it(imds: ImdsEmulator):
    client = ImdsClient(imds.url, timeout_seconds=1.0)
    assert client.scheduled_maintenance() == []
    imds.schedule_maintenance("system-reboot")
    imds.schedule_maintenance("instance-stop", state="canceled")
    events = client.scheduled_maintenance()
    assert [(e["Code"], e["State"]) for e in events] == [
        ("system-reboot", "active"),
        ("instance-stop", "canceled"),
    ]
    # "21 Jan 2019 09:00:43 GMT", as documented for events/maintenance/scheduled.
    assert events[0]["NotBefore"].endswith(" GMT") and len(events[0]["NotBefore"].split()) == 5
    assert {"EventId", "Description", "NotAfter"} <= set(events[0])


def test_a_garbled_maintenance_list_is_an_imds_error(imds: ImdsEmulator):
    client = ImdsClient(imds.url, timeout_seconds=1.0)
    with imds.state.lock:
        imds.state.maintenance_events = {"not": "a list"}  # type: ignore[assignment]
    with pytest.raises(ImdsError, match="not a list"):
        client.scheduled_maintenance()
