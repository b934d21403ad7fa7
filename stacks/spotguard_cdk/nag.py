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

import re
from typing import Any

from aws_cdk import Acknowledgment, Stack, Validations
from constructs import IConstruct

#: Minimum length of a reason: a word or two is not a reason.
MIN_REASON_LENGTH = 20


def acknowledge(construct: IConstruct, rule: str, reason: str) -> None:
    """Acknowledge one cdk-nag finding on ``construct`` (and its children)."""
    if len(reason.strip()) < MIN_REASON_LENGTH:
        raise ValueError(f"acknowledgement of {rule} needs a real reason, got {reason!r}")
    Validations.of(construct).acknowledge(Acknowledgment(id=rule, reason=reason))


def iam5_resource(scope: IConstruct, resource: str) -> str:
    """The cdk-nag finding id for a wildcard ``resource`` (an ARN, possibly with tokens).

    cdk-nag names the finding after the resolved resource with intrinsics flattened
    (``{"Ref": "X"}`` -> ``<X>``, ``Fn::GetAtt`` -> ``<X.Attr>``), so the id differs
    between an environment-agnostic stack and one with a concrete account and region.
    """
    return f"AwsSolutions-IAM5[Resource::{_flatten(Stack.of(scope).resolve(resource))}]"


def _flatten(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and len(value) == 1:
        ((key, arg),) = value.items()
        if key == "Ref":
            return f"<{arg}>"
        if key == "Fn::GetAtt":
            return f"<{arg[0]}.{arg[1]}>"
        if key == "Fn::Join":
            separator, parts = arg
            return separator.join(_flatten(part) for part in parts)
        if key == "Fn::Sub" and isinstance(arg, str):
            return re.sub(r"\$\{([^}]+)\}", r"<\1>", arg)
    raise ValueError(f"cannot name the cdk-nag finding for {value!r}")
