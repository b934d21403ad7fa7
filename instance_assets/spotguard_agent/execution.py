"""Running the user's work for one message, so that a released task really stops.

Two modes (``Env.HANDLER`` xor ``Env.COMMAND``), both outside the agent's own process:

* **Python handler** (``module:function`` from the workload directory): one persistent child
  process per concurrency slot (``spotguard_agent.handler_host`` under ``Env.WORKLOAD_PYTHON``)
  imports the handler once and runs one task at a time, talking JSON lines over pipes.
  Every slot's child starts with the agent (the first before it takes work, so a handler
  that cannot be imported stops the agent; the others side by side, in the background), so
  no task waits for a process start, not even a requeued one landing on a fresh instance.
  When the agent releases the task (drain, SIGTERM) it sends the child SIGTERM (the handler sees
  ``context.released``), waits ``Env.STOP_GRACE_SECONDS`` (never past the interruption
  deadline) and then SIGKILLs it; a fresh child takes the slot's next task. A released
  handler therefore cannot go on with side effects, whatever it does.
* **Command** (a shell command line run in the workload directory): per message, body on
  stdin, ``contracts.TaskEnv`` in its environment on top of the agent's own, its own process
  group; exit 0 = done, anything else = a genuine failure. Released: SIGTERM to the group,
  the grace time, SIGKILL to the group; then the files in ``$SPOTGUARD_CHECKPOINT_DIR`` are
  saved as the message's checkpoint. Its output goes to the agent's log, line by line, with
  the message id. Leftover processes of the group are killed when the command exits, and
  ``task_supervisor`` (the group's leader) kills the group if the agent dies first.

The worker calls ``run(task)`` in the task's thread: it returns when the task succeeded or
was released (the worker tells those apart by the task state) and raises ``TaskFailed``
when it failed. ``succeeded(tasks)`` deletes their checkpoints; ``close()`` waits for stopping
tasks and ends the child processes at exit.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import spotguard_core
from spotguard_core.contracts import (
    DEFAULT_CHECKPOINT_MAX_BYTES,
    DEFAULT_HANDLER,
    DEFAULT_STOP_GRACE_SECONDS,
    WORKLOAD_DIR,
    Env,
    Metric,
    TaskEnv,
)

import spotguard_agent
from spotguard_agent.checkpoint import CheckpointError, CheckpointStore, CheckpointTooLarge
from spotguard_agent.config import AgentConfig, ConfigError

if TYPE_CHECKING:
    from spotguard_agent.worker import Task

LOG = logging.getLogger("spotguard.execution")
TASK_LOG = logging.getLogger("spotguard.task")
#: Metrics this module counts (the worker publishes them with its own).
EXECUTION_METRICS = (
    Metric.CHECKPOINTS_SAVED,
    Metric.CHECKPOINTS_REJECTED,
    Metric.TASKS_RESUMED,
    Metric.TASKS_KILLED,
)
HOST_READY_TIMEOUT_SECONDS = 60.0
#: ``HandlerHost.next_event``: nothing arrived in time.
NO_EVENT: dict[str, Any] = {"t": "none"}
_POLL_SECONDS = 0.05
Deadline = Callable[[], "datetime | None"]
Count = Callable[[Metric], None]


class TaskFailed(RuntimeError):
    """The handler raised, its process died, or the command exited non-zero."""


class WorkloadError(ConfigError):
    """Invalid workload configuration or a handler that cannot be loaded."""


@dataclass(frozen=True)
class WorkloadConfig:
    """The workload part of the agent's configuration (``contracts.Env`` variables)."""

    #: Unpacked workload (cwd of tasks, first on the handler's path); None: none installed.
    workload_dir: Path | None = None
    python: str = sys.executable
    command: str = ""
    stop_grace_seconds: float = float(DEFAULT_STOP_GRACE_SECONDS)
    checkpoint_bucket: str = ""
    checkpoint_max_bytes: int = DEFAULT_CHECKPOINT_MAX_BYTES
    log_group: str = ""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> WorkloadConfig:
        env = os.environ if environ is None else environ
        command = env.get(Env.COMMAND.value, "").strip()
        handler = env.get(Env.HANDLER.value, "").strip()
        if command and handler:
            raise WorkloadError(f"set {Env.HANDLER.value} or {Env.COMMAND.value}, not both")
        directory = env.get(Env.WORKLOAD_DIR.value, "") or WORKLOAD_DIR
        try:
            grace = float(env.get(Env.STOP_GRACE_SECONDS.value) or DEFAULT_STOP_GRACE_SECONDS)
            max_bytes = int(env.get(Env.CHECKPOINT_MAX_BYTES.value) or DEFAULT_CHECKPOINT_MAX_BYTES)
        except ValueError as error:
            names = f"{Env.STOP_GRACE_SECONDS.value} and {Env.CHECKPOINT_MAX_BYTES.value}"
            raise WorkloadError(f"{names} must be numbers: {error}") from None
        if grace < 0 or max_bytes < 1:
            raise WorkloadError(
                f"{Env.STOP_GRACE_SECONDS.value} must be >= 0 and {Env.CHECKPOINT_MAX_BYTES.value} >= 1"
            )
        return cls(
            workload_dir=Path(directory) if Path(directory).is_dir() else None,
            python=env.get(Env.WORKLOAD_PYTHON.value, "") or sys.executable,
            command=command,
            stop_grace_seconds=grace,
            checkpoint_bucket=env.get(Env.CHECKPOINT_BUCKET.value, ""),
            checkpoint_max_bytes=max_bytes,
            log_group=env.get(Env.LOG_GROUP.value, ""),
        )

    @classmethod
    def from_agent_config(cls, config: AgentConfig) -> WorkloadConfig:
        """The same settings from the agent's typed configuration (environment + flags)."""
        directory = Path(config.workload_dir) if config.workload_dir else None
        return cls(
            workload_dir=directory if directory is not None and directory.is_dir() else None,
            python=config.workload_python or sys.executable,
            command=config.command.strip(),
            stop_grace_seconds=float(config.stop_grace_seconds),
            checkpoint_bucket=config.checkpoint_bucket,
            checkpoint_max_bytes=max(1, int(config.checkpoint_max_bytes)),
            log_group=config.log_group,
        )


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


