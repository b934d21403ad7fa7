"""api λ: the operations API behind API Gateway (IAM auth). Routes and delegates.

- ``GET  /health``                       service health with the ``migrationService`` block
- ``GET  /migration/status``             enabled, statistics, configuration, last execution
- ``POST /migration/trigger``            ``{"dryRun": bool, "maxMigrations": n}`` → 202 + job id
- ``GET  /migration/history``            ``?limit=1..100&offset=0..10000``
- ``GET  /fleet``, ``GET /fleet/{instanceId}``  fleet records (state, bootstrap, last signal)

Models and answers live in ``spotguard_core.ops_models`` / ``ops_views``. Requests are
validated by Powertools against the strict models: invalid input gets 400 with a message
naming each bad field. Whatever a caller sends, the answer is a JSON response: a body
that cannot be read (not JSON, nested too deeply, multipart, too large) is a 400/413/415,
and anything unexpected is logged and answered 500 with a generic message — never an
exception out of the handler (API Gateway would turn it into a bare 502).
``spotguard_tools.openapi_doc`` writes docs/openapi.json from these routes.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from http import HTTPStatus
from typing import Annotated, Any

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response, content_types
from aws_lambda_powertools.event_handler.exceptions import NotFoundError
from aws_lambda_powertools.event_handler.openapi.exceptions import RequestValidationError
from aws_lambda_powertools.event_handler.openapi.params import Path, Query
from aws_lambda_powertools.event_handler.openapi.types import OpenAPIResponse
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel
from spotguard_core import aws, ops_views
from spotguard_core.contracts import Env, InstanceState, Metric
from spotguard_core.fleet_store import FleetStore
from spotguard_core.migration.models import MigrationJobSettings
from spotguard_core.migration.store import JobStore
from spotguard_core.ops_models import (
    HISTORY_DEFAULT_LIMIT,
    HISTORY_MAX_LIMIT,
    HISTORY_MAX_OFFSET,
    INSTANCE_ID_PATTERN,
    MAX_MIGRATIONS_LIMIT,
    ErrorResponse,
    FleetInstance,
    FleetResponse,
    HealthResponse,
    HistoryResponse,
    MigrationStatusResponse,
    QueryInt,
    TriggerRequest,
    TriggerResponse,
)

from spotguard_functions.observability import powertools

logger, metrics, tracer = powertools("api")
app = APIGatewayRestResolver(enable_validation=True)

__all__ = ["HISTORY_MAX_LIMIT", "HISTORY_MAX_OFFSET", "MAX_MIGRATIONS_LIMIT", "app", "handler"]

#: The trigger body is two fields; anything much larger is not a request of this API.
MAX_BODY_BYTES = 16 * 1024
#: JSON nesting a request body may have (the trigger body has one level).
MAX_BODY_DEPTH = 32


def _documented(model: type[BaseModel], description: str) -> OpenAPIResponse:
    """A route's OpenAPI entry for one more status it answers with, and its JSON model."""
    return {"description": description, "content": {content_types.APPLICATION_JSON: {"model": model}}}


def _error(status: int, message: str, errors: list[dict[str, str]] | None = None) -> Response[str]:
    body = ErrorResponse.model_validate({"message": message, "errors": errors or []})
    return Response(
        status_code=status, content_type=content_types.APPLICATION_JSON, body=body.model_dump_json()
    )


# ------------------------------------------------------------------------------ errors
@app.exception_handler(RequestValidationError)
def _bad_request(error: RequestValidationError) -> Response[str]:
    problems = []
    for item in error.errors():
        location = ".".join(
            str(part) for part in item.get("loc", ()) if part != "body" or len(item["loc"]) == 1
        )
        problems.append({"field": location or "body", "message": str(item.get("msg", "invalid"))})
    summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
    return _error(400, f"invalid request: {summary}", problems)


@app.exception_handler(ops_views.UnreadableRecordError)
def _unreadable_record(error: ops_views.UnreadableRecordError) -> Response[str]:
    metrics.add_metric(name=Metric.API_UNREADABLE_RECORDS.value, unit="Count", value=1)
    logger.error(
        "Unreadable fleet record", extra={"key": error.unreadable.key, "error": error.unreadable.error}
    )
    return _error(500, f"{error} (logged)")


class ReconcilerUnavailableError(Exception):
    """No reconciler function is configured: a manual job has nowhere to run."""


