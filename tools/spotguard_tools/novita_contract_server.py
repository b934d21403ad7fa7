"""A local HTTP server that follows Novita's documented GPU-instance API contract.

Used by the tests and for trying the Novita provider without an account. It serves the
two endpoints spotguard uses, with the documented request/response shapes and error
responses, and records what happened so tests can assert on it:

- ``GET  /gpu-instance/openapi/v1/gpu/instances?pageSize=&pageNum=`` (both required,
  integers >= 0; ``pageNum`` counts from 1) → ``{"instances": [...], "total": n}``
- ``POST /gpu-instance/openapi/v1/gpu/instance/migrate`` ``{"instanceId": "…"}`` → ``{}``;
  the instance goes to status ``migrating``.
- ``Authorization: Bearer <key>`` required (401 otherwise); unknown instance → 404;
  malformed parameters → 400; injected faults → 429 (with ``Retry-After``) or 5xx.
  Error bodies: ``{"code": n, "reason": "…", "message": "…", "metadata": {}}``.

``max_in_flight_migrations`` is the highest number of migrate calls being served at the
same moment (each takes ``migrate_delay`` seconds), which is how the tests prove the job's
concurrency limit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LIST_PATH = "/gpu-instance/openapi/v1/gpu/instances"
MIGRATE_PATH = "/gpu-instance/openapi/v1/gpu/instance/migrate"


def novita_instance(
    instance_id: str,
    *,
    status: str = "exited",
    spot_status: str | None = "reclaimed",
    spot_reclaim_time: str = "1704067200",
    name: str | None = None,
) -> dict[str, Any]:
    """An instance object with the documented fields (list response item)."""
    instance: dict[str, Any] = {
        "id": instance_id,
        "name": name or f"gpu-{instance_id}",
        "clusterId": "cluster-1",
        "clusterName": "CN-HK-01",
        "status": status,
        "imageUrl": "docker.io/library/python:3.12",
        "cpuNum": "16",
        "memory": "64",
        "gpuNum": "1",
        "productId": "prod-rtx4090",
        "productName": "RTX 4090 24GB",
        "rootfsSize": 60,
        "kind": "gpu",
        "billingMode": "spot" if spot_status else "onDemand",
        "endTime": "-1",
        "spotReclaimTime": spot_reclaim_time,
    }
    if spot_status is not None:
        instance["spotStatus"] = spot_status
    return instance


@dataclass
class NovitaState:
    api_key: str = "sk_test_novita"
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Seconds each migrate call takes (to make concurrency observable).
    migrate_delay: float = 0.0
    #: instance id -> number of migrate calls that answer 500 before one succeeds.
    migrate_failures: dict[str, int] = field(default_factory=dict)
    #: instance id -> HTTP status every migrate call answers (permanent faults, e.g. 400).
    migrate_always_fails: dict[str, int] = field(default_factory=dict)
    #: Next N requests of any kind answer 429 with ``Retry-After: 0``.
    rate_limit_next: int = 0
    #: Next N list calls answer 503 (a backend hiccup).
    list_failures: int = 0
    # observations
    list_calls: list[dict[str, str]] = field(default_factory=list)
    migrate_calls: list[str] = field(default_factory=list)
    migrated: list[str] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight_migrations: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, *instances: dict[str, Any]) -> None:
        for instance in instances:
            self.instances[instance["id"]] = instance


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    # ---------------------------------------------------------------- helpers
    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, {"code": status, "reason": reason, "message": message, "metadata": {}}, headers)

    def _authorized(self) -> bool:
        state = self.server.state
        if self.headers.get("Authorization") != f"Bearer {state.api_key}":
            self._error(HTTPStatus.UNAUTHORIZED, "INVALID_API_KEY", "API key is missing or incorrect")
            return False
        with state.lock:
            if state.rate_limit_next > 0:
                state.rate_limit_next -= 1
                limited = True
            else:
                limited = False
        if limited:
            self._error(
                HTTPStatus.TOO_MANY_REQUESTS, "RATE_LIMIT_EXCEEDED", "too many requests", {"Retry-After": "0"}
            )
            return False
        return True

    # ---------------------------------------------------------------- routes
    def do_GET(self) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        if parsed.path != LIST_PATH:
            self._error(HTTPStatus.NOT_FOUND, "NOT_FOUND", f"no route {parsed.path}")
            return
        if not self._authorized():
            return
        query = dict(urllib.parse.parse_qsl(parsed.query))
        try:
            page_size = int(query["pageSize"])
            page_num = int(query["pageNum"])
            if page_size < 0 or page_num < 0:
                raise ValueError
        except (KeyError, ValueError):
            self._error(
                HTTPStatus.BAD_REQUEST, "INVALID_PARAMETER", "pageSize and pageNum are required integers >= 0"
            )
            return
        state = self.server.state
        with state.lock:
            state.list_calls.append(query)
            instances = list(state.instances.values())
            failing = state.list_failures > 0
            if failing:
                state.list_failures -= 1
        if failing:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE", "backend timeout")
            return
        start = max(page_num - 1, 0) * page_size
        self._send(
            HTTPStatus.OK, {"instances": instances[start : start + page_size], "total": len(instances)}
        )

    def do_POST(self) -> None:
        if self.path != MIGRATE_PATH:
            self._error(HTTPStatus.NOT_FOUND, "NOT_FOUND", f"no route {self.path}")
            return
        if not self._authorized():
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            instance_id = body["instanceId"]
            if not isinstance(instance_id, str) or not 1 <= len(instance_id) <= 255:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            self._error(HTTPStatus.BAD_REQUEST, "INVALID_PARAMETER", "instanceId is required")
            return
        state = self.server.state
        with state.lock:
            state.migrate_calls.append(instance_id)
            known = instance_id in state.instances
            state.in_flight += 1
            state.max_in_flight_migrations = max(state.max_in_flight_migrations, state.in_flight)
        try:
            if state.migrate_delay:
                time.sleep(state.migrate_delay)
            if not known:
                self._error(HTTPStatus.NOT_FOUND, "INSTANCE_NOT_FOUND", f"instance {instance_id} not found")
                return
            with state.lock:
                permanent = state.migrate_always_fails.get(instance_id)
                transient = state.migrate_failures.get(instance_id, 0)
                if transient:
                    state.migrate_failures[instance_id] = transient - 1
            if permanent:
                self._error(permanent, "MIGRATE_REJECTED", "instance cannot be migrated")
                return
            if transient:
                self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "INTERNAL_ERROR", "temporary failure")
                return
            with state.lock:
                state.instances[instance_id]["status"] = "migrating"
                state.migrated.append(instance_id)
            self._send(HTTPStatus.OK, {})
        finally:
            with state.lock:
                state.in_flight -= 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: NovitaState) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state


@dataclass
class RunningNovitaServer:
    url: str
    state: NovitaState


@contextmanager
def running_novita_server(state: NovitaState | None = None) -> Iterator[RunningNovitaServer]:
    """Serve the contract on 127.0.0.1 (a free port) for the duration of the block."""
    server = _Server(state or NovitaState())
    thread = threading.Thread(target=server.serve_forever, name="novita-contract", daemon=True)
    thread.start()
    try:
        yield RunningNovitaServer(url=f"http://127.0.0.1:{server.server_address[1]}", state=server.state)
    finally:
        server.shutdown()
        server.server_close()


def main(argv: Sequence[str] | None = None) -> None:
    """Serve a few sample instances until interrupted (try the Novita provider locally)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--api-key", default=NovitaState.api_key)
    args = parser.parse_args(argv)
    state = NovitaState(api_key=args.api_key)
    state.add(
        novita_instance("inst-reclaimed-1"),
        novita_instance("inst-normal-exit", spot_reclaim_time="0"),
        novita_instance("inst-running", status="running"),
        novita_instance("inst-on-demand", spot_status=""),
    )
    with running_novita_server(state) as server:
        print(f"Novita contract server on {server.url} (API key {args.api_key}); Ctrl-C stops it")
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
