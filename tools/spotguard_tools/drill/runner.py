"""The drill itself: emulator up, fleet up, tasks in, chaos on, report out.

One loop in this process plays three parts:

- the **AWS event source**: it watches the emulated ASG and EC2 and publishes the events
  AWS would (lifecycle launch, spot warning, rebalance, state changes) with ``PutEvents``
  on the default bus; the fleet's EventBridge rules, built from the same patterns as the
  stack, route them to the signal queue;
- the **EC2 host**: each instance the ASG launches becomes a simulated instance (IMDS
  emulator + real agent process), and an instance that goes away takes its agent with it;
- the **chaos monkey**: the seeded plan's interruptions at their times.

The control plane (real dispatcher and watchdog) runs in its own process
(:mod:`spotguard_tools.drill.control_plane`), like Lambda would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from spotguard_core import contracts
from spotguard_core.contracts import Env, FleetRecord

from spotguard_tools import events as aws_events
from spotguard_tools.drill.config import DrillConfig
from spotguard_tools.drill.instances import Phase, SimulatedInstance
from spotguard_tools.drill.journal import Journal, Mark
from spotguard_tools.drill.ledger import DONE, Ledger
from spotguard_tools.drill.moto import ACCOUNT_ID, DEFAULT_REGION, MotoServer
from spotguard_tools.drill.plan import ChaosAction, ChaosKind, build_plan, choose, task_durations
from spotguard_tools.drill.progress import Progress, Snapshot
from spotguard_tools.drill.report import Interruption, build_report, read_control_plane_log
from spotguard_tools.drill.resources import DrillResources, control_plane_environment, create_resources

ENDING_STATES = contracts.ENDING_EC2_STATES
TICK_SECONDS = 0.2
FLEET_POLL_SECONDS = 0.5
#: The chaos plan starts when the initial fleet works, or this long after the tasks at the latest.
CHAOS_CLOCK_FALLBACK_SECONDS = 90.0


class LedgerTail:
    """Counts completions as the ledger grows, without re-reading it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.done: set[str] = set()

    def poll(self) -> int:
        if not self.path.exists():
            return 0
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        for raw in chunk[:end].splitlines():
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if record.get("ev") == DONE:
                self.done.add(str(record["task"]))
        return len(self.done)