@app.exception_handler(ReconcilerUnavailableError)
def _no_reconciler(error: ReconcilerUnavailableError) -> Response[str]:
    return _error(503, str(error))


# ------------------------------------------------------------------------------ request guard
def _content_types(event: Mapping[str, Any]) -> set[str]:
    """Every media type the request's Content-Type headers name (any spelling of the name,
    single- and multi-value), lower-cased; "" for a header without a usable value."""
    found: set[str] = set()
    for field in ("headers", "multiValueHeaders"):
        headers = event.get(field)
        if not isinstance(headers, Mapping):
            continue
        for key, value in headers.items():
            if not (isinstance(key, str) and key.lower() == "content-type"):
                continue
            for one in value if isinstance(value, list) else [value]:
                found.add(one.split(";", 1)[0].strip().lower() if isinstance(one, str) else "")
    return found


def _with_json_content_type(event: Mapping[str, Any]) -> dict[str, Any]:
    """The event with its Content-Type headers (already checked to be JSON) spelled the one
    way Powertools' body parser recognises (it compares case-sensitively)."""
    normalised = dict(event)
    for field, value in (("headers", "application/json"), ("multiValueHeaders", ["application/json"])):
        headers = event.get(field)
        if isinstance(headers, Mapping) and any(
            isinstance(key, str) and key.lower() == "content-type" for key in headers
        ):
            kept = {
                k: v for k, v in headers.items() if not (isinstance(k, str) and k.lower() == "content-type")
            }
            normalised[field] = {**kept, "Content-Type": value}
    return normalised


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        current, depth = stack.pop()
        if isinstance(current, dict | list):
            if depth > limit:
                return True
            children = current.values() if isinstance(current, dict) else current
            stack.extend((child, depth + 1) for child in children)
    return False


def _unreadable_body(event: Mapping[str, Any]) -> tuple[int, str] | None:  # noqa: PLR0911 - one per reason
    """``(status, message)`` for a body this API cannot read, checked before Powertools parses
    it (its parsers raise ValueError on a multipart body without boundary and RecursionError
    on deeply nested JSON); None when the body is absent or readable JSON."""
    body = event.get("body")
    method = event.get("httpMethod")
    # Checked even without a body: Powertools parses a multipart POST's empty body too.
    if not _content_types(event) <= {"", "application/json"} and (
        body or (isinstance(method, str) and method.upper() in ("POST", "PUT", "PATCH"))
    ):
        return 415, "invalid request: Content-Type must be application/json"
    if body is None or body == "":
        return None
    if not isinstance(body, str):
        return 400, "invalid request: body must be text"
    raw: bytes | str = body
    if event.get("isBase64Encoded"):
        try:
            raw = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            return 400, "invalid request: body is not valid base64"
    if len(raw) > MAX_BODY_BYTES:
        return 413, f"invalid request: body larger than {MAX_BODY_BYTES} bytes"
    try:
        parsed = json.loads(raw)
    except RecursionError:
        return 400, f"invalid request: body nests deeper than {MAX_BODY_DEPTH} levels"
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return 400, "invalid request: body is not valid JSON"
    if _depth_exceeds(parsed, MAX_BODY_DEPTH):
        return 400, f"invalid request: body nests deeper than {MAX_BODY_DEPTH} levels"
    return None


# ------------------------------------------------------------------------------ routes
@app.get("/health", summary="Service health, including the migration service block")
def get_health() -> HealthResponse:
    return ops_views.health(
        fleet=os.environ.get(Env.FLEET_NAME, ""), settings=MigrationJobSettings(), store=JobStore()
    )


@app.get("/migration/status", summary="Migration service status, statistics and configuration")
def get_migration_status() -> MigrationStatusResponse:
    return ops_views.migration_status(settings=MigrationJobSettings(), store=JobStore())


def invoke_reconciler_function(payload: Mapping[str, Any]) -> None:
    """Start the reconciler asynchronously (InvocationType=Event) with the trigger payload."""
    function = os.environ.get(Env.RECONCILER_FUNCTION)
    if not function:
        raise ReconcilerUnavailableError(
            f"no reconciler function configured ({Env.RECONCILER_FUNCTION.value} is not set)"
        )
    aws.client("lambda").invoke(
        FunctionName=function, InvocationType="Event", Payload=json.dumps(dict(payload)).encode()
    )
    logger.info("Migration job triggered", extra={"jobId": payload.get("jobId"), "function": function})


