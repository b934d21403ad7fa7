"""cdk-nag acknowledgements, each with its reason.

cdk-nag 3 reports through CDK's Validations API: findings fail synth and are written to
the cloud assembly's validation report; an acknowledgement is recorded in the construct
metadata (``aws:cdk:acknowledged-rules``) together with its reason, so the reason travels
with the template and the infrastructure tests can check that every one has a reason.
Acknowledgements apply to the construct and everything below it, and each finding id is
acknowledged individually (cdk-nag 3 has no prefix matching), e.g.
``AwsSolutions-IAM5[Resource::*]``.
"""

from __future__ import annotations

from aws_cdk import Acknowledgment, Validations
from constructs import IConstruct

#: Minimum length of a reason: a word or two is not a reason.
MIN_REASON_LENGTH = 20


def acknowledge(construct: IConstruct, rule: str, reason: str) -> None:
    """Acknowledge one cdk-nag finding on ``construct`` (and its children)."""
    if len(reason.strip()) < MIN_REASON_LENGTH:
        raise ValueError(f"acknowledgement of {rule} needs a real reason, got {reason!r}")
    Validations.of(construct).acknowledge(Acknowledgment(id=rule, reason=reason))


def acknowledge_all(construct: IConstruct, rules: list[str], reason: str) -> None:
    for rule in rules:
        acknowledge(construct, rule, reason)
