"""The live progress display on stderr (rich): a progress bar with the fleet's figures on a
terminal, one plain line every ``interval`` seconds otherwise (CI logs, pipes)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress


@dataclass(frozen=True, slots=True)
class Snapshot:
    mode: str
    elapsed: float
    done: int
    total: int
    fleet: int
    ready: int
    warnings: int
    kills: int
    rebalances: int
    by_watchdog: int
    replacements: int


class Progress:
    def __init__(
        self, stream: TextIO | None = None, *, interval: float | None = None, enabled: bool = True
    ) -> None:
        self.console = Console(file=stream or sys.stderr, highlight=False)
        self.live = self.console.is_terminal
        self.interval = interval if interval is not None else (0.5 if self.live else 10.0)
        self.enabled = enabled
        self._last = 0.0
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None

    @staticmethod
    def figures(s: Snapshot) -> str:
        return (
            f"fleet {s.fleet} ({s.ready} ready)  warnings {s.warnings}  kills {s.kills}  "
            f"rebalances {s.rebalances}  watchdog {s.by_watchdog}  replacements {s.replacements}"
        )

    @classmethod
    def render(cls, s: Snapshot) -> str:
        return f"[{s.mode} {s.elapsed:5.0f}s] tasks {s.done}/{s.total}  {cls.figures(s)}"

    def update(self, snapshot: Snapshot, *, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < self.interval):
            return
        self._last = now
        if not self.live:
            self.console.print(self.render(snapshot), markup=False, soft_wrap=True)
            return
        if self._bar is None:
            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[figures]}"),
                console=self.console,
                refresh_per_second=4,
            )
            self._bar.start()
            self._task = self._bar.add_task(snapshot.mode, total=snapshot.total, figures="")
        assert self._task is not None
        self._bar.update(
            self._task, completed=snapshot.done, total=snapshot.total, figures=self.figures(snapshot)
        )

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, markup=False, soft_wrap=True)

    def close(self) -> None:
        """End this run's display (the next run of the same object starts a new one)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            self._task = None
