"""AWS latency and fault injection for benchmarks and the drill (never set by the stack).

When ``SPOTGUARD_AWS_LATENCY_MS`` or ``SPOTGUARD_AWS_FAULT_RATE`` is set, the one client
factory of each process (``spotguard_core.aws``, which the control plane and the agent
both use) registers :meth:`FaultInjector.before_send` on every client's ``before-send``
event. Before each HTTP attempt it sleeps the configured latency; a seeded fraction of
attempts is answered, without reaching the endpoint, by a throttling error in the
service's own wire format (SQS ``RequestThrottled``, DynamoDB
``ProvisionedThroughputExceededException``, EC2 ``RequestLimitExceeded``, S3 ``SlowDown``,
query services ``Throttling``, the others ``ThrottlingException``) or by a bare 5xx. botocore
parses that answer like a real one, so its retry handler (standard or adaptive) sees
exactly what it would see from AWS and retries it.

Why a botocore hook and not a proxy: it runs in-process per call, sees the service and
the operation (so each gets its own error code and protocol), adds no process or port to
run and no TLS/endpoint rewriting, and is inherited by every process that builds its
clients through the one factory (Lambda code in the drill, each simulated instance's
agent). A proxy would only see opaque HTTP and would have to guess the protocol from the
target header.

Every process writes ``{"calls": n, "faults_injected": m}`` to
``<SPOTGUARD_AWS_FAULT_LOG_DIR>/faults-<pid>.json`` at least once a second and at exit,
so whoever started the processes sums those files. Standard library and botocore only:
the agent bundle ships this module.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.awsrequest import AWSResponse, HTTPHeaders

from spotguard_core.contracts import Env

#: How often the count file is rewritten (the contract says at least once a second).
COUNT_FILE_INTERVAL_SECONDS = 0.5
#: Of the injected faults, this share are throttling errors; the rest are 5xx.
THROTTLE_SHARE = 0.7
SERVER_ERROR_STATUSES = (500, 503)
#: Throttling error codes as each service sends them (all in botocore's throttling list).
THROTTLE_CODES = {
    "sqs": "RequestThrottled",
    "dynamodb": "ProvisionedThroughputExceededException",
    "ec2": "RequestLimitExceeded",
    "s3": "SlowDown",
}
DEFAULT_THROTTLE_CODE = "ThrottlingException"
QUERY_THROTTLE_CODE = "Throttling"


def count_file_name(pid: int) -> str:
    return f"faults-{pid}.json"


@dataclass(frozen=True, slots=True)
class FaultSettings:
    latency_ms: float = 0.0
    fault_rate: float = 0.0
    seed: int = 0
    log_dir: Path | None = None

    @property
    def active(self) -> bool:
        return self.latency_ms > 0 or self.fault_rate > 0 or self.log_dir is not None

    @classmethod
    def from_env(cls, environ: Any = None) -> FaultSettings:
        env = os.environ if environ is None else environ

        def number(name: Env, default: float) -> float:
            raw = str(env.get(name.value, "") or "").strip()
            if not raw:
                return default
            try:
                return float(raw)
            except ValueError:
                raise ValueError(f"{name.value} must be a number, got {raw!r}") from None

        rate = number(Env.AWS_FAULT_RATE, 0.0)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{Env.AWS_FAULT_RATE.value} must be between 0 and 1, got {rate}")
        latency = number(Env.AWS_LATENCY_MS, 0.0)
        if latency < 0:
            raise ValueError(f"{Env.AWS_LATENCY_MS.value} must be >= 0, got {latency}")
        log_dir = str(env.get(Env.AWS_FAULT_LOG_DIR.value, "") or "").strip()
        return cls(
            latency_ms=latency,
            fault_rate=rate,
            seed=int(number(Env.AWS_FAULT_SEED, 0)),
            log_dir=Path(log_dir) if log_dir else None,
        )


class _Body:
    """The ``raw`` of an ``AWSResponse``: botocore only calls ``stream()`` on error bodies."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any) -> Any:
        yield self._data


def _headers(values: dict[str, str]) -> HTTPHeaders:
    headers = HTTPHeaders()
    for name, value in values.items():
        headers[name] = value
    return headers


def _cbor_text(value: str) -> bytes:
    data = value.encode()
    if len(data) < 24:
        return bytes([0x60 + len(data)]) + data
    return bytes([0x78, len(data)]) + data


def throttle_response(url: str, service: str, protocol: str) -> AWSResponse:
    """A throttling error in ``protocol``'s wire format, as ``service`` sends it."""
    code = THROTTLE_CODES.get(service, QUERY_THROTTLE_CODE if protocol == "query" else DEFAULT_THROTTLE_CODE)
    message = "Rate exceeded (injected by spotguard fault injection)"
    headers = {"x-amzn-requestid": "spotguard-fault-injection"}
    status = 400
    if protocol == "ec2":
        body = (
            f"<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors>"
            "<RequestID>spotguard-fault-injection</RequestID></Response>"
        ).encode()
        status = 503
    elif protocol == "query":
        body = (
            f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message>"
            "</Error><RequestId>spotguard-fault-injection</RequestId></ErrorResponse>"
        ).encode()
    elif protocol == "rest-xml":
        body = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
        status = 503
    elif protocol == "smithy-rpc-v2-cbor":
        # {"__type": code, "message": message} as a two-entry CBOR map.
        body = b"\xa2" + _cbor_text("__type") + _cbor_text(code) + _cbor_text("message") + _cbor_text("Rate")
        headers["smithy-protocol"] = "rpc-v2-cbor"
        headers["x-amzn-query-error"] = f"{code};Sender"
    elif protocol == "rest-json":
        body = json.dumps({"message": message}).encode()
        headers["x-amzn-errortype"] = code
        status = 429
    else:  # json: SQS speaks it query-compatible, with the query error code in a header
        wire_type = "ThrottlingException" if service == "sqs" else code
        body = json.dumps({"__type": wire_type, "message": message}).encode()
        if service == "sqs":
            headers["x-amzn-query-error"] = f"{code};Sender"
    return AWSResponse(url, status, _headers(headers), _Body(body))


