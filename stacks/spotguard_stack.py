"""The spotguard stack: one fleet and its control plane, composed from one construct per concern."""

from __future__ import annotations

from typing import Any

from aws_cdk import Aws, CfnOutput, CfnResource, Environment, Fn, Stack, Tags
from aws_cdk import aws_lambda_event_sources as event_sources
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct
from spotguard_core import contracts
from spotguard_core.contracts import Env

from stacks import permissions
from stacks.agent_bundle import AgentBundle, AgentConfig
from stacks.api import OpsApi
from stacks.common import cfn_lint_ignore
from stacks.events import NotificationBus, Schedules, SignalRules
from stacks.fleet import Fleet, InstanceRole
from stacks.functions import CDK_ROLE_DEPENDENCY_REASON, Functions
from stacks.nag import acknowledge
from stacks.network import Network
from stacks.observability import Observability
from stacks.queues import Queues
from stacks.settings import Settings
from stacks.staging import SpotInterruptionExperiment
from stacks.tables import Tables


def _environment(settings: Settings) -> Environment | None:
    env = settings.environment
    if env.account is None and env.region is None:
        return None  # environment-agnostic template
    return Environment(account=env.account, region=env.region)


def _bool(value: bool) -> str:
    return "true" if value else "false"


class SpotguardStack(Stack):
    def __init__(self, scope: Construct, *, settings: Settings, **kwargs: Any) -> None:
        super().__init__(
            scope,
            settings.stack_name,
            env=_environment(settings),
            description=f"spotguard fleet '{settings.fleet.name}': spot workers that do not lose work",
            **kwargs,
        )
        self.settings = settings
        self._configured_azs = settings.environment.availability_zones
        fleet = settings.fleet.name
        Tags.of(self).add(contracts.FLEET_TAG_KEY, fleet)

        network = Network(self, "Network", settings=settings)
        queues = Queues(self, "Queues", settings=settings)
        tables = Tables(self, "Tables")
        bundle = AgentBundle(self, "AgentBundle", settings=settings, fleet_table_name=tables.fleet.table_name)
        asg_name = contracts.asg_name(fleet)

        agent_config = AgentConfig(
            self,
            "AgentConfig",
            name=bundle.config_parameter_name,
            values=agent_config_values(settings, queues, tables),
        )
        instance_role = InstanceRole(
            self,
            "InstanceRole",
            settings=settings,
            work_queue=queues.work_queue,
            work_dlq=queues.work_dlq,
            leases=tables.leases,
            fleet_table=tables.fleet,
            config_parameter_name=bundle.config_parameter_name,
        )
        fleet_construct = Fleet(
            self,
            "Fleet",
            settings=settings,
            network=network,
            bundle=bundle,
            instance_role=instance_role.role,
            work_queue=queues.work_queue,
        )
        # The agent reads its configuration at install: it must exist before any instance.
        fleet_construct.asg.node.add_dependency(agent_config)

        notifications = NotificationBus(
            self,
            "Notifications",
            settings=settings,
            notify_queue=queues.notify_queue,
            notify_dlq=queues.notify_dlq,
        )
        webhook_secret = None
        if settings.notifications.webhook_url:
            webhook_secret = secretsmanager.Secret(
                self,
                "WebhookSecret",
                description=f"spotguard {fleet}: HMAC-SHA256 key for webhook signatures",
                generate_secret_string=secretsmanager.SecretStringGenerator(
                    exclude_punctuation=True, password_length=64
                ),
            )
            acknowledge(
                webhook_secret,
                "AwsSolutions-SMG4",
                "The webhook signing key is shared with the receiver out of band; automatic rotation "
                "would break every receiver. Rotate by updating the secret and the receivers together.",
            )
        novita_secret = None
        if settings.migration.provider == "novita" and settings.migration.novita_api_key_secret_name:
            novita_secret = secretsmanager.Secret.from_secret_name_v2(
                self, "NovitaApiKey", settings.migration.novita_api_key_secret_name
            )

        environments = FunctionEnvironments(
            settings,
            queues=queues,
            tables=tables,
            bus_name=notifications.bus.event_bus_name,
            launch_template_id=fleet_construct.launch_template.launch_template_id or "",
            subnet_ids=network.vpc.select_subnets(subnet_type=network.subnets.subnet_type).subnet_ids,
            webhook_secret=webhook_secret,
            novita_secret=novita_secret,
        )
        functions = Functions(
            self,
            "Functions",
            settings=settings,
            environment=environments.common,
            extra_environment={
                "Reconciler": environments.reconciler,
                "Api": environments.migration,
                "Notifier": environments.notifier,
            },
        )
        # The api function triggers the reconciler on demand.
        functions.api.function.add_environment(
            Env.RECONCILER_FUNCTION.value, functions.reconciler.function.function_name
        )

        permissions.grant_dispatcher(
            functions.dispatcher.role,
            fleet=fleet,
            leases=tables.leases,
            fleet_table=tables.fleet,
            idempotency=tables.idempotency,
            work_queue=queues.work_queue,
            bus=notifications.bus,
        )
        permissions.grant_watchdog(
            functions.watchdog.role,
            fleet=fleet,
            leases=tables.leases,
            fleet_table=tables.fleet,
            work_queue=queues.work_queue,
            bus=notifications.bus,
        )
        permissions.grant_reconciler(
            functions.reconciler.role,
            fleet=fleet,
            jobs=tables.jobs,
            fleet_table=tables.fleet,
            launch_template_id=fleet_construct.launch_template.launch_template_id or "",
            instance_role=instance_role.role,
            bus=notifications.bus,
            novita_secret=novita_secret,
        )
        permissions.grant_api(
            functions.api.role,
            jobs=tables.jobs,
            fleet_table=tables.fleet,
            reconciler=functions.reconciler.function,
        )
        permissions.grant_notifier(functions.notifier.role, webhook_secret=webhook_secret)

        functions.dispatcher.function.add_event_source(
            event_sources.SqsEventSource(queues.signal_queue, batch_size=10, report_batch_item_failures=True)
        )
        # A webhook delivery can take ~18 s in the worst case (three timed-out attempts):
        # four per batch fit the notifier's timeout; the rest would only be sent back.
        functions.notifier.function.add_event_source(
            event_sources.SqsEventSource(queues.notify_queue, batch_size=4, report_batch_item_failures=True)
        )

        SignalRules(
            self,
            "SignalRules",
            settings=settings,
            signal_queue=queues.signal_queue,
            signal_dlq=queues.signal_dlq,
        )
        Schedules(
            self,
            "Schedules",
            settings=settings,
            watchdog=functions.watchdog.function,
            reconciler=functions.reconciler.function,
        )
        api = OpsApi(self, "OpsApi", settings=settings, handler=functions.api.function)
        observability = Observability(
            self,
            "Observability",
            settings=settings,
            work_queue=queues.work_queue,
            dead_letter_queues=queues.dead_letter_queues,
            functions={name: f.function for name, f in functions.by_name.items()},
            asg_name=fleet_construct.asg.auto_scaling_group_name,
            api_name=api.api.rest_api_name,
        )
        if settings.staging.fis_experiment:
            experiment = SpotInterruptionExperiment(
                self,
                "SpotInterruptionExperiment",
                settings=settings,
                stop_alarm=observability.alarms["WorkDeadLetterQueueNotEmpty"],
            )
            CfnOutput(self, "FisExperimentTemplateId", value=experiment.template.attr_id)

        self._lint_cdk_internals()
        acknowledge(
            self,
            "AwsSolutions-L1",
            "Functions run Python 3.13 to match the public Powertools layer built for python3.13 "
            "(settings.control_plane.powertools_layer_version).",
        )

        outputs = {
            "ApiUrl": api.api.url,
            "WorkQueueUrl": queues.work_queue.queue_url,
            "WorkDeadLetterQueueUrl": queues.work_dlq.queue_url,
            "FleetTableName": tables.fleet.table_name,
            "AutoScalingGroupName": asg_name,
            "NotificationBusName": notifications.bus.event_bus_name,
            "AlarmTopicArn": observability.topic.topic_arn,
            "DashboardName": f"spotguard-{fleet}",
            "AgentBundleSha256": bundle.bundle_sha256,
        }
        if webhook_secret is not None:
            outputs["WebhookSecretArn"] = webhook_secret.secret_arn
        for output_id, value in outputs.items():
            CfnOutput(self, output_id, value=value)

    def _lint_cdk_internals(self) -> None:
        """cfn-lint findings on resources CDK generates itself (the VPC default security
        group restriction provider)."""
        provider = self.node.try_find_child("Custom::VpcRestrictDefaultSGCustomResourceProvider")
        handler = provider.node.try_find_child("Handler") if provider is not None else None
        if isinstance(handler, CfnResource):
            cfn_lint_ignore(handler, {"W3005": CDK_ROLE_DEPENDENCY_REASON})

    @property
    def availability_zones(self) -> list[str]:
        """AZs from settings when given: an environment-specific stack then needs no AZ lookup."""
        return list(self._configured_azs or super().availability_zones)


