"""Settings of one drill run. Time is compressed: seconds here stand for minutes on AWS."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from spotguard_core.contracts import RebalancePolicy


@dataclass(frozen=True, slots=True)
class DrillConfig:
    fleet: str = "drill"
    seed: int = 7
    #: Instances the ASG keeps running (desired capacity).
    instances: int = 6
    #: Tasks the agent of one instance runs at once.
    concurrency: int = 2
    tasks: int = 160
    #: Most tasks take a uniform time in this range (seconds).
    task_min_seconds: float = 1.0
    task_max_seconds: float = 3.0
    #: Some tasks are too long to finish inside the interruption warning: the agent must
    #: release them (spotguard) or they wait for the visibility timeout (baseline).
    long_task_fraction: float = 0.08
    long_task_seconds: float = 18.0
    # ---- chaos plan
    spot_warnings: int = 2
    hard_kills: int = 2
    rebalances: int = 1
    bootstrap_failures: int = 1
    #: Interruptions happen at seeded times inside this window (seconds after the first task).
    chaos_start_seconds: float = 8.0
    chaos_end_seconds: float = 40.0
    # ---- compressed AWS timings
    #: The 2-minute spot warning, compressed.
    warning_seconds: float = 12.0
    visibility_timeout_seconds: int = 30
    bootstrap_seconds: float = 1.0
    #: Generous against a busy machine (agents start slowly under load), short enough that
    #: the watchdog ends the hung instance well inside the drill.
    bootstrap_deadline_seconds: int = 30
    heartbeat_stale_seconds: int = 20
    watchdog_interval_seconds: float = 3.0
    imds_poll_seconds: float = 0.5
    drain_margin_seconds: float = 1.0
    rebalance_policy: str = RebalancePolicy.REPLACE.value
    # ---- mode and limits
    #: False is the baseline: spotguard's requeue off, only the visibility timeout brings
    #: work back (the spot-hopping seed's design).
    requeue_enabled: bool = True
    #: Hard stop of the whole run (seconds); tasks not done by then are lost.
    timeout_seconds: float = 170.0
    out_dir: Path = Path("drill-out")

    @property
    def mode(self) -> str:
        return "spotguard" if self.requeue_enabled else "baseline"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        data["mode"] = self.mode
        return data
