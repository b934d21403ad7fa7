"""Small helpers shared by the constructs."""

from __future__ import annotations

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