def agent_config_values(settings: Settings, queues: Queues, tables: Tables) -> dict[str, str]:
    """The agent's configuration (SSM parameter), by ``contracts.Env`` name."""
    return {
        Env.FLEET_NAME: settings.fleet.name,
        Env.REGION: Aws.REGION,
        Env.WORK_QUEUE_URL: queues.work_queue.queue_url,
        Env.WORK_DLQ_URL: queues.work_dlq.queue_url,
        Env.LEASE_TABLE: tables.leases.table_name,
        Env.FLEET_TABLE: tables.fleet.table_name,
        Env.ASG_NAME: contracts.asg_name(settings.fleet.name),
        Env.LAUNCH_HOOK_NAME: contracts.LAUNCH_HOOK_NAME,
        Env.TERMINATE_HOOK_NAME: contracts.TERMINATE_HOOK_NAME,
        Env.HANDLER: settings.fleet.handler,
        Env.CONCURRENCY: str(settings.fleet.concurrency),
        Env.VISIBILITY_TIMEOUT_SECONDS: str(settings.queue.visibility_timeout_seconds),
        Env.IMDS_POLL_SECONDS: str(settings.agent.imds_poll_seconds),
        Env.HEALTH_PORT: str(settings.fleet.health_port),
        Env.BOOTSTRAP_DEADLINE_SECONDS: str(settings.bootstrap.deadline_minutes * 60),
        Env.REBALANCE_POLICY: settings.control_plane.rebalance_policy.value,
        Env.MAX_FAILURES: str(settings.queue.max_failures),
        Env.DRAIN_MARGIN_SECONDS: str(settings.agent.drain_margin_seconds),
    }