class Execution:
    """What the modes share: checkpoints, the stop grace, bookkeeping of running tasks."""

    def __init__(
        self, workload: WorkloadConfig, store: CheckpointStore, *, deadline: Deadline, count: Count
    ) -> None:
        self.workload = workload
        self.store = store
        self._deadline = deadline
        self._count = count
        self._active = 0
        self._active_changed = threading.Condition()

    @property
    def cwd(self) -> str | None:
        return str(self.workload.workload_dir) if self.workload.workload_dir else None

    def grace_seconds(self) -> float:
        """The stop grace, but never past the interruption deadline."""
        grace = self.workload.stop_grace_seconds
        deadline = self._deadline()
        if deadline is not None:
            grace = min(grace, max(0.5, deadline.timestamp() - time.time()))
        return grace

    def deadline_text(self) -> str | None:
        deadline = self._deadline()
        return _iso(deadline) if deadline is not None else None

    def run(self, task: Task) -> None:
        with self._active_changed:
            self._active += 1
        try:
            self._run(task)
        finally:
            self.store.forget([task.message_id])  # this attempt saves nothing more
            with self._active_changed:
                self._active -= 1
                self._active_changed.notify_all()

    def _run(self, task: Task) -> None:
        raise NotImplementedError

    def succeeded(self, tasks: Sequence[Task]) -> None:
        """After the messages were deleted: their checkpoints are not needed any more (one
        DeleteObjects call). Only a message that was received before, or saved one now, can
        have one."""
        if self.store.enabled:
            self.store.delete_many(
                t.message_id for t in tasks if t.receive_count > 1 or t.context.checkpointed
            )

    def close(self, timeout: float | None = None) -> None:
        """Wait (bounded) for running/stopping tasks, then end the child processes."""
        limit = time.monotonic() + (timeout if timeout is not None else self.workload.stop_grace_seconds + 30)
        with self._active_changed:
            while self._active and time.monotonic() < limit:
                self._active_changed.wait(0.1)

    def _resumed(self, task: Task) -> bytes | None:
        # A first receive cannot have a checkpoint: no S3 call on the common path.
        if not self.store.enabled or task.receive_count <= 1:
            return None
        data = self.store.load(task.message_id)
        if data is not None:
            self._count(Metric.TASKS_RESUMED)
            LOG.info("task %s resumes from a checkpoint of %d bytes", task.message_id, len(data))
        return data

    def task_environment(self, task: Task) -> dict[str, str]:
        env = {
            TaskEnv.MESSAGE_ID.value: task.message_id,
            TaskEnv.RECEIVE_COUNT.value: str(task.receive_count),
        }
        deadline = self.deadline_text()
        if deadline is not None:
            env[TaskEnv.DEADLINE.value] = deadline
        return env


