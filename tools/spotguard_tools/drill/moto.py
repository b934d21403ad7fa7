"""An embedded moto server: the local AWS emulator of the drill.

moto in server mode as a subprocess on a free 127.0.0.1 port, so every process of the
drill (agents, the control-plane runner, the drill itself) talks to the same emulated
account over real HTTP. The tests and benchmarks use the same server
(``tests/support/moto_server.py``). It runs through :mod:`spotguard_tools.drill.moto_main`, which
fixes a moto race that could drop SQS messages under concurrent load.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DEFAULT_REGION = "us-east-1"
MOTO_MAIN = "spotguard_tools.drill.moto_main"
#: moto's default account id.
ACCOUNT_ID = "123456789012"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoServer:
    """A moto server subprocess on 127.0.0.1."""

    def __init__(
        self, port: int | None = None, log_path: Path | None = None, environment: dict[str, str] | None = None
    ) -> None:
        self.port = port or free_port()
        #: Added to the server's environment (the drill's agent-ledger settings).
        self._environment = environment or {}
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> MotoServer:
        log = self._log_path.open("ab") if self._log_path else subprocess.DEVNULL
        try:
            self._process = subprocess.Popen(  # noqa: S603 - fixed argv
                [sys.executable, "-m", MOTO_MAIN, "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=log,
                env={**os.environ, **self._environment} if self._environment else None,
            )
        finally:
            if not isinstance(log, int):
                log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto server exited with {self._process.returncode}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1)  # noqa: S310 - loopback
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("moto server did not start in time")

    def reset(self) -> None:
        """Wipe all emulated state (``POST /moto-api/reset``)."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")  # noqa: S310
        urllib.request.urlopen(request, timeout=10).read()  # noqa: S310 - loopback

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        self._process = None

    def environment(self) -> dict[str, str]:
        """What a process needs to talk to this server with plain boto3."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": DEFAULT_REGION,
            "AWS_REGION": DEFAULT_REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
