"""Lifecycle and hardening promises of the template (issues 12 and 13, infrastructure side)."""

from __future__ import annotations

import json
import re

import pytest
from spotguard_cdk.fleet import capacity_rebalance
from spotguard_core import contracts
from spotguard_core.contracts import Env, RebalancePolicy

from tests.infrastructure.conftest import Synth
from tests.infrastructure.test_stack import (
    _as_list,
    _statements,
    function_id,
    function_role_statements,
    role_policy_statements,
    spotguard_functions,
)

pytestmark = [pytest.mark.infrastructure, pytest.mark.xdist_group("synth")]


def instance_statements(synth: Synth) -> dict[str, dict]:
    (role_id,) = [
        k
        for k, r in synth.of_type("AWS::IAM::Role").items()
        if "ec2.amazonaws.com" in json.dumps(r["Properties"]["AssumeRolePolicyDocument"])
    ]
    return {s.get("Sid"): s for s in role_policy_statements(synth, role_id)}


@pytest.mark.parametrize("policy", list(RebalancePolicy))
def test_one_event_at_most_one_replacement_for_every_policy(policy: RebalancePolicy) -> None:
    # ignore: nothing replaces; replace/drain: spotguard's detach is the only replacement.
    assert capacity_rebalance(policy) is False


def test_the_agent_may_protect_only_its_own_asg_from_scale_in(any_synth: Synth) -> None:
    fleet = any_synth.stack_name.removeprefix("Spotguard-")
    protection = instance_statements(any_synth)["ProtectSelfFromScaleInWhileBusy"]
    assert _as_list(protection["Action"]) == ["autoscaling:SetInstanceProtection"]
    assert f"autoScalingGroupName/{contracts.asg_name(fleet)}" in json.dumps(protection["Resource"])
    assert "*" not in _as_list(protection["Resource"])


def test_instance_role_reads_assets_by_key_and_checkpoints_by_prefix(default_synth: Synth) -> None:
    statements = instance_statements(default_synth)
    read = statements["ReadAgentBundleAndWorkload"]
    assert _as_list(read["Action"]) == ["s3:GetObject"]
    for resource in _as_list(read["Resource"]):
        text = json.dumps(resource)
        assert "*" not in text and re.search(r"/[0-9a-f]{64}\.", text), text  # one object key
    actions = {a for s in statements.values() for a in _as_list(s["Action"])}
    assert not {a for a in actions if a.startswith(("s3:List", "s3:GetBucket"))} - {"s3:ListBucket"}
    listing = statements["ListOwnFleetCheckpoints"]
    assert listing["Condition"] == {
        "StringLike": {"s3:prefix": [f"{contracts.CHECKPOINT_KEY_PREFIX}default/*"]}
    }
    assert "checkpoints/default/*" in json.dumps(statements["OwnFleetCheckpoints"]["Resource"])
    logs = statements["WriteFleetLogGroup"]
    assert all("Logs" in json.dumps(r) for r in _as_list(logs["Resource"]))


def test_agent_config_points_at_checkpoints_and_logs_without_a_workload(default_synth: Synth) -> None:
    (parameter,) = default_synth.of_type("AWS::SSM::Parameter").values()
    rendered = json.dumps(parameter["Properties"]["Value"])
    for name in (Env.CHECKPOINT_BUCKET, Env.LOG_GROUP, Env.STOP_GRACE_SECONDS, Env.CHECKPOINT_MAX_BYTES):
        assert f'\\"{name.value}\\"' in rendered
    assert Env.WORKLOAD_URL.value not in rendered and Env.COMMAND.value not in rendered
    assert f'\\"{Env.HANDLER.value}\\":\\"{contracts.DEFAULT_HANDLER}\\"' in rendered


def test_work_waiting_and_no_instance_always_alarms(any_synth: Synth) -> None:
    (topic_id,) = any_synth.of_type("AWS::SNS::Topic")
    alarms = [
        a["Properties"]
        for a in any_synth.of_type("AWS::CloudWatch::Alarm").values()
        if "no instance is in service" in a["Properties"].get("AlarmDescription", "")
    ]
    assert len(alarms) == 1
    assert {"Ref": topic_id} in alarms[0]["AlarmActions"]
    expressions = [m.get("Expression", "") for m in alarms[0]["Metrics"]]
    assert any("visible > 0" in e and "inservice < 1" in e for e in expressions)


