"""cdk-nag (AwsSolutions) and cfn-lint on the synthesized templates, and the user data size."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from spotguard_core import contracts
from spotguard_tools.bundle import render_user_data

from tests.infrastructure.conftest import Synth

pytestmark = [pytest.mark.infrastructure, pytest.mark.xdist_group("synth")]

#: Raw user data limit of EC2 (before base64) and spotguard's own target.
USER_DATA_LIMIT = 16 * 1024
USER_DATA_TARGET = 2048


def validation_violations(synth: Synth) -> list[dict[str, Any]]:
    report = json.loads((synth.outdir / "validation-report.json").read_text())
    return [
        {"plugin": plugin["pluginName"], **violation}
        for plugin in report["pluginReports"]
        for violation in plugin["violations"]
    ]


def acknowledgements(synth: Synth) -> dict[tuple[str, str], str]:
    metadata = json.loads((synth.outdir / f"{synth.stack_name}.metadata.json").read_text())
    found: dict[tuple[str, str], str] = {}
    for path, entries in metadata.items():
        for entry in entries:
            if entry["type"] == "aws:cdk:acknowledged-rules":
                for rule, reason in entry["data"].items():
                    found[(path, rule)] = reason
    return found


def test_cdk_nag_has_no_unacknowledged_findings(every_synth: Synth) -> None:
    # A finding fails synth (every_synth asserts returncode 0); the report must be empty too,
    # including warnings (annotations) that would not fail synth.
    violations = validation_violations(every_synth)
    assert violations == [], json.dumps(violations, indent=1)[:4000]


def test_cdk_nag_is_active(every_synth: Synth) -> None:
    """The plugin really ran: acknowledged AwsSolutions rules are recorded in the metadata."""
    rules = {rule for _, rule in acknowledgements(every_synth)}
    assert any(rule.startswith("Annotation::AwsSolutions-") for rule in rules), rules


def test_every_acknowledgement_has_a_reason(every_synth: Synth) -> None:
    acks = acknowledgements(every_synth)
    assert acks
    for (path, rule), reason in acks.items():
        assert isinstance(reason, str), (path, rule)
        assert len(reason.strip()) >= 20, f"{path} {rule}: reason too short: {reason!r}"


def test_cfn_lint_has_no_errors(every_synth: Synth) -> None:
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("cfn-lint")),
            "--format",
            "json",
            "--",
            str(every_synth.template_path()),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    errors = [f for f in findings if f["Level"] == "Error"]
    assert errors == [], json.dumps(errors, indent=1)[:4000]
    # No warnings either: a rule is only skipped per resource, with its reason in the
    # template (Metadata.cfn-lint), see test_every_cfn_lint_ignore_has_a_reason.
    assert findings == [], json.dumps(findings, indent=1)[:4000]
    assert result.returncode == 0, result.stderr


def test_every_cfn_lint_ignore_has_a_reason(every_synth: Synth) -> None:
    ignored = {}
    for logical_id, resource in every_synth.resources.items():
        lint = resource.get("Metadata", {}).get("cfn-lint")
        if lint is None:
            continue
        rules = lint["config"]["ignore_checks"]
        assert set(rules) == set(lint["reasons"]), logical_id
        for rule in rules:
            assert len(lint["reasons"][rule]) >= 20, (logical_id, rule)
            ignored[(logical_id, rule)] = lint["reasons"][rule]
    assert {rule for _, rule in ignored} <= {"W3005", "W3010"}


def realistic_values(variables: dict[str, Any]) -> dict[str, str]:
    """Values for the Fn::Sub variables: literals as synthesized, tokens at real AWS lengths."""
    bucket = "cdk-hnb659fds-assets-123456789012-ap-southeast-2"  # CDK bootstrap bucket name
    bucket = bucket + "x" * (63 - len(bucket))  # longest legal bucket name
    key = secrets.token_hex(32) + ".tar.gz"  # CDK asset keys: <sha256>.tar.gz
    token_values = {
        "Region": "ap-southeast-2",
        "BundleUrl": f"s3://{bucket}/{key}",
        # CloudFormation names: <stack>-<logical id>-<13-char suffix>
        "FleetTable": "Spotguard-default-TablesFleet4F2B1A9C-1Q2W3E4R5T6Y7",
        "InstanceArnPrefix": "arn:aws:ec2:ap-southeast-2:123456789012:instance/",
    }
    values = {}
    for name in contracts.BOOTSTRAP_PLACEHOLDERS:
        value = variables.get(name)
        values[name] = value if isinstance(value, str) else token_values[name]
    return values


def rendered_user_data(synth: Synth) -> str:
    """The launch template's user data as an instance receives it (Fn::Sub resolved)."""
    (template,) = synth.of_type("AWS::EC2::LaunchTemplate").values()
    sub = template["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]["Fn::Sub"]
    text, variables = sub
    assert set(variables) == set(contracts.BOOTSTRAP_PLACEHOLDERS)
    rendered = render_user_data(realistic_values(variables), template=text)
    assert "${" not in rendered
    return rendered


def test_user_data_is_under_the_ec2_limit(any_synth: Synth, record_property: Any) -> None:
    size = len(rendered_user_data(any_synth).encode())
    record_property("user_data_bytes", size)
    sys.stderr.write(f"\n{any_synth.name}: user data {size} bytes\n")
    assert size < USER_DATA_LIMIT


def test_user_data_meets_the_2kb_target(default_synth: Synth) -> None:
    assert len(rendered_user_data(default_synth).encode()) < USER_DATA_TARGET


def test_synth_time_and_size_are_recorded(any_synth: Synth, record_property: Any) -> None:
    resources = len(any_synth.resources)
    record_property("synth_seconds", round(any_synth.seconds, 1))
    record_property("resources", resources)
    sys.stderr.write(f"\n{any_synth.name}: {resources} resources, synth {any_synth.seconds:.1f} s\n")
    assert 50 < resources < 500  # CloudFormation allows 500 per stack