class FunctionEnvironments:
    """Environment variables of the functions: common ones plus per-function extras."""

    def __init__(
        self,
        settings: Settings,
        *,
        queues: Queues,
        tables: Tables,
        bus_name: str,
        launch_template_id: str,
        subnet_ids: list[str],
        webhook_secret: secretsmanager.ISecret | None,
        novita_secret: secretsmanager.ISecret | None,
    ) -> None:
        control = settings.control_plane
        self.common = {
            Env.FLEET_NAME.value: settings.fleet.name,
            Env.REGION.value: Aws.REGION,
            Env.ACCOUNT_ID.value: Aws.ACCOUNT_ID,
            Env.WORK_QUEUE_URL.value: queues.work_queue.queue_url,
            Env.WORK_DLQ_URL.value: queues.work_dlq.queue_url,
            Env.SIGNAL_QUEUE_URL.value: queues.signal_queue.queue_url,
            Env.LEASE_TABLE.value: tables.leases.table_name,
            Env.FLEET_TABLE.value: tables.fleet.table_name,
            Env.JOBS_TABLE.value: tables.jobs.table_name,
            Env.IDEMPOTENCY_TABLE.value: tables.idempotency.table_name,
            Env.ASG_NAME.value: contracts.asg_name(settings.fleet.name),
            Env.NOTIFICATION_BUS.value: bus_name,
            Env.REBALANCE_POLICY.value: control.rebalance_policy.value,
            Env.EARLY_REPLACEMENT.value: _bool(control.early_replacement),
            Env.HEARTBEAT_STALE_SECONDS.value: str(control.heartbeat_stale_minutes * 60),
            Env.BOOTSTRAP_DEADLINE_SECONDS.value: str(settings.bootstrap.deadline_minutes * 60),
            Env.MAX_FAILURES.value: str(settings.queue.max_failures),
            # The dispatcher's own switch for source spotguard.test (found by make e2e: without
            # it every staging test event was rejected, "test events are disabled").
            Env.ALLOW_TEST_EVENTS.value: _bool(settings.staging.allow_test_events),
        }
        migration = settings.migration
        self.migration = {
            Env.MIGRATION_ENABLED.value: _bool(migration.enabled),
            Env.MIGRATION_INTERVAL_MINUTES.value: str(migration.interval_minutes),
            Env.MIGRATION_JOB_TIMEOUT_MS.value: str(migration.job_timeout_ms),
            Env.MIGRATION_MAX_CONCURRENT.value: str(migration.max_concurrent),
            Env.MIGRATION_DRY_RUN.value: _bool(migration.dry_run),
            Env.MIGRATION_RETRY_FAILED.value: _bool(migration.retry_failed),
            Env.MIGRATION_LOG_LEVEL.value: migration.log_level,
            Env.MIGRATION_PROVIDER.value: migration.provider,
        }
        self.reconciler = {
            **self.migration,
            Env.LAUNCH_TEMPLATE_ID.value: launch_template_id,
            Env.SUBNET_IDS.value: Fn.join(",", subnet_ids),
            # The seed's log level setting; Powertools spells "warn" as WARNING.
            "POWERTOOLS_LOG_LEVEL": {"warn": "WARNING"}.get(migration.log_level, migration.log_level.upper()),
        }
        if novita_secret is not None:
            self.reconciler[Env.NOVITA_API_KEY_SECRET_ARN.value] = novita_secret.secret_arn
            self.reconciler[Env.NOVITA_API_URL.value] = migration.novita_api_url
        self.notifier: dict[str, str] = {}
        if webhook_secret is not None and settings.notifications.webhook_url:
            self.notifier = {
                Env.WEBHOOK_URL.value: settings.notifications.webhook_url,
                Env.WEBHOOK_SECRET_ARN.value: webhook_secret.secret_arn,
            }