#: How a manual job reaches the reconciler (tests run it in-process instead).
reconciler_invoker: ops_views.ReconcilerInvoker = invoke_reconciler_function


@app.post(
    "/migration/trigger",
    summary="Run a migration job now",
    responses={
        202: _documented(
            TriggerResponse, "accepted: the reconciler runs the job (follow its id in the history)"
        ),
        503: _documented(ErrorResponse, "no reconciler function configured"),
    },
)
def post_migration_trigger(request: TriggerRequest) -> Response[TriggerResponse]:
    # Looked up per call (not bound at import) so tests can run the reconciler in-process.
    body = ops_views.trigger(request, lambda payload: reconciler_invoker(payload))  # noqa: PLW0108
    return Response(status_code=202, content_type=content_types.APPLICATION_JSON, body=body)


@app.get("/migration/history", summary="Migration jobs, newest first")
def get_migration_history(
    limit: Annotated[QueryInt, Query(ge=1, le=HISTORY_MAX_LIMIT, description="jobs per page")] = (
        HISTORY_DEFAULT_LIMIT
    ),
    offset: Annotated[QueryInt, Query(ge=0, le=HISTORY_MAX_OFFSET, description="jobs to skip")] = 0,
) -> HistoryResponse:
    return ops_views.history(store=JobStore(), limit=limit, offset=offset)


@app.get("/fleet", summary="Fleet records of managed instances")
def get_fleet(
    state: Annotated[InstanceState | None, Query(description="only instances in this state")] = None,
) -> FleetResponse:
    answer = ops_views.fleet(store=FleetStore(), state=state, on_unreadable=_count_unreadable)
    return answer


def _count_unreadable(unreadable: ops_views.Unreadable) -> None:
    metrics.add_metric(name=Metric.API_UNREADABLE_RECORDS.value, unit="Count", value=1)
    logger.warning(
        "Unreadable fleet record skipped", extra={"key": unreadable.key, "error": unreadable.error}
    )


@app.get(
    "/fleet/<instanceId>",
    summary="One managed instance",
    responses={404: _documented(ErrorResponse, "instance not managed by spotguard")},
)
def get_fleet_instance(
    instanceId: Annotated[str, Path(pattern=INSTANCE_ID_PATTERN, description="EC2 instance id")],
) -> FleetInstance:
    instance = ops_views.fleet_instance(store=FleetStore(), instance_id=instanceId)
    if instance is None:
        raise NotFoundError(f"instance {instanceId} is not managed by spotguard")
    return instance


# ------------------------------------------------------------------------------ handler
@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_REST)
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    try:
        return _handle(event, context)
    finally:
        # Most requests add no metric (API Gateway's own metrics cover 4xx/5xx/latency):
        # flush only when there is one, instead of a "no metrics" warning per request.
        if metrics.metric_set:
            metrics.flush_metrics()


def _handle(event: Any, context: LambdaContext) -> dict[str, Any]:
    try:
        if not (
            isinstance(event, Mapping)
            and isinstance(event.get("httpMethod"), str)
            and isinstance(event.get("path"), str)
        ):
            return _plain(400, "invalid request: not an API Gateway REST event")
        unreadable = _unreadable_body(event)
        if unreadable is not None:
            return _plain(*unreadable)
        return _with_message(app.resolve(_with_json_content_type(event), context))
    except Exception:  # the one place that turns anything unexpected into a 500
        metrics.add_metric(name=Metric.API_INTERNAL_ERRORS.value, unit="Count", value=1)
        logger.exception("Unhandled error in the operations API")
        return _plain(500, "internal error (logged); try again or see the function's logs")


def _with_message(response: dict[str, Any]) -> dict[str, Any]:
    """Every error answer carries ``ErrorResponse``'s ``message``, also the few Powertools
    builds itself (its own 404/405/415 shapes)."""
    status = response.get("statusCode")
    if not isinstance(status, int) or status < 400:
        return response
    try:
        body = json.loads(response.get("body") or "null")
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str) and body["message"]:
        return response
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = str(status)
    return _plain(status, f"request not served ({phrase})")


def _plain(status: int, message: str) -> dict[str, Any]:
    """An API Gateway proxy answer with an ``ErrorResponse`` body, built without the resolver."""
    return {
        "statusCode": status,
        "headers": {"Content-Type": content_types.APPLICATION_JSON},
        "multiValueHeaders": {},
        "body": ErrorResponse(message=message).model_dump_json(),
        "isBase64Encoded": False,
    }
