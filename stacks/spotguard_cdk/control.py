"""The control plane of one fleet: dispatcher, watchdog and reconciler with their grants,
the signal queue and rules that feed the dispatcher, and the schedules.

One control plane per fleet (not one per stack serving many fleets by tag): each role
reaches only its own fleet's tables, queue, ASG and tag, so a bug in one fleet's lookup
cannot act on another fleet's instances; each fleet keeps its own policies (rebalance,
heartbeat, migration). Idle it costs little (see docs/infrastructure.md, "Idle cost").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypedDict

from aws_cdk import Duration
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_events as events
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda_destinations as destinations
from aws_cdk import aws_lambda_event_sources as event_sources
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_sqs as sqs
from constructs import Construct
from spotguard_core.contracts import Env

from spotguard_cdk import permissions
from spotguard_cdk.events import Schedules, SignalRules
from spotguard_cdk.functions import ControlPlaneFunction, FunctionRuntime
from spotguard_cdk.nag import acknowledge
from spotguard_cdk.queues import DLQ_RETENTION, consumer_queue, secure_queue
from spotguard_cdk.settings import Settings
from spotguard_cdk.tables import Tables

DISPATCHER_TIMEOUT_SECONDS = 60
WATCHDOG_TIMEOUT_SECONDS = 55


@dataclass(frozen=True)
class FunctionInputs:
    """What a fleet's control-plane functions are built from (``ControlPlane``, ``OpsApi``)."""

    settings: Settings
    #: Code, layer, log retention and concurrency shared by the fleet's functions.
    runtime: FunctionRuntime
    #: The function environment (``runtime_env.control_plane_env``), before per-function additions.
    environment: Mapping[str, str]
    tables: Tables

    def function(
        self,
        scope: Construct,
        construct_id: str,
        module: str,
        description: str,
        *,
        timeout_seconds: int,
        environment: Mapping[str, str] | None = None,
        memory_mb: int = 512,
        reserved_concurrency: int | None = None,
    ) -> ControlPlaneFunction:
        """The function of ``spotguard_functions.<module>`` on the shared runtime, with the fleet's
        environment plus ``environment``."""
        return ControlPlaneFunction(
            scope,
            construct_id,
            runtime=self.runtime,
            module=module,
            description=description,
            timeout_seconds=timeout_seconds,
            environment={**self.environment, **(environment or {})},
            memory_mb=memory_mb,
            reserved_concurrency=reserved_concurrency,
        )


class _GrantScope(TypedDict):
    """What every control-plane grant is pinned to: the fleet's tag, its fleet table, its bus."""

    fleet: str
    fleet_table: dynamodb.ITable
    bus: events.IEventBus


class ControlPlane(Construct):
    """Signals in, decisions out: everything that acts on the fleet's instances."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        inputs: FunctionInputs,
        reconciler_environment: Mapping[str, str],
        work_queue: sqs.IQueue,
        bus: events.IEventBus,
        launch_template_id: str,
        instance_role: iam.IRole,
        novita_secret: secretsmanager.ISecret | None,
    ) -> None:
        super().__init__(scope, construct_id)
        settings, tables = inputs.settings, inputs.tables
        scope_of_grants = _GrantScope(fleet=settings.fleet.name, fleet_table=tables.fleet, bus=bus)
        self.signal_queue, self.signal_dlq = consumer_queue(
            self, "Signal", consumer_timeout_seconds=DISPATCHER_TIMEOUT_SECONDS
        )

        self.dispatcher = inputs.function(
            self,
            "Dispatcher",
            "dispatcher",
            "Normalises interruption signals and requeues work",
            timeout_seconds=DISPATCHER_TIMEOUT_SECONDS,
            environment={Env.SIGNAL_QUEUE_URL.value: self.signal_queue.queue_url},
        )
        permissions.grant_dispatcher(
            self.dispatcher.role,
            leases=tables.leases,
            idempotency=tables.idempotency,
            work_queue=work_queue,
            **scope_of_grants,
        )
        self.dispatcher.function.add_event_source(
            event_sources.SqsEventSource(
                self.signal_queue,
                batch_size=10,
                report_batch_item_failures=True,
                # Below the reserved concurrency: the poller never drives the function into
                # throttling (throttled batches would come back and count toward the DLQ).
                max_concurrency=max(2, min(settings.control_plane.reserved_concurrency, 1000)),
            )
        )
        self.rules = SignalRules(
            self, "SignalRules", settings=settings, signal_queue=self.signal_queue, signal_dlq=self.signal_dlq
        )

        self.watchdog = inputs.function(
            self,
            "Watchdog",
            "watchdog",
            "Ends instances past their bootstrap or heartbeat deadline",
            timeout_seconds=WATCHDOG_TIMEOUT_SECONDS,
        )
        permissions.grant_watchdog(
            self.watchdog.role, leases=tables.leases, work_queue=work_queue, **scope_of_grants
        )

        self.reconciler = inputs.function(
            self,
            "Reconciler",
            "reconciler",
            "Migrates or replaces spot-reclaimed instances",
            # Stop at the job timeout plus a margin; Lambda's own limit is 15 minutes.
            timeout_seconds=min(settings.migration.job_timeout_ms // 1000 + 60, 900),
            memory_mb=1024,
            environment=reconciler_environment,
            # One reconciler at a time (scheduled or triggered through the API).
            reserved_concurrency=1,
        )
        permissions.grant_reconciler(
            self.reconciler.role,
            jobs=tables.jobs,
            launch_template_id=launch_template_id,
            instance_role=instance_role,
            novita_secret=novita_secret,
            instance_types=[*settings.fleet.instance_types, *settings.fleet.fallback_instance_types],
            **scope_of_grants,
        )
        # Asynchronous invocations (schedules, API trigger), on purpose: the watchdog is not
        # retried (the next sweep is a minute away), a failed reconciler job is retried once;
        # what still fails lands in the fleet's async-failure queue (alarmed).
        self.async_failures = secure_queue(self, "AsyncFailureQueue", retention_period=DLQ_RETENTION)
        acknowledge(
            self.async_failures,
            "AwsSolutions-SQS3",
            "This queue is itself a dead-letter destination (on-failure destination of the "
            "watchdog's and reconciler's asynchronous invocations); it is alarmed when not empty.",
        )
        self.watchdog.function.configure_async_invoke(
            retry_attempts=0,
            max_event_age=Duration.minutes(5),
            on_failure=destinations.SqsDestination(self.async_failures),
        )
        self.reconciler.function.configure_async_invoke(
            retry_attempts=1,
            max_event_age=Duration.hours(1),
            on_failure=destinations.SqsDestination(self.async_failures),
        )
        self.schedules = Schedules(
            self,
            "Schedules",
            settings=settings,
            watchdog=self.watchdog.function,
            reconciler=self.reconciler.function,
        )

    @property
    def functions(self) -> dict[str, ControlPlaneFunction]:
        """The control plane's functions by name (alarms, dashboard)."""
        return {"Dispatcher": self.dispatcher, "Watchdog": self.watchdog, "Reconciler": self.reconciler}
