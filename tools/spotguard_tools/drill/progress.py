"""The live progress display on stderr: one updating line on a terminal, periodic lines otherwise."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO


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
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if interval is not None else (0.5 if self.tty else 10.0)
        self.enabled = enabled
        self._last = 0.0
        self._width = 0

    @staticmethod
    def render(s: Snapshot) -> str:
        return (
            f"[{s.mode} {s.elapsed:5.0f}s] tasks {s.done}/{s.total}  fleet {s.fleet} ({s.ready} ready)  "
            f"warnings {s.warnings}  kills {s.kills}  rebalances {s.rebalances}  "
            f"watchdog {s.by_watchdog}  replacements {s.replacements}"
        )

    def update(self, snapshot: Snapshot, *, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < self.interval):
            return
        self._last = now
        text = self.render(snapshot)
        if self.tty:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
