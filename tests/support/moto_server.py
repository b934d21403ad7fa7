"""moto in server mode on 127.0.0.1 for the tests: a real HTTP endpoint that boto3 talks to.

The server itself is the drill's (``spotguard_tools.drill.moto``), so tests, benchmarks and
the drill run the same emulator, including its fix for moto's SQS send/delete race.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import boto3
from spotguard_core.contracts import FLEET_TABLE_PK, Env, instance_arn_prefix, instance_key
from spotguard_tools.drill.moto import ACCOUNT_ID, DEFAULT_REGION, MotoServer, free_port

__all__ = [
    "ACCOUNT_ID",
    "DEFAULT_REGION",
    "MOTO_INSTANCE_ARN_PREFIX",
    "MotoClients",
    "MotoServer",
    "free_port",
    "moto_fleet_key",
    "restore_environ",
    "running_moto_server",
]
#: Instance keys on moto (its account and region), as the stack sets them for a deployment.
MOTO_INSTANCE_ARN_PREFIX = instance_arn_prefix(partition="aws", region=DEFAULT_REGION, account_id=ACCOUNT_ID)


def moto_fleet_key(instance_id: str) -> dict[str, str]:
    """The fleet table key of ``instance_id`` on moto."""
    return {FLEET_TABLE_PK: instance_key(instance_id, MOTO_INSTANCE_ARN_PREFIX)}


def restore_environ(saved: Mapping[str, str | None]) -> None:
    """Put the variables back as ``saved`` holds them (``None``: the variable was not set)."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _client(service: str) -> Any:
    return property(lambda _self: boto3.client(service))


class MotoClients:
    """boto3 clients for the helpers of the tests, made at each use rather than kept: they
    follow the environment of the moment (the moto endpoint, a test's region)."""

    sqs = _client("sqs")
    s3 = _client("s3")
    ec2 = _client("ec2")
    #: The resource, for ``Table`` reads in the tests' own checks.
    dynamodb = property(lambda _self: boto3.resource("dynamodb"))


@contextlib.contextmanager
def running_moto_server() -> Iterator[MotoServer]:
    """Start a server and point this process's boto3 at it (restored afterwards)."""
    server = MotoServer().start()
    # The stores key instance items with the ARN prefix the stack sets (moto's account, region).
    environment = {**server.environment(), Env.INSTANCE_ARN_PREFIX.value: MOTO_INSTANCE_ARN_PREFIX}
    previous = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)
    try:
        yield server
    finally:
        restore_environ(previous)
        server.stop()
