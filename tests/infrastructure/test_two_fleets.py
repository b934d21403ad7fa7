"""A user's own CDK app with two ``SpotWorkerFleet``s on two of the user's queues in one stack
(apps/two_fleets.py): each fleet is its own world (ASG, launch template, agent configuration,
tables, control plane), its roles reach only its own queue, tables and tag, and the user's
queues are used as given. cdk-nag and cfn-lint run on it in test_compliance.py."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from spotguard_cdk.workload import workload_bytes
from spotguard_core import contracts
from spotguard_core.contracts import Env

from tests.infrastructure.conftest import TWO_FLEETS_APP, Synth
from tests.infrastructure.test_stack import (
    _as_list,
    _statements,
    identity_policy_statements,
    role_policy_statements,
)

pytestmark = [pytest.mark.infrastructure, pytest.mark.xdist_group("synth")]

FLEETS = {"render-fleet": "RenderFleet", "encode-fleet": "EncodeFleet"}
USER_QUEUES = {"render-fleet": "Renders", "encode-fleet": "Encodes"}


def owned_by(synth: Synth, prefix: str, resource_type: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in synth.of_type(resource_type).items() if k.startswith(prefix)}


def only_id(synth: Synth, prefix: str, resource_type: str) -> str:
    (logical_id,) = owned_by(synth, prefix, resource_type)
    return logical_id


def refs(value: Any) -> set[str]:
    """Logical ids a policy fragment references (Ref / Fn::GetAtt)."""
    text = json.dumps(value)
    found = set()
    for resource_id in json.loads(json.dumps(list(FLEET_RESOURCE_IDS))):
        if f'"{resource_id}"' in text:
            found.add(resource_id)
    return found


FLEET_RESOURCE_IDS: set[str] = set()


@pytest.fixture(scope="module")
def template(two_fleets_synth: Synth) -> Synth:
    FLEET_RESOURCE_IDS.clear()
    for logical_id, resource in two_fleets_synth.resources.items():
        if resource["Type"] in {"AWS::SQS::Queue", "AWS::DynamoDB::Table"}:
            FLEET_RESOURCE_IDS.add(logical_id)
    return two_fleets_synth


def test_two_asgs_two_launch_templates_names_and_tags_do_not_collide(template: Synth) -> None:
    groups = template.of_type("AWS::AutoScaling::AutoScalingGroup")
    assert len(groups) == 2
    assert len(template.of_type("AWS::EC2::LaunchTemplate")) == 2
    for fleet, prefix in FLEETS.items():
        (group,) = owned_by(template, prefix, "AWS::AutoScaling::AutoScalingGroup").values()
        props = group["Properties"]
        assert props["AutoScalingGroupName"] == contracts.asg_name(fleet)
        tags = {t["Key"]: t["Value"] for t in props["Tags"]}
        assert tags[contracts.FLEET_TAG_KEY] == fleet  # the fleet name comes from the construct id
        (launch_template,) = owned_by(template, prefix, "AWS::EC2::LaunchTemplate").values()
        spec_tags = {
            t["Key"]: t["Value"]
            for spec in launch_template["Properties"]["LaunchTemplateData"]["TagSpecifications"]
            for t in spec["Tags"]
        }
        assert spec_tags[contracts.FLEET_TAG_KEY] == fleet
    # Physical names are unique per resource type (an ASG and a bus may share one).
    names = [
        (r["Type"], r["Properties"][key])
        for r in template.resources.values()
        for key in ("Name", "EventBusName", "DashboardName", "LogGroupName", "AutoScalingGroupName")
        if isinstance(r["Properties"].get(key), str)
    ]
    assert len(names) == len(set(names)), names
    assert len(template.of_type("AWS::SSM::Parameter")) == 2


def test_user_queues_are_used_as_given(template: Synth) -> None:
    queues = template.of_type("AWS::SQS::Queue")
    # The user's 2 queues + 2 DLQs, and per fleet its signal and notify queues with DLQs and
    # its async-failure queue: no work queue of its own.
    assert len(queues) == 4 + 2 * 5
    assert not [k for k in queues if "WorkQueue" in k or "PoisonDeadLetter" in k]
    for fleet, prefix in FLEETS.items():
        (parameter,) = owned_by(template, prefix, "AWS::SSM::Parameter").values()
        value = json.dumps(parameter["Properties"]["Value"])
        queue_id = next(k for k in queues if k.startswith(USER_QUEUES[fleet]) and "Dlq" not in k)
        dlq_id = next(k for k in queues if k.startswith(USER_QUEUES[fleet] + "Dlq"))
        assert queue_id in value and dlq_id in value
        visibility = queues[queue_id]["Properties"]["VisibilityTimeout"]
        # The agent extends visibility by the queue's own timeout.
        assert f'\\"{Env.VISIBILITY_TIMEOUT_SECONDS.value}\\":\\"{visibility}\\"' in value


def instance_role_id(template: Synth, prefix: str) -> str:
    (role_id,) = [
        k
        for k, r in template.of_type("AWS::IAM::Role").items()
        if k.startswith(prefix)
        and "ec2.amazonaws.com" in json.dumps(r["Properties"]["AssumeRolePolicyDocument"])
    ]
    return role_id


def test_each_instance_role_reaches_only_its_own_queue_tables_and_tag(template: Synth) -> None:
    for fleet, prefix in FLEETS.items():
        other_fleet, other_prefix = next((f, p) for f, p in FLEETS.items() if f != fleet)
        statements = role_policy_statements(template, instance_role_id(template, prefix))
        referenced = set().union(*(refs(s["Resource"]) for s in statements))
        assert referenced, fleet
        assert all(r.startswith((prefix, USER_QUEUES[fleet])) for r in referenced), (fleet, referenced)
        assert not [r for r in referenced if r.startswith((other_prefix, USER_QUEUES[other_fleet]))]
        by_sid = {s.get("Sid"): s for s in statements}
        tagging = by_sid["TagOwnBootstrapOutcome"]["Condition"]["StringEquals"]
        assert tagging == {f"aws:ResourceTag/{contracts.FLEET_TAG_KEY}": fleet}
        assert f"autoScalingGroupName/{contracts.asg_name(fleet)}" in json.dumps(
            by_sid["AnswerOwnLifecycleHooks"]
        )
        checkpoints = json.dumps(by_sid["OwnFleetCheckpoints"]["Resource"])
        assert f"{contracts.CHECKPOINT_KEY_PREFIX}{fleet}/*" in checkpoints


def test_each_control_plane_acts_only_on_its_own_fleet(template: Synth) -> None:
    for fleet, prefix in FLEETS.items():
        other_prefix = next(p for p in FLEETS.values() if p != prefix)
        functions = owned_by(template, prefix, "AWS::Lambda::Function")
        spotguard = {
            k: v
            for k, v in functions.items()
            if str(v["Properties"]["Handler"]).startswith("spotguard_functions.")
        }
        assert len(spotguard) == 5
        for function in spotguard.values():
            env = function["Properties"]["Environment"]["Variables"]
            assert env[Env.FLEET_NAME] == fleet
            role = function["Properties"]["Role"]["Fn::GetAtt"][0]
            statements = role_policy_statements(template, role)
            referenced = set().union(*(refs(s["Resource"]) for s in statements))
            assert not [r for r in referenced if r.startswith(other_prefix)], (fleet, referenced)
            for statement in statements:
                condition = statement.get("Condition", {}).get("StringEquals", {})
                if f"aws:ResourceTag/{contracts.FLEET_TAG_KEY}" in condition:
                    assert condition[f"aws:ResourceTag/{contracts.FLEET_TAG_KEY}"] == fleet
    for _, statement in identity_policy_statements(template):
        for action in _as_list(statement["Action"]):
            assert action != "*"


def test_workloads_are_assets_in_the_agent_config_not_in_user_data(template: Synth) -> None:
    apps = TWO_FLEETS_APP.parent
    expected = {
        "render-fleet": (apps / "render_worker", "tasks:handle", None),
        "encode-fleet": (apps / "encode_worker", None, "./encode.sh"),
    }
    for fleet, (directory, handler, command) in expected.items():
        prefix = FLEETS[fleet]
        (parameter,) = owned_by(template, prefix, "AWS::SSM::Parameter").values()
        value = parameter["Properties"]["Value"]
        rendered = json.dumps(value)
        sha = hashlib.sha256(workload_bytes(directory)).hexdigest()
        assert f'\\"{Env.WORKLOAD_SHA256.value}\\":\\"{sha}\\"' in rendered
        assert Env.WORKLOAD_URL.value in rendered and "s3://" in rendered
        assert (Env.HANDLER.value in rendered) is (handler is not None)
        assert (Env.COMMAND.value in rendered) is (command is not None)
        for name in (Env.CHECKPOINT_BUCKET, Env.LOG_GROUP, Env.STOP_GRACE_SECONDS, Env.CHECKPOINT_MAX_BYTES):
            assert f'\\"{name.value}\\"' in rendered, (fleet, name)
        (launch_template,) = owned_by(template, prefix, "AWS::EC2::LaunchTemplate").values()
        user_data = json.dumps(launch_template["Properties"]["LaunchTemplateData"]["UserData"])
        assert "WORKLOAD" not in user_data and sha not in user_data
    encode = json.dumps(owned_by(template, "EncodeFleet", "AWS::SSM::Parameter"))
    assert f'\\"{Env.STOP_GRACE_SECONDS.value}\\":\\"20\\"' in encode


def test_checkpoint_buckets_are_private_encrypted_tls_only_and_expire(template: Synth) -> None:
    buckets = template.of_type("AWS::S3::Bucket")
    assert len(buckets) == 2
    for logical_id, bucket in buckets.items():
        props = bucket["Properties"]
        assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0][
            "ServerSideEncryptionByDefault"
        ]
        assert props["PublicAccessBlockConfiguration"] == {
            "BlockPublicAcls": True,
            "BlockPublicPolicy": True,
            "IgnorePublicAcls": True,
            "RestrictPublicBuckets": True,
        }
        (rule,) = props["LifecycleConfiguration"]["Rules"]
        assert rule["Prefix"] == contracts.CHECKPOINT_KEY_PREFIX
        assert rule["ExpirationInDays"] == 7  # the user's queue keeps messages 7 days
        policies = [
            p
            for p in template.of_type("AWS::S3::BucketPolicy").values()
            if p["Properties"]["Bucket"] == {"Ref": logical_id}
        ]
        (policy,) = policies
        denies = [s for s in _statements(policy["Properties"]["PolicyDocument"]) if s["Effect"] == "Deny"]
        assert any(s["Condition"]["Bool"]["aws:SecureTransport"] == "false" for s in denies)


def test_instance_log_groups_are_per_fleet_encrypted_with_retention(template: Synth) -> None:
    groups = {
        v["Properties"]["LogGroupName"]: v["Properties"]
        for v in template.of_type("AWS::Logs::LogGroup").values()
        if isinstance(v["Properties"].get("LogGroupName"), str)
    }
    for fleet in FLEETS:
        props = groups[f"/spotguard/{fleet}/instances"]
        assert "KmsKeyId" in props
        assert props["RetentionInDays"] == 30


def test_only_the_first_api_creates_the_account_cloudwatch_role(template: Synth) -> None:
    (account_id,) = template.of_type("AWS::ApiGateway::Account")
    for stage in template.of_type("AWS::ApiGateway::Stage").values():
        assert account_id in _as_list(stage.get("DependsOn", []))
