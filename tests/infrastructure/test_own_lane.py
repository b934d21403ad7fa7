"""A compromised worker stays in its own lane (issue 13): the instance role may write and read
only its own leases and fleet record (``dynamodb:LeadingKeys`` = its instance ARN), and the one
shared item kind, requeue counters, only through a narrow statement."""

from __future__ import annotations

import json

import pytest
from spotguard_core import contracts
from spotguard_core.contracts import Env

from tests.infrastructure.conftest import Synth
from tests.infrastructure.test_hardening import instance_statements
from tests.infrastructure.test_stack import _as_list, spotguard_functions

pytestmark = [pytest.mark.infrastructure, pytest.mark.xdist_group("synth")]

WRITES = {"dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem", "dynamodb:BatchWriteItem"}


def _dynamodb_statements(synth: Synth) -> dict[str, dict]:
    return {
        sid: s
        for sid, s in instance_statements(synth).items()
        if any(a.startswith("dynamodb:") for a in _as_list(s["Action"]))
    }


def _table_refs(statement: dict) -> set[str]:
    return {json.dumps(r, sort_keys=True) for r in _as_list(statement["Resource"])}


def test_every_instance_table_statement_is_pinned_by_leading_keys(any_synth: Synth) -> None:
    statements = _dynamodb_statements(any_synth)
    assert set(statements) == {"OwnLeasesAndFleetRecord", "SharedRequeueCountersOnly"}
    for sid, statement in statements.items():
        leading = {
            operator: keys["dynamodb:LeadingKeys"]
            for operator, keys in statement["Condition"].items()
            if "dynamodb:LeadingKeys" in keys
        }
        assert leading, f"{sid} has no dynamodb:LeadingKeys condition"
        assert all(op.startswith("ForAllValues:") for op in leading), (sid, leading)
        assert "dynamodb:Scan" not in _as_list(statement["Action"]), (
            "Scan has no keys: ForAllValues would pass"
        )
        assert statement["Effect"] == "Allow"


def test_own_items_only_under_the_calling_instances_arn(any_synth: Synth) -> None:
    own = _dynamodb_statements(any_synth)["OwnLeasesAndFleetRecord"]
    assert own["Condition"] == {
        "ForAllValues:StringEquals": {"dynamodb:LeadingKeys": ["${ec2:SourceInstanceARN}"]}
    }
    assert set(_as_list(own["Action"])) >= WRITES
    assert "dynamodb:BatchGetItem" not in _as_list(own["Action"])
    resources = json.dumps(own["Resource"])
    assert "TablesLeases" in resources and "TablesFleet" in resources


def test_requeue_counters_are_the_only_shared_items_and_narrow(any_synth: Synth) -> None:
    counters = _dynamodb_statements(any_synth)["SharedRequeueCountersOnly"]
    assert _as_list(counters["Action"]) == ["dynamodb:GetItem", "dynamodb:UpdateItem"]
    assert "TablesLeases" in json.dumps(counters["Resource"])
    assert "TablesFleet" not in json.dumps(counters["Resource"])
    condition = counters["Condition"]
    assert condition["ForAllValues:StringLike"] == {"dynamodb:LeadingKeys": ["message#*"]}
    assert sorted(condition["ForAllValues:StringEquals"]["dynamodb:Attributes"]) == sorted(
        [
            contracts.LEASE_TABLE_PK,
            contracts.LEASE_TABLE_SK,
            contracts.REQUEUE_COUNTER_ATTRIBUTE,
            contracts.TTL_ATTRIBUTE,
        ]
    )
    assert condition["StringEqualsIfExists"]["dynamodb:Select"] == "SPECIFIC_ATTRIBUTES"
    assert "ALL_NEW" not in json.dumps(condition["StringEqualsIfExists"]["dynamodb:ReturnValues"])
    # The counter key really is what the statement names.
    assert contracts.requeue_counter_key("m-1")[contracts.LEASE_TABLE_PK].startswith("message#")


def _is_prefix_token(value: object) -> bool:
    """``arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:instance/`` as CFN renders it."""
    text = json.dumps(value)
    return all(p in text for p in ("AWS::Partition", "AWS::Region", "AWS::AccountId", ":instance/"))


def test_functions_agent_config_and_user_data_share_the_instance_arn_prefix(default_synth: Synth) -> None:
    functions = spotguard_functions(default_synth)
    assert functions
    for name, function in functions.items():
        variables = function["Properties"]["Environment"]["Variables"]
        assert _is_prefix_token(variables[Env.INSTANCE_ARN_PREFIX.value]), name
    (parameter,) = [
        p
        for p in default_synth.of_type("AWS::SSM::Parameter").values()
        if Env.INSTANCE_ARN_PREFIX.value in json.dumps(p["Properties"]["Value"])
    ]
    assert _is_prefix_token(parameter["Properties"]["Value"])
    (template,) = default_synth.of_type("AWS::EC2::LaunchTemplate").values()
    user_data = json.dumps(template["Properties"]["LaunchTemplateData"]["UserData"])
    assert "InstanceArnPrefix" in user_data and _is_prefix_token(user_data)