# ---------------------------------------------------------------------- python handlers
class HandlerHost:
    """One child process running ``spotguard_agent.handler_host``."""

    def __init__(self, argv: list[str], *, env: Mapping[str, str], cwd: str | None) -> None:
        self.process = subprocess.Popen(  # noqa: S603 - our own module under the workload python
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=dict(env),
            bufsize=0,
        )
        self.message_id: str | None = None
        self._write_lock = threading.Lock()
        # Events are read by the task's own thread (no hand-over between threads per
        # message: under the GIL each hand-over can cost milliseconds).
        assert self.process.stdout is not None
        self._events_fd = self.process.stdout.fileno()
        self._buffer = b""
        threading.Thread(target=self._read_output, name=f"host-{self.pid}-err", daemon=True).start()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        """The next event line; ``NO_EVENT`` after ``timeout``; None when the process ended."""
        limit = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = limit - time.monotonic()
            if left <= 0:
                return NO_EVENT
            readable, _, _ = select.select([self._events_fd], [], [], left)
            if not readable:
                return NO_EVENT
            chunk = os.read(self._events_fd, 1 << 16)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            event = json.loads(line)
        except ValueError:
            TASK_LOG.warning("handler process %d: unreadable line %r", self.pid, line[:200])
            return NO_EVENT
        return event if isinstance(event, dict) else NO_EVENT

    def _read_output(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            _log_task_line(self.message_id, line.decode("utf-8", errors="replace"))

    def send(self, message: Mapping[str, Any]) -> bool:
        assert self.process.stdin is not None
        try:
            with self._write_lock:
                data = memoryview((json.dumps(message, separators=(",", ":")) + "\n").encode())
                while data:  # an unbuffered pipe may take a large request in parts
                    written = self.process.stdin.write(data)
                    data = data[written or 0 :]
        except (OSError, ValueError):  # the child is gone
            return False
        return True

    def wait_ready(self, timeout: float) -> None:
        event = self.next_event(timeout)
        if event is NO_EVENT:
            self.kill()
            raise WorkloadError(f"handler process did not start within {timeout:.0f} s")
        if event is None or event.get("t") != "ready" or event.get("error"):
            self.kill()
            reason = event.get("error") if event else f"exited with code {self.process.wait()}"
            raise WorkloadError(str(reason))

    def stop(self, grace: float) -> bool:
        """SIGTERM, ``grace`` seconds, SIGKILL. True when it had to be killed."""
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill()
            return True
        return False

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)

    def close(self) -> None:
        """Idle host: closing its stdin ends it at once; killed if it does not."""
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.kill()


