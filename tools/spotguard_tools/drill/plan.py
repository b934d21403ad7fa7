"""The chaos plan: which interruptions happen when. Seeded, so a run can be reproduced.

Targets cannot be named in advance (instance ids are assigned by the emulated ASG), so
each action carries a pre-drawn number in [0, 1) that picks, at execution time, one of the
eligible instances in launch order: the same seed gives the same choices for the same fleet.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from spotguard_tools.drill.config import DrillConfig


class ChaosKind(StrEnum):
    SPOT_WARNING = "spot_warning"  # IMDS notice + EventBridge warning; reclaimed at the deadline
    HARD_KILL = "hard_kill"  # SIGKILL + terminate, no notice at all
    REBALANCE = "rebalance"  # IMDS rebalance recommendation + EventBridge event
    HEALTH_EVENT = "health_event"  # AWS Health scheduled change (EventBridge only)
    BOOTSTRAP_FAILURE = "bootstrap_failure"  # the bootstrap never reports ready


@dataclass(frozen=True, slots=True)
class ChaosAction:
    at: float  # seconds after the drill's first task was queued
    kind: ChaosKind
    pick: float  # in [0, 1): which eligible instance (by launch order)


T = TypeVar("T")


def choose(candidates: Sequence[T], pick: float) -> T:
    return candidates[min(len(candidates) - 1, int(pick * len(candidates)))]


def build_plan(config: DrillConfig) -> list[ChaosAction]:
    """Interruptions spread evenly (with seeded jitter) over the chaos window.

    Bootstrap failures are not timed: they are assigned to the first instances that launch
    (their agents are never started), so they are returned with ``at=0``.
    """
    rng = random.Random(config.seed)  # noqa: S311 - a reproducible plan, not a secret
    kinds = (
        [ChaosKind.SPOT_WARNING] * config.spot_warnings
        + [ChaosKind.HARD_KILL] * config.hard_kills
        + [ChaosKind.REBALANCE] * config.rebalances
        + [ChaosKind.HEALTH_EVENT] * config.health_events
    )
    rng.shuffle(kinds)
    actions = [
        ChaosAction(0.0, ChaosKind.BOOTSTRAP_FAILURE, rng.random()) for _ in range(config.bootstrap_failures)
    ]
    if kinds:
        span = max(0.0, config.chaos_end_seconds - config.chaos_start_seconds)
        step = span / len(kinds)
        for index, kind in enumerate(kinds):
            at = config.chaos_start_seconds + step * index + rng.uniform(0, step * 0.8)
            actions.append(ChaosAction(round(at, 2), kind, rng.random()))
    return sorted(actions, key=lambda action: action.at)


def task_durations(config: DrillConfig) -> list[float]:
    """The seeded duration of every task, by task index."""
    rng = random.Random(config.seed * 7919 + 1)  # noqa: S311 - reproducible, not a secret
    durations = []
    for _ in range(config.tasks):
        if rng.random() < config.long_task_fraction:
            durations.append(config.long_task_seconds)
        else:
            durations.append(round(rng.uniform(config.task_min_seconds, config.task_max_seconds), 2))
    return durations
