"""Small helpers shared by the constructs."""

from __future__ import annotations

from aws_cdk import CfnResource
from aws_cdk import aws_logs as logs

_RETENTION_NAMES = {
    1: "ONE_DAY",
    3: "THREE_DAYS",
    5: "FIVE_DAYS",
    7: "ONE_WEEK",
    14: "TWO_WEEKS",
    30: "ONE_MONTH",
    60: "TWO_MONTHS",
    90: "THREE_MONTHS",
    120: "FOUR_MONTHS",
    150: "FIVE_MONTHS",
    180: "SIX_MONTHS",
    365: "ONE_YEAR",
}


def retention(days: int) -> logs.RetentionDays:
    """The RetentionDays member for one of the allowed ``log_retention_days`` values."""
    return logs.RetentionDays[_RETENTION_NAMES[days]]


def cfn_lint_ignore(resource: CfnResource, rules: dict[str, str]) -> None:
    """Skip cfn-lint ``rules`` (id -> reason) for this one resource.

    The reasons are kept next to the rule ids in the template metadata, so that anyone who
    reads the template sees why; cfn-lint honours ``Metadata.cfn-lint.config.ignore_checks``.
    """
    if not all(len(reason.strip()) >= 20 for reason in rules.values()):
        raise ValueError(f"every ignored cfn-lint rule needs a reason: {rules}")
    existing = resource.get_metadata("cfn-lint") or {}
    config = existing.get("config", {})
    ignored = sorted(set(config.get("ignore_checks", [])) | set(rules))
    reasons = {**existing.get("reasons", {}), **rules}
    resource.add_metadata("cfn-lint", {"config": {"ignore_checks": ignored}, "reasons": reasons})
