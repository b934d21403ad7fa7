"""The synthesized template: every resource exists with its security settings."""

from __future__ import annotations

import json
from typing import Any

import pytest
from spotguard_core import contracts
from spotguard_core.contracts import Env

from tests.infrastructure.conftest import Synth

pytestmark = [pytest.mark.infrastructure, pytest.mark.xdist_group("synth")]


def _statements(document: dict[str, Any]) -> list[dict[str, Any]]:
    statements = document.get("Statement", [])
    return statements if isinstance(statements, list) else [statements]


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def identity_policy_statements(synth: Synth) -> list[tuple[str, dict[str, Any]]]:
    """Every statement of every IAM identity policy (inline policies, managed policies, roles)."""
    found: list[tuple[str, dict[str, Any]]] = []
    for logical_id, resource in synth.resources.items():
        props = resource.get("Properties", {})
        if resource["Type"] in {"AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"}:
            found += [(logical_id, s) for s in _statements(props["PolicyDocument"])]
        elif resource["Type"] == "AWS::IAM::Role":
            for policy in props.get("Policies", []):
                found += [(logical_id, s) for s in _statements(policy["PolicyDocument"])]
    return found


def spotguard_functions(synth: Synth) -> dict[str, dict[str, Any]]:
    return {
        k: v
        for k, v in synth.of_type("AWS::Lambda::Function").items()
        if str(v["Properties"].get("Handler", "")).startswith("spotguard_functions.")
    }


def function_id(synth: Synth, module: str) -> str:
    (logical_id,) = [
        k
        for k, v in spotguard_functions(synth).items()
        if v["Properties"]["Handler"] == f"spotguard_functions.{module}.handler"
    ]
    return logical_id


def role_policy_statements(synth: Synth, role_id: str) -> list[dict[str, Any]]:
    statements: list[dict[str, Any]] = []
    for resource in synth.of_type("AWS::IAM::Policy").values():
        if {"Ref": role_id} in resource["Properties"].get("Roles", []):
            statements += _statements(resource["Properties"]["PolicyDocument"])
    return statements


def function_role_statements(synth: Synth, module: str) -> list[dict[str, Any]]:
    function = synth.resources[function_id(synth, module)]
    role_id = function["Properties"]["Role"]["Fn::GetAtt"][0]
    return role_policy_statements(synth, role_id)


def actions_of(statements: list[dict[str, Any]]) -> set[str]:
    return {action for s in statements for action in _as_list(s["Action"])}


# --------------------------------------------------------------------------- network
def test_vpc_has_no_nat_gateway_and_gateway_endpoints(default_synth: Synth) -> None:
    template = default_synth.assertions()
    template.resource_count_is("AWS::EC2::NatGateway", 0)
    template.resource_count_is("AWS::EC2::VPC", 1)
    endpoints = default_synth.of_type("AWS::EC2::VPCEndpoint").values()
    services = json.dumps([e["Properties"]["ServiceName"] for e in endpoints])
    assert ".s3" in services
    assert ".dynamodb" in services
    assert all(e["Properties"]["VpcEndpointType"] == "Gateway" for e in endpoints)
    template.resource_count_is("AWS::EC2::FlowLog", 1)


def test_instance_security_group_has_no_ingress_and_https_egress_only(default_synth: Synth) -> None:
    (group,) = [
        g["Properties"]
        for g in default_synth.of_type("AWS::EC2::SecurityGroup").values()
        if "spotguard workers" in g["Properties"]["GroupDescription"]
    ]
    assert "SecurityGroupIngress" not in group
    default_synth.assertions().resource_count_is("AWS::EC2::SecurityGroupIngress", 0)
    egress = group["SecurityGroupEgress"]
    assert egress == [
        {
            "CidrIp": "0.0.0.0/0",
            "Description": "HTTPS to AWS APIs, S3 and package repositories",
            "FromPort": 443,
            "IpProtocol": "tcp",
            "ToPort": 443,
        }
    ]


