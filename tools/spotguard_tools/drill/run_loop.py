"""The drill's run loop: emulator up, fleet up, tasks in, chaos on, report out.

Three objects with their own state do the work; this module wires them and owns the run:

- :class:`~spotguard_tools.drill.aws_standin.AwsStandIn`, EC2 and the AWS event sources
  (simulated instances, events on the default bus);
- :class:`~spotguard_tools.drill.chaos.ChaosExecutor`, the seeded plan, played through
  the stand-in;
- :class:`Drill` (here): the producer keeping a backlog on the work queue, the count of
  completions from the ledger, the live progress, the stop condition and the report.

The control plane (real dispatcher and watchdog) runs in its own process
(:mod:`spotguard_tools.drill.lambda_host`), as Lambda would run it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Set
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from spotguard_core import contracts
from spotguard_core.contracts import Env, FleetRecord

from spotguard_tools.drill import ledger
from spotguard_tools.drill.aws_standin import AwsStandIn
from spotguard_tools.drill.chaos import ChaosExecutor
from spotguard_tools.drill.config import DrillConfig
from spotguard_tools.drill.constants import TICK_SECONDS, WATCHDOG_KIND
from spotguard_tools.drill.drill_report import Interruption, build_report, read_control_plane_log
from spotguard_tools.drill.instances import Phase
from spotguard_tools.drill.journal import Journal
from spotguard_tools.drill.ledger import (
    AGENT_LEDGER_ENV,
    DONE,
    LEASE_TABLE_ENV,
    RELEASED,
    START,
    WORK_QUEUE_ENV,
    Ledger,
)
from spotguard_tools.drill.moto import ACCOUNT_ID, DEFAULT_REGION, MotoServer
from spotguard_tools.drill.plan import ChaosKind, build_plan, task_durations
from spotguard_tools.drill.progress import Progress, Snapshot
from spotguard_tools.drill.resources import (
    DrillResources,
    control_plane_environment,
    create_resources,
    lease_table_name,
    work_queue_name,
)

#: How long the end of a run waits for instances replaced early to be retired.
RETIREMENT_GRACE_SECONDS = 30.0
RETIREMENT_POLL_SECONDS = 2.0
#: The drill's own task handler (standard library only, like any handler on an instance).
DRILL_HANDLER = "spotguard_tools.drill.task:handle"


class LedgerTail:
    """Follows the ledger as it grows, without re-reading it: completions, and which
    instance runs which task now (the chaos plan aims at those)."""

    def __init__(self, path: Path, long_tasks: Set[str] = frozenset()) -> None:
        self.path = path
        self.long_tasks = long_tasks
        self.offset = 0
        self.done: set[str] = set()
        self.running: dict[str, set[str]] = {}
        #: Instances that have started at least one task: their agent takes work.
        self.at_work: set[str] = set()
        #: The clock thread reads what the run loop's thread updates.
        self._lock = threading.Lock()

    def poll(self) -> int:
        if not self.path.exists():
            return len(self.done)
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        with self._lock:
            self._apply(chunk[:end])
        return len(self.done)

    def _apply(self, chunk: bytes) -> None:
        for raw in chunk.splitlines():
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            task, instance, event = str(record.get("task")), str(record.get("instance")), record.get("ev")
            if event == START:
                self.running.setdefault(instance, set()).add(task)
                self.at_work.add(instance)
            elif event in (DONE, RELEASED):
                self.running.get(instance, set()).discard(task)
            if event == DONE:
                self.done.add(task)

    def instances_at_work(self) -> set[str]:
        with self._lock:
            return set(self.at_work)

    def running_count(self, instance_id: str) -> int:
        with self._lock:
            return len(self.running.get(instance_id, ()))

    def long_task_holders(self) -> set[str]:
        with self._lock:
            return {instance for instance, tasks in self.running.items() if tasks & self.long_tasks}


class Drill:
    def __init__(self, config: DrillConfig, progress: Progress | None = None) -> None:
        self.config = config
        self.progress = progress or Progress(enabled=False)
        self.out = config.out_dir / config.mode
        self.journal = Journal()
        self.t0 = 0.0
        self.ended = 0.0
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ setup
    def _clients(self, endpoint: str) -> dict[str, Any]:
        """The drill's own clients, pointed at its emulator explicitly: this process's
        environment stays untouched (agents and the control plane get theirs explicitly)."""
        session = boto3.session.Session(
            aws_access_key_id="testing",
            aws_secret_access_key="testing",  # noqa: S106 - moto's dummy credentials
            region_name=DEFAULT_REGION,
        )
        config = Config(retries={"mode": "standard", "max_attempts": 5}, connect_timeout=5, read_timeout=30)
        return {
            name: session.client(name, endpoint_url=endpoint, config=config)
            for name in ("sqs", "dynamodb", "ec2", "autoscaling", "events", "s3")
        }

    def _prepare_out_dir(self) -> None:
        if self.out.exists():
            shutil.rmtree(self.out)
        (self.out / "instances").mkdir(parents=True)
        #: What the drill's own task handler records (attempts, checkpoints, releases).
        self.ledger_path = self.out / "ledger.jsonl"
        #: What the agents did to the work queue, as the emulator saw it: completions.
        self.agent_ledger_path = self.out / "agent-ledger.jsonl"
        self.fault_log_dir = self.out / "aws-faults"
        self.fault_log_dir.mkdir()
        self.control_plane_log = self.out / "control-plane.jsonl"

    def _fault_environment(self) -> dict[str, str]:
        """Latency and fault injection for every process the drill starts (agents, the
        Lambda host): each counts what it injected under ``aws-faults/``."""
        c = self.config
        if c.aws_faults <= 0 and c.aws_latency_ms <= 0:
            return {}
        return {
            Env.AWS_FAULT_RATE.value: str(c.aws_faults),
            Env.AWS_LATENCY_MS.value: str(c.aws_latency_ms),
            Env.AWS_FAULT_SEED.value: str(c.seed),
            Env.AWS_FAULT_LOG_DIR.value: str(self.fault_log_dir),
        }

    def _workload_environment(self, resources: DrillResources) -> dict[str, str]:
        """What the agent runs: the drill's own task handler, or the user's directory."""
        c = self.config
        env: dict[str, str] = {}
        if resources.checkpoint_bucket is not None:
            env[Env.CHECKPOINT_BUCKET.value] = resources.checkpoint_bucket
        if not c.checkpoints:
            env[ledger.CHECKPOINTS_ENV] = "0"
        env[ledger.CHECKPOINT_EVERY_ENV] = str(c.checkpoint_every_seconds)
        if c.workload is None:
            env[Env.HANDLER.value] = DRILL_HANDLER
            return env
        env[Env.WORKLOAD_DIR.value] = str(c.workload.resolve())
        if c.handler:
            env[Env.HANDLER.value] = c.handler
        else:
            env[Env.COMMAND.value] = str(c.command)
        return env

    def _agent_environment(self, moto: MotoServer, resources: DrillResources) -> dict[str, str]:
        c = self.config
        return {
            **_inherited_environment(),
            **moto.environment(),
            **self._fault_environment(),
            Env.FLEET_NAME.value: c.fleet,
            Env.ASG_NAME.value: resources.asg_name,
            Env.WORK_QUEUE_URL.value: resources.work_queue_url,
            Env.WORK_DLQ_URL.value: resources.work_dlq_url,
            Env.LEASE_TABLE.value: resources.lease_table,
            Env.FLEET_TABLE.value: resources.fleet_table,
            **self._workload_environment(resources),
            Env.CONCURRENCY.value: str(c.concurrency),
            Env.VISIBILITY_TIMEOUT_SECONDS.value: str(c.visibility_timeout_seconds),
            Env.IMDS_POLL_SECONDS.value: str(c.imds_poll_seconds),
            Env.DRAIN_MARGIN_SECONDS.value: str(c.drain_margin_seconds),
            Env.MAX_FAILURES.value: "5",
            Env.REQUEUE_ENABLED.value: "true" if c.requeue_enabled else "false",
            Env.REBALANCE_POLICY.value: c.rebalance_policy,
            Env.BOOTSTRAP_DEADLINE_SECONDS.value: str(c.bootstrap_deadline_seconds),
        }

    def _start_lambda_hosts(
        self, moto: MotoServer, resources: DrillResources
    ) -> list[subprocess.Popen[bytes]]:
        """``dispatcher_concurrency`` hosts dispatch the signal queue; the first one also
        runs the watchdog (one schedule, as on AWS)."""
        return [
            self._start_lambda_host(moto, resources, runs_watchdog=index == 0)
            for index in range(max(1, self.config.dispatcher_concurrency))
        ]

    def _start_lambda_host(
        self, moto: MotoServer, resources: DrillResources, *, runs_watchdog: bool
    ) -> subprocess.Popen[bytes]:
        c = self.config
        env = {
            **_inherited_environment(),
            **moto.environment(),
            **self._fault_environment(),
            **control_plane_environment(
                resources,
                requeue_enabled=c.requeue_enabled,
                rebalance_policy=c.rebalance_policy,
                heartbeat_stale_seconds=c.heartbeat_stale_seconds,
                bootstrap_deadline_seconds=c.bootstrap_deadline_seconds,
                account_id=ACCOUNT_ID,
                region=DEFAULT_REGION,
            ),
            "POWERTOOLS_SERVICE_NAME": f"spotguard-{c.fleet}",
            "POWERTOOLS_METRICS_NAMESPACE": contracts.METRIC_NAMESPACE,
            "POWERTOOLS_TRACE_DISABLED": "true",
            "POWERTOOLS_METRICS_DISABLED": "true",
        }
        with (self.out / "control-plane.log").open("ab") as log:
            return subprocess.Popen(  # noqa: S603 - our own module
                [
                    sys.executable,
                    "-m",
                    "spotguard_tools.drill.lambda_host",
                    "--signal-queue-url",
                    resources.signal_queue_url,
                    "--signal-queue-arn",
                    resources.signal_queue_arn,
                    "--watchdog-interval",
                    str(c.watchdog_interval_seconds if runs_watchdog else 0),
                    "--log",
                    str(self.control_plane_log),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def _prepare_tasks(self) -> list[str]:
        """The seeded tasks, after the ``long_tasks`` (queued first: they must be running
        when the plan's warnings and kills come)."""
        c = self.config
        durations = task_durations(c)
        self.long_task_ids = [f"long-{index:03d}" for index in range(c.long_tasks)]
        tasks = [(task_id, c.long_task_seconds) for task_id in self.long_task_ids]
        tasks += [(f"task-{index:05d}", seconds) for index, seconds in enumerate(durations)]
        self.unsent = [json.dumps({"task_id": task_id, "seconds": seconds}) for task_id, seconds in tasks]
        self.unsent.reverse()  # popped from the end: the first task first
        self.sent = 0
        return [task_id for task_id, _ in tasks]

    def _top_up(self, done: int) -> None:
        """Keep a bounded backlog on the work queue, like a producer submitting work.

        moto's SQS costs O(messages in the queue) per call (it recomputes the queue's
        counters message by message), so queuing thousands of tasks at once would make
        the emulator, not spotguard, the bottleneck. The backlog stays well above what the
        fleet can hold in flight, so workers never starve.
        """
        backlog = max(20, 3 * self.config.instances * self.config.concurrency)
        while self.unsent and self.sent - done < backlog:
            bodies = [self.unsent.pop() for _ in range(min(10, len(self.unsent)))]
            entries = [{"Id": str(i), "MessageBody": body} for i, body in enumerate(bodies)]
            self.sqs.send_message_batch(QueueUrl=self.resources.work_queue_url, Entries=entries)
            self.sent += len(bodies)

    def _start(self, moto: MotoServer) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
        c = self.config
        clients = self._clients(moto.endpoint)
        self.sqs, self.dynamodb = clients["sqs"], clients["dynamodb"]
        max_capacity = (
            c.instances * 3
            + c.spot_warnings
            + c.hard_kills
            + c.rebalances
            + c.health_events
            + c.bootstrap_failures
        )
        self.resources = create_resources(
            fleet=c.fleet,
            desired_capacity=0,
            max_capacity=max_capacity,
            visibility_timeout_seconds=c.visibility_timeout_seconds,
            **clients,
        )
        task_ids = self._prepare_tasks()
        plan = build_plan(c)
        self.aws = AwsStandIn(
            ec2=clients["ec2"],
            autoscaling=clients["autoscaling"],
            events=clients["events"],
            resources=self.resources,
            journal=self.journal,
            log_dir=self.out / "instances",
            agent_environment=self._agent_environment(moto, self.resources),
            ledger_path=self.ledger_path,
            bootstrap_seconds=c.bootstrap_seconds,
            bootstrap_failure_picks=[a.pick for a in plan if a.kind == ChaosKind.BOOTSTRAP_FAILURE],
        )
        self.tail = LedgerTail(self.agent_ledger_path, long_tasks=frozenset(self.long_task_ids))
        self.chaos = ChaosExecutor(
            c,
            plan,
            self.aws,
            self.journal,
            at_work=self.tail.instances_at_work,
            long_task_holders=self.tail.long_task_holders if c.long_tasks else None,
            running=self.tail.running_count if c.aim_at_busiest else None,
        )
        lambda_hosts = self._start_lambda_hosts(moto, self.resources)
        self._top_up(0)
        clients["autoscaling"].set_desired_capacity(
            AutoScalingGroupName=self.resources.asg_name, DesiredCapacity=c.instances
        )
        self.t0 = time.time()
        self.timings["setup_s"] = self.t0 - self.started
        self.progress.message(
            f"spotguard drill ({c.mode}): {c.instances} instances x {c.concurrency} workers, "
            f"{len(task_ids)} tasks, moto at {moto.endpoint}, logs in {self.out}"
        )
        return lambda_hosts, task_ids

    # ------------------------------------------------------------------ run
    def _snapshot(self, now: float, done: int, total: int) -> Snapshot:
        alive = self.aws.alive()
        kinds = [i.kind for i in self._interruptions()]
        return Snapshot(
            mode=self.config.mode,
            elapsed=now - self.t0,
            done=done,
            total=total,
            fleet=len(alive),
            ready=sum(1 for i in alive if i.ready_at is not None and i.agent_alive),
            warnings=kinds.count(ChaosKind.SPOT_WARNING.value),
            kills=kinds.count(ChaosKind.HARD_KILL.value),
            rebalances=kinds.count(ChaosKind.REBALANCE.value),
            by_watchdog=kinds.count(WATCHDOG_KIND),
            replacements=max(0, len(self.aws.instances) - self.aws.initial_count),
        )

    def _interruptions(self) -> list[Interruption]:
        return sorted([*self.aws.interruptions, *self.chaos.interruptions], key=lambda i: i.at)

    def _finished(self, now: float, done: int, total: int) -> bool:
        if done < total or not self.chaos.finished or self.aws.reclaims_pending:
            return False
        # Wait for the watchdog to deal with the instances whose bootstrap hangs (bounded).
        grace = self.config.bootstrap_deadline_seconds + 3 * self.config.watchdog_interval_seconds + 10
        for iid in self.aws.bootstrap_failure_ids:
            instance = self.aws.instances[iid]
            if instance.phase != Phase.GONE and now < instance.launched_at + grace:
                return False
        return True

    def _fleet_records(self) -> dict[str, dict[str, Any]]:
        """The control plane's view of every instance at the end (state, end reason)."""
        records: dict[str, dict[str, Any]] = {}
        pages = self.dynamodb.get_paginator("scan").paginate(TableName=self.resources.fleet_table)
        for page in pages:
            for item in page.get("Items", []):
                plain = {k: _plain(v) for k, v in item.items()}
                record = FleetRecord.from_item(plain)
                records[record.instance_id] = {
                    "state": record.state.value,
                    "bootstrap_status": record.bootstrap_status.value,
                    "end_reason": record.end_reason.value if record.end_reason else None,
                    "ec2_state": record.ec2_state,
                }
        return dict(sorted(records.items()))

    def _clock(self, stop: threading.Event, failures: list[BaseException]) -> None:
        """The time-critical part on its own thread: the plan's actions and EC2's
        deadlines. On a loaded emulator one AWS call of the run loop (the producer, the
        fleet sync) can take seconds; a warning or a reclaim must not wait for it."""
        while not stop.is_set():
            try:
                self.chaos.step(time.time(), self.t0)
                self.aws.take_due(time.time())
            except Exception as error:  # noqa: BLE001 - handed to the run loop, which stops the drill
                failures.append(error)
                return
            stop.wait(TICK_SECONDS)

    def _loop(self, lambda_hosts: list[subprocess.Popen[bytes]], total: int) -> bool:
        """Until every task is done and the plan has played out; True when it timed out."""
        stop = threading.Event()
        failures: list[BaseException] = []
        clock = threading.Thread(target=self._clock, args=(stop, failures), name="drill-clock", daemon=True)
        clock.start()
        try:
            return self._until_done(lambda_hosts, total, failures)
        finally:
            stop.set()
            clock.join(timeout=30)

    def _until_done(
        self, lambda_hosts: list[subprocess.Popen[bytes]], total: int, failures: list[BaseException]
    ) -> bool:
        tail = self.tail
        while True:
            now = time.time()
            done = tail.poll()
            self._top_up(done)
            self.aws.step(now)
            if failures:
                raise RuntimeError("the drill's clock thread failed") from failures[0]
            self.progress.update(self._snapshot(now, done, total))
            for host in lambda_hosts:
                if host.poll() is not None:
                    raise RuntimeError(
                        f"a Lambda host exited ({host.returncode}); see {self.out / 'control-plane.log'}"
                    )
            if self._finished(now, done, total):
                self.ended = time.time()
                self.progress.update(self._snapshot(self.ended, done, total), force=True)
                return False
            if now - self.t0 > self.config.timeout_seconds:
                self.ended = time.time()
                self.progress.update(self._snapshot(self.ended, tail.poll(), total), force=True)
                return True
            time.sleep(TICK_SECONDS)

    def _await_retirements(self, timed_out: bool) -> list[str]:
        """Instances EC2 still runs outside the ASG at the end of the run (must be none).

        An instance replaced early drains and ends once its replacement is in service (or
        at a deadline): one replaced just before the last task finished gets a bounded
        grace to do so; one that is never retired is still counted.
        """
        outside = self.aws.running_outside_asg()
        grace_until = time.time() + (0 if timed_out else RETIREMENT_GRACE_SECONDS)
        while outside and time.time() < grace_until:
            time.sleep(RETIREMENT_POLL_SECONDS)
            self.aws.step(time.time())
            self.aws.take_due(time.time())
            outside = self.aws.running_outside_asg()
        return outside

    def run(self) -> dict[str, Any]:
        c = self.config
        started = self.started = time.time()
        self._prepare_out_dir()
        moto = MotoServer(
            log_path=self.out / "moto.log",
            environment={
                AGENT_LEDGER_ENV: str(self.agent_ledger_path),
                WORK_QUEUE_ENV: work_queue_name(c.fleet),
                LEASE_TABLE_ENV: lease_table_name(c.fleet),
            },
        ).start()
        lambda_hosts: list[subprocess.Popen[bytes]] = []
        try:
            lambda_hosts, task_ids = self._start(moto)
            timed_out = self._loop(lambda_hosts, len(task_ids))
            outside_asg = self._await_retirements(timed_out)
            self.progress.close()
            if timed_out:
                self.progress.message(f"drill timed out after {c.timeout_seconds:.0f} s")
            stopping = time.time()
            self.aws.stop_agents()
            self.timings["stop_agents_s"] = time.time() - stopping
            fleet_records = self._fleet_records()
            dlq = self.sqs.get_queue_attributes(
                QueueUrl=self.resources.work_dlq_url,
                AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
            )["Attributes"]
        finally:
            self.progress.close()
            if hasattr(self, "aws"):
                self.aws.kill_all()
            for host in lambda_hosts:
                _stop_process(host)
            moto.stop()
        completions = Ledger.read(self.agent_ledger_path)
        # The handler's ledger has the detail (checkpoints, exact start and end); the
        # user's code keeps none: then the agents' record is all there is.
        self.ledger = completions if c.workload is not None else Ledger.read(self.ledger_path)
        report = build_report(
            mode=c.mode,
            config=c.to_json(),
            task_ids=task_ids,
            ledger=self.ledger,
            completions=completions,
            journal=self.journal,
            interruptions=self._interruptions(),
            control_plane_log=read_control_plane_log(self.control_plane_log),
            initial_instances=self.aws.initial_count,
            launched_instances=len(self.aws.instances),
            bootstrap_failure_ids=self.aws.bootstrap_failure_ids,
            tasks_in_dlq=sum(int(v) for v in dlq.values()),
            wall_s=time.time() - started,
            drill_s=self.ended - self.t0,
        )
        report["instances_running_outside_asg"] = len(outside_asg)
        report["instances_running_outside_asg_ids"] = outside_asg
        report["fleet_records"] = fleet_records
        report["timings_s"] = {k: round(v, 1) for k, v in self.timings.items()}
        report["timed_out"] = timed_out
        report["events_emitted"] = self.aws.events_emitted
        report.update(fault_counts(self.fault_log_dir))
        report["started_at"] = datetime.fromtimestamp(self.t0, UTC).isoformat()
        (self.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        self.journal.write(self.out / "journal.jsonl")
        self.report = report
        return report

    def draw_timeline(self, path: Path) -> Path:
        from spotguard_tools.drill.timeline import draw_timeline, title_for  # noqa: PLC0415 - matplotlib is heavy

        return draw_timeline(
            path,
            ledger=self.ledger,
            journal=self.journal,
            t0=self.t0,
            end=self.ended,
            title=title_for(self.report),
        )


def fault_counts(directory: Path) -> dict[str, int]:
    """The sum of every process's ``faults-<pid>.json`` (the fault injector's contract)."""
    calls = faults = 0
    for path in sorted(directory.glob("faults-*.json")):
        try:
            counts = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being rewritten at the moment its process died: the last second is lost
        calls += int(counts.get("calls", 0))
        faults += int(counts.get("faults_injected", 0))
    return {"aws_calls_observed": calls, "aws_faults_injected": faults}


def _plain(value: Any) -> Any:
    """A DynamoDB attribute value as plain Python (enough for fleet records)."""
    from boto3.dynamodb.types import TypeDeserializer  # noqa: PLC0415

    return TypeDeserializer().deserialize(value)


def _inherited_environment() -> dict[str, str]:
    """What child processes keep from ours: PATH and friends, never AWS settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SPOTGUARD_", "POWERTOOLS_"))}


def _stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)