def server_error_response(url: str, status: int) -> AWSResponse:
    """A bare 5xx (empty body): every botocore parser reads it as a generic, retryable error."""
    return AWSResponse(url, status, _headers({"x-amzn-requestid": "spotguard-fault-injection"}), _Body(b""))


class FaultInjector:
    """One per process: shared by every client the factory makes (counts are per process)."""

    def __init__(
        self, settings: FaultSettings, *, throttle_share: float = THROTTLE_SHARE, sleep: Any = time.sleep
    ) -> None:
        self.settings = settings
        self.throttle_share = throttle_share
        self._random = random.Random(settings.seed)  # noqa: S311 - repeatable choice, not a secret
        self._lock = threading.Lock()
        self._sleep = sleep
        self.calls = 0
        self.faults_injected = 0
        self._writer: threading.Thread | None = None
        self._stopped = threading.Event()
        if settings.log_dir is not None:
            settings.log_dir.mkdir(parents=True, exist_ok=True)
            self.write_counts()
            self._writer = threading.Thread(target=self._write_loop, name="aws-fault-counts", daemon=True)
            self._writer.start()
            atexit.register(self.close)

    @property
    def count_file(self) -> Path | None:
        if self.settings.log_dir is None:
            return None
        return self.settings.log_dir / count_file_name(os.getpid())

    def install(self, client: Any) -> Any:
        """Register on ``client``'s ``before-send`` (every HTTP attempt, retries included)."""
        service_model = client.meta.service_model
        service = str(service_model.service_name)
        protocol = str(getattr(service_model, "resolved_protocol", service_model.protocol))

        def before_send(request: Any, **_: Any) -> AWSResponse | None:
            return self.before_send(request, service=service, protocol=protocol)

        client.meta.events.register("before-send", before_send, unique_id="spotguard-fault-injection")
        return client

    def before_send(self, request: Any, *, service: str, protocol: str) -> AWSResponse | None:
        with self._lock:
            self.calls += 1
            roll = self._random.random()
            kind = self._random.random()
            fault = roll < self.settings.fault_rate
            if fault:
                self.faults_injected += 1
        if self.settings.latency_ms > 0:
            self._sleep(self.settings.latency_ms / 1000)
        if not fault:
            return None
        url = str(getattr(request, "url", ""))
        if kind < self.throttle_share:
            return throttle_response(url, service, protocol)
        status = SERVER_ERROR_STATUSES[int(kind * 1000) % len(SERVER_ERROR_STATUSES)]
        return server_error_response(url, status)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"calls": self.calls, "faults_injected": self.faults_injected}

    def write_counts(self) -> None:
        path = self.count_file
        if path is None:
            return
        temporary = path.with_suffix(f".tmp{threading.get_ident()}")
        with contextlib.suppress(OSError):
            temporary.write_text(json.dumps(self.counts()))
            temporary.replace(path)  # readers never see half a file

    def _write_loop(self) -> None:
        while not self._stopped.wait(COUNT_FILE_INTERVAL_SECONDS):
            self.write_counts()

    def close(self) -> None:
        self._stopped.set()
        self.write_counts()


_lock = threading.Lock()
_injector: FaultInjector | None = None
_resolved = False


def process_injector() -> FaultInjector | None:
    """This process's injector, from the environment on first use (None when not configured)."""
    global _injector, _resolved  # noqa: PLW0603 - one injector per process, by contract
    with _lock:
        if not _resolved:
            settings = FaultSettings.from_env()
            _injector = FaultInjector(settings) if settings.active else None
            _resolved = True
        return _injector


def install(client: Any) -> Any:
    """Install the process's injector on ``client`` when the environment asks for one."""
    injector = process_injector()
    if injector is not None:
        injector.install(client)
    return client


def reset() -> None:
    """Forget the process's injector (tests change the environment between cases)."""
    global _injector, _resolved  # noqa: PLW0603
    with _lock:
        if _injector is not None:
            _injector.close()
        _injector = None
        _resolved = False


def total_counts(log_dir: Path) -> dict[str, int]:
    """Sum of every process's count file in ``log_dir`` (what the drill and benchmarks report)."""
    total = {"calls": 0, "faults_injected": 0}
    for path in sorted(Path(log_dir).glob("faults-*.json")):
        with contextlib.suppress(OSError, ValueError):
            counts = json.loads(path.read_text())
            for key in total:
                total[key] += int(counts.get(key, 0))
    return total
