"""``SpotWorkerFleet``: a queue-driven worker fleet on EC2 Spot that does not lose work.

    from spotguard_cdk import SpotWorkerFleet, Workload

    SpotWorkerFleet(stack, "RenderFleet",
        queue=renders,                                        # your sqs.IQueue
        workload=Workload.python("./worker", handler="tasks:handle"),
        vpc=vpc,                                              # optional ec2.IVpc
        instance_types=["c6i.large", "c5.large"], min_capacity=0, max_capacity=20)

The props are the settings of ``spotguard_cdk.settings.Settings`` (the model the ready app
reads from cdk.json): a handful of common ones as keyword arguments, every other one through
``settings=Settings(...)``; both are validated at construction with the same messages.

Each fleet carries its own control plane (see ``spotguard_cdk.control``): several fleets in
one stack share nothing but the stack, and never act on each other's instances.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from aws_cdk import Aws, CfnOutput, CfnResource, Fn, Stack, Tags
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_sqs as sqs
from constructs import Construct
from spotguard_core import contracts, runtime_env

from spotguard_cdk.agent_bundle import AgentBundle, AgentConfigParameter
from spotguard_cdk.api import OpsApi
from spotguard_cdk.common import cfn_lint_ignore
from spotguard_cdk.control import ControlPlane, FunctionInputs
from spotguard_cdk.fleet import Fleet
from spotguard_cdk.functions import CDK_ROLE_DEPENDENCY_REASON, FunctionRuntime, instance_arn_prefix
from spotguard_cdk.network import Network
from spotguard_cdk.notifications import Notifications
from spotguard_cdk.observability import Observability
from spotguard_cdk.permissions import InstanceRole
from spotguard_cdk.queues import WorkQueues
from spotguard_cdk.settings import PROPS_HINT, ConfigurationError, EmulatorGap, Settings
from spotguard_cdk.staging import SpotInterruptionExperiment
from spotguard_cdk.storage import FleetKey, WorkerStorage
from spotguard_cdk.tables import Tables
from spotguard_cdk.workload import Workload, WorkloadAsset

#: Keyword props -> the setting each one sets.
_PROP_SETTINGS = {
    "name": "fleet.name",
    "instance_types": "fleet.instance_types",
    "min_capacity": "fleet.min_capacity",
    "max_capacity": "fleet.max_capacity",
    "desired_capacity": "fleet.desired_capacity",
    "on_demand_base_capacity": "fleet.on_demand_base_capacity",
    "backlog_per_instance": "fleet.backlog_per_instance",
    "concurrency": "fleet.concurrency",
    "ami_id": "fleet.ami_id",
    "root_volume_gb": "fleet.root_volume_gb",
    "rebalance_policy": "control_plane.rebalance_policy",
    "bootstrap_deadline_minutes": "bootstrap.deadline_minutes",
    "max_failures": "queue.max_failures",
    "alarm_email": "observability.alarm_email",
    "webhook_url": "notifications.webhook_url",
    "allow_test_events": "staging.allow_test_events",
}


def fleet_name_from_id(construct_id: str) -> str:
    """``RenderFleet`` -> ``render-fleet``: the default fleet name (ASG, tags, resource names)."""
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1-\2", construct_id)
    name = re.sub(r"[^a-z0-9]+", "-", words.lower()).strip("-")
    return name if re.match(r"^[a-z]", name) else f"fleet-{name}"


def resolve_settings(
    construct_id: str,
    settings: Settings | None,
    props: Mapping[str, Any],
    workload: Workload | None,
) -> Settings:
    """The construct's settings: ``settings`` (or the defaults), then the keyword props, then
    the workload; validated once, with the same messages as cdk.json."""
    base = settings if settings is not None else Settings()
    overrides = {_PROP_SETTINGS[key]: value for key, value in props.items() if value is not None}
    if "fleet.name" not in overrides and "name" not in base.fleet.model_fields_set:
        overrides["fleet.name"] = fleet_name_from_id(construct_id)
    if workload is not None:
        overrides.update(workload.as_overrides())
    return Settings.from_mapping(base.model_dump(mode="json"), overrides, hint=PROPS_HINT)


class SpotWorkerFleet(Construct):
    """A worker fleet on EC2 Spot for one SQS queue, with its own control plane.

    It creates the launch template and Auto Scaling group (mixed instance types,
    price-capacity-optimized spot, backlog scaling down to zero), the instance role, the agent
    bundle and configuration, the workload asset, checkpoint bucket and log group, the lease,
    fleet, jobs and idempotency tables, the dispatcher/watchdog/reconciler, the operations API,
    notifications, alarms and a dashboard, and (staging) the FIS experiment.

    :param queue: the queue the workers consume (created or imported). Used as given: its
        visibility timeout, retention and DLQ. Omitted: the fleet creates a work queue and DLQ.
    :param dead_letter_queue: where the poison rule moves a message (default: ``queue``'s own
        redrive target, or one the fleet creates; see ``queues.WorkQueues``).
    :param workload: what runs per message (``Workload.python`` / ``Workload.command``);
        omitted: the built-in sample handler.
    :param vpc: the VPC to launch into (default: a new VPC without NAT gateways).
    :param vpc_subnets: subnets of ``vpc`` (default: its public subnets).
    :param settings: every other setting, typed (``spotguard_cdk.settings.Settings``).
    :param name: fleet name (default: from the construct id, ``RenderFleet`` -> ``render-fleet``);
        unique per account and region (ASG, bus, dashboard and parameter names carry it).
    :raises ConfigurationError: a bad value, naming the setting and what to change.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        queue: sqs.IQueue | None = None,
        dead_letter_queue: sqs.IQueue | None = None,
        workload: Workload | None = None,
        vpc: ec2.IVpc | None = None,
        vpc_subnets: ec2.SubnetSelection | None = None,
        settings: Settings | None = None,
        name: str | None = None,
        instance_types: list[str] | None = None,
        min_capacity: int | None = None,
        max_capacity: int | None = None,
        desired_capacity: int | None = None,
        on_demand_base_capacity: int | None = None,
        backlog_per_instance: int | None = None,
        concurrency: int | None = None,
        ami_id: str | None = None,
        root_volume_gb: int | None = None,
        rebalance_policy: contracts.RebalancePolicy | str | None = None,
        bootstrap_deadline_minutes: int | None = None,
        max_failures: int | None = None,
        alarm_email: str | None = None,
        webhook_url: str | None = None,
        allow_test_events: bool | None = None,
    ) -> None:
        props = {
            "name": name,
            "instance_types": instance_types,
            "min_capacity": min_capacity,
            "max_capacity": max_capacity,
            "desired_capacity": desired_capacity,
            "on_demand_base_capacity": on_demand_base_capacity,
            "backlog_per_instance": backlog_per_instance,
            "concurrency": concurrency,
            "ami_id": ami_id,
            "root_volume_gb": root_volume_gb,
            "rebalance_policy": str(rebalance_policy) if rebalance_policy is not None else None,
            "bootstrap_deadline_minutes": bootstrap_deadline_minutes,
            "max_failures": max_failures,
            "alarm_email": alarm_email,
            "webhook_url": webhook_url,
            "allow_test_events": allow_test_events,
        }
        resolved = resolve_settings(construct_id, settings, props, workload)
        _check_unique_fleet(scope, resolved.fleet.name)
        super().__init__(scope, construct_id)
        self.settings = resolved
        self.fleet_name = fleet = resolved.fleet.name
        Tags.of(self).add(contracts.FLEET_TAG_KEY, fleet)

        key = FleetKey(self, "Key", fleet=fleet)
        self.network = Network(self, "Network", settings=resolved, vpc=vpc, vpc_subnets=vpc_subnets)
        self.queues = WorkQueues(
            self, "Queues", settings=resolved, queue=queue, dead_letter_queue=dead_letter_queue
        )
        self.work_queue = self.queues.work_queue
        self.work_dlq = self.queues.work_dlq
        self.tables = Tables(self, "Tables")
        self.storage = WorkerStorage(
            self,
            "Storage",
            fleet=fleet,
            key=key.key,
            checkpoint_retention_days=self.queues.retention_days,
            log_retention_days=resolved.control_plane.log_retention_days,
        )
        self.bundle = AgentBundle(
            self, "AgentBundle", settings=resolved, fleet_table_name=self.tables.fleet.table_name
        )
        workload_path = resolved.fleet.workload.path
        self.workload = WorkloadAsset(self, "Workload", path=workload_path) if workload_path else None

        fleet_resources = runtime_env.FleetResources(
            fleet=fleet,
            region=Aws.REGION,
            account_id=Aws.ACCOUNT_ID,
            work_queue_url=self.work_queue.queue_url,
            work_dlq_url=self.work_dlq.queue_url,
            lease_table=self.tables.leases.table_name,
            fleet_table=self.tables.fleet.table_name,
            jobs_table=self.tables.jobs.table_name,
            idempotency_table=self.tables.idempotency.table_name,
            instance_arn_prefix=instance_arn_prefix(self),
        )
        self.agent_config = AgentConfigParameter(
            self,
            "AgentConfig",
            name=self.bundle.config_parameter_name,
            values=runtime_env.agent_config(
                runtime_env.AgentResources(
                    fleet=fleet_resources,
                    workload_url=self.workload.asset.s3_object_url if self.workload else None,
                    workload_sha256=self.workload.sha256 if self.workload else None,
                    checkpoint_bucket=self.storage.checkpoint_bucket.bucket_name,
                    log_group=self.storage.log_group.log_group_name,
                ),
                agent_options(resolved, visibility_timeout_seconds=self.queues.visibility_timeout_seconds),
            ),
        )
        self.instance_role = InstanceRole(
            self,
            "InstanceRole",
            fleet=fleet,
            work_queue=self.work_queue,
            work_dlq=self.work_dlq,
            leases=self.tables.leases,
            fleet_table=self.tables.fleet,
            config_parameter_name=self.bundle.config_parameter_name,
            assets=[self.bundle.asset] + ([self.workload.asset] if self.workload else []),
            checkpoint_bucket=self.storage.checkpoint_bucket,
            log_group=self.storage.log_group,
        )
        self.fleet = Fleet(
            self,
            "Fleet",
            settings=resolved,
            network=self.network,
            bundle=self.bundle,
            instance_role=self.instance_role.role,
            work_queue=self.work_queue,
        )
        # The agent reads its configuration at install: it must exist before any instance.
        self.fleet.asg.node.add_dependency(self.agent_config)

        self.notifications = Notifications(self, "Notifications", settings=resolved)
        novita_secret = None
        migration = resolved.migration
        if migration.provider == "novita" and migration.novita_api_key_secret_name:
            novita_secret = secretsmanager.Secret.from_secret_name_v2(
                self, "NovitaApiKey", migration.novita_api_key_secret_name
            )
        fleet_resources = dataclasses.replace(
            fleet_resources, notification_bus=self.notifications.bus.event_bus_name
        )
        environment = runtime_env.control_plane_env(fleet_resources, control_options(resolved))
        migration_options = runtime_env.MigrationOptions(
            enabled=migration.enabled,
            interval_minutes=migration.interval_minutes,
            job_timeout_ms=migration.job_timeout_ms,
            max_concurrent=migration.max_concurrent,
            dry_run=migration.dry_run,
            retry_failed=migration.retry_failed,
            log_level=migration.log_level,
            provider=migration.provider,
            novita_api_key_secret_arn=novita_secret.secret_arn if novita_secret else None,
            novita_api_url=migration.novita_api_url if novita_secret else None,
            fallback_instance_types=tuple(resolved.fleet.fallback_instance_types),
        )
        runtime = FunctionRuntime(self, "Runtime", settings=resolved)
        subnets = self.network.vpc.select_subnets(**_selection_kwargs(self.network.subnets)).subnet_ids
        inputs = FunctionInputs(
            settings=resolved, runtime=runtime, environment=environment, tables=self.tables
        )
        self.control_plane = ControlPlane(
            self,
            "ControlPlane",
            inputs=inputs,
            reconciler_environment=runtime_env.reconciler_env(
                migration_options,
                launch_template_id=self.fleet.launch_template.launch_template_id or "",
                subnet_ids=Fn.join(",", subnets),
            ),
            work_queue=self.work_queue,
            bus=self.notifications.bus,
            launch_template_id=self.fleet.launch_template.launch_template_id or "",
            instance_role=self.instance_role.role,
            novita_secret=novita_secret,
        )
        self.notifications.add_notifier(runtime=runtime, environment=environment, settings=resolved)
        # Only the roles that publish notifications may put events on the fleet's bus.
        if resolved.supports(EmulatorGap.EVENT_BUS_POLICY):
            self.notifications.allow_only(
                [
                    self.control_plane.dispatcher.role,
                    self.control_plane.watchdog.role,
                    self.control_plane.reconciler.role,
                ]
            )
        self.ops_api = OpsApi(
            self,
            "OpsApi",
            inputs=dataclasses.replace(
                inputs, environment={**environment, **runtime_env.migration_env(migration_options)}
            ),
            reconciler=self.control_plane.reconciler.function,
        )
        functions = {
            **self.control_plane.functions,
            "Api": self.ops_api.function,
            "Notifier": self.notifications.notifier,
        }
        self.observability = Observability(
            self,
            "Observability",
            settings=resolved,
            key=key.key,
            work_queue=self.work_queue,
            dead_letter_queues={
                "Work": self.work_dlq,
                "Signal": self.control_plane.signal_dlq,
                "Notify": self.notifications.notify_dlq,
                "AsyncFailure": self.control_plane.async_failures,
            },
            functions={name: f.function for name, f in functions.items()},
            asg_name=self.fleet.asg.auto_scaling_group_name,
            api_name=self.ops_api.api.rest_api_name,
        )
        if resolved.staging.fis_experiment:
            self.experiment: SpotInterruptionExperiment | None = SpotInterruptionExperiment(
                self,
                "SpotInterruptionExperiment",
                settings=resolved,
                stop_alarm=self.observability.alarms["WorkDeadLetterQueueNotEmpty"],
            )
        else:
            self.experiment = None
        _lint_cdk_internals(Stack.of(self))
        self._outputs()

    def _outputs(self) -> None:
        outputs = {
            "ApiUrl": self.ops_api.api.url,
            "WorkQueueUrl": self.work_queue.queue_url,
            "WorkDeadLetterQueueUrl": self.work_dlq.queue_url,
            "FleetTableName": self.tables.fleet.table_name,
            "AutoScalingGroupName": contracts.asg_name(self.fleet_name),
            "NotificationBusName": self.notifications.bus.event_bus_name,
            "AlarmTopicArn": self.observability.topic.topic_arn,
            "DashboardName": f"spotguard-{self.fleet_name}",
            "AgentBundleSha256": self.bundle.bundle_sha256,
            "CheckpointBucketName": self.storage.checkpoint_bucket.bucket_name,
            "InstanceLogGroupName": self.storage.log_group.log_group_name,
        }
        if self.workload is not None:
            outputs["WorkloadSha256"] = self.workload.sha256
        if self.notifications.webhook_secret is not None:
            outputs["WebhookSecretArn"] = self.notifications.webhook_secret.secret_arn
        if self.experiment is not None:
            outputs["FisExperimentTemplateId"] = self.experiment.template.attr_id
        for output_id, value in outputs.items():
            CfnOutput(self, output_id, value=value)


