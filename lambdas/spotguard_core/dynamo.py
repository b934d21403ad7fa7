"""Small helpers shared by the DynamoDB adapters (value conversion, update expressions,
pagination).

Standard library + boto3 only: the agent bundle ships this module."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from decimal import Decimal
from enum import Enum
from typing import Any

from botocore.exceptions import ClientError

from spotguard_core import aws
from spotguard_core.contracts import Env


def to_dynamo(value: Any) -> Any:
    """Plain Python → what the boto3 resource layer accepts (no binary floats, no enums)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, float):
        return Decimal(str(round(value, 3)))
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): to_dynamo(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_dynamo(v) for v in value]
    return value


def table(env_name: Env, table_name: str | None = None, clients: aws.ClientFactory | None = None) -> Any:
    """The boto3 ``Table`` named by ``table_name`` or by the environment variable ``env_name``,
    from ``clients`` (default: the control plane's factory)."""
    name = table_name or os.environ.get(env_name)
    if not name:
        raise RuntimeError(f"table name missing: set {env_name.value}")
    return (clients or aws.default_factory()).table(name)


def condition_failed(error: ClientError) -> bool:
    """The write was refused by its ``ConditionExpression`` (not an outage)."""
    return error.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"


def update_expression(fields: Mapping[str, Any]) -> tuple[str, dict[str, str], dict[str, Any]]:
    """``SET #f0 = :f0, …`` (names always aliased: ``state`` is a reserved word) and
    ``REMOVE`` for fields set to ``None``."""
    sets: list[str] = []
    removes: list[str] = []
    names: dict[str, str] = {}
    values: dict[str, Any] = {}
    for index, (key, value) in enumerate(fields.items()):
        names[f"#f{index}"] = key
        if value is None:
            removes.append(f"#f{index}")
        else:
            sets.append(f"#f{index} = :f{index}")
            values[f":f{index}"] = to_dynamo(value)
    expression = ""
    if sets:
        expression += "SET " + ", ".join(sets)
    if removes:
        expression += (" " if expression else "") + "REMOVE " + ", ".join(removes)
    return expression, names, values


def pages(read: Callable[..., Mapping[str, Any]], **request: Any) -> Iterator[Mapping[str, Any]]:
    """Every page of a Query or Scan (``read``: a table's ``query`` or ``scan``), each next
    page read only when asked for: a caller that stops iterating stops reading."""
    while True:
        page = read(**request)
        yield page
        if "LastEvaluatedKey" not in page:
            return
        request = {**request, "ExclusiveStartKey": page["LastEvaluatedKey"]}


def items(read: Callable[..., Mapping[str, Any]], **request: Any) -> Iterator[Mapping[str, Any]]:
    """Every raw item of a Query or Scan, page after page (see ``pages``): callers parse
    each one (or skip a bad one) as it comes."""
    for page in pages(read, **request):
        yield from page.get("Items", [])
