"""moto in server mode on 127.0.0.1 for the tests: a real HTTP endpoint that boto3 talks to.

The server itself is the drill's (``spotguard_tools.drill.moto``), so tests, benchmarks and
the drill run the same emulator, including its fix for moto's SQS send/delete race.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from spotguard_tools.drill.moto import ACCOUNT_ID, DEFAULT_REGION, MotoServer, free_port

__all__ = ["ACCOUNT_ID", "DEFAULT_REGION", "MotoServer", "free_port", "running_moto_server"]


@contextlib.contextmanager
def running_moto_server() -> Iterator[MotoServer]:
    """Start a server and point this process's boto3 at it (restored afterwards)."""
    server = MotoServer().start()
    previous = {key: os.environ.get(key) for key in server.environment()}
    os.environ.update(server.environment())
    try:
        yield server
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()
