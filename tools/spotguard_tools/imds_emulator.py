"""An IMDSv2 emulator served over real HTTP on 127.0.0.1.

Tests and the local drill run one per simulated instance. It follows the instance
metadata service's v2 token semantics: ``PUT /latest/api/token`` with
``X-aws-ec2-metadata-token-ttl-seconds`` returns a token; every ``GET`` needs a valid,
unexpired ``X-aws-ec2-metadata-token`` or gets 401 (IMDSv1 requests are refused, as on
an instance launched with ``HttpTokens=required``). Notices answer 404 until they are
published, then the JSON bodies AWS documents.

Fault injection for the agent's tests: ``fail_next(n, status)`` answers the next ``n``
requests with ``status``; ``set_delay(seconds)`` delays every answer (timeouts);
``expire_tokens()`` invalidates every token handed out so far (the 401 path).

Standalone (prints ``{"instance_id", "url"}``; drive it with ``POST /_emulator/<command>``)::

    python -m spotguard_tools.imds_emulator --instance-id i-0123456789abcdef0 --port 8081
    curl -X POST -d '{"in_seconds": 120}' http://127.0.0.1:8081/_emulator/spot-action
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKEN_PATH = "/latest/api/token"  # noqa: S105 - header names and paths, not secrets
TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"  # noqa: S105
TOKEN_HEADER = "X-aws-ec2-metadata-token"  # noqa: S105
#: IMDS accepts token TTLs from 1 second to 6 hours.
MAX_TOKEN_TTL_SECONDS = 21600
#: Control API of the standalone emulator (not an IMDS path).
CONTROL_PREFIX = "/_emulator/"


def _maintenance_time(moment: datetime) -> str:
    """Scheduled-event times look like ``21 Jan 2019 09:00:43 GMT``."""
    return moment.astimezone(UTC).strftime("%d %b %Y %H:%M:%S GMT")


def _iso(moment: datetime) -> str:
    """IMDS timestamps: ``2026-11-24T22:50:00Z`` (second precision, Z suffix)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ImdsState:
    """What the emulated instance currently publishes (guarded by ``lock``)."""

    instance_id: str
    availability_zone: str = "us-east-1a"
    instance_type: str = "m5.large"
    region: str = "us-east-1"
    account_id: str = "123456789012"
    ami_id: str = "ami-0123456789abcdef0"
    spot_action: dict[str, str] | None = None
    rebalance: dict[str, str] | None = None
    maintenance_events: list[dict[str, str]] = field(default_factory=list)
    target_lifecycle_state: str = "InService"
    failures_left: int = 0
    failure_status: int = 500
    delay_seconds: float = 0.0
    tokens: dict[str, float] = field(default_factory=dict)  # token -> monotonic expiry
    lock: threading.Lock = field(default_factory=threading.Lock)

    def identity_document(self) -> dict[str, Any]:
        return {
            "accountId": self.account_id,
            "architecture": "x86_64",
            "availabilityZone": self.availability_zone,
            "imageId": self.ami_id,
            "instanceId": self.instance_id,
            "instanceType": self.instance_type,
            "pendingTime": _iso(datetime.now(UTC)),
            "privateIp": "10.0.0.10",
            "region": self.region,
            "version": "2017-09-30",
        }


