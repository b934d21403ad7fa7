"""The drill's stand-in for EC2 and EventBridge's AWS sources.

moto emulates the APIs (the ASG launches members, ``TerminateInstances`` terminates) but
publishes no events and runs no machines. This object does both, as AWS would:

- **the EC2 host**: each instance the emulated ASG launches becomes a simulated instance
  (IMDS emulator + real agent process, :mod:`spotguard_tools.drill.instances`); an instance
  that goes away takes its agent with it; a spot instance is taken at its warning's deadline;
- **the event source**: it publishes what EC2 and Auto Scaling publish (state changes,
  lifecycle launch, spot warning, rebalance recommendation, AWS Health scheduled change)
  with ``PutEvents`` on the default bus; the fleet's rules, built from the same patterns as
  the stack, route them to the signal queue.

The chaos executor asks it for interruptions; the run loop steps it. It knows nothing of
either.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from spotguard_core import contracts

from spotguard_tools import events as aws_events
from spotguard_tools.drill.constants import ENDING_STATES, FLEET_POLL_SECONDS, GONE_STATES, WATCHDOG_KIND
from spotguard_tools.drill.drill_report import Interruption
from spotguard_tools.drill.instances import Phase, SimulatedInstance
from spotguard_tools.drill.journal import Journal, Mark
from spotguard_tools.drill.plan import ChaosKind, choose
from spotguard_tools.drill.resources import DrillResources


class AwsStandIn:
    def __init__(
        self,
        *,
        ec2: Any,
        autoscaling: Any,
        events: Any,
        resources: DrillResources,
        journal: Journal,
        log_dir: Path,
        agent_environment: dict[str, str],
        ledger_path: Path,
        bootstrap_seconds: float,
        bootstrap_failure_picks: Sequence[float] = (),
    ) -> None:
        self.ec2 = ec2
        self.autoscaling = autoscaling
        self.events = events
        self.resources = resources
        self.journal = journal
        self.log_dir = log_dir
        self.agent_environment = agent_environment
        self.ledger_path = ledger_path
        self.bootstrap_seconds = bootstrap_seconds
        self.bootstrap_failure_picks = list(bootstrap_failure_picks)
        self.instances: dict[str, SimulatedInstance] = {}
        #: What happened to instances without the chaos plan asking (bootstrap failures,
        #: terminations by the control plane).
        self.interruptions: list[Interruption] = []
        self.bootstrap_failure_ids: list[str] = []
        self.initial_count = 0
        self.events_emitted = 0
        self._next_sync = 0.0
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ the event source
    def emit(self, event: dict[str, Any]) -> float:
        """Publish one event on the default bus; returns when it was sent (the moment it can
        be observed: the call delivers it to the signal queue)."""
        sent = time.time()
        self.events.put_events(Entries=[aws_events.to_put_events_entry(event)])
        with self._lock:
            self.events_emitted += 1
        return sent

    # ------------------------------------------------------------------ the run loop's view
    def step(self, now: float) -> None:
        """Follow the ASG and advance every simulated bootstrap (the run loop's thread)."""
        if now >= self._next_sync:
            self._sync_fleet(now)
            self._next_sync = now + FLEET_POLL_SECONDS
        for instance in self._all():
            mark = instance.step(now, self.agent_environment, self.ledger_path)
            if mark is not None:
                self.journal.record(Mark(mark), instance.instance_id, at=now)

    def take_due(self, now: float) -> None:
        """Take the instances whose spot deadline or Health start time has come. Called
        from the drill's clock thread, so a slow emulator call elsewhere (the producer, the
        fleet sync) never makes EC2 late."""
        for instance in self._all():
            if instance.retire_at is not None and now >= instance.retire_at:
                instance.retire_at = None
                if instance.ec2_state not in ENDING_STATES:
                    self.journal.record(Mark.RETIRED, instance.instance_id, at=now)
                    instance.kill()
                    self.terminate(instance)
            if instance.reclaim_at is not None and now >= instance.reclaim_at:
                instance.reclaim_at = None
                alive = instance.kill()
                self.journal.record(Mark.RECLAIMED, instance.instance_id, agent_alive=alive)
                if instance.ec2_state not in ENDING_STATES:
                    self.terminate(instance)

    def _all(self) -> list[SimulatedInstance]:
        """A copy: the run loop's thread adds instances while the clock thread reads."""
        with self._lock:
            return list(self.instances.values())

    def working(self) -> list[SimulatedInstance]:
        """Instances whose agent takes work and that no interruption is under way for."""
        return sorted((i for i in self._all() if i.working), key=lambda i: (i.launched_at, i.instance_id))

    def alive(self) -> list[SimulatedInstance]:
        return [i for i in self._all() if i.phase != Phase.GONE]

    @property
    def reclaims_pending(self) -> bool:
        return any(i.reclaim_at is not None for i in self._all())

    def running_outside_asg(self) -> list[str]:
        """Instances EC2 runs that are no members of the group (detached, never ended)."""
        group = self._group_members()
        ids = [i.instance_id for i in self._all()]
        running = []
        for start in range(0, len(ids), 100):
            reply = self.ec2.describe_instances(InstanceIds=ids[start : start + 100])
            for reservation in reply["Reservations"]:
                for item in reservation["Instances"]:
                    if item["State"]["Name"] not in ENDING_STATES and item["InstanceId"] not in group:
                        running.append(str(item["InstanceId"]))
        return sorted(running)

    # ------------------------------------------------------------------ what AWS does to instances
    def warn_spot(self, instance: SimulatedInstance, *, lead_seconds: float) -> float:
        """The spot interruption warning: IMDS notice and the EventBridge event; the
        instance is taken at the deadline. Returns when the warning was observable."""
        now = time.time()
        instance.doomed = True
        deadline = now + lead_seconds
        instance.reclaim_at = deadline
        instance.imds.set_spot_action("terminate", at=contracts.utc_from_epoch(deadline))
        observable = self.emit(
            aws_events.spot_interruption_warning(
                instance.instance_id,
                availability_zone=instance.availability_zone,
                time=contracts.utc_from_epoch(now),
            )
        )
        self.journal.record(Mark.SPOT_WARNING, instance.instance_id, at=now, deadline=deadline)
        return min(now, observable)

    def hard_kill(self, instance: SimulatedInstance) -> float:
        """The machine is gone without notice; returns when its state change was published
        (the first moment anything outside the instance can know)."""
        now = time.time()
        instance.doomed = True
        instance.kill()
        self.journal.record(Mark.HARD_KILL, instance.instance_id, at=now)
        return self.terminate(instance)

    def recommend_rebalance(self, instance: SimulatedInstance) -> float:
        now = time.time()
        when = contracts.utc_from_epoch(now)
        instance.imds.set_rebalance(at=when)
        self.emit(aws_events.rebalance_recommendation(instance.instance_id, time=when))
        self.journal.record(Mark.REBALANCE, instance.instance_id, at=now)
        return now

    def schedule_health_change(self, instance: SimulatedInstance, *, start_in_seconds: float) -> float:
        """An AWS Health scheduled change (an instance retirement) for this instance.
        EventBridge is its only channel: nothing appears in the instance's IMDS. EC2 retires
        (terminates) the instance at the start time if it still runs then."""
        now = time.time()
        when = contracts.utc_from_epoch(now)
        observable = self.emit(
            aws_events.health_scheduled_change(
                [instance.instance_id], start_time=when + timedelta(seconds=start_in_seconds), time=when
            )
        )
        instance.retire_at = now + start_in_seconds
        self.journal.record(Mark.HEALTH_EVENT, instance.instance_id, at=now, start_in=start_in_seconds)
        return observable

    def terminate(self, instance: SimulatedInstance) -> float:
        """Terminate in EC2 and publish the state changes at once (EC2 sends them within
        seconds; waiting for the next poll would only measure the drill's own lag).
        Returns when the first state change was published."""
        instance.terminated_by_drill = True
        reply = self.ec2.terminate_instances(InstanceIds=[instance.instance_id])
        published = time.time()
        for change in reply.get("TerminatingInstances", []):
            if change["InstanceId"] == instance.instance_id:
                published = self._transition(instance, change["CurrentState"]["Name"]) or published
        return published

    def stop_agents(self) -> None:
        """End of the drill: SIGTERM every agent at once, then wait (one slow agent must
        not serialise the rest)."""
        instances = self._all()
        for instance in instances:
            instance.terminate_processes()
        for instance in instances:
            instance.stop(timeout=3.0)

    def kill_all(self) -> None:
        for instance in self._all():
            instance.kill()
            instance.imds.stop()

    # ------------------------------------------------------------------ following EC2
    def _group_members(self) -> dict[str, str]:
        group = self.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[self.resources.asg_name])
        return {i["InstanceId"]: i["AvailabilityZone"] for i in group["AutoScalingGroups"][0]["Instances"]}

    def _sync_fleet(self, now: float) -> None:
        members = self._group_members()
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
            self._launch(
                instance_id, members[instance_id], now, initial=initial, fails=instance_id in failing
            )
        self._sync_states()
        # Left the group while still running: detached, its replacement requested early.
        for instance in self._all():
            instance_id = instance.instance_id
            if instance.in_asg and instance_id not in members:
                instance.in_asg = False
                if instance.ec2_state == "running":
                    self.journal.record(Mark.DETACHED, instance_id, at=now)

    def _launch(self, instance_id: str, zone: str, now: float, *, initial: bool, fails: bool) -> None:
        instance = SimulatedInstance(
            instance_id,
            availability_zone=zone,
            launched_at=now,
            bootstrap_seconds=self.bootstrap_seconds,
            bootstrap_fails=fails,
            log_dir=self.log_dir,
            initial=initial,
        )
        with self._lock:
            self.instances[instance_id] = instance
        self.journal.record(Mark.LAUNCHED, instance_id, at=now, initial=initial, bootstrap_fails=fails)
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
        if fails:
            self.interruptions.append(Interruption(instance_id, ChaosKind.BOOTSTRAP_FAILURE.value, now))

    def _sync_states(self) -> None:
        watched = self.alive()
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

    def _transition(self, instance: SimulatedInstance, state: str) -> float | None:
        """An EC2 state change: publish it as EC2 does and, if the instance is gone, take
        its agent with it. Returns when the first event was published (None: no event)."""
        with self._lock:  # the clock thread and the fleet sync may both see the change
            previous = instance.ec2_state
            # A state read before a termination the other thread already published must
            # not take the instance back (EC2 states only move forward).
            going_back = previous in ENDING_STATES and state not in ENDING_STATES
            if previous == state or previous in GONE_STATES or going_back:
                return None
            instance.ec2_state = state
        if state not in ENDING_STATES:
            return None
        if state in GONE_STATES:
            instance.kill()
        # The time of the change itself, not of the tick: on a loaded machine the AWS calls
        # of a tick can take seconds.
        now = time.time()
        when = contracts.utc_from_epoch(now)
        # moto jumps straight to "terminated"; EC2 passes through "shutting-down" first.
        first: float | None = None
        if state == "terminated" and previous not in ("shutting-down", "terminated"):
            first = self.emit(aws_events.state_change(instance.instance_id, "shutting-down", time=when))
        published = self.emit(aws_events.state_change(instance.instance_id, state, time=when))
        if state in GONE_STATES:
            instance.phase = Phase.GONE
            instance.imds.stop()
            if not instance.terminated_by_drill:
                self.journal.record(Mark.TERMINATED_BY_CONTROL_PLANE, instance.instance_id, at=now)
                self.interruptions.append(Interruption(instance.instance_id, WATCHDOG_KIND, now, published))
            self.journal.record(Mark.TERMINATED, instance.instance_id, at=now, state=state)
        return first if first is not None else published