class PythonExecution(Execution):
    def __init__(
        self, spec: str, workload: WorkloadConfig, store: CheckpointStore, *, slots: int = 1, **kwargs: Any
    ) -> None:
        super().__init__(workload, store, **kwargs)
        self.spec = spec
        self._idle: list[HandlerHost] = []
        self._hosts: set[HandlerHost] = set()
        self._lock = threading.Lock()
        #: Notified when a host becomes idle or a start-up spawn ends (``_acquire`` waits on it).
        self._host_ready = threading.Condition(self._lock)
        self._starting = 0  # start-up spawns still running
        self._closed = False
        # Start one at once: a handler that cannot be imported stops the agent with a
        # clear reason instead of failing every message.
        self._put_idle(self._spawn())
        # The other slots' hosts start now, side by side, not when their first task comes.
        self._starting = max(0, slots - 1)
        for index in range(self._starting):
            threading.Thread(target=self._spawn_at_start, name=f"host-start-{index}", daemon=True).start()

    def _spawn_at_start(self) -> None:
        host: HandlerHost | None = None
        try:
            host = self._spawn()
        except WorkloadError as error:  # the first host started: a task spawns its own later
            LOG.warning("a handler process did not start: %s", error)
        with self._lock:
            self._starting -= 1
            if host is not None and not self._closed:
                host.message_id = None
                self._idle.append(host)
                host = None
            self._host_ready.notify_all()
        if host is not None:  # closed meanwhile
            self._discard(host)
            host.close()

    def _spawn(self) -> HandlerHost:
        host = HandlerHost(
            [self.workload.python, "-m", "spotguard_agent.handler_host", self.spec],
            env=self._host_environment(),
            cwd=self.cwd,
        )
        with self._lock:
            self._hosts.add(host)
        try:
            host.wait_ready(HOST_READY_TIMEOUT_SECONDS)
        except WorkloadError:
            with self._lock:
                self._hosts.discard(host)
            raise
        return host

    def _host_environment(self) -> dict[str, str]:
        """The agent's environment, the workload directory first on the path, then the
        agent's own code (the host module, the sample handler, contracts)."""
        paths = [str(self.workload.workload_dir)] if self.workload.workload_dir else []
        for package in (spotguard_agent, spotguard_core):
            parent = str(Path(package.__file__ or "").resolve().parent.parent)
            if parent not in paths:
                paths.append(parent)
        inherited = os.environ.get("PYTHONPATH")
        if inherited:
            paths.append(inherited)
        return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}

    def _acquire(self) -> HandlerHost:
        """An idle host; while start-up spawns run, the next of them; else a new one."""
        with self._lock:
            while True:
                while self._idle:
                    host = self._idle.pop()
                    if host.alive:
                        return host
                    self._hosts.discard(host)
                if not self._starting:
                    break
                self._host_ready.wait(HOST_READY_TIMEOUT_SECONDS)
        return self._spawn()

    def _put_idle(self, host: HandlerHost) -> None:
        host.message_id = None
        with self._lock:
            self._idle.append(host)
            self._host_ready.notify()

    def _discard(self, host: HandlerHost) -> None:
        with self._lock:
            self._hosts.discard(host)

    def _run(self, task: Task) -> None:
        context = task.context
        resumed = self._resumed(task)
        context.resumed = resumed
        request = {
            "t": "run",
            "message_id": task.message_id,
            "receive_count": task.receive_count,
            "attributes": context.attributes,
            "body": str(task.message.get("Body", "")),
            "resumed": base64.b64encode(resumed).decode("ascii") if resumed is not None else None,
            "deadline": self.deadline_text(),
            "checkpoint_max_bytes": self.store.max_bytes,
            "env": self.task_environment(task),
        }
        host, sent = self._start_on_host(task, request)
        stopper: threading.Thread | None = None
        deadline_sent = self.deadline_text()
        while sent:
            event = host.next_event(_POLL_SECONDS)
            if event is NO_EVENT:
                deadline = self.deadline_text()
                if deadline != deadline_sent and deadline is not None:
                    # A task that fits goes on during the drain: tell it when the end is.
                    deadline_sent = deadline
                    host.send({"t": "deadline", "deadline": deadline})
                if stopper is None and context.released.is_set():
                    stopper = threading.Thread(target=self._stop, args=(host, task), daemon=True)
                    stopper.start()
                continue
            if event is None:
                break  # the process ended
            kind = event.get("t")
            if kind == "expected":
                seconds = event.get("seconds")
                task.expected_seconds = float(seconds) if isinstance(seconds, int | float) else None
            elif kind == "checkpoint":
                host.send(self._checkpoint(task, event))
            elif kind == "result" and stopper is None:
                self._put_idle(host)
                if event.get("ok"):
                    return
                raise TaskFailed(str(event.get("error") or "handler failed"))
        # The process ended before a result (or while it was being stopped).
        if stopper is not None:
            stopper.join()
        else:
            host.kill()
        self._discard(host)
        if stopper is None and not context.released.is_set():
            raise TaskFailed(f"handler process exited with code {host.process.returncode} during the task")

    def _start_on_host(self, task: Task, request: Mapping[str, Any]) -> tuple[HandlerHost, bool]:
        host = self._acquire()
        host.message_id = task.message_id
        if host.send(request):
            return host, True
        # An idle child died since its last task: not the message's fault, use a new one.
        host.kill()
        self._discard(host)
        host = self._spawn()
        host.message_id = task.message_id
        return host, host.send(request)

    def _stop(self, host: HandlerHost, task: Task) -> None:
        grace = self.grace_seconds()
        if host.stop(grace):
            self._count(Metric.TASKS_KILLED)
            LOG.warning("released task %s ignored SIGTERM for %.1f s: killed", task.message_id, grace)
        else:
            LOG.info("released task %s stopped", task.message_id)

    def _checkpoint(self, task: Task, event: Mapping[str, Any]) -> dict[str, Any]:
        ack: dict[str, Any] = {"t": "checkpoint_ack", "stored": False, "error": None, "too_large": False}
        if not self.store.enabled:
            return ack
        size = int(event.get("size") or 0)
        data = event.get("data")
        if data is None or size > self.store.max_bytes:
            self.store.reject(task.message_id, size)
            ack["too_large"] = True
            return ack
        try:
            payload = base64.b64decode(data)
            ack["stored"] = self.store.save(task.message_id, payload, attempt=task.receive_count)
        except CheckpointTooLarge:
            ack["too_large"] = True
        except CheckpointError as error:
            ack["error"] = str(error)
        if ack["stored"]:
            task.context.checkpointed = True
        return ack

    def close(self, timeout: float | None = None) -> None:
        super().close(timeout)
        with self._lock:
            self._closed = True
            hosts, self._idle = list(self._hosts), []
            self._hosts.clear()
        for host in hosts:
            host.close()


