"""Helpers shared by the operations tests (migration, API, notifier, CLI): tables on the
moto server, a Lambda context, API Gateway REST proxy events."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import boto3
from spotguard_core import aws
from spotguard_core.contracts import Env
from spotguard_tools.local_tables import TableKind, create_table

JOBS_TABLE = "spotguard-jobs"
FLEET_TABLE = "spotguard-fleet"


def create_tables(monkeypatch: Any) -> None:
    """Jobs and fleet tables with the contract key schemas; env vars point at them."""
    aws.reset_clients()
    dynamodb = boto3.client("dynamodb")
    create_table(dynamodb, TableKind.JOBS, JOBS_TABLE)
    create_table(dynamodb, TableKind.FLEET, FLEET_TABLE)
    monkeypatch.setenv(Env.JOBS_TABLE.value, JOBS_TABLE)
    monkeypatch.setenv(Env.FLEET_TABLE.value, FLEET_TABLE)


@dataclass
class FakeLambdaContext:
    """The attributes Powertools reads from a Lambda context (a plain value object)."""

    function_name: str = "spotguard-test"
    memory_limit_in_mb: int = 256
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:spotguard-test"
    aws_request_id: str = "00000000-0000-0000-0000-000000000000"
    remaining_ms: int = 300_000

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


def rest_event(
    method: str,
    path: str,
    *,
    query: dict[str, str] | None = None,
    body: Any = None,
    raw_body: str | None = None,
    resource: str | None = None,
    path_parameters: dict[str, str] | None = None,
) -> dict[str, Any]:
    """An API Gateway REST (v1 proxy) event as IAM-authorised requests produce it."""
    text = raw_body if raw_body is not None else (json.dumps(body) if body is not None else None)
    return {
        "resource": resource or path,
        "path": path,
        "httpMethod": method,
        "headers": {"Content-Type": "application/json", "Host": "api.example.com"},
        "multiValueHeaders": {"Content-Type": ["application/json"], "Host": ["api.example.com"]},
        "queryStringParameters": query,
        "multiValueQueryStringParameters": {k: [v] for k, v in query.items()} if query else None,
        "pathParameters": path_parameters,
        "stageVariables": None,
        "requestContext": {
            "resourcePath": resource or path,
            "httpMethod": method,
            "path": f"/prod{path}",
            "stage": "prod",
            "requestId": str(uuid.uuid4()),
            "accountId": "123456789012",
            "identity": {
                "userArn": "arn:aws:iam::123456789012:user/operator",
                "sourceIp": "127.0.0.1",
                "caller": "AIDAEXAMPLE",
                "accessKey": "AKIAEXAMPLE",
            },
            "authorizer": None,
            "apiId": "abc123",
        },
        "body": text,
        "isBase64Encoded": False,
    }


def run_reconciler_inline(payload: Mapping[str, Any]) -> None:
    """Stands in for Lambda's asynchronous invoke of the reconciler: runs the real
    reconciler's job in this process, with the payload the API sent, before returning."""
    from spotguard_functions.reconciler import ManualTrigger, run_job  # noqa: PLC0415 - test support

    run_job(ManualTrigger.model_validate(dict(payload)))


def reconciler_runs_inline(monkeypatch: Any) -> list[dict[str, Any]]:
    """Make ``POST /migration/trigger`` run its job in-process (no Lambda service here).
    Returns the payloads the API handed to the reconciler."""
    from spotguard_functions import api  # noqa: PLC0415 - test support

    sent: list[dict[str, Any]] = []

    def invoke(payload: Mapping[str, Any]) -> None:
        sent.append(dict(payload))
        run_reconciler_inline(payload)

    monkeypatch.setattr(api, "reconciler_invoker", invoke)
    return sent
