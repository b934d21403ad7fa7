"""Settings of one drill run. Time is compressed: seconds here stand for minutes on AWS.

Each field is written once, here: its type, its default and its help. ``spotguard drill``
derives its command-line flags from these fields (:func:`add_arguments`,
:func:`config_from_arguments`); a field without help is an internal knob with no flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spotguard_core.contracts import RebalancePolicy


def cli(help: str, *, flag: str | None = None, choices: tuple[str, ...] | None = None) -> dict[str, Any]:
    """A field's command-line flag: ``--field-name`` unless ``flag`` says otherwise."""
    return {"help": help, "flag": flag, "choices": choices}


@dataclass(frozen=True, slots=True)
class DrillConfig:
    fleet: str = "drill"
    seed: int = field(default=7, metadata=cli("chaos plan, task durations and injected AWS faults"))
    instances: int = field(default=6, metadata=cli("instances the ASG keeps running (desired capacity)"))
    concurrency: int = field(default=2, metadata=cli("tasks the agent of one instance runs at once"))
    tasks: int = field(default=160, metadata=cli("tasks to run"))
    task_min_seconds: float = field(default=1.0, metadata=cli("most tasks take a uniform time from here ..."))
    task_max_seconds: float = field(default=3.0, metadata=cli("... to here (seconds)"))
    #: Some tasks are too long to finish inside the interruption warning: the agent must
    #: release them (spotguard) or they wait for the visibility timeout (baseline).
    long_task_fraction: float = field(default=0.08, metadata=cli("fraction of the tasks that are long"))
    long_task_seconds: float = field(
        default=18.0, metadata=cli("duration of a long task (the fraction's and --long-tasks')")
    )
    #: Two by default, so the demo shows an interrupted long task resumed from its checkpoint.
    long_tasks: int = field(
        default=2,
        metadata=cli(
            "add N long tasks and aim spot warnings and hard kills at instances running them "
            "(exercises checkpoints)",
        ),
    )
    checkpoints: bool = field(
        default=True, metadata=cli("the drill's task handler saves progress with context.checkpoint")
    )
    checkpoint_every_seconds: float = field(
        default=1.0, metadata=cli("seconds of a task's work between two of its checkpoints")
    )
    # ---- chaos plan
    spot_warnings: int = field(
        default=2, metadata=cli("spot interruption warnings (reclaimed at the deadline)")
    )
    hard_kills: int = field(default=2, metadata=cli("instances killed without notice"))
    rebalances: int = field(default=1, metadata=cli("rebalance recommendations"))
    health_events: int = field(
        default=0, metadata=cli("AWS Health scheduled changes (EventBridge only, no IMDS notice)")
    )
    #: The start time of a Health scheduled change, after the event (AWS gives days).
    health_event_lead_seconds: float = 600.0
    bootstrap_failures: int = field(default=1, metadata=cli("instances whose bootstrap never finishes"))
    aim_at_busiest: bool = field(
        default=False, metadata=cli("spot warnings and hard kills take the instances running the most tasks")
    )
    #: Interruptions happen at seeded times inside this window (seconds after the first task).
    chaos_start_seconds: float = field(
        default=8.0, metadata=cli("interruptions start this long after the fleet works ...")
    )
    chaos_end_seconds: float = field(default=40.0, metadata=cli("... and end by here (seconds)"))
    chaos_when_running: int = field(
        default=0,
        metadata=cli(
            "the interruptions' clock waits until every healthy initial instance runs this many "
            "tasks at once (0: one started task is enough)"
        ),
    )
    # ---- compressed AWS timings
    warning_seconds: float = field(default=12.0, metadata=cli("the 2-minute spot warning, compressed"))
    visibility_timeout_seconds: int = field(
        default=30, metadata=cli("work queue visibility timeout", flag="--visibility-timeout")
    )
    bootstrap_seconds: float = 1.0
    #: Generous against a busy machine (agents start slowly under load), short enough that
    #: the watchdog ends the hung instance well inside the drill.
    bootstrap_deadline_seconds: int = field(
        default=30, metadata=cli("bootstrap deadline (the watchdog ends hung instances)")
    )
    heartbeat_stale_seconds: int = field(
        default=20, metadata=cli("agent heartbeat age after which the watchdog acts")
    )
    watchdog_interval_seconds: float = field(
        default=3.0, metadata=cli("the watchdog's schedule (rate(1 minute) on AWS)")
    )
    imds_poll_seconds: float = field(default=0.5, metadata=cli("the agent's IMDS poll interval"))
    drain_margin_seconds: float = 1.0
    dispatcher_concurrency: int = field(
        default=2, metadata=cli("signal-queue batches dispatched at once (Lambda's SQS event source)")
    )
    rebalance_policy: str = field(
        default=RebalancePolicy.REPLACE.value,
        metadata=cli(
            "what a rebalance recommendation does",
            choices=tuple(p.value for p in RebalancePolicy),
        ),
    )
    # ---- AWS faults (every process of the drill: agents and the Lambda host)
    aws_faults: float = field(
        default=0.0, metadata=cli("fraction of AWS calls answered with throttling or a 5xx")
    )
    aws_latency_ms: int = field(default=0, metadata=cli("milliseconds added before every AWS call"))
    # ---- the user's workload instead of the drill's own task handler
    workload: Path | None = field(
        default=None, metadata=cli("run this directory's code on the simulated instances")
    )
    handler: str | None = field(default=None, metadata=cli("python mode: MODULE:FUNCTION inside --workload"))
    command: str | None = field(
        default=None, metadata=cli("command mode: a command line run in --workload per message")
    )
    # ---- mode and limits
    #: False is the baseline: spotguard's requeue off, only the visibility timeout brings
    #: work back (the spot-hopping seed's design). Flags: --baseline, --compare.
    requeue_enabled: bool = True
    timeout_seconds: float = field(
        default=170.0, metadata=cli("hard stop of the whole run; tasks not done are lost", flag="--timeout")
    )
    out_dir: Path = field(default=Path("drill-out"), metadata=cli("logs, ledger, reports"))

    def __post_init__(self) -> None:
        if self.workload is None and (self.handler or self.command):
            raise ValueError("--handler and --command run a --workload DIR: name the directory")
        if self.workload is not None:
            if bool(self.handler) == bool(self.command):
                raise ValueError("--workload needs exactly one of --handler MODULE:FUNCTION or --command CMD")
            if not self.workload.is_dir():
                raise ValueError(f"--workload {self.workload}: not a directory")
            if self.handler and ":" not in self.handler:
                raise ValueError(f"--handler {self.handler!r}: expected MODULE:FUNCTION")
        if not 0.0 <= self.aws_faults < 1.0:
            raise ValueError(f"--aws-faults {self.aws_faults}: a fraction in [0, 1)")

    @property
    def mode(self) -> str:
        return "spotguard" if self.requeue_enabled else "baseline"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        data["workload"] = str(self.workload) if self.workload is not None else None
        data["mode"] = self.mode
        return data