def agent_options(settings: Settings, *, visibility_timeout_seconds: int) -> runtime_env.AgentOptions:
    """The agent's options from the settings (``runtime_env.agent_config`` input)."""
    fleet = settings.fleet
    return runtime_env.AgentOptions(
        handler=fleet.effective_handler,
        command=fleet.workload.command,
        concurrency=fleet.concurrency,
        prefetch=settings.agent.prefetch,
        visibility_timeout_seconds=visibility_timeout_seconds,
        imds_poll_seconds=settings.agent.imds_poll_seconds,
        health_port=fleet.health_port,
        bootstrap_deadline_seconds=settings.bootstrap.deadline_minutes * 60,
        rebalance_policy=settings.control_plane.rebalance_policy,
        max_failures=settings.queue.max_failures,
        drain_margin_seconds=settings.agent.drain_margin_seconds,
        stop_grace_seconds=fleet.workload.stop_grace_seconds,
        checkpoint_max_bytes=fleet.workload.checkpoint_max_bytes,
    )


def control_options(settings: Settings) -> runtime_env.ControlOptions:
    """The control plane's options from the settings (``runtime_env.control_plane_env`` input)."""
    control = settings.control_plane
    return runtime_env.ControlOptions(
        rebalance_policy=control.rebalance_policy,
        early_replacement=control.early_replacement,
        heartbeat_stale_seconds=control.heartbeat_stale_minutes * 60,
        bootstrap_deadline_seconds=settings.bootstrap.deadline_minutes * 60,
        max_failures=settings.queue.max_failures,
        allow_test_events=settings.staging.allow_test_events,
    )


