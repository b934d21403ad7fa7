"""boto3 clients for the agent: standard retries, short timeouts, one place.

boto3 honours ``AWS_ENDPOINT_URL`` itself (the drill and the tests point it at moto)."""

from __future__ import annotations

import threading
from typing import Any

import boto3
from botocore.config import Config

_CONFIG = Config(
    retries={"mode": "standard", "max_attempts": 5},
    connect_timeout=5,
    read_timeout=25,
    max_pool_connections=50,
)


class AwsClients:
    """Lazily created, thread-safe (boto3 clients are) clients for one region."""

    def __init__(self, region: str = "") -> None:
        self._session = boto3.session.Session(region_name=region or None)
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()

    def client(self, service: str) -> Any:
        with self._lock:
            if service not in self._clients:
                self._clients[service] = self._session.client(service, config=_CONFIG)  # type: ignore[call-overload]
            return self._clients[service]

    @property
    def sqs(self) -> Any:
        return self.client("sqs")

    @property
    def dynamodb(self) -> Any:
        return self.client("dynamodb")
