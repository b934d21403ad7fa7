"""boto3 clients, made in one place.

Every AWS call of the control plane goes through a client from here: standard retry
mode with adaptive back-off (throttling is normal during a mass interruption), short
connect timeouts, and the endpoint from ``AWS_ENDPOINT_URL`` when set (the local drill
and the integration tests point it at the moto server; boto3 honours it natively).
"""

from __future__ import annotations

import functools
from typing import Any

import boto3
from botocore.config import Config

RETRY_CONFIG = Config(
    retries={"mode": "standard", "max_attempts": 8},
    connect_timeout=5,
    read_timeout=30,
)


@functools.cache
def _session() -> boto3.session.Session:
    return boto3.session.Session()


def client(service: str, **kwargs: Any) -> Any:
    """A cached boto3 client for ``service`` with spotguard's retry configuration."""
    return _cached_client(service, tuple(sorted(kwargs.items())))


@functools.cache
def _cached_client(service: str, options: tuple[tuple[str, Any], ...]) -> Any:
    return _session().client(service, config=RETRY_CONFIG, **dict(options))  # type: ignore[call-overload]


def resource(service: str) -> Any:
    return _cached_resource(service)


@functools.cache
def _cached_resource(service: str) -> Any:
    return _session().resource(service, config=RETRY_CONFIG)  # type: ignore[call-overload]


def reset_clients() -> None:
    """Forget cached clients (tests switch endpoints between moto servers)."""
    _session.cache_clear()
    _cached_client.cache_clear()
    _cached_resource.cache_clear()
