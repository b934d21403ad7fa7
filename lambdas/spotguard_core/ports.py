"""Interfaces the domain core needs from the outside world (kept free of Lambda)."""

from __future__ import annotations

from typing import Protocol


class MetricsSink(Protocol):
    """What the domain records metrics into. Powertools' ``Metrics`` satisfies it; tests and
    the drill can pass any object with this method (e.g. ``RecordingMetrics``)."""

    def add_metric(self, name: str, unit: str, value: float) -> None: ...


class RecordingMetrics:
    """A real in-memory sink (used where no CloudWatch exists: CLI ``explain``, the drill)."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}

    def add_metric(self, name: str, unit: str, value: float) -> None:
        self.values.setdefault(str(name), []).append(float(value))

    def total(self, name: str) -> float:
        return sum(self.values.get(str(name), []))