# --------------------------------------------------------------------------- fleet
def test_launch_template_is_locked_down(any_synth: Synth) -> None:
    (template,) = any_synth.of_type("AWS::EC2::LaunchTemplate").values()
    data = template["Properties"]["LaunchTemplateData"]
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
    assert data["MetadataOptions"]["InstanceMetadataTags"] == "enabled"
    assert data["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert "KeyName" not in data
    volumes = data["BlockDeviceMappings"]
    assert volumes
    assert all(v["Ebs"]["Encrypted"] is True and v["Ebs"]["VolumeType"] == "gp3" for v in volumes)
    assert "UserData" in data
    # The AMI is resolved from SSM at deploy time (no lookup at synth).
    assert "Ref" in data["ImageId"]
    tags = {
        t["Key"]: t["Value"]
        for spec in data["TagSpecifications"]
        if spec["ResourceType"] == "instance"
        for t in spec["Tags"]
    }
    assert tags[contracts.FLEET_TAG_KEY] == any_synth.stack_name.removeprefix("Spotguard-")


def test_instance_role_uses_ssm_not_ssh(default_synth: Synth) -> None:
    roles = default_synth.of_type("AWS::IAM::Role").values()
    ec2_roles = [
        r for r in roles if "ec2.amazonaws.com" in json.dumps(r["Properties"]["AssumeRolePolicyDocument"])
    ]
    assert len(ec2_roles) == 1
    # Session Manager through a scoped statement instead of AmazonSSMManagedInstanceCore (whose
    # ssm:GetParameter* on "*" reads every parameter of the region): no managed policy at all.
    assert "ManagedPolicyArns" not in ec2_roles[0]["Properties"]
    (role_id,) = [k for k, r in default_synth.of_type("AWS::IAM::Role").items() if r in ec2_roles]
    statements = {s.get("Sid"): s for s in role_policy_statements(default_synth, role_id)}
    session = set(_as_list(statements["SessionManagerOnly"]["Action"]))
    assert {
        "ssmmessages:CreateControlChannel",
        "ssmmessages:OpenDataChannel",
        "ssm:UpdateInstanceInformation",
    } <= session
    ssm_reads = [
        s for s in statements.values() if any(a.startswith("ssm:GetParameter") for a in _as_list(s["Action"]))
    ]
    assert [s.get("Sid") for s in ssm_reads] == ["ReadAgentConfig"]
    assert "*" not in _as_list(statements["ReadAgentConfig"]["Resource"])


def test_instance_role_is_least_privilege(default_synth: Synth) -> None:
    (role_id,) = [
        k
        for k, r in default_synth.of_type("AWS::IAM::Role").items()
        if "ec2.amazonaws.com" in json.dumps(r["Properties"]["AssumeRolePolicyDocument"])
    ]
    statements = {s.get("Sid"): s for s in role_policy_statements(default_synth, role_id)}
    assert set(_as_list(statements["ConsumeWorkQueue"]["Action"])) >= {
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility",
    }
    tagging = statements["TagOwnBootstrapOutcome"]
    assert tagging["Condition"]["StringEquals"] == {f"aws:ResourceTag/{contracts.FLEET_TAG_KEY}": "default"}
    assert set(tagging["Condition"]["ForAllValues:StringEquals"]["aws:TagKeys"]) == {
        contracts.BOOTSTRAP_TAG_KEY,
        contracts.BOOTSTRAP_REASON_TAG_KEY,
    }
    metrics = statements["PutAgentMetrics"]
    # Agent metrics only into their own namespace: no worker can feed a control-plane alarm.
    assert metrics["Condition"] == {
        "StringEquals": {"cloudwatch:namespace": contracts.AGENT_METRIC_NAMESPACE}
    }
    lifecycle = statements["AnswerOwnLifecycleHooks"]
    assert f"autoScalingGroupName/{contracts.asg_name('default')}" in json.dumps(lifecycle["Resource"])
    assert "parameter/spotguard/default/agent-config" in json.dumps(statements["ReadAgentConfig"]["Resource"])
    all_actions = actions_of(list(statements.values()))
    assert not {a for a in all_actions if a.startswith("ec2:Terminate")}


def test_asg_mixed_instances_spot_with_hooks(any_synth: Synth) -> None:
    fleet = any_synth.stack_name.removeprefix("Spotguard-")
    (group,) = any_synth.of_type("AWS::AutoScaling::AutoScalingGroup").values()
    props = group["Properties"]
    assert props["AutoScalingGroupName"] == contracts.asg_name(fleet)
    # spotguard's dispatcher is the one replacement path for every policy (see
    # fleet.capacity_rebalance): the ASG's own Capacity Rebalancing stays off.
    assert props["CapacityRebalance"] is False
    policy = props["MixedInstancesPolicy"]
    distribution = policy["InstancesDistribution"]
    assert distribution["SpotAllocationStrategy"] == "price-capacity-optimized"
    assert distribution["OnDemandPercentageAboveBaseCapacity"] == 0
    overrides = [o["InstanceType"] for o in policy["LaunchTemplate"]["Overrides"]]
    assert len(overrides) >= 2
    hooks = {h["LifecycleHookName"]: h for h in props["LifecycleHookSpecificationList"]}
    launch = hooks[contracts.LAUNCH_HOOK_NAME]
    assert launch["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_LAUNCHING"
    assert launch["DefaultResult"] == "ABANDON"
    assert launch["HeartbeatTimeout"] >= 20 * 60  # default bootstrap deadline
    terminate = hooks[contracts.TERMINATE_HOOK_NAME]
    assert terminate["LifecycleTransition"] == "autoscaling:EC2_INSTANCE_TERMINATING"
    assert terminate["DefaultResult"] == "CONTINUE"
    tags = {t["Key"]: t for t in props["Tags"]}
    assert tags[contracts.FLEET_TAG_KEY] == {
        "Key": contracts.FLEET_TAG_KEY,
        "PropagateAtLaunch": True,
        "Value": fleet,
    }
    assert "MetricsCollection" in props  # group metrics feed the scaling math and the alarms
    if any_synth.name == "staging":
        assert tags[contracts.FIS_TARGET_TAG_KEY]["Value"] == "true"
        assert props["MinSize"] == "1"
    else:
        assert contracts.FIS_TARGET_TAG_KEY not in tags
        assert props["MinSize"] == "0"


def test_backlog_scaling_can_reach_zero_and_start_from_it(default_synth: Synth) -> None:
    policies = list(default_synth.of_type("AWS::AutoScaling::ScalingPolicy").values())
    tracking = [p["Properties"] for p in policies if p["Properties"]["PolicyType"] == "TargetTrackingScaling"]
    assert len(tracking) == 1
    config = tracking[0]["TargetTrackingConfiguration"]
    assert config["TargetValue"] == 10
    queries = {q["Id"]: q for q in config["CustomizedMetricSpecification"]["Metrics"]}
    assert queries["backlog"]["ReturnData"] is True
    assert "MAX([inservice, 1])" in queries["backlog"]["Expression"]
    steps = [p["Properties"] for p in policies if p["Properties"]["PolicyType"] == "StepScaling"]
    assert sorted(s["StepAdjustments"][0]["ScalingAdjustment"] for s in steps) == [0, 1]
    assert all(s["AdjustmentType"] == "ExactCapacity" for s in steps)


# --------------------------------------------------------------------------- queues and tables
def test_every_queue_is_encrypted_and_tls_only(any_synth: Synth) -> None:
    queues = any_synth.of_type("AWS::SQS::Queue")
    assert len(queues) == 7  # work, signal, notify + a DLQ each, and the async-failure queue
    assert all(q["Properties"].get("SqsManagedSseEnabled") is True for q in queues.values())
    tls_only: set[str] = set()
    for policy in any_synth.of_type("AWS::SQS::QueuePolicy").values():
        for statement in _statements(policy["Properties"]["PolicyDocument"]):
            if (
                statement["Effect"] == "Deny"
                and statement.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport") == "false"
            ):
                tls_only |= {q["Ref"] for q in policy["Properties"]["Queues"]}
    assert tls_only == set(queues)


def test_work_queue_redrive_is_only_a_backstop(default_synth: Synth) -> None:
    queues = default_synth.of_type("AWS::SQS::Queue")
    (work,) = [q["Properties"] for k, q in queues.items() if k.startswith("QueuesWorkQueue")]
    assert work["RedrivePolicy"]["maxReceiveCount"] == contracts.REDRIVE_BACKSTOP_RECEIVE_COUNT
    assert work["MessageRetentionPeriod"] == 4 * 24 * 3600
    assert work["VisibilityTimeout"] == 120
    with_dlq = [q for q in queues.values() if "RedrivePolicy" in q["Properties"]]
    assert len(with_dlq) == 3


def test_tables_have_pitr_encryption_ttl_and_contract_keys(default_synth: Synth) -> None:
    tables = {k: v["Properties"] for k, v in default_synth.of_type("AWS::DynamoDB::Table").items()}
    assert len(tables) == 4
    for props in tables.values():
        assert props["BillingMode"] == "PAY_PER_REQUEST"
        assert props["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True
        assert props["SSESpecification"]["SSEEnabled"] is True
        assert props["TimeToLiveSpecification"]["Enabled"] is True

    def keys(prefix: str) -> tuple[list[tuple[str, str]], str]:
        (props,) = [p for k, p in tables.items() if k.startswith(prefix)]
        schema = [(k["AttributeName"], k["KeyType"]) for k in props["KeySchema"]]
        return schema, props["TimeToLiveSpecification"]["AttributeName"]

    assert keys("TablesLeases") == (
        [(contracts.LEASE_TABLE_PK, "HASH"), (contracts.LEASE_TABLE_SK, "RANGE")],
        contracts.TTL_ATTRIBUTE,
    )
    assert keys("TablesFleet") == ([(contracts.FLEET_TABLE_PK, "HASH")], contracts.TTL_ATTRIBUTE)
    assert keys("TablesJobs") == (
        [(contracts.JOBS_TABLE_PK, "HASH"), (contracts.JOBS_TABLE_SK, "RANGE")],
        contracts.TTL_ATTRIBUTE,
    )
    assert keys("TablesIdempotency") == (
        [(contracts.IDEMPOTENCY_TABLE_PK, "HASH")],
        contracts.IDEMPOTENCY_TTL_ATTRIBUTE,
    )


# --------------------------------------------------------------------------- IAM
def test_no_identity_policy_grants_wildcard_actions(any_synth: Synth) -> None:
    statements = identity_policy_statements(any_synth)
    assert statements
    for logical_id, statement in statements:
        for action in _as_list(statement.get("Action", [])):
            assert action != "*", logical_id
            assert not action.endswith(":*"), f"{logical_id}: {action}"


def test_kms_key_policy_root_admin_is_the_only_wildcard(any_synth: Synth) -> None:
    """Resource policies: the alarm key has the standard account-root admin statement (so the
    key stays manageable) and CloudWatch's publish permission; nothing else is broad."""
    (key,) = any_synth.of_type("AWS::KMS::Key").values()
    assert key["Properties"]["EnableKeyRotation"] is True
    services = set()
    for statement in _statements(key["Properties"]["KeyPolicy"]):
        if "kms:*" in _as_list(statement["Action"]):
            assert ":root" in json.dumps(statement["Principal"])
        elif statement["Principal"] == {"Service": "cloudwatch.amazonaws.com"}:
            services.add("cloudwatch")
            assert statement["Condition"] == {
                "StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}
            }
        else:
            # CloudWatch Logs, for the fleet's instance log group only.
            assert "logs." in json.dumps(statement["Principal"])
            services.add("logs")
            context = statement["Condition"]["ArnEquals"]["kms:EncryptionContext:aws:logs:arn"]
            assert "/spotguard/" in json.dumps(context)
    assert services == {"cloudwatch", "logs"}


DESTRUCTIVE = {
    "ec2:TerminateInstances",
    "ec2:StartInstances",
    "ec2:StopInstances",
    "autoscaling:DetachInstances",
    "autoscaling:TerminateInstanceInAutoScalingGroup",
    "ec2:SendSpotInstanceInterruptions",
}


def test_destructive_actions_carry_the_fleet_tag_condition(any_synth: Synth) -> None:
    fleet = any_synth.stack_name.removeprefix("Spotguard-")
    seen: set[str] = set()
    for logical_id, statement in identity_policy_statements(any_synth):
        destructive = DESTRUCTIVE & set(_as_list(statement["Action"]))
        if not destructive:
            continue
        seen |= destructive
        condition = statement.get("Condition", {}).get("StringEquals", {})
        assert condition.get(f"aws:ResourceTag/{contracts.FLEET_TAG_KEY}") == fleet, logical_id
        assert "*" not in _as_list(statement["Resource"]), logical_id
    expected = {"ec2:TerminateInstances", "ec2:StartInstances", "autoscaling:DetachInstances"}
    if any_synth.name == "staging":
        expected.add("ec2:SendSpotInstanceInterruptions")
    assert seen == expected


def test_one_distinct_role_per_function(any_synth: Synth) -> None:
    functions = spotguard_functions(any_synth)
    modules = sorted(f["Properties"]["Handler"].split(".")[1] for f in functions.values())
    assert modules == ["api", "dispatcher", "notifier", "reconciler", "watchdog"]
    roles = [f["Properties"]["Role"]["Fn::GetAtt"][0] for f in functions.values()]
    assert len(set(roles)) == len(roles)
    for role in roles:
        props = any_synth.resources[role]["Properties"]
        assert "ManagedPolicyArns" not in props  # own log group instead of AWSLambdaBasicExecutionRole


def test_functions_runtime_layer_tracing_and_metric_contract(any_synth: Synth) -> None:
    for function in spotguard_functions(any_synth).values():
        props = function["Properties"]
        assert props["Runtime"] == "python3.13"
        assert props["TracingConfig"] == {"Mode": "Active"}
        layers = json.dumps(props["Layers"])
        assert "017000801446:layer:AWSLambdaPowertoolsPythonV3-python313-x86_64:27" in layers
        env = props["Environment"]["Variables"]
        assert "POWERTOOLS_SERVICE_NAME" not in env
        assert env["POWERTOOLS_METRICS_NAMESPACE"] == contracts.METRIC_NAMESPACE
        assert env[Env.FLEET_NAME] == any_synth.stack_name.removeprefix("Spotguard-")
        assert "LoggingConfig" in props  # own log group with retention


def test_function_roles_least_privilege(default_synth: Synth) -> None:
    dispatcher = actions_of(function_role_statements(default_synth, "dispatcher"))
    assert {"autoscaling:DetachInstances", "sqs:ChangeMessageVisibility", "events:PutEvents"} <= dispatcher
    assert "ec2:TerminateInstances" not in dispatcher
    watchdog = actions_of(function_role_statements(default_synth, "watchdog"))
    assert {"ec2:TerminateInstances", "sqs:ChangeMessageVisibility"} <= watchdog
    assert "autoscaling:DetachInstances" not in watchdog
    reconciler_statements = function_role_statements(default_synth, "reconciler")
    reconciler = actions_of(reconciler_statements)
    assert {"ec2:RunInstances", "iam:PassRole", "ec2:TerminateInstances"} <= reconciler
    assert "secretsmanager:GetSecretValue" not in reconciler  # aws provider: no Novita secret
    run = [s for s in reconciler_statements if s.get("Sid") == "LaunchOnlyThroughFleetTemplate"]
    assert "ec2:LaunchTemplate" in json.dumps(run[0]["Condition"])
    # The instance itself: the fleet's template, instance types and IMDSv2 only.
    (instance,) = [s for s in reconciler_statements if s.get("Sid") == "LaunchOnlyFleetInstances"]
    assert "ec2:LaunchTemplate" in json.dumps(instance["Condition"])
    assert set(instance["Condition"]["StringEquals"]["ec2:InstanceType"]) == {
        "m7i.large",
        "m6i.large",
        "m5.large",
        "c6i.large",
    }
    assert instance["Condition"]["StringEquals"]["ec2:MetadataHttpTokens"] == "required"
    assert ":instance/*" in json.dumps(instance["Resource"])
    api = actions_of(function_role_statements(default_synth, "api"))
    assert "lambda:InvokeFunction" in api
    assert not {a for a in api if a.startswith(("dynamodb:Put", "dynamodb:Update", "dynamodb:Delete"))}
    notifier = actions_of(function_role_statements(default_synth, "notifier"))
    assert "secretsmanager:GetSecretValue" not in notifier  # no webhook configured
    assert {"sqs:ReceiveMessage", "sqs:DeleteMessage"} <= notifier


def test_staging_grants_secret_reads(staging_synth: Synth) -> None:
    assert "secretsmanager:GetSecretValue" in actions_of(function_role_statements(staging_synth, "notifier"))
    assert "secretsmanager:GetSecretValue" in actions_of(
        function_role_statements(staging_synth, "reconciler")
    )
    (secret,) = staging_synth.of_type("AWS::SecretsManager::Secret").values()
    assert secret["Properties"]["GenerateSecretString"]["PasswordLength"] == 64


def test_no_webhook_secret_without_webhook(default_synth: Synth) -> None:
    default_synth.assertions().resource_count_is("AWS::SecretsManager::Secret", 0)


# --------------------------------------------------------------------------- events
def test_queue_event_sources_report_batch_item_failures(any_synth: Synth) -> None:
    mappings = any_synth.of_type("AWS::Lambda::EventSourceMapping").values()
    by_function = {m["Properties"]["FunctionName"]["Ref"]: m["Properties"] for m in mappings}
    dispatcher = by_function[function_id(any_synth, "dispatcher")]
    notifier = by_function[function_id(any_synth, "notifier")]
    for props in (dispatcher, notifier):
        assert props["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert dispatcher["EventSourceArn"]["Fn::GetAtt"][0].startswith("ControlPlaneSignalQueue")
    assert notifier["EventSourceArn"]["Fn::GetAtt"][0].startswith("NotificationsNotifyQueue")


def signal_rules(synth: Synth) -> list[dict[str, Any]]:
    return [
        r["Properties"]
        for r in synth.of_type("AWS::Events::Rule").values()
        if "EventPattern" in r["Properties"] and "EventBusName" not in r["Properties"]
    ]


def test_signal_rule_patterns_are_the_contract_patterns(any_synth: Synth) -> None:
    fleet = any_synth.stack_name.removeprefix("Spotguard-")
    allow = any_synth.name == "staging"
    expected = contracts.event_patterns(allow_test_events=allow, asg_name=contracts.asg_name(fleet))
    actual = [rule["EventPattern"] for rule in signal_rules(any_synth)]
    key = lambda p: json.dumps(p, sort_keys=True)  # noqa: E731
    assert sorted(map(key, actual)) == sorted(map(key, expected.values()))
    has_test_source = any(contracts.TEST_EVENT_SOURCE in p["source"] for p in actual)
    assert has_test_source is allow


def test_signal_rules_deliver_to_signal_queue_with_dlq(default_synth: Synth) -> None:
    rules = signal_rules(default_synth)
    for rule in rules:
        (target,) = rule["Targets"]
        assert target["Arn"]["Fn::GetAtt"][0].startswith("ControlPlaneSignalQueue")
        assert target["DeadLetterConfig"]["Arn"]["Fn::GetAtt"][0].startswith(
            "ControlPlaneSignalDeadLetterQueue"
        )
    # The queue policy lets EventBridge send only for these rules.
    allowed = []
    for policy in default_synth.of_type("AWS::SQS::QueuePolicy").values():
        for statement in _statements(policy["Properties"]["PolicyDocument"]):
            if statement.get("Principal") == {"Service": "events.amazonaws.com"}:
                assert "aws:SourceArn" in statement["Condition"]["ArnEquals"]
                allowed.append(statement)
    assert len(allowed) >= len(rules)


def test_schedules(any_synth: Synth) -> None:
    schedules = {
        r["Properties"]["Description"]: r["Properties"]
        for r in any_synth.of_type("AWS::Events::Rule").values()
        if "ScheduleExpression" in r["Properties"]
    }
    watchdog = schedules["spotguard watchdog sweep"]
    assert watchdog["ScheduleExpression"] == "rate(1 minute)"
    assert watchdog["State"] == "ENABLED"
    reconciler = schedules["spotguard migration/reconcile job"]
    assert reconciler["ScheduleExpression"] == "rate(15 minutes)"
    assert reconciler["State"] == ("DISABLED" if any_synth.name == "staging" else "ENABLED")


def test_notification_bus_routes_to_notify_queue_with_dlq(default_synth: Synth) -> None:
    (bus_id,) = default_synth.of_type("AWS::Events::EventBus")
    rules = [
        r["Properties"]
        for r in default_synth.of_type("AWS::Events::Rule").values()
        if r["Properties"].get("EventBusName") == {"Ref": bus_id}
    ]
    assert len(rules) == 1
    assert rules[0]["EventPattern"] == {"source": [contracts.NOTIFICATION_EVENT_SOURCE]}
    (target,) = rules[0]["Targets"]
    assert target["Arn"]["Fn::GetAtt"][0].startswith("NotificationsNotifyQueue")
    assert target["DeadLetterConfig"]["Arn"]["Fn::GetAtt"][0].startswith("NotificationsNotifyDeadLetterQueue")


# --------------------------------------------------------------------------- API
def test_every_api_method_requires_iam(default_synth: Synth) -> None:
    methods = default_synth.of_type("AWS::ApiGateway::Method")
    assert len(methods) == 2  # ANY / and ANY /{proxy+}
    for method in methods.values():
        assert method["Properties"]["AuthorizationType"] == "AWS_IAM"
        assert "RequestValidatorId" in method["Properties"]
    (stage,) = default_synth.of_type("AWS::ApiGateway::Stage").values()
    props = stage["Properties"]
    assert props["TracingEnabled"] is True
    assert "AccessLogSetting" in props
    assert props["MethodSettings"][0]["MetricsEnabled"] is True
    assert props["MethodSettings"][0]["LoggingLevel"] == "ERROR"


# --------------------------------------------------------------------------- observability
def test_alarms_and_topic(any_synth: Synth) -> None:
    alarms = {k: v["Properties"] for k, v in any_synth.of_type("AWS::CloudWatch::Alarm").items()}
    described = {p.get("AlarmDescription", ""): p for p in alarms.values()}
    dlq = [d for d in described if "dead-letter queue" in d]
    assert len(dlq) == 4  # work, signal, notify and the async-failure queue
    errors = [d for d in described if d.endswith("function errors")]
    assert len(errors) == 5
    (silent,) = [p for d, p in described.items() if "no watchdog heartbeat" in d]
    assert silent["TreatMissingData"] == "breaching"
    assert silent["ComparisonOperator"] == "LessThanThreshold"
    assert silent["MetricName"] == contracts.Metric.WATCHDOG_HEARTBEAT.value
    assert silent["Namespace"] == contracts.METRIC_NAMESPACE
    assert silent["Dimensions"] == [
        {"Name": contracts.METRIC_DIMENSION_FLEET, "Value": any_synth.stack_name.removeprefix("Spotguard-")}
    ]
    assert any("oldest work message" in d for d in described)
    assert any("failed their bootstrap" in d for d in described)
    below = [d for d in described if "instances in service" in d]
    assert len(below) == (1 if any_synth.name == "staging" else 0)
    (topic_id,) = any_synth.of_type("AWS::SNS::Topic")
    topic = any_synth.resources[topic_id]["Properties"]
    assert "KmsMasterKeyId" in topic
    for description, props in described.items():
        if description.startswith("Scaling:"):
            continue
        assert {"Ref": topic_id} in props["AlarmActions"], description
    (policy,) = any_synth.of_type("AWS::SNS::TopicPolicy").values()
    assert "aws:SecureTransport" in json.dumps(policy["Properties"]["PolicyDocument"])
    subscriptions = any_synth.of_type("AWS::SNS::Subscription")
    assert len(subscriptions) == (1 if any_synth.name == "staging" else 0)


def test_dashboard_uses_contract_metrics(default_synth: Synth) -> None:
    (dashboard,) = default_synth.of_type("AWS::CloudWatch::Dashboard").values()
    body = json.dumps(dashboard["Properties"]["DashboardBody"])
    for metric in (
        contracts.Metric.INTERRUPTION_WARNINGS,
        contracts.Metric.MESSAGES_REQUEUED,
        contracts.Metric.REQUEUE_LATENCY,
        contracts.Metric.FLEET_SIZE,
        contracts.Metric.BOOTSTRAP_FAILURES,
    ):
        assert f'\\"{metric.value}\\"' in body
    for text in ("ApproximateAgeOfOldestMessage", "ApproximateNumberOfMessagesNotVisible", "5XXError", "p99"):
        assert text in body
    assert f'\\"{contracts.METRIC_NAMESPACE}\\"' in body


def test_agent_config_parameter(default_synth: Synth) -> None:
    (parameter,) = default_synth.of_type("AWS::SSM::Parameter").values()
    props = parameter["Properties"]
    assert props["Name"] == contracts.agent_config_parameter("default")
    rendered = json.dumps(props["Value"])
    for name in (
        Env.FLEET_NAME,
        Env.REGION,
        Env.WORK_QUEUE_URL,
        Env.WORK_DLQ_URL,
        Env.LEASE_TABLE,
        Env.FLEET_TABLE,
        Env.ASG_NAME,
        Env.LAUNCH_HOOK_NAME,
        Env.TERMINATE_HOOK_NAME,
        Env.HANDLER,
        Env.CONCURRENCY,
        Env.VISIBILITY_TIMEOUT_SECONDS,
        Env.IMDS_POLL_SECONDS,
        Env.HEALTH_PORT,
        Env.BOOTSTRAP_DEADLINE_SECONDS,
        Env.REBALANCE_POLICY,
        Env.MAX_FAILURES,
        Env.DRAIN_MARGIN_SECONDS,
    ):
        assert f'\\"{name.value}\\"' in rendered, name


# --------------------------------------------------------------------------- staging
def test_fis_template_targets_only_tagged_fleet_instances(staging_synth: Synth, default_synth: Synth) -> None:
    default_synth.assertions().resource_count_is("AWS::FIS::ExperimentTemplate", 0)
    (template,) = staging_synth.of_type("AWS::FIS::ExperimentTemplate").values()
    props = template["Properties"]
    (target,) = props["Targets"].values()
    assert target["ResourceType"] == "aws:ec2:spot-instance"
    assert target["ResourceTags"] == {
        contracts.FLEET_TAG_KEY: "staging",
        contracts.FIS_TARGET_TAG_KEY: "true",
    }
    assert "ResourceArns" not in target
    assert target["SelectionMode"] == "COUNT(1)"
    (action,) = props["Actions"].values()
    assert action["ActionId"] == "aws:ec2:send-spot-instance-interruptions"
    (stop,) = props["StopConditions"]
    assert stop["Source"] == "aws:cloudwatch:alarm"
    role_id = props["RoleArn"]["Fn::GetAtt"][0]
    role = staging_synth.resources[role_id]["Properties"]
    assert "fis.amazonaws.com" in json.dumps(role["AssumeRolePolicyDocument"])
    (interrupt,) = [
        s
        for s in role_policy_statements(staging_synth, role_id)
        if s["Action"] == "ec2:SendSpotInstanceInterruptions"
    ]
    assert interrupt["Condition"]["StringEquals"] == {
        f"aws:ResourceTag/{contracts.FLEET_TAG_KEY}": "staging",
        f"aws:ResourceTag/{contracts.FIS_TARGET_TAG_KEY}": "true",
    }


def test_synth_needs_no_aws_lookup(any_synth: Synth) -> None:
    manifest = json.loads((any_synth.outdir / "manifest.json").read_text())
    assert "missing" not in manifest, manifest.get("missing")
