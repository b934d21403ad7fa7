"""Simulated instances: a real ``spotguard-agent run`` process each, with its own IMDS.

The bootstrap is simulated (a short wait stands in for fetching and installing the
bundle); then the agent starts, and once its health port listens the instance reports
``ready`` with ``spotguard-agent report ready`` — the installer's last step on EC2.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from enum import StrEnum
from pathlib import Path

from spotguard_core.contracts import Env

from spotguard_tools.drill import ledger
from spotguard_tools.imds_emulator import ImdsEmulator


class Phase(StrEnum):
    BOOTING = "booting"  # simulated bootstrap running
    STARTING = "starting"  # agent process started, health port not yet listening
    REPORTING = "reporting"  # `report ready` running
    READY = "ready"
    HUNG = "hung"  # the bootstrap never finishes (chaos: bootstrap failure)
    GONE = "gone"  # terminated


def agent_command() -> list[str]:
    """The agent's console script from the same environment as this interpreter."""
    beside = Path(sys.executable).with_name("spotguard-agent")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("spotguard-agent")
    if found:
        return [found]
    return [sys.executable, "-m", "spotguard_agent.cli"]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SimulatedInstance:
    def __init__(
        self,
        instance_id: str,
        *,
        availability_zone: str,
        launched_at: float,
        bootstrap_seconds: float,
        bootstrap_fails: bool,
        log_dir: Path,
        initial: bool,
    ) -> None:
        self.instance_id = instance_id
        self.availability_zone = availability_zone
        self.launched_at = launched_at
        self.initial = initial
        self.bootstrap_fails = bootstrap_fails
        self.phase = Phase.HUNG if bootstrap_fails else Phase.BOOTING
        self.bootstrap_due = launched_at + bootstrap_seconds
        self.imds = ImdsEmulator(instance_id, availability_zone=availability_zone).start()
        self.health_port = free_port()
        self.log_path = log_dir / f"{instance_id}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.reporter: subprocess.Popen[bytes] | None = None
        self.ready_at: float | None = None
        self.report_failed: bool = False
        #: A spot warning (deadline) or hard kill is under way: not a chaos target any more.
        self.doomed = False
        self.reclaim_at: float | None = None
        #: The start time of an AWS Health scheduled change: EC2 retires the instance then.
        self.retire_at: float | None = None
        self.in_asg = True
        self.ec2_state = "running"
        self.terminated_by_drill = False
        self.exit_code: int | None = None

    # ------------------------------------------------------------------ processes
    def agent_environment(self, base: dict[str, str], ledger_path: Path) -> dict[str, str]:
        return {
            **base,
            Env.HEALTH_PORT.value: str(self.health_port),
            Env.IMDS_URL.value: self.imds.url,
            ledger.LEDGER_ENV: str(ledger_path),
            ledger.INSTANCE_ENV: self.instance_id,
        }

    def _spawn(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with self.log_path.open("ab") as log:
            return subprocess.Popen(  # noqa: S603 - our own console script
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def step(self, now: float, base_env: dict[str, str], ledger_path: Path) -> str | None:
        """Advance the simulated bootstrap; returns a journal mark name when something happened."""
        env = self.agent_environment(base_env, ledger_path)
        if self.phase == Phase.BOOTING and now >= self.bootstrap_due:
            self.process = self._spawn([*agent_command(), "run", "--imds-url", self.imds.url], env)
            self.phase = Phase.STARTING
            return "agent_started"
        if self.phase == Phase.STARTING:
            if self.process is not None and self.process.poll() is not None:
                self.exit_code = self.process.returncode
                self.phase = Phase.READY  # it ran and died; nothing to report any more
                self.report_failed = True
                return "agent_exited"
            if _listening(self.health_port):
                # moto answers CompleteLifecycleAction with HTTP 500 (not even an AWS error
                # document); without an ASG name the agent skips the lifecycle answer and
                # still writes the fleet record and the bootstrap tag.
                report_env = {**env, Env.ASG_NAME.value: ""}
                self.reporter = self._spawn(
                    [*agent_command(), "report", "ready", "--imds-url", self.imds.url], report_env
                )
                self.phase = Phase.REPORTING
            return None
        if self.phase == Phase.REPORTING and self.reporter is not None and self.reporter.poll() is not None:
            self.phase = Phase.READY
            if self.reporter.returncode == 0:
                self.ready_at = now
                return "ready"
            self.report_failed = True
            return "report_failed"
        return None

    @property
    def agent_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def working(self) -> bool:
        """Its agent runs (it takes work once its health port listens) and no interruption
        is under way: a chaos target."""
        running = self.phase in (Phase.REPORTING, Phase.READY) and self.agent_alive
        return running and not self.doomed and self.ec2_state == "running"

    def kill(self) -> bool:
        """SIGKILL the agent (the machine is gone). True when it was still running."""
        alive = self.agent_alive
        for process in (self.process, self.reporter):
            if process is not None and process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGKILL)
                process.wait(timeout=10)
        if self.process is not None:
            self.exit_code = self.process.returncode
        return alive

    def terminate_processes(self) -> None:
        """SIGTERM the agent and its reporter without waiting (see :meth:`stop`)."""
        for process in (self.process, self.reporter):
            if process is not None and process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 8.0) -> None:
        """End of drill: ask the agent to stop (SIGTERM), then kill what is left."""
        self.terminate_processes()
        deadline = time.monotonic() + timeout
        for process in (self.process, self.reporter):
            if process is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
        self.kill()
        self.imds.stop()