def test_dashboard_shows_agent_metrics_from_the_agent_namespace(default_synth: Synth) -> None:
    (dashboard,) = default_synth.of_type("AWS::CloudWatch::Dashboard").values()
    body = json.dumps(dashboard["Properties"]["DashboardBody"])
    namespace = contracts.AGENT_METRIC_NAMESPACE.replace("/", "\\\\/")
    assert f'\\"{contracts.AGENT_METRIC_NAMESPACE}\\"' in body or namespace in body
    assert f'\\"{contracts.Metric.TASKS_COMPLETED.value}\\"' in body


def test_work_queue_and_dlq_are_retained_on_destroy(default_synth: Synth) -> None:
    queues = default_synth.of_type("AWS::SQS::Queue")
    for prefix in ("QueuesWorkQueue", "QueuesWorkDeadLetterQueue"):
        (queue,) = [q for k, q in queues.items() if k.startswith(prefix)]
        assert queue["DeletionPolicy"] == "Retain" and queue["UpdateReplacePolicy"] == "Retain"


def test_kms_cloudwatch_entry_is_limited_to_this_account(any_synth: Synth) -> None:
    (key,) = any_synth.of_type("AWS::KMS::Key").values()
    (cloudwatch,) = [
        s
        for s in _statements(key["Properties"]["KeyPolicy"])
        if s["Principal"] == {"Service": "cloudwatch.amazonaws.com"}
    ]
    assert cloudwatch["Condition"]["StringEquals"]["aws:SourceAccount"] == {"Ref": "AWS::AccountId"}


def test_api_stage_is_throttled_and_the_api_has_a_resource_policy(default_synth: Synth) -> None:
    (stage,) = default_synth.of_type("AWS::ApiGateway::Stage").values()
    (settings,) = stage["Properties"]["MethodSettings"]
    assert settings["ThrottlingRateLimit"] == 10 and settings["ThrottlingBurstLimit"] == 20
    (api,) = default_synth.of_type("AWS::ApiGateway::RestApi").values()
    (statement,) = _statements(api["Properties"]["Policy"])
    assert statement["Effect"] == "Allow" and _as_list(statement["Action"]) == ["execute-api:Invoke"]
    assert ":root" in json.dumps(statement["Principal"])


def test_every_function_has_reserved_concurrency_and_one_reconciler_at_a_time(any_synth: Synth) -> None:
    for logical_id, function in spotguard_functions(any_synth).items():
        assert function["Properties"]["ReservedConcurrentExecutions"] >= 1, logical_id
    reconciler = any_synth.resources[function_id(any_synth, "reconciler")]
    assert reconciler["Properties"]["ReservedConcurrentExecutions"] == 1


def test_dispatcher_event_source_has_a_maximum_concurrency(any_synth: Synth) -> None:
    dispatcher = function_id(any_synth, "dispatcher")
    (mapping,) = [
        m["Properties"]
        for m in any_synth.of_type("AWS::Lambda::EventSourceMapping").values()
        if m["Properties"]["FunctionName"] == {"Ref": dispatcher}
    ]
    reserved = any_synth.resources[dispatcher]["Properties"]["ReservedConcurrentExecutions"]
    assert 2 <= mapping["ScalingConfig"]["MaximumConcurrency"] <= reserved


def test_watchdog_and_reconciler_async_retries_and_failure_destination(any_synth: Synth) -> None:
    configs = {
        c["Properties"]["FunctionName"]["Ref"]: c["Properties"]
        for c in any_synth.of_type("AWS::Lambda::EventInvokeConfig").values()
    }
    watchdog = configs[function_id(any_synth, "watchdog")]
    reconciler = configs[function_id(any_synth, "reconciler")]
    assert watchdog["MaximumRetryAttempts"] == 0 and reconciler["MaximumRetryAttempts"] == 1
    for config in (watchdog, reconciler):
        destination = config["DestinationConfig"]["OnFailure"]["Destination"]["Fn::GetAtt"][0]
        assert destination.startswith("ControlPlaneAsyncFailureQueue")
    assert "sqs:SendMessage" in {
        a for s in function_role_statements(any_synth, "watchdog") for a in _as_list(s["Action"])
    }