def _selection_kwargs(selection: ec2.SubnetSelection) -> dict[str, Any]:
    fields = (
        "availability_zones",
        "one_per_az",
        "subnet_filters",
        "subnet_group_name",
        "subnets",
        "subnet_type",
    )
    return {f: getattr(selection, f) for f in fields if getattr(selection, f, None) is not None}


def _check_unique_fleet(scope: Construct, fleet: str) -> None:
    """Two fleets of one name would share an ASG, a bus, a dashboard and a parameter name."""
    for other in Stack.of(scope).node.find_all():
        if isinstance(other, SpotWorkerFleet) and other.fleet_name == fleet:
            raise ConfigurationError(
                f"invalid spotguard configuration:\n  fleet.name: {fleet!r} is already used by "
                f"{other.node.path}\n{PROPS_HINT} (each fleet needs its own name)"
            )


def _lint_cdk_internals(stack: Stack) -> None:
    """cfn-lint findings on resources CDK generates itself (the VPC default security group
    restriction provider, one per stack)."""
    provider = stack.node.try_find_child("Custom::VpcRestrictDefaultSGCustomResourceProvider")
    handler = provider.node.try_find_child("Handler") if provider is not None else None
    if isinstance(handler, CfnResource) and not (handler.get_metadata("cfn-lint") or {}):
        cfn_lint_ignore(handler, {"W3005": CDK_ROLE_DEPENDENCY_REASON})