# ---------------------------------------------------------------------- commands
#: Parent of each command: kills the task's group when the agent dies without stopping it.
TASK_SUPERVISOR = str(Path(__file__).resolve().with_name("task_supervisor.py"))


def _deadline_file(checkpoint_dir: Path) -> Path:
    """Next to the checkpoint directory, in the task's scratch space (never checkpointed)."""
    return checkpoint_dir.parent / "deadline"


def _write_atomically(path: Path, text: str) -> None:
    """A reader sees the whole deadline or no file, never half of it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text + "\n")
    partial.replace(path)


class CommandExecution(Execution):
    def __init__(self, command: str, workload: WorkloadConfig, store: CheckpointStore, **kwargs: Any) -> None:
        super().__init__(workload, store, **kwargs)
        self.command = command
        self._live: dict[int, subprocess.Popen[bytes]] = {}
        self._live_lock = threading.Lock()

    def _environment(self, task: Task, checkpoint_dir: Path) -> dict[str, str]:
        env = {
            **os.environ,
            **self.task_environment(task),
            TaskEnv.CHECKPOINT_DIR.value: str(checkpoint_dir),
            TaskEnv.DEADLINE_FILE.value: str(_deadline_file(checkpoint_dir)),
        }
        python_bin = Path(self.workload.python).parent
        if (python_bin.parent / "pyvenv.cfg").exists():  # the workload venv: its tools first
            env["PATH"] = os.pathsep.join([str(python_bin), env.get("PATH", os.defpath)])
            env["VIRTUAL_ENV"] = str(python_bin.parent)
        return env

    def _run(self, task: Task) -> None:
        scratch = Path(tempfile.mkdtemp(prefix="spotguard-task-"))
        try:
            self._run_in(task, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _run_in(self, task: Task, scratch: Path) -> None:
        checkpoint_dir = scratch / "checkpoint"
        checkpoint_dir.mkdir()
        if (
            self.store.enabled
            and task.receive_count > 1
            and self.store.restore_directory(task.message_id, checkpoint_dir)
        ):
            self._count(Metric.TASKS_RESUMED)
        # The supervisor watches this pipe: its write end lives only in the agent.
        watch_read, watch_write = os.pipe()
        try:
            process = subprocess.Popen(  # noqa: S603 - the fleet's own configured command
                [sys.executable, "-I", "-S", TASK_SUPERVISOR, str(watch_read), self.command],
                cwd=self.cwd,
                env=self._environment(task, checkpoint_dir),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own process group: the whole task can be signalled
                pass_fds=(watch_read,),
            )
        finally:
            os.close(watch_read)
        try:
            self._supervise(task, process, checkpoint_dir)
        finally:
            os.close(watch_write)

    def _supervise(self, task: Task, process: subprocess.Popen[bytes], checkpoint_dir: Path) -> None:
        with self._live_lock:
            self._live[process.pid] = process
        body = str(task.message.get("Body", ""))
        pumps = [
            threading.Thread(target=_feed, args=(process.stdin, body), daemon=True),
            threading.Thread(target=_pump, args=(process.stdout, task.message_id), daemon=True),
            threading.Thread(target=_pump, args=(process.stderr, task.message_id), daemon=True),
        ]
        for pump in pumps:
            pump.start()
        released = False
        deadline_file = _deadline_file(checkpoint_dir)
        deadline_written: str | None = None
        try:
            while True:
                try:
                    process.wait(timeout=_POLL_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    deadline = self.deadline_text()
                    if deadline is not None and deadline != deadline_written:
                        _write_atomically(deadline_file, deadline)
                        deadline_written = deadline
                    if task.context.released.is_set():
                        released = True
                        self._stop(process, task)
                        break
        finally:
            _signal_group(process.pid, signal.SIGKILL)  # nothing of the task outlives it
            with self._live_lock:
                self._live.pop(process.pid, None)
            for pump in pumps:
                pump.join(timeout=2)
        code = process.returncode
        if released or task.context.released.is_set():
            if self.store.save_directory(task.message_id, checkpoint_dir, attempt=task.receive_count):
                task.context.checkpointed = True
            return
        if code != 0:
            raise TaskFailed(f"command exited with code {code}")

    def _stop(self, process: subprocess.Popen[bytes], task: Task) -> None:
        """SIGTERM to the group; the grace time for *every* process of it (the shell may die
        at once while the program it started is still writing its checkpoint); SIGKILL."""
        grace = self.grace_seconds()
        _signal_group(process.pid, signal.SIGTERM)
        limit = time.monotonic() + grace
        while time.monotonic() < limit:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=_POLL_SECONDS)
            if process.returncode is not None and not _group_alive(process.pid):
                LOG.info("released task %s stopped (exit code %s)", task.message_id, process.returncode)
                return
        _signal_group(process.pid, signal.SIGKILL)
        process.wait()
        self._count(Metric.TASKS_KILLED)
        LOG.warning("released task %s ignored SIGTERM for %.1f s: killed", task.message_id, grace)

    def close(self, timeout: float | None = None) -> None:
        super().close(timeout)
        with self._live_lock:
            left = list(self._live)
        for pid in left:
            _signal_group(pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    """Does any process of the group still run (zombies waiting for a reaper do not)?"""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _feed(stream: IO[bytes] | None, body: str) -> None:
    if stream is None:
        return
    with contextlib.suppress(OSError, ValueError):  # a command that does not read its input
        stream.write(body.encode("utf-8"))
    with contextlib.suppress(OSError, ValueError):
        stream.close()


def _pump(stream: IO[bytes] | None, message_id: str) -> None:
    if stream is None:
        return
    for raw in stream:
        _log_task_line(message_id, raw.decode("utf-8", errors="replace"))


def _log_task_line(message_id: str | None, line: str) -> None:
    text = line.rstrip("\n")
    if text:
        TASK_LOG.info("[%s] %s", message_id or "-", text, extra={"message_id": message_id})


# ---------------------------------------------------------------------- factory
def build_execution(
    *,
    handler: str,
    workload: WorkloadConfig,
    s3: Any,
    fleet: str,
    deadline: Deadline,
    count: Count,
    slots: int = 1,
) -> Execution:
    store = CheckpointStore(
        s3,
        bucket=workload.checkpoint_bucket,
        fleet=fleet,
        max_bytes=workload.checkpoint_max_bytes,
        count=count,
    )
    if workload.command:
        LOG.info("command mode: %s (in %s)", workload.command, workload.workload_dir or Path.cwd())
        return CommandExecution(workload.command, workload, store, deadline=deadline, count=count)
    spec = handler or DEFAULT_HANDLER
    if ":" not in spec:
        raise WorkloadError(f"{Env.HANDLER.value} must be 'module:function', got {spec!r}")
    LOG.info("handler mode: %s under %s", spec, workload.python)
    return PythonExecution(spec, workload, store, slots=slots, deadline=deadline, count=count)
