"""The child process that runs a Python handler: one per concurrency slot, kept between tasks.

    <workload python> -m spotguard_agent.handler_host module:function

Standard library only: it runs under the workload's own interpreter (``Env.WORKLOAD_PYTHON``,
the workload venv), which need not have boto3. The agent (``spotguard_agent.execution``)
starts it with the workload directory and the agent's code on ``PYTHONPATH``, the workload
directory as working directory and the agent's own environment plus ``contracts.TaskEnv``.

It imports the handler once, then talks JSON lines with the agent: requests on its stdin,
answers on the stdout it had at start-up (the handler's own ``print`` output is moved to
stderr, which the agent logs with the message id, so it cannot corrupt the protocol).

    agent -> host   {"t": "run", "message_id", "receive_count", "attributes", "body",
                     "resumed": base64 | null, "deadline": iso | null, "checkpoint_max_bytes"}
                    {"t": "checkpoint_ack", "stored": bool, "error": str | null, "too_large": bool}
                    {"t": "deadline", "deadline": iso}   (a drain began while the task runs)
    host -> agent   {"t": "ready"} | {"t": "ready", "error": "..."}
                    {"t": "expected", "seconds": float | null}     (before the handler runs)
                    {"t": "checkpoint", "size": n, "data": base64 | null}
                    {"t": "result", "ok": true} | {"t": "result", "ok": false, "error": "..."}

Stopping: SIGTERM sets ``context.released``; the host exits as soon as the handler returns
(a handler that ignores it is SIGKILLed by the agent after the grace time). When the agent
goes away (stdin closes: the agent crashed or was killed) the host does the same on its
own, so a task never outlives the agent that leased it.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import json
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import IO, Any

from spotguard_core.contracts import DEFAULT_STOP_GRACE_SECONDS, Env, TaskEnv

Handler = Callable[[str, Any], Any]
ExpectedSeconds = Callable[[str], "float | None"]
CHECKPOINT_ACK_TIMEOUT_SECONDS = 300.0


class CheckpointError(RuntimeError):
    """The checkpoint was not stored (S3 error, agent gone). The previous one is intact."""


class CheckpointTooLarge(CheckpointError, ValueError):
    """Larger than ``Env.CHECKPOINT_MAX_BYTES``: rejected whole, never truncated."""


def load_handler(spec: str) -> tuple[Handler, ExpectedSeconds | None]:
    """``module:function``. The module may define ``expected_seconds(body) -> float | None``
    so a drain can tell which running tasks will finish in time."""
    module_name, _, function_name = spec.partition(":")
    module = importlib.import_module(module_name)
    handler = getattr(module, function_name)
    expected = getattr(module, "expected_seconds", None)
    return handler, expected if callable(expected) else None


def estimate_seconds(
    expected: ExpectedSeconds | None, body: str, on_error: Callable[[Exception], object]
) -> float | None:
    """What the handler's ``expected_seconds(body)`` says, as a float; None when it has none
    or it fails (user code: a bad estimate only means "unknown", ``on_error`` reports why)."""
    if expected is None:
        return None
    try:
        value = expected(body)
        return float(value) if value is not None else None
    except Exception as error:  # noqa: BLE001 - user code, see above
        on_error(error)
        return None


class HostContext:
    """The ``context`` a handler receives (the same attributes as the agent's TaskContext)."""

    def __init__(self, host: Host, request: Mapping[str, Any]) -> None:
        self._host = host
        self.message_id = str(request["message_id"])
        self.receive_count = int(request.get("receive_count", 1))
        self.attributes: dict[str, Any] = dict(request.get("attributes") or {})
        resumed = request.get("resumed")
        #: The last checkpoint of this message (from any instance), or None.
        self.resumed: bytes | None = base64.b64decode(resumed) if resumed is not None else None
        deadline = request.get("deadline")
        #: When the instance goes away (set while the agent drains), else None.
        self.deadline: datetime | None = datetime.fromisoformat(deadline) if deadline else None
        self._max_bytes = int(request.get("checkpoint_max_bytes") or 0)
        #: Set when the agent gave the message back: stop, the result is ignored.
        self.released = threading.Event()

    def checkpoint(self, data: bytes) -> bool:
        """Store ``data`` as this message's progress (replacing the previous checkpoint).

        True when stored; False when checkpoints are disabled (no bucket configured).
        Raises CheckpointTooLarge over the limit, CheckpointError when it was not stored.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"checkpoint data must be bytes, not {type(data).__name__}")
        payload = bytes(data)
        too_large = bool(self._max_bytes) and len(payload) > self._max_bytes
        answer = self._host.request(
            {
                "t": "checkpoint",
                "size": len(payload),
                "data": None if too_large else base64.b64encode(payload).decode("ascii"),
            }
        )
        if answer.get("too_large"):
            raise CheckpointTooLarge(
                f"checkpoint of {len(payload)} bytes is over the limit of {self._max_bytes} bytes"
                " (SPOTGUARD_CHECKPOINT_MAX_BYTES); nothing was stored"
            )
        if answer.get("error"):
            raise CheckpointError(str(answer["error"]))
        return bool(answer.get("stored"))


class Host:
    def __init__(self, spec: str, protocol_out: IO[str]) -> None:
        self.spec = spec
        self._out = protocol_out
        self._write_lock = threading.Lock()
        self._answers: queue.Queue[dict[str, Any]] = queue.Queue()
        self._context: HostContext | None = None
        self._stopping = threading.Event()
        self._busy = threading.Event()
        self.handler: Handler | None = None
        self.expected: ExpectedSeconds | None = None
        #: One handler thread for the life of the host (the main thread reads the agent).
        self._runs: queue.Queue[Mapping[str, Any]] = queue.Queue()
        threading.Thread(target=self._run_forever, name="handler", daemon=True).start()

    def _run_forever(self) -> None:
        while True:
            self.run(self._runs.get())

    def send(self, message: Mapping[str, Any]) -> None:
        line = json.dumps(message, separators=(",", ":")) + "\n"
        with self._write_lock:
            self._out.write(line)
            self._out.flush()

    def request(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """Send and wait for the agent's answer (only the running task asks anything)."""
        try:
            self.send(message)
            return self._answers.get(timeout=CHECKPOINT_ACK_TIMEOUT_SECONDS)
        except (OSError, queue.Empty) as error:
            raise CheckpointError(f"the agent did not answer: {error!r}") from None

    def load(self) -> bool:
        try:
            self.handler, self.expected = load_handler(self.spec)
        except BaseException as error:  # noqa: BLE001 - reported to the agent, which fails clearly
            reason = f"cannot load handler {self.spec}: {type(error).__name__}: {error}"
            self.send({"t": "ready", "error": reason})
            return False
        self.send({"t": "ready", "pid": os.getpid()})
        return True

    # -------------------------------------------------------------- one task
    def run(self, request: Mapping[str, Any]) -> None:
        context = HostContext(self, request)
        # contracts.TaskEnv of this message, for code that reads the environment.
        for name, value in dict(request.get("env") or {}).items():
            os.environ[str(name)] = str(value)
        if TaskEnv.DEADLINE.value not in (request.get("env") or {}):
            os.environ.pop(TaskEnv.DEADLINE.value, None)
        self._context = context
        if self._stopping.is_set():
            context.released.set()
        body = str(request.get("body", ""))
        seconds = estimate_seconds(
            self.expected, body, lambda error: sys.stderr.write(f"expected_seconds failed: {error}\n")
        )
        self.send({"t": "expected", "seconds": seconds})
        assert self.handler is not None
        try:
            self.handler(body, context)
        except BaseException as error:  # noqa: BLE001 - any handler exception is a task failure
            traceback.print_exc(file=sys.stderr)
            result: dict[str, Any] = {"t": "result", "ok": False, "error": f"{type(error).__name__}: {error}"}
        else:
            result = {"t": "result", "ok": True}
        sys.stdout.flush()
        sys.stderr.flush()
        with contextlib.suppress(OSError):  # the agent is gone
            self.send(result)
        self._context = None
        self._busy.clear()
        if self._stopping.is_set():
            os._exit(0)

    def set_deadline(self, deadline: str | None) -> None:
        context = self._context
        if context is not None and deadline:
            context.deadline = datetime.fromisoformat(deadline)
            os.environ[TaskEnv.DEADLINE.value] = deadline

    def stop(self) -> None:
        """SIGTERM or the agent gone: release the running task, exit once it returns."""
        self._stopping.set()
        context = self._context
        if context is not None:
            context.released.set()
        if not self._busy.is_set():
            os._exit(0)

    # -------------------------------------------------------------- main loop
    def serve(self, requests: IO[str]) -> None:
        for line in requests:
            try:
                message = json.loads(line)
            except ValueError:
                sys.stderr.write(f"handler host: unreadable request {line[:200]!r}\n")
                continue
            kind = message.get("t")
            if kind == "run":
                self._busy.set()
                self._runs.put(message)
            elif kind == "checkpoint_ack":
                self._answers.put(message)
            elif kind == "deadline":  # a drain began while the task runs
                self.set_deadline(message.get("deadline"))
        # The agent is gone: nobody will delete or release this message, the control plane
        # requeues it. Stop like on SIGTERM, but do not wait long for the handler.
        self.stop()  # returns only while the handler still runs
        time.sleep(_stop_grace_seconds())
        os._exit(0)


def _stop_grace_seconds() -> float:
    """How long the handler may still run once the agent went away (stdin closed)."""
    try:
        return float(os.environ.get(Env.STOP_GRACE_SECONDS.value) or DEFAULT_STOP_GRACE_SECONDS)
    except ValueError:
        return float(DEFAULT_STOP_GRACE_SECONDS)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or ":" not in args[0]:
        sys.stderr.write("usage: python -m spotguard_agent.handler_host module:function\n")
        return 2
    # The protocol keeps the original stdout; everything the handler prints goes to stderr.
    protocol_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = os.fdopen(1, "w", encoding="utf-8", buffering=1)
    if hasattr(sys.stderr, "reconfigure"):
        sys.stderr.reconfigure(line_buffering=True)
    host = Host(args[0], protocol_out)
    signal.signal(signal.SIGTERM, lambda _signum, _frame: host.stop())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent decides; Ctrl-C reaches it too
    if not host.load():
        return 3
    host.serve(sys.stdin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