class Drill:
    def __init__(self, config: DrillConfig, progress: Progress | None = None) -> None:
        self.config = config
        self.progress = progress or Progress(enabled=False)
        self.out = config.out_dir / config.mode
        self.journal = Journal()
        self.instances: dict[str, SimulatedInstance] = {}
        self.interruptions: list[Interruption] = []
        self.plan = build_plan(config)
        self.pending: list[ChaosAction] = [a for a in self.plan if a.kind != ChaosKind.BOOTSTRAP_FAILURE]
        self.bootstrap_failure_picks = [a.pick for a in self.plan if a.kind == ChaosKind.BOOTSTRAP_FAILURE]
        self.bootstrap_failure_ids: list[str] = []
        self.initial_count = 0
        self.events_emitted = 0
        self.t0 = 0.0
        self.ended = 0.0
        self.chaos_t0: float | None = None
        self.next_sync = 0.0
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
            for name in ("sqs", "dynamodb", "ec2", "autoscaling", "events")
        }

    def _prepare_out_dir(self) -> None:
        if self.out.exists():
            shutil.rmtree(self.out)
        (self.out / "instances").mkdir(parents=True)
        self.ledger_path = self.out / "ledger.jsonl"
        self.control_plane_log = self.out / "control-plane.jsonl"

    def _agent_environment(self, moto: MotoServer, resources: DrillResources) -> dict[str, str]:
        c = self.config
        return {
            **_inherited_environment(),
            **moto.environment(),
            Env.FLEET_NAME.value: c.fleet,
            Env.ASG_NAME.value: resources.asg_name,
            Env.WORK_QUEUE_URL.value: resources.work_queue_url,
            Env.WORK_DLQ_URL.value: resources.work_dlq_url,
            Env.LEASE_TABLE.value: resources.lease_table,
            Env.FLEET_TABLE.value: resources.fleet_table,
            Env.HANDLER.value: "spotguard_tools.drill.task:handle",
            Env.CONCURRENCY.value: str(c.concurrency),
            Env.VISIBILITY_TIMEOUT_SECONDS.value: str(c.visibility_timeout_seconds),
            Env.IMDS_POLL_SECONDS.value: str(c.imds_poll_seconds),
            Env.DRAIN_MARGIN_SECONDS.value: str(c.drain_margin_seconds),
            Env.MAX_FAILURES.value: "5",
            Env.REQUEUE_ENABLED.value: "true" if c.requeue_enabled else "false",
            Env.REBALANCE_POLICY.value: c.rebalance_policy,
            Env.BOOTSTRAP_DEADLINE_SECONDS.value: str(c.bootstrap_deadline_seconds),
        }

    def _start_control_plane(self, moto: MotoServer, resources: DrillResources) -> subprocess.Popen[bytes]:
        c = self.config
        env = {
            **_inherited_environment(),
            **moto.environment(),
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
                    "spotguard_tools.drill.control_plane",
                    "--signal-queue-url",
                    resources.signal_queue_url,
                    "--signal-queue-arn",
                    resources.signal_queue_arn,
                    "--watchdog-interval",
                    str(c.watchdog_interval_seconds),
                    "--log",
                    str(self.control_plane_log),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def _prepare_tasks(self) -> list[str]:
        durations = task_durations(self.config)
        ids = [f"task-{index:05d}" for index in range(len(durations))]
        self.unsent = [json.dumps({"task_id": ids[i], "seconds": durations[i]}) for i in range(len(ids))]
        self.unsent.reverse()  # popped from the end: task-00000 first
        self.sent = 0
        return ids

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

    # ------------------------------------------------------------------ the AWS event source
    def emit(self, event: dict[str, Any]) -> None:
        self.events.put_events(Entries=[aws_events.to_put_events_entry(event)])
        self.events_emitted += 1

    def _sync_fleet(self, now: float) -> None:
        group = self.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[self.resources.asg_name])
        members = {i["InstanceId"]: i["AvailabilityZone"] for i in group["AutoScalingGroups"][0]["Instances"]}
        new = sorted(set(members) - set(self.instances))
        initial = not self.instances
        failing: set[str] = set()
        if initial:
            self.initial_count = len(new)
            candidates = list(new)
            for pick in self.bootstrap_failure_picks:
                if candidates:
                    chosen = choose(candidates, pick)
                    candidates.remove(chosen)
                    failing.add(chosen)
            self.bootstrap_failure_ids = sorted(failing)
        for instance_id in new:
            instance = SimulatedInstance(
                instance_id,
                availability_zone=members[instance_id],
                launched_at=now,
                bootstrap_seconds=self.config.bootstrap_seconds,
                bootstrap_fails=instance_id in failing,
                log_dir=self.out / "instances",
                initial=initial,
            )
            self.instances[instance_id] = instance
            self.journal.record(
                Mark.LAUNCHED, instance_id, at=now, initial=initial, bootstrap_fails=instance.bootstrap_fails
            )
            when = contracts.utc_from_epoch(now)
            self.emit(aws_events.state_change(instance_id, "pending", time=when))
            self.emit(
                aws_events.lifecycle_action(
                    instance_id,
                    transition="launch",
                    asg_name=self.resources.asg_name,
                    hook_name=contracts.LAUNCH_HOOK_NAME,
                    time=when,
                )
            )
            self.emit(aws_events.state_change(instance_id, "running", time=when))
            if instance.bootstrap_fails:
                interruption = Interruption(instance_id, ChaosKind.BOOTSTRAP_FAILURE.value, now)
                self.interruptions.append(interruption)
        self._sync_states(now)
        # Left the group while still running: detached, its replacement requested early.
        for instance_id, instance in self.instances.items():
            if instance.in_asg and instance_id not in members:
                instance.in_asg = False
                if instance.ec2_state == "running":
                    self.journal.record(Mark.DETACHED, instance_id, at=now)

    def _sync_states(self, now: float) -> None:
        watched = [i for i in self.instances.values() if i.phase != Phase.GONE]
        if not watched:
            return
        states: dict[str, str] = {}
        ids = [i.instance_id for i in watched]
        for start in range(0, len(ids), 100):
            reply = self.ec2.describe_instances(InstanceIds=ids[start : start + 100])
            for reservation in reply["Reservations"]:
                for item in reservation["Instances"]:
                    states[item["InstanceId"]] = item["State"]["Name"]
        for instance in watched:
            state = states.get(instance.instance_id, instance.ec2_state)
            if state != instance.ec2_state:
                self._transition(instance, state)

    def _transition(self, instance: SimulatedInstance, state: str) -> None:
        """An EC2 state change: publish it as EC2 does and, if the instance is gone, take
        its agent with it."""
        previous, instance.ec2_state = instance.ec2_state, state
        if state not in ENDING_STATES:
            return
        if state in ("terminated", "stopped"):
            instance.kill()
        # The time of the change itself, not of the tick: on a loaded machine the AWS calls
        # of a tick can take seconds.
        now = time.time()
        when = contracts.utc_from_epoch(now)
        # moto jumps straight to "terminated"; EC2 passes through "shutting-down" first.
        if state == "terminated" and previous not in ("shutting-down", "terminated"):
            self.emit(aws_events.state_change(instance.instance_id, "shutting-down", time=when))
        self.emit(aws_events.state_change(instance.instance_id, state, time=when))
        if state in ("terminated", "stopped"):
            instance.phase = Phase.GONE
            instance.imds.stop()
            if not instance.terminated_by_drill:
                self.journal.record(Mark.TERMINATED_BY_CONTROL_PLANE, instance.instance_id, at=now)
                self.interruptions.append(Interruption(instance.instance_id, "watchdog", now))
            self.journal.record(Mark.TERMINATED, instance.instance_id, at=now, state=state)

    # ------------------------------------------------------------------ chaos
    def _working(self) -> list[SimulatedInstance]:
        return sorted(
            (i for i in self.instances.values() if i.working), key=lambda i: (i.launched_at, i.instance_id)
        )

    def _terminate(self, instance: SimulatedInstance) -> None:
        """Terminate in EC2 and publish the state changes at once (EC2 sends them within
        seconds; waiting for the next poll would only measure the drill's own lag)."""
        instance.terminated_by_drill = True
        reply = self.ec2.terminate_instances(InstanceIds=[instance.instance_id])
        for change in reply.get("TerminatingInstances", []):
            if change["InstanceId"] == instance.instance_id:
                self._transition(instance, change["CurrentState"]["Name"])

    def _act(self, action: ChaosAction, now: float) -> bool:
        """Run one chaos action; False when no instance is eligible yet (try again later)."""
        now = time.time()  # the action's own time (the tick's may be seconds old on a busy machine)
        working = self._working()
        if not working:
            return False
        target = choose(working, action.pick)
        iid = target.instance_id
        when = contracts.utc_from_epoch(now)
        if action.kind == ChaosKind.SPOT_WARNING:
            target.doomed = True
            deadline = now + self.config.warning_seconds
            target.reclaim_at = deadline
            target.imds.set_spot_action("terminate", at=contracts.utc_from_epoch(deadline))
            self.emit(
                aws_events.spot_interruption_warning(
                    iid, availability_zone=target.availability_zone, time=when
                )
            )
            self.journal.record(Mark.SPOT_WARNING, iid, at=now, deadline=deadline)
        elif action.kind == ChaosKind.HARD_KILL:
            target.doomed = True
            target.kill()
            self.journal.record(Mark.HARD_KILL, iid, at=now)
            self._terminate(target)
        elif action.kind == ChaosKind.REBALANCE:
            target.imds.set_rebalance(at=when)
            self.emit(aws_events.rebalance_recommendation(iid, time=when))
            self.journal.record(Mark.REBALANCE, iid, at=now)
        self.interruptions.append(Interruption(iid, action.kind.value, now))
        return True

    def _reclaim_due(self, now: float) -> None:
        for instance in self.instances.values():
            if instance.reclaim_at is not None and now >= instance.reclaim_at:
                instance.reclaim_at = None
                alive = instance.kill()
                self.journal.record(Mark.RECLAIMED, instance.instance_id, agent_alive=alive)
                if instance.ec2_state not in ENDING_STATES:
                    self._terminate(instance)

    # ------------------------------------------------------------------ run
    def _snapshot(self, now: float, done: int, total: int) -> Snapshot:
        alive = [i for i in self.instances.values() if i.phase != Phase.GONE]
        kinds = [i.kind for i in self.interruptions]
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
            by_watchdog=kinds.count("watchdog"),
            replacements=max(0, len(self.instances) - self.initial_count),
        )

    def _finished(self, now: float, done: int, total: int) -> bool:
        if done < total or self.pending:
            return False
        if any(i.reclaim_at is not None for i in self.instances.values()):
            return False
        # Wait for the watchdog to deal with the instances whose bootstrap hangs (bounded).
        grace = self.config.bootstrap_deadline_seconds + 3 * self.config.watchdog_interval_seconds + 10
        for iid in self.bootstrap_failure_ids:
            instance = self.instances[iid]
            if instance.phase != Phase.GONE and now < instance.launched_at + grace:
                return False
        return True

    def _fleet_records(self) -> dict[str, dict[str, Any]]:
        """The control plane's view of every instance at the end (state, end reason)."""
        table = self.resources.fleet_table
        records: dict[str, dict[str, Any]] = {}
        pages = self.dynamodb.get_paginator("scan").paginate(TableName=table)
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

    def _chaos_clock(self, now: float) -> float | None:
        """Seconds on the chaos plan's clock, which starts once the initial fleet works.

        On a busy machine agents take a while to start; the plan must hit a working fleet,
        not instances still booting. Bounded: it starts at the latest
        ``CHAOS_CLOCK_FALLBACK_SECONDS`` after the tasks.
        """
        if self.chaos_t0 is None:
            healthy = [i for i in self.instances.values() if i.initial and not i.bootstrap_fails]
            if (healthy and all(i.working for i in healthy)) or now - self.t0 > CHAOS_CLOCK_FALLBACK_SECONDS:
                self.chaos_t0 = now
                self.journal.record(Mark.CHAOS_STARTED, "-", at=now)
        return None if self.chaos_t0 is None else now - self.chaos_t0

    def _tick(self, now: float, agent_env: dict[str, str]) -> None:
        if now >= self.next_sync:
            self._sync_fleet(now)
            self.next_sync = now + FLEET_POLL_SECONDS
        for instance in list(self.instances.values()):
            mark = instance.step(now, agent_env, self.ledger_path)
            if mark is not None:
                self.journal.record(Mark(mark), instance.instance_id, at=now)
        clock = self._chaos_clock(now)
        while clock is not None and self.pending and clock >= self.pending[0].at:
            if not self._act(self.pending[0], now):
                break
            self.pending.pop(0)
        self._reclaim_due(now)

    def _start(self, moto: MotoServer) -> tuple[dict[str, str], subprocess.Popen[bytes], list[str]]:
        c = self.config
        clients = self._clients(moto.endpoint)
        self.sqs, self.ec2, self.dynamodb = clients["sqs"], clients["ec2"], clients["dynamodb"]
        self.autoscaling, self.events = clients["autoscaling"], clients["events"]
        max_capacity = c.instances * 3 + c.spot_warnings + c.hard_kills + c.rebalances + c.bootstrap_failures
        self.resources = create_resources(
            fleet=c.fleet,
            desired_capacity=0,
            max_capacity=max_capacity,
            visibility_timeout_seconds=c.visibility_timeout_seconds,
            **clients,
        )
        agent_env = self._agent_environment(moto, self.resources)
        control_plane = self._start_control_plane(moto, self.resources)
        task_ids = self._prepare_tasks()
        self._top_up(0)
        self.autoscaling.set_desired_capacity(
            AutoScalingGroupName=self.resources.asg_name, DesiredCapacity=c.instances
        )
        self.t0 = time.time()
        self.timings["setup_s"] = self.t0 - self.started
        self.progress.message(
            f"spotguard drill ({c.mode}): {c.instances} instances x {c.concurrency} workers, "
            f"{len(task_ids)} tasks, moto at {moto.endpoint}, logs in {self.out}"
        )
        return agent_env, control_plane, task_ids

    def _loop(self, agent_env: dict[str, str], control_plane: subprocess.Popen[bytes], total: int) -> bool:
        """Until every task is done and the plan has played out; True when it timed out."""
        tail = LedgerTail(self.ledger_path)
        while True:
            now = time.time()
            done = tail.poll()
            self._top_up(done)
            self._tick(now, agent_env)
            self.progress.update(self._snapshot(now, done, total))
            if control_plane.poll() is not None:
                raise RuntimeError(
                    f"the control-plane runner exited ({control_plane.returncode}); "
                    f"see {self.out / 'control-plane.log'}"
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

    def run(self) -> dict[str, Any]:
        c = self.config
        started = self.started = time.time()
        self._prepare_out_dir()
        moto = MotoServer(log_path=self.out / "moto.log").start()
        control_plane: subprocess.Popen[bytes] | None = None
        try:
            agent_env, control_plane, task_ids = self._start(moto)
            timed_out = self._loop(agent_env, control_plane, len(task_ids))
            self.progress.close()
            if timed_out:
                self.progress.message(f"drill timed out after {c.timeout_seconds:.0f} s")
            stopping = time.time()
            _stop_all(list(self.instances.values()))
            self.timings["stop_agents_s"] = time.time() - stopping
            fleet_records = self._fleet_records()
            dlq = self.sqs.get_queue_attributes(
                QueueUrl=self.resources.work_dlq_url,
                AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
            )["Attributes"]
        finally:
            for instance in self.instances.values():
                instance.kill()
            if control_plane is not None:
                _stop_process(control_plane)
            moto.stop()
        self.ledger = Ledger.read(self.ledger_path)
        report = build_report(
            mode=c.mode,
            config=c.to_json(),
            task_ids=task_ids,
            ledger=self.ledger,
            journal=self.journal,
            interruptions=self.interruptions,
            control_plane_log=read_control_plane_log(self.control_plane_log),
            initial_instances=self.initial_count,
            launched_instances=len(self.instances),
            bootstrap_failure_ids=self.bootstrap_failure_ids,
            tasks_in_dlq=sum(int(v) for v in dlq.values()),
            wall_s=time.time() - started,
            drill_s=self.ended - self.t0,
        )
        report["fleet_records"] = fleet_records
        report["timings_s"] = {k: round(v, 1) for k, v in self.timings.items()}
        report["timed_out"] = timed_out
        report["events_emitted"] = self.events_emitted
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


def _stop_all(instances: list[SimulatedInstance]) -> None:
    """SIGTERM every agent at once, then wait (one slow agent must not serialise the rest)."""
    import signal  # noqa: PLC0415

    for instance in instances:
        for process in (instance.process, instance.reporter):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
    for instance in instances:
        instance.stop(timeout=3.0)
