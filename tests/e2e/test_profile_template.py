"""The emulator profile and the bundled Powertools layer, on synthesized templates (no emulator).

``profile = emulator`` must change exactly the ``EmulatorGap`` features and nothing else: this
lists every template difference against the same configuration with ``profile = aws`` and
attributes each removed resource to its gap. ``powertools_layer = bundled`` replaces the public
layer ARN by a layer asset built from requirements.lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from spotguard_cdk.settings import ConfigurationError, EmulatorGap, Settings
from spotguard_core.contracts import Env

from tests.e2e.emulator import DEPLOY_CONTEXT, REPO_ROOT, STACK_NAME
from tests.infrastructure.conftest import Synth, default_synth, synth_environment, synths  # noqa: F401

pytestmark = [pytest.mark.infrastructure, pytest.mark.xdist_group("synth")]

AWS_CONTEXT = {k: v for k, v in DEPLOY_CONTEXT.items() if k != "spotguard.profile"}
PROFILES = {"aws": AWS_CONTEXT, "emulator": DEPLOY_CONTEXT}


@pytest.fixture(scope="session")
def profile_synths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The deploy configuration of ``make e2e`` with each profile (both synthesized at once)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    directory = base / "spotguard-profile-synth"
    directory.mkdir(exist_ok=True)
    with (directory / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / "done").exists():
            started = {
                name: subprocess.Popen(
                    [sys.executable, "app.py"],
                    cwd=REPO_ROOT,
                    env=synth_environment(directory / name, context),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for name, context in PROFILES.items()
            }
            for name, process in started.items():
                _, stderr = process.communicate(timeout=300)
                assert process.returncode == 0, f"synth {name} failed:\n{stderr[-4000:]}"
            (directory / "done").write_text("ok")
    return {
        name: json.loads((directory / name / f"{STACK_NAME}.template.json").read_text()) for name in PROFILES
    }


def _refs(value: Any) -> set[str]:
    """Logical ids referenced (Ref / Fn::GetAtt) anywhere in ``value``."""
    found: set[str] = set()
    if isinstance(value, dict):
        if "Ref" in value and isinstance(value["Ref"], str):
            found.add(value["Ref"])
        if "Fn::GetAtt" in value:
            found.add(value["Fn::GetAtt"][0])
        for child in value.values():
            found |= _refs(child)
    elif isinstance(value, list):
        for child in value:
            found |= _refs(child)
    return found


def _anchor_gap(resource: dict[str, Any]) -> EmulatorGap | None:
    """The gap a resource *is* (the one the emulator cannot deploy), if any."""
    kind, props = resource["Type"], resource.get("Properties", {})
    if kind == "AWS::EC2::FlowLog":
        return EmulatorGap.VPC_FLOW_LOGS
    if kind == "Custom::VpcRestrictDefaultSG":
        return EmulatorGap.DEFAULT_SECURITY_GROUP_RESTRICTION
    if kind == "AWS::Events::EventBusPolicy":
        return EmulatorGap.EVENT_BUS_POLICY
    if kind == "AWS::CloudWatch::Alarm" and any("Expression" in m for m in props.get("Metrics", [])):
        return EmulatorGap.METRIC_MATH_ALARMS
    return None


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def gaps_of_removed(removed: dict[str, dict[str, Any]]) -> dict[str, EmulatorGap | None]:
    """Each removed resource's gap: resources connected (Ref, GetAtt, DependsOn, either way)
    only among themselves form a group, explained by the one gap resource in it (a flow log
    with its role, policy and log group; an alarm with its step policy). A group with no gap
    resource, or two, maps to None."""
    edges: dict[str, set[str]] = {k: set() for k in removed}
    for logical_id, resource in removed.items():
        for other in (_refs(resource) | set(_as_list(resource.get("DependsOn", [])))) & set(removed):
            edges[logical_id].add(other)
            edges[other].add(logical_id)
    result: dict[str, EmulatorGap | None] = {}
    for start in removed:
        if start in result:
            continue
        group, stack = {start}, [start]
        while stack:
            for other in edges[stack.pop()] - group:
                group.add(other)
                stack.append(other)
        anchors = [g for g in (_anchor_gap(removed[k]) for k in sorted(group)) if g is not None]
        gap = anchors[0] if anchors and len(set(anchors)) == 1 else None
        result.update(dict.fromkeys(group, gap))
    return result


def test_the_emulator_profile_removes_exactly_the_named_gaps(
    profile_synths: dict[str, dict[str, Any]],
) -> None:
    normal, emulator = profile_synths["aws"]["Resources"], profile_synths["emulator"]["Resources"]
    assert not set(emulator) - set(normal), "the emulator profile must not add resources"
    removed = {k: normal[k] for k in set(normal) - set(emulator)}
    by_gap: dict[EmulatorGap | None, Counter[str]] = {}
    for logical_id, gap in gaps_of_removed(removed).items():
        by_gap.setdefault(gap, Counter())[removed[logical_id]["Type"]] += 1
    assert by_gap == {
        EmulatorGap.VPC_FLOW_LOGS: Counter(
            {"AWS::EC2::FlowLog": 1, "AWS::Logs::LogGroup": 1, "AWS::IAM::Role": 1, "AWS::IAM::Policy": 1}
        ),
        EmulatorGap.DEFAULT_SECURITY_GROUP_RESTRICTION: Counter(
            {"Custom::VpcRestrictDefaultSG": 1, "AWS::Lambda::Function": 1, "AWS::IAM::Role": 1}
        ),
        EmulatorGap.METRIC_MATH_ALARMS: Counter(
            {"AWS::CloudWatch::Alarm": 4, "AWS::AutoScaling::ScalingPolicy": 2}
        ),
        EmulatorGap.EVENT_BUS_POLICY: Counter({"AWS::Events::EventBusPolicy": 1}),
    }


def test_the_emulator_profile_changes_no_property_of_what_it_keeps(
    profile_synths: dict[str, dict[str, Any]],
) -> None:
    normal, emulator = profile_synths["aws"], profile_synths["emulator"]
    changed = [
        (logical_id, part)
        for logical_id, resource in emulator["Resources"].items()
        for part in ("Type", "Properties", "DependsOn", "Condition", "DeletionPolicy", "UpdateReplacePolicy")
        if resource.get(part) != normal["Resources"][logical_id].get(part)
    ]
    assert changed == []
    for section in ("Parameters", "Outputs", "Conditions", "Rules", "Mappings"):
        assert emulator.get(section) == normal.get(section), section
    # What stays is what security rests on: the work queue's TLS-only policy, the tables' PITR,
    # the launch template's IMDSv2 and encrypted volumes, the target-tracking backlog policy.
    kinds = Counter(r["Type"] for r in emulator["Resources"].values())
    assert kinds["AWS::SQS::QueuePolicy"] >= 1
    assert kinds["AWS::AutoScaling::ScalingPolicy"] == 1


def test_the_bundled_layer_is_an_asset_every_function_uses(profile_synths: dict[str, dict[str, Any]]) -> None:
    resources = profile_synths["aws"]["Resources"]
    layers = {k: v for k, v in resources.items() if v["Type"] == "AWS::Lambda::LayerVersion"}
    (layer_id,) = layers
    props = layers[layer_id]["Properties"]
    assert props["CompatibleRuntimes"] == ["python3.13"]
    assert props["CompatibleArchitectures"] == ["x86_64"]
    assert "S3Bucket" in props["Content"] and "S3Key" in props["Content"]
    functions = [
        v["Properties"]
        for v in resources.values()
        if v["Type"] == "AWS::Lambda::Function"
        and str(v["Properties"].get("Handler", "")).startswith("spotguard_functions.")
    ]
    assert len(functions) == 5
    for function in functions:
        assert function["Layers"] == [{"Ref": layer_id}]
        assert function["Runtime"] == "python3.13"


def test_the_public_layer_is_the_default(default_synth: Synth) -> None:  # noqa: F811
    assert not default_synth.of_type("AWS::Lambda::LayerVersion")
    functions = [
        v["Properties"]
        for v in default_synth.of_type("AWS::Lambda::Function").values()
        if str(v["Properties"].get("Handler", "")).startswith("spotguard_functions.")
    ]
    assert len(functions) == 5
    for function in functions:
        (arn,) = function["Layers"]
        text = json.dumps(arn)
        assert ":017000801446:layer:AWSLambdaPowertoolsPythonV3-python313-x86_64:27" in text


def test_the_emulator_profile_needs_the_bundled_layer_and_no_fis() -> None:
    with pytest.raises(ConfigurationError, match=r"powertools_layer = bundled"):
        Settings.from_mapping({"profile": "emulator"})
    with pytest.raises(ConfigurationError, match=r"staging\.fis_experiment = false"):
        Settings.from_mapping(
            {
                "profile": "emulator",
                "control_plane": {"powertools_layer": "bundled"},
                "fleet": {"fis_target": True},
                "staging": {"fis_experiment": True},
            }
        )
    with pytest.raises(ConfigurationError, match="profile"):
        Settings.from_mapping({"profile": "localstack"})


def test_supports_is_true_for_every_gap_on_aws() -> None:
    aws = Settings.from_mapping({})
    emulator = Settings.from_mapping(
        {"profile": "emulator", "control_plane": {"powertools_layer": "bundled"}}
    )
    assert all(aws.supports(gap) for gap in EmulatorGap)
    assert not any(emulator.supports(gap) for gap in EmulatorGap)


def test_the_deploy_context_is_the_staging_stack() -> None:
    settings = Settings.from_mapping({}, DEPLOY_CONTEXT_OVERRIDES)
    assert settings.staging.allow_test_events is True
    assert settings.profile == "emulator"
    assert settings.control_plane.powertools_layer == "bundled"
    assert settings.stack_name == STACK_NAME


DEPLOY_CONTEXT_OVERRIDES = {
    key.removeprefix("spotguard."): (value == "true" if value in {"true", "false"} else value)
    for key, value in DEPLOY_CONTEXT.items()
}


def test_cdk_json_stays_production_like() -> None:
    context = json.loads((Path(REPO_ROOT) / "cdk.json").read_text())["context"]["spotguard"]
    assert context.get("profile", "aws") == "aws"
    assert context["control_plane"].get("powertools_layer", "public") == "public"


def _dispatcher_environment(resources: dict[str, Any]) -> dict[str, Any]:
    (dispatcher,) = [
        v["Properties"]
        for v in resources.values()
        if v["Type"] == "AWS::Lambda::Function"
        and v["Properties"].get("Handler") == "spotguard_functions.dispatcher.handler"
    ]
    variables = dispatcher["Environment"]["Variables"]
    assert isinstance(variables, dict)
    return variables


def test_the_dispatcher_accepts_test_events_only_where_the_rules_do(
    profile_synths: dict[str, dict[str, Any]],
    default_synth: Synth,  # noqa: F811
) -> None:
    """Found by make e2e: the rules forwarded spotguard.test events but the dispatcher's own
    switch was not set, so it rejected every staging test event."""
    for name in PROFILES:
        env = _dispatcher_environment(profile_synths[name]["Resources"])
        assert env[Env.ALLOW_TEST_EVENTS.value] == "true", name
    production = _dispatcher_environment(default_synth.resources)
    assert production.get(Env.ALLOW_TEST_EVENTS.value, "false") == "false"
