"""boto3 clients, made in one place, for the control plane and the instance agent alike.

Every AWS call of spotguard goes through a client from a :class:`ClientFactory`: botocore
retries (``adaptive`` for the control plane, whose requeue bursts are where throttling
happens during a mass interruption; ``standard`` on the agent, whose few calls must not be
rate-limited on a drain), short connect timeouts, a connection pool as large as the
requeue's concurrency, and the endpoint from ``AWS_ENDPOINT_URL`` when set (the local drill
and the tests point it at the moto server; boto3 honours it natively). ``AWS_MAX_ATTEMPTS``
overrides the attempt count. When the fault-injection variables are set
(``contracts.Env.AWS_*``), every client gets the injector's hook
(``spotguard_core.fault_injection``).

Standard library + boto3 only: the agent bundle ships this module.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError

from spotguard_core import fault_injection

#: What an AWS call can raise besides a programming error. botocore raises
#: ResponseParserError (not a BotoCoreError) for a garbled 5xx body.
AWS_ERRORS: tuple[type[Exception], ...] = (BotoCoreError, ClientError, ResponseParserError)
DEFAULT_MAX_ATTEMPTS = 8
#: At least the requeuer's concurrency: a smaller pool makes threads wait for connections.
MAX_POOL_CONNECTIONS = 64


def error_code(error: Exception) -> str:
    """The AWS error code of a ``ClientError`` ("" for anything else)."""
    if isinstance(error, ClientError):
        return str(error.response.get("Error", {}).get("Code", ""))
    return ""


def client_config(mode: str = "adaptive") -> Config:
    raw_attempts = os.environ.get("AWS_MAX_ATTEMPTS", "").strip()
    attempts = int(raw_attempts) if raw_attempts.isdigit() and int(raw_attempts) > 0 else DEFAULT_MAX_ATTEMPTS
    retries: Any = {"mode": mode, "total_max_attempts": attempts}
    return Config(
        retries=retries,
        connect_timeout=5,
        read_timeout=30,
        max_pool_connections=MAX_POOL_CONNECTIONS,
    )


class ClientFactory:
    """Cached, thread-safe clients and resources of one region (boto3 clients are thread-safe;
    creating them from one session is not, hence the lock)."""

    def __init__(self, region: str | None = None, *, retry_mode: str = "adaptive") -> None:
        self.region = region or None
        self.retry_mode = retry_mode
        self._session = boto3.session.Session(region_name=self.region)
        self._clients: dict[tuple[str, tuple[tuple[str, Any], ...]], Any] = {}
        self._resources: dict[str, Any] = {}
        self._lock = threading.Lock()

    def client(self, service: str, **kwargs: Any) -> Any:
        key = (service, tuple(sorted(kwargs.items())))
        with self._lock:
            if key not in self._clients:
                made = self._session.client(service, config=client_config(self.retry_mode), **kwargs)  # type: ignore[call-overload]
                self._clients[key] = fault_injection.install(made)
            return self._clients[key]

    def resource(self, service: str) -> Any:
        with self._lock:
            if service not in self._resources:
                made = self._session.resource(service, config=client_config(self.retry_mode))  # type: ignore[call-overload]
                fault_injection.install(made.meta.client)
                self._resources[service] = made
            return self._resources[service]

    def table(self, name: str) -> Any:
        """A DynamoDB ``Table`` of this factory's resource."""
        return self.resource("dynamodb").Table(name)

    @property
    def sqs(self) -> Any:
        return self.client("sqs")

    @property
    def dynamodb(self) -> Any:
        return self.client("dynamodb")


_default_lock = threading.Lock()
_default: ClientFactory | None = None


def default_factory() -> ClientFactory:
    """The control plane's factory (the Lambda functions, the drill's control plane, tools)."""
    global _default  # noqa: PLW0603 - one factory per process (warm Lambda containers reuse it)
    with _default_lock:
        if _default is None:
            _default = ClientFactory()
        return _default


def client(service: str, **kwargs: Any) -> Any:
    """A cached boto3 client for ``service`` with spotguard's retry configuration."""
    return default_factory().client(service, **kwargs)


def resource(service: str) -> Any:
    return default_factory().resource(service)


def reset_clients() -> None:
    """Forget cached clients and the fault injector (tests switch endpoints and settings)."""
    global _default  # noqa: PLW0603
    with _default_lock:
        _default = None
    fault_injection.reset()