# ---------------------------------------------------------------------- command-line flags
def _flag(spec: dataclasses.Field[Any]) -> str:
    return spec.metadata.get("flag") or "--" + spec.name.replace("_", "-")


def _value_type(annotation: Any) -> Any:
    """``int``, ``float``, ``str``, ``Path``, ``bool``; ``X | None`` is ``X``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        [inner] = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return inner
    return annotation


def _dest(spec: dataclasses.Field[Any]) -> str:
    """Prefixed: a field name like ``command`` must not clash with the CLI's own names."""
    return f"drill_{spec.name}"


def cli_fields() -> list[dataclasses.Field[Any]]:
    return [spec for spec in dataclasses.fields(DrillConfig) if spec.metadata.get("help")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per documented field of :class:`DrillConfig`, default and help from it."""
    hints = typing.get_type_hints(DrillConfig)
    for spec in cli_fields():
        kind = _value_type(hints[spec.name])
        default = spec.default
        shown = "" if default is None else " (default %(default)s)"
        if kind is bool:
            parser.add_argument(
                _flag(spec),
                dest=_dest(spec),
                action=argparse.BooleanOptionalAction,
                default=default,
                help=spec.metadata["help"] + shown,
            )
            continue
        parser.add_argument(
            _flag(spec),
            dest=_dest(spec),
            metavar=None if spec.metadata.get("choices") else spec.name.upper(),
            type=kind,
            default=default,
            choices=spec.metadata.get("choices"),
            help=spec.metadata["help"] + shown,
        )


def config_from_arguments(args: argparse.Namespace, **overrides: Any) -> DrillConfig:
    values = {spec.name: getattr(args, _dest(spec)) for spec in cli_fields()}
    return DrillConfig(**{**values, **overrides})