def test_notification_bus_accepts_events_only_from_control_plane_roles(any_synth: Synth) -> None:
    (policy,) = any_synth.of_type("AWS::Events::EventBusPolicy").values()
    statement = policy["Properties"]["Statement"]
    assert statement["Effect"] == "Deny" and statement["Action"] == "events:PutEvents"
    allowed = statement["Condition"]["ArnNotEquals"]["aws:PrincipalArn"]
    roles = {a["Fn::GetAtt"][0] for a in allowed}
    expected = {
        any_synth.resources[function_id(any_synth, m)]["Properties"]["Role"]["Fn::GetAtt"][0]
        for m in ("dispatcher", "watchdog", "reconciler")
    }
    assert roles == expected


#: Logical ids of the ready app's stateful (or physically named) resources before it became a
#: user of SpotWorkerFleet (main at 7aafcc4): an existing deployment keeps them.
PRE_CONSTRUCT_LOGICAL_IDS = {
    "TablesLeases8A459FA5": "AWS::DynamoDB::Table",
    "TablesFleet271300BB": "AWS::DynamoDB::Table",
    "TablesJobs313634AE": "AWS::DynamoDB::Table",
    "TablesIdempotency498FF680": "AWS::DynamoDB::Table",
    "QueuesWorkQueue59050C56": "AWS::SQS::Queue",
    "QueuesWorkDeadLetterQueue59E88B57": "AWS::SQS::Queue",
    "NetworkVpc7FB7348F": "AWS::EC2::VPC",
    "FleetGroupASGF037160E": "AWS::AutoScaling::AutoScalingGroup",
    "FleetLaunchTemplate3FC2FEAE": "AWS::EC2::LaunchTemplate",
    "AgentConfigParameterD053D782": "AWS::SSM::Parameter",
    "NotificationsBusD6EAAED1": "AWS::Events::EventBus",
}


def test_the_ready_app_keeps_its_logical_ids(default_synth: Synth) -> None:
    for logical_id, resource_type in PRE_CONSTRUCT_LOGICAL_IDS.items():
        assert default_synth.resources[logical_id]["Type"] == resource_type, logical_id


def test_the_logical_id_algorithm_is_cdks(two_fleets_synth: Synth) -> None:
    from spotguard_cdk.app_stack import cdk_unique_id  # noqa: PLC0415

    expected = cdk_unique_id(["RenderFleet", "Tables", "Leases", "Resource"])
    assert two_fleets_synth.resources[expected]["Type"] == "AWS::DynamoDB::Table"


def test_reconciler_widens_only_its_own_pools_and_launches_spot_through_the_template(
    default_synth: Synth,
) -> None:
    statements = {s.get("Sid"): s for s in function_role_statements(default_synth, "reconciler")}
    widen = statements["WidenOwnFleetPools"]
    assert _as_list(widen["Action"]) == ["autoscaling:UpdateAutoScalingGroup"]
    assert f"autoScalingGroupName/{contracts.asg_name('default')}" in json.dumps(widen["Resource"])
    assert widen["Condition"]["StringEquals"] == {f"aws:ResourceTag/{contracts.FLEET_TAG_KEY}": "default"}
    through = statements["LaunchOnlyThroughFleetTemplate"]
    assert "spot-instances-request/*" in json.dumps(through["Resource"])
    assert "ec2:LaunchTemplate" in json.dumps(through["Condition"])


def test_batch_counter_reads_are_allowed_where_leases_are_requeued(default_synth: Synth) -> None:
    # Instances read counters one GetItem at a time (issue 13: no batch call on shared items).
    counters = instance_statements(default_synth)["SharedRequeueCountersOnly"]
    assert _as_list(counters["Action"]) == ["dynamodb:GetItem", "dynamodb:UpdateItem"]
    for module in ("dispatcher", "watchdog"):
        actions = {a for s in function_role_statements(default_synth, module) for a in _as_list(s["Action"])}
        assert "dynamodb:BatchGetItem" in actions, module


def test_unreadable_items_and_capacity_shortfall_alarm(any_synth: Synth) -> None:
    described = [
        a["Properties"].get("AlarmDescription", "")
        for a in any_synth.of_type("AWS::CloudWatch::Alarm").values()
    ]
    assert any("could not read" in d for d in described)
    assert any("stuck below its desired capacity" in d for d in described)
