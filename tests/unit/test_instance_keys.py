"""Instance keys (issue 13): an instance's items are keyed by its ARN, which is what IAM's
``${ec2:SourceInstanceARN}`` names, so ``dynamodb:LeadingKeys`` can pin them to it."""

from __future__ import annotations

import pytest
from spotguard_core import contracts, runtime_env
from spotguard_core.contracts import (
    FLEET_TABLE_PK,
    LEASE_TABLE_PK,
    LEASE_TABLE_SK,
    Env,
    FleetRecord,
    Lease,
    checked_instance_arn_prefix,
    instance_arn_prefix,
    instance_id_of_key,
    instance_key,
)

PREFIX = "arn:aws:ec2:eu-west-1:123456789012:instance/"
INSTANCE = "i-0123456789abcdef0"


def test_the_key_is_the_instance_arn_iam_sees() -> None:
    prefix = instance_arn_prefix(partition="aws", region="eu-west-1", account_id="123456789012")
    assert prefix == PREFIX
    assert instance_key(INSTANCE, prefix) == f"arn:aws:ec2:eu-west-1:123456789012:instance/{INSTANCE}"
    assert instance_id_of_key(instance_key(INSTANCE, prefix)) == INSTANCE
    china = instance_arn_prefix(partition="aws-cn", region="cn-north-1", account_id="123456789012")
    assert instance_id_of_key(instance_key(INSTANCE, china)) == INSTANCE


@pytest.mark.parametrize(
    "key", [f"instance#{INSTANCE}", INSTANCE, "message#m-1", f"{PREFIX}", "arn:aws:ec2:x:y:volume/vol-1", ""]
)
def test_anything_but_an_instance_key_is_refused(key: str) -> None:
    with pytest.raises(ValueError, match="not an instance key"):
        instance_id_of_key(key)


@pytest.mark.parametrize(
    "prefix",
    [
        "",
        "arn:aws:ec2:eu-west-1:123456789012:instance",  # no slash
        "arn:aws:ec2:eu-west-1:12345:instance/",  # not an account id
        "arn:aws:ec2::123456789012:instance/",  # no region
        "arn:aws:s3:eu-west-1:123456789012:instance/",
        "${Token[AWS.Partition.1]}",  # a CDK token that never got resolved
    ],
)
def test_a_malformed_prefix_is_refused_before_any_write(prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(Env.INSTANCE_ARN_PREFIX.value, raising=False)
    with pytest.raises(RuntimeError, match=Env.INSTANCE_ARN_PREFIX.value):
        checked_instance_arn_prefix(prefix)


def test_the_control_plane_reads_the_prefix_from_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(Env.INSTANCE_ARN_PREFIX.value, PREFIX)
    assert checked_instance_arn_prefix() == PREFIX
    assert checked_instance_arn_prefix("arn:aws-us-gov:ec2:us-gov-west-1:123456789012:instance/").startswith(
        "arn:aws-us-gov:"
    )


def test_lease_keys_and_items() -> None:
    lease = Lease(INSTANCE, "m-1", "receipt", "https://queue", leased_at=1.0, heartbeat_at=2.0)
    item = lease.to_item(PREFIX)
    assert lease.key(PREFIX) == {LEASE_TABLE_PK: PREFIX + INSTANCE, LEASE_TABLE_SK: "lease#m-1"}
    assert item[LEASE_TABLE_PK] == PREFIX + INSTANCE and item["instance_id"] == INSTANCE
    assert Lease.from_item(item) == Lease(
        INSTANCE, "m-1", "receipt", "https://queue", 1.0, 2.0, expires_at=item["expires_at"]
    )


def test_the_control_plane_trusts_the_key_not_the_plain_instance_id() -> None:
    """An instance may write only under its own ARN, but any attribute there: a forged
    ``instance_id`` attribute must not make the control plane act on another instance."""
    lease = Lease(INSTANCE, "m-1", "receipt", "https://queue", leased_at=1.0, heartbeat_at=2.0)
    forged = {**lease.to_item(PREFIX), "instance_id": "i-0victim000000000"}
    assert Lease.from_item(forged).instance_id == INSTANCE
    record = {**FleetRecord(INSTANCE, "demo").to_item(), FLEET_TABLE_PK: PREFIX + INSTANCE}
    record["instance_id"] = "i-0victim000000000"
    assert FleetRecord.from_item(record).instance_id == INSTANCE


def test_legacy_items_are_unreadable_not_misread() -> None:
    with pytest.raises(ValueError):
        FleetRecord.from_item({FLEET_TABLE_PK: INSTANCE, "instance_id": INSTANCE, "state": "ready"})
    with pytest.raises(ValueError):
        Lease.from_item(
            {
                LEASE_TABLE_PK: f"instance#{INSTANCE}",
                "instance_id": INSTANCE,
                "message_id": "m",
                "receipt_handle": "r",
                "queue_url": "q",
                "leased_at": 1,
                "heartbeat_at": 1,
            }
        )


def test_requeue_counters_stay_outside_every_instance_key() -> None:
    key = contracts.requeue_counter_key("m-1")
    assert key == {LEASE_TABLE_PK: "message#m-1", LEASE_TABLE_SK: "requeues"}
    with pytest.raises(ValueError):
        instance_id_of_key(key[LEASE_TABLE_PK])


def _resources(**names: str) -> runtime_env.FleetResources:
    return runtime_env.FleetResources(
        fleet="demo", work_queue_url="q", work_dlq_url="d", lease_table="l", fleet_table="f", **names
    )


def test_runtime_env_sets_the_prefix_for_functions_and_agent() -> None:
    resources = _resources(region="eu-west-1", account_id="123456789012")
    env = runtime_env.control_plane_env(resources, runtime_env.ControlOptions())
    assert env[Env.INSTANCE_ARN_PREFIX.value] == PREFIX
    agent = runtime_env.agent_config(runtime_env.AgentResources(fleet=resources), runtime_env.AgentOptions())
    assert agent[Env.INSTANCE_ARN_PREFIX.value] == PREFIX
    # The stack passes its own (CDK tokens, partition included): never replaced by the default.
    given = "arn:${Token[AWS.Partition.3]}:ec2:${Token[AWS.Region.1]}:${Token[AWS.AccountId.2]}:instance/"
    tokens = _resources(
        region="${Token[AWS.Region.1]}", account_id="${Token[AWS.AccountId.2]}", instance_arn_prefix=given
    )
    assert (
        runtime_env.control_plane_env(tokens, runtime_env.ControlOptions())[Env.INSTANCE_ARN_PREFIX.value]
        == given
    )
