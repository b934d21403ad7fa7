"""EventBridge: interruption signal rules and schedules (the notification bus is in
``notifications``).

Signal rules use ``contracts.event_patterns`` verbatim (the same patterns the drill and
``spotguard explain`` use) and deliver to the signal queue; events EventBridge cannot
deliver go to the signal DLQ. The queue policy that CDK adds allows
``events.amazonaws.com`` only for these rules (``aws:SourceArn``).
"""

from __future__ import annotations

from typing import Any

from aws_cdk import Duration
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sqs as sqs
from constructs import Construct
from spotguard_core import contracts

from spotguard_cdk.settings import Settings


def event_pattern(pattern: dict[str, Any]) -> events.EventPattern:
    """A contracts pattern as an L2 EventPattern (renders back to the same JSON)."""
    known = {"source", "detail-type", "detail"}
    unknown = set(pattern) - known
    if unknown:
        raise ValueError(f"pattern keys not mapped to EventPattern: {sorted(unknown)}")
    return events.EventPattern(
        source=pattern.get("source"),
        detail_type=pattern.get("detail-type"),
        detail=pattern.get("detail"),
    )


def _rule_id(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("-"))


class SignalRules(Construct):
    """Default-bus rules for every interruption signal kind -> signal queue."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: Settings,
        signal_queue: sqs.IQueue,
        signal_dlq: sqs.IQueue,
    ) -> None:
        super().__init__(scope, construct_id)
        patterns = contracts.event_patterns(
            allow_test_events=settings.staging.allow_test_events,
            asg_name=contracts.asg_name(settings.fleet.name),
        )
        self.rules: dict[str, events.Rule] = {}
        for name, pattern in patterns.items():
            rule = events.Rule(
                self,
                _rule_id(name),
                description=f"spotguard {settings.fleet.name}: {name} signals to the signal queue",
                event_pattern=event_pattern(pattern),
            )
            rule.add_target(
                targets.SqsQueue(
                    signal_queue,
                    dead_letter_queue=signal_dlq,
                    retry_attempts=185,
                    max_event_age=Duration.hours(24),
                )
            )
            self.rules[name] = rule


class Schedules(Construct):
    """watchdog every minute; reconciler every ``migration.interval_minutes`` when enabled."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: Settings,
        watchdog: lambda_.IFunction,
        reconciler: lambda_.IFunction,
    ) -> None:
        super().__init__(scope, construct_id)
        self.watchdog = events.Rule(
            self,
            "Watchdog",
            description="spotguard watchdog sweep",
            schedule=events.Schedule.rate(Duration.minutes(1)),
        )
        self.watchdog.add_target(targets.LambdaFunction(watchdog, retry_attempts=0))
        self.reconciler = events.Rule(
            self,
            "Reconciler",
            description="spotguard migration/reconcile job",
            schedule=events.Schedule.rate(Duration.minutes(settings.migration.interval_minutes)),
            enabled=settings.migration.enabled,
        )
        self.reconciler.add_target(
            targets.LambdaFunction(
                reconciler,
                event=events.RuleTargetInput.from_object({"source": "schedule", "trigger": "scheduled"}),
                retry_attempts=0,
            )
        )