class _Handler(BaseHTTPRequestHandler):
    server: _ImdsHttpServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the emulator runs inside tests and the drill."""

    def _send(self, status: int, body: str = "", content_type: str = "text/plain") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _faults(self) -> bool:
        """Apply delay / injected failures. True when the request was answered here."""
        state = self.server.state
        with state.lock:
            delay = state.delay_seconds
            fail = state.failures_left > 0
            if fail:
                state.failures_left -= 1
            status = state.failure_status
        if delay:
            time.sleep(delay)
        if fail:
            self._send(status, HTTPStatus(status).phrase)
            return True
        return False

    def do_PUT(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if self._faults():
            return
        if self.path != TOKEN_PATH:
            self._send(HTTPStatus.NOT_FOUND, "Not Found")
            return
        # Requests through a proxy (X-Forwarded-For) are refused by the real service.
        if self.headers.get("X-Forwarded-For"):
            self._send(HTTPStatus.FORBIDDEN, "Forbidden")
            return
        try:
            ttl = int(self.headers.get(TOKEN_TTL_HEADER, ""))
        except ValueError:
            ttl = 0
        if not 1 <= ttl <= MAX_TOKEN_TTL_SECONDS:
            self._send(HTTPStatus.BAD_REQUEST, "Bad Request")
            return
        token = secrets.token_urlsafe(32)
        with self.server.state.lock:
            self.server.state.tokens[token] = time.monotonic() + ttl
        self._send(HTTPStatus.OK, token)

    def do_POST(self) -> None:
        """Control API for the standalone emulator: ``POST /_emulator/<command>`` with a JSON
        body (``spot-action {"action", "in_seconds"}``, ``rebalance``,
        ``target-lifecycle-state {"state"}``, ``maintenance {"code", "in_seconds", "state"}``,
        ``fail-next {"n", "status"}``,
        ``delay {"seconds"}``, ``expire-tokens``, ``clear``). Not part of IMDS."""
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}") if length else {}
        except ValueError:
            self._send(HTTPStatus.BAD_REQUEST, "invalid JSON")
            return
        emulator = self.server.emulator
        command = self.path.removeprefix(CONTROL_PREFIX)
        if emulator is None or not self.path.startswith(CONTROL_PREFIX):
            self._send(HTTPStatus.NOT_FOUND, "Not Found")
            return
        at = datetime.now(UTC) + timedelta(seconds=float(body.get("in_seconds", 120)))
        actions = {
            "spot-action": lambda: emulator.set_spot_action(str(body.get("action", "terminate")), at),
            "rebalance": emulator.set_rebalance,
            "target-lifecycle-state": lambda: emulator.set_target_lifecycle_state(str(body["state"])),
            "maintenance": lambda: emulator.schedule_maintenance(
                str(body.get("code", "instance-stop")), at, state=str(body.get("state", "active"))
            ),
            "fail-next": lambda: emulator.fail_next(int(body.get("n", 1)), int(body.get("status", 500))),
            "delay": lambda: emulator.set_delay(float(body.get("seconds", 0))),
            "expire-tokens": emulator.expire_tokens,
            "clear": emulator.clear,
        }
        if command not in actions:
            self._send(HTTPStatus.NOT_FOUND, f"unknown command {command}")
            return
        try:
            result = actions[command]()
        except (KeyError, ValueError) as error:
            self._send(HTTPStatus.BAD_REQUEST, f"bad request: {error}")
            return
        self._send(HTTPStatus.OK, json.dumps(result or {}), "application/json")

    def do_GET(self) -> None:
        if self._faults():
            return
        state = self.server.state
        token = self.headers.get(TOKEN_HEADER)
        with state.lock:
            expiry = state.tokens.get(token or "")
        if expiry is None or expiry <= time.monotonic():
            self._send(HTTPStatus.UNAUTHORIZED, "Unauthorized")
            return
        status, body, content_type = self._resolve(self.path.split("?", 1)[0].rstrip("/"))
        self._send(status, body, content_type)

    def _resolve(self, path: str) -> tuple[int, str, str]:  # noqa: PLR0911 - one answer per path
        state = self.server.state
        with state.lock:
            simple = {
                "/latest/meta-data/instance-id": state.instance_id,
                "/latest/meta-data/instance-type": state.instance_type,
                "/latest/meta-data/placement/availability-zone": state.availability_zone,
                "/latest/meta-data/placement/region": state.region,
                "/latest/meta-data/ami-id": state.ami_id,
                "/latest/meta-data/autoscaling/target-lifecycle-state": state.target_lifecycle_state,
            }
            if path in simple:
                return HTTPStatus.OK, simple[path], "text/plain"
            if path == "/latest/meta-data/spot/instance-action":
                return _json_or_404(state.spot_action)
            if path == "/latest/meta-data/spot/termination-time":
                if state.spot_action is None:
                    return HTTPStatus.NOT_FOUND, "Not Found", "text/plain"
                return HTTPStatus.OK, state.spot_action["time"], "text/plain"
            if path == "/latest/meta-data/events/recommendations/rebalance":
                return _json_or_404(state.rebalance)
            if path == "/latest/meta-data/events/maintenance/scheduled":
                return HTTPStatus.OK, json.dumps(state.maintenance_events), "application/json"
            if path == "/latest/dynamic/instance-identity/document":
                return HTTPStatus.OK, json.dumps(state.identity_document(), indent=2), "application/json"
        return HTTPStatus.NOT_FOUND, "Not Found", "text/plain"


def _json_or_404(document: dict[str, str] | None) -> tuple[int, str, str]:
    if document is None:
        return HTTPStatus.NOT_FOUND, "Not Found", "text/plain"
    return HTTPStatus.OK, json.dumps(document), "application/json"


class _ImdsHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: ImdsState) -> None:
        super().__init__(address, _Handler)
        self.state = state
        self.emulator: ImdsEmulator | None = None

    def handle_error(self, request: Any, client_address: Any) -> None:
        """An agent that went away mid-answer (the drill's hard kill) is not the emulator's
        error: no traceback for it. Anything else is printed as before."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class ImdsEmulator:
    """One emulated instance metadata service. Use as a context manager or start()/stop()."""

    def __init__(
        self,
        instance_id: str = "i-0123456789abcdef0",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        availability_zone: str = "us-east-1a",
        instance_type: str = "m5.large",
        region: str = "us-east-1",
    ) -> None:
        self.state = ImdsState(
            instance_id=instance_id,
            availability_zone=availability_zone,
            instance_type=instance_type,
            region=region,
        )
        self._server = _ImdsHttpServer((host, port), self.state)
        self._server.emulator = self
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL, the equivalent of ``http://169.254.169.254``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def instance_id(self) -> str:
        return self.state.instance_id

    def start(self) -> ImdsEmulator:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever, name=f"imds-{self.instance_id}", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> ImdsEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ control
    def set_spot_action(self, action: str = "terminate", at: datetime | None = None) -> dict[str, str]:
        """Publish a spot interruption notice (default: terminate in two minutes)."""
        when = at or datetime.now(UTC) + timedelta(minutes=2)
        document = {"action": action, "time": _iso(when)}
        with self.state.lock:
            self.state.spot_action = document
        return dict(document)

    def set_rebalance(self, at: datetime | None = None) -> dict[str, str]:
        document = {"noticeTime": _iso(at or datetime.now(UTC))}
        with self.state.lock:
            self.state.rebalance = document
        return dict(document)

    def schedule_maintenance(
        self,
        code: str,
        not_before: datetime | None = None,
        *,
        state: str = "active",
        event_id: str | None = None,
        description: str = "",
    ) -> dict[str, str]:
        """Publish a scheduled event (``instance-stop``, ``instance-retirement``, ``system-reboot``,
        ``instance-reboot``, ``system-maintenance``) the way IMDS lists them."""
        start = not_before or datetime.now(UTC) + timedelta(days=1)
        with self.state.lock:
            number = len(self.state.maintenance_events)
            document = {
                "Code": code,
                "Description": description or f"scheduled {code}",
                "EventId": event_id or f"instance-event-{number:017x}",
                "NotBefore": _maintenance_time(start),
                "NotAfter": _maintenance_time(start + timedelta(hours=2)),
                "State": state,
            }
            self.state.maintenance_events.append(document)
        return dict(document)

    def set_target_lifecycle_state(self, state: str) -> None:
        with self.state.lock:
            self.state.target_lifecycle_state = state

    def clear(self) -> None:
        """Withdraw every notice and fault (tokens stay valid)."""
        with self.state.lock:
            self.state.spot_action = None
            self.state.rebalance = None
            self.state.maintenance_events = []
            self.state.target_lifecycle_state = "InService"
            self.state.failures_left = 0
            self.state.delay_seconds = 0.0

    def fail_next(self, n: int, status: int = 500) -> None:
        with self.state.lock:
            self.state.failures_left = n
            self.state.failure_status = status

    def set_delay(self, seconds: float) -> None:
        with self.state.lock:
            self.state.delay_seconds = seconds

    def expire_tokens(self) -> None:
        with self.state.lock:
            self.state.tokens.clear()


@contextmanager
def running_imds(instance_id: str = "i-0123456789abcdef0", **kwargs: Any) -> Iterator[ImdsEmulator]:
    emulator = ImdsEmulator(instance_id, **kwargs).start()
    try:
        yield emulator
    finally:
        emulator.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve an IMDSv2 emulator on 127.0.0.1.")
    parser.add_argument("--instance-id", default="i-0123456789abcdef0")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--availability-zone", default="us-east-1a")
    parser.add_argument("--instance-type", default="m5.large")
    args = parser.parse_args(argv)
    emulator = ImdsEmulator(
        args.instance_id,
        host=args.host,
        port=args.port,
        availability_zone=args.availability_zone,
        instance_type=args.instance_type,
    )
    print(json.dumps({"instance_id": emulator.instance_id, "url": emulator.url}), flush=True)
    try:
        emulator._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        emulator._server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
