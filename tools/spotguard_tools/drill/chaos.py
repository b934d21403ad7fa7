"""The chaos executor: plays the seeded plan against the fleet through the AWS stand-in.

Its own state is the plan still to play and the plan's clock, which starts once the
initial fleet works (on a busy machine agents start slowly; the plan must hit a working
fleet, not instances still booting). What an interruption *does* (IMDS notices, events,
terminations) is the stand-in's business: the executor only says which and when.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence, Set

from spotguard_tools.drill.aws_standin import AwsStandIn
from spotguard_tools.drill.config import DrillConfig
from spotguard_tools.drill.constants import CHAOS_CLOCK_FALLBACK_SECONDS
from spotguard_tools.drill.drill_report import Interruption
from spotguard_tools.drill.instances import SimulatedInstance
from spotguard_tools.drill.journal import Journal, Mark
from spotguard_tools.drill.plan import ChaosAction, ChaosKind, choose

#: A set of instance ids the run loop knows from the ledger: those that have started a
#: task (their agent takes work), those running one of the drill's long tasks.
InstanceIds = Callable[[], Set[str]]
#: How many tasks an instance runs now (from the ledger).
RunningCount = Callable[[str], int]

#: Kinds that take the instance away: aimed at instances running long tasks when asked.
_TAKING = frozenset({ChaosKind.SPOT_WARNING, ChaosKind.HARD_KILL})


class ChaosExecutor:
    def __init__(
        self,
        config: DrillConfig,
        plan: Sequence[ChaosAction],
        aws: AwsStandIn,
        journal: Journal,
        *,
        at_work: InstanceIds,
        long_task_holders: InstanceIds | None = None,
        running: RunningCount | None = None,
    ) -> None:
        self.config = config
        self.aws = aws
        self.journal = journal
        self.at_work = at_work
        self.long_task_holders = long_task_holders
        #: Given: warnings and kills take the busiest instances (the benchmark's plan, so
        #: that enough in-flight work is cut short for a p99 to mean something).
        self.running = running
        #: Timed actions still to play; bootstrap failures are the stand-in's (at launch).
        self.pending: list[ChaosAction] = [a for a in plan if a.kind != ChaosKind.BOOTSTRAP_FAILURE]
        self.interruptions: list[Interruption] = []
        self.started_at: float | None = None

    @property
    def finished(self) -> bool:
        return not self.pending

    def clock(self, now: float, tasks_queued_at: float) -> float | None:
        """Seconds on the plan's clock; None until the initial fleet works, every healthy
        instance's agent running tasks (``chaos_when_running`` of them at once when set;
        bounded: ``CHAOS_CLOCK_FALLBACK_SECONDS`` after the tasks at the latest)."""
        if self.started_at is None:
            healthy = [i for i in self.aws.instances.values() if i.initial and not i.bootstrap_fails]
            at_work = self.at_work()
            working = healthy and all(i.working and i.instance_id in at_work for i in healthy)
            loaded = self.config.chaos_when_running
            if working and loaded and self.running is not None:
                # A fleet at work on a starved machine may still hold one task per instance:
                # wait until it is loaded, so the plan cuts enough work short.
                working = all(self.running(i.instance_id) >= loaded for i in healthy)
            if working or now - tasks_queued_at > CHAOS_CLOCK_FALLBACK_SECONDS:
                self.started_at = now
                self.journal.record(Mark.CHAOS_STARTED, "-", at=now)
        return None if self.started_at is None else now - self.started_at

    def step(self, now: float, tasks_queued_at: float) -> None:
        """Run every action that is due (one that finds no eligible instance waits)."""
        clock = self.clock(now, tasks_queued_at)
        while clock is not None and self.pending and clock >= self.pending[0].at:
            if not self._act(self.pending[0]):
                break
            self.pending.pop(0)

    def _target(self, action: ChaosAction) -> SimulatedInstance | None:
        working = self.aws.working()
        if not working:
            return None
        if action.kind in _TAKING and self.long_task_holders is not None:
            holders = self.long_task_holders()
            aimed = [i for i in working if i.instance_id in holders]
            if aimed:
                return choose(aimed, action.pick)
        if action.kind in _TAKING and self.running is not None:
            count = self.running
            busiest = max(count(i.instance_id) for i in working)
            return choose([i for i in working if count(i.instance_id) == busiest], action.pick)
        return choose(working, action.pick)

    def _act(self, action: ChaosAction) -> bool:
        """Run one action; False when no instance is eligible yet (try again later)."""
        target = self._target(action)
        if target is None:
            return False
        at = time.time()  # the action's own time (the tick's may be seconds old on a busy machine)
        if action.kind == ChaosKind.SPOT_WARNING:
            observable = self.aws.warn_spot(target, lead_seconds=self.config.warning_seconds)
        elif action.kind == ChaosKind.HARD_KILL:
            observable = self.aws.hard_kill(target)
        elif action.kind == ChaosKind.REBALANCE:
            observable = self.aws.recommend_rebalance(target)
        elif action.kind == ChaosKind.HEALTH_EVENT:
            observable = self.aws.schedule_health_change(
                target, start_in_seconds=self.config.health_event_lead_seconds
            )
        else:
            raise ValueError(f"not a timed chaos action: {action.kind}")
        self.interruptions.append(Interruption(target.instance_id, action.kind.value, at, observable))
        return True
