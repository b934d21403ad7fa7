"""One dashboard and the alarms, built from ``contracts.Metric`` names.

Alarms notify an SNS topic encrypted with a customer managed KMS key (CloudWatch can
publish to it; the AWS managed SNS key does not allow that) and refusing non-TLS
publishers. An email subscription is added when ``observability.alarm_email`` is set.
"""

from __future__ import annotations

from collections.abc import Mapping

from aws_cdk import Duration
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_sqs as sqs
from constructs import Construct
from spotguard_core import contracts
from spotguard_core.contracts import Metric

from spotguard_cdk.settings import EmulatorGap, Settings

PERIOD = Duration.minutes(1)


#: Metrics the instances publish (into ``contracts.AGENT_METRIC_NAMESPACE``, the only
#: namespace the instance role may write); every other spotguard metric is the control plane's.
AGENT_METRICS = frozenset(
    {
        Metric.TASKS_COMPLETED,
        Metric.TASKS_FAILED,
        Metric.TASKS_RELEASED_ON_DRAIN,
        Metric.POISON_MESSAGES,
        Metric.CHECKPOINTS_SAVED,
        Metric.CHECKPOINTS_REJECTED,
        Metric.TASKS_RESUMED,
        Metric.TASKS_KILLED,
    }
)


def spotguard_metric(
    fleet: str, name: Metric, *, statistic: str = "Sum", period: Duration = PERIOD, label: str | None = None
) -> cloudwatch.Metric:
    """A spotguard metric of ``fleet`` (agent metrics from the agent namespace)."""
    namespace = contracts.AGENT_METRIC_NAMESPACE if name in AGENT_METRICS else contracts.METRIC_NAMESPACE
    return cloudwatch.Metric(
        namespace=namespace,
        metric_name=name.value,
        dimensions_map={contracts.METRIC_DIMENSION_FLEET: fleet},
        statistic=statistic,
        period=period,
        label=label,
    )


AT_LEAST = cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD
BELOW = cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD

# The dashboard's longer groups of spotguard metrics (summed unless a statistic is named).
SIGNAL_METRICS = (
    Metric.INTERRUPTION_WARNINGS,
    Metric.REBALANCE_RECOMMENDATIONS,
    Metric.HEALTH_SCHEDULED_CHANGES,
    Metric.INSTANCES_ENDED,
    Metric.REPLACEMENTS_REQUESTED,
    Metric.SIGNALS_REJECTED,
    Metric.SIGNALS_UNMANAGED,
)
WATCHDOG_METRICS = (
    Metric.BOOTSTRAP_FAILURES,
    Metric.TERMINATED_BY_WATCHDOG,
    Metric.ORPHAN_LEASES_SWEPT,
    Metric.WATCHDOG_HEARTBEAT,
)
CHECKPOINT_METRICS = (
    Metric.CHECKPOINTS_SAVED,
    Metric.CHECKPOINTS_REJECTED,
    Metric.TASKS_RESUMED,
    Metric.TASKS_KILLED,
)
CAPACITY_METRICS = (
    Metric.INSTANCES_RETIRED,
    (Metric.CAPACITY_SHORTFALL, "Maximum"),
    Metric.UNREADABLE_TABLE_ITEMS,
    Metric.API_UNREADABLE_RECORDS,
    Metric.API_INTERNAL_ERRORS,
    Metric.MIGRATION_JOBS_ABANDONED,
)
MIGRATION_METRICS = (
    Metric.MIGRATION_JOBS,
    Metric.MIGRATIONS_SUCCEEDED,
    Metric.MIGRATIONS_FAILED,
    Metric.MIGRATION_ELIGIBLE,
    Metric.WEBHOOK_DELIVERED,
    Metric.WEBHOOK_FAILURES,
)


def group_metric(
    asg_name: str, metric_name: str, *, statistic: str, period: Duration = PERIOD
) -> cloudwatch.Metric:
    """An Auto Scaling group metric (``AWS/AutoScaling``, needs ``group_metrics`` on the group)."""
    return cloudwatch.Metric(
        namespace="AWS/AutoScaling",
        metric_name=metric_name,
        dimensions_map={"AutoScalingGroupName": asg_name},
        statistic=statistic,
        period=period,
    )


class Observability(Construct):
    """The fleet's alarm topic, alarms and dashboard."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: Settings,
        key: kms.IKey,
        work_queue: sqs.IQueue,
        dead_letter_queues: Mapping[str, sqs.IQueue],
        functions: Mapping[str, lambda_.IFunction],
        asg_name: str,
        api_name: str,
    ) -> None:
        super().__init__(scope, construct_id)
        fleet = settings.fleet.name
        self.topic = sns.Topic(
            self, "AlarmTopic", display_name=f"spotguard {fleet} alarms", master_key=key, enforce_ssl=True
        )
        if settings.observability.alarm_email:
            self.topic.add_subscription(subscriptions.EmailSubscription(settings.observability.alarm_email))
        self._alarm_action = cloudwatch_actions.SnsAction(self.topic)
        self._settings = settings
        self.alarms: dict[str, cloudwatch.Alarm] = {}

        for name, dlq in dead_letter_queues.items():
            self._alarm(
                f"{name}DeadLetterQueueNotEmpty",
                dlq.metric_approximate_number_of_messages_visible(period=PERIOD, statistic="Maximum"),
                f"messages in the {name.lower()} dead-letter queue",
            )
        max_age = settings.queue.max_message_age_seconds
        self._alarm(
            "OldestWorkMessageTooOld",
            work_queue.metric_approximate_age_of_oldest_message(period=PERIOD, statistic="Maximum"),
            f"oldest work message older than {max_age} s",
            threshold=max_age,
            evaluation_periods=3,
        )
        for name, function in functions.items():
            self._alarm(
                f"{name}Errors",
                function.metric_errors(period=Duration.minutes(5), statistic="Sum"),
                f"{name.lower()} function errors",
            )
        five_minutes = Duration.minutes(5)
        self._alarm(
            "WatchdogSilent",
            spotguard_metric(fleet, Metric.WATCHDOG_HEARTBEAT, period=five_minutes),
            "no watchdog heartbeat for 5 minutes",
            comparison=BELOW,
            missing=cloudwatch.TreatMissingData.BREACHING,
        )
        # One unreadable table item is skipped (never stops a sweep): counted, and alarmed here.
        self._alarm(
            "UnreadableTableItems",
            cloudwatch.MathExpression(
                expression="FILL(sweep, 0) + FILL(api, 0)",
                using_metrics={
                    "sweep": spotguard_metric(fleet, Metric.UNREADABLE_TABLE_ITEMS, period=five_minutes),
                    "api": spotguard_metric(fleet, Metric.API_UNREADABLE_RECORDS, period=five_minutes),
                },
                label="Unreadable table items skipped",
                period=five_minutes,
            ),
            "table items the control plane could not read (skipped)",
        )
        shortfall = spotguard_metric(
            fleet, Metric.CAPACITY_SHORTFALL, period=Duration.minutes(15), statistic="Maximum"
        )
        self._alarm(
            "CapacityShortfall",
            shortfall,
            "the group is stuck below its desired capacity (no spot capacity in its pools)",
        )
        bootstrap_failures = spotguard_metric(fleet, Metric.BOOTSTRAP_FAILURES, period=five_minutes)
        self._alarm("BootstrapFailures", bootstrap_failures, "instances failed their bootstrap")
        in_service = group_metric(asg_name, "GroupInServiceInstances", statistic="Minimum")
        # Always present (also with a minimum of 0): work is waiting and nothing runs it for
        # longer than a bootstrap takes, e.g. no spot capacity in any pool or every launch fails.
        launch_window = settings.bootstrap.deadline_minutes + 5
        self._alarm(
            "WorkWaitingNoInstance",
            cloudwatch.MathExpression(
                expression="IF(visible > 0 AND inservice < 1, 1, 0)",
                using_metrics={
                    "visible": work_queue.metric_approximate_number_of_messages_visible(
                        period=PERIOD, statistic="Minimum"
                    ),
                    "inservice": in_service.with_(statistic="Maximum"),
                },
                label="Work waiting and no instance in service",
                period=PERIOD,
            ),
            "work is waiting and no instance is in service",
            evaluation_periods=launch_window,
        )
        if settings.fleet.min_capacity > 0:
            self._alarm(
                "FleetBelowMinimum",
                in_service,
                f"fewer than {settings.fleet.min_capacity} instances in service",
                threshold=settings.fleet.min_capacity,
                comparison=BELOW,
                evaluation_periods=launch_window,
                missing=cloudwatch.TreatMissingData.BREACHING,
            )

        self.dashboard = self._dashboard(
            fleet=fleet,
            work_queue=work_queue,
            dead_letter_queues=dead_letter_queues,
            functions=functions,
            in_service=in_service,
            api_name=api_name,
        )

    def _alarm(
        self,
        name: str,
        metric: cloudwatch.IMetric,
        description: str,
        *,
        threshold: float = 1,
        comparison: cloudwatch.ComparisonOperator = AT_LEAST,
        evaluation_periods: int = 1,
        missing: cloudwatch.TreatMissingData = cloudwatch.TreatMissingData.NOT_BREACHING,
    ) -> None:
        """An alarm that notifies the topic on alarm and on OK (``self.alarms[name]``); none on a
        metric-math expression where the deploy target cannot alarm on one."""
        if isinstance(metric, cloudwatch.MathExpression) and not self._settings.supports(
            EmulatorGap.METRIC_MATH_ALARMS
        ):
            return
        created = cloudwatch.Alarm(
            self,
            name,
            alarm_description=f"spotguard {self._settings.fleet.name}: {description}",
            metric=metric,
            threshold=threshold,
            comparison_operator=comparison,
            evaluation_periods=evaluation_periods,
            treat_missing_data=missing,
        )
        created.add_alarm_action(self._alarm_action)
        created.add_ok_action(self._alarm_action)
        self.alarms[name] = created

    def _dashboard(
        self,
        *,
        fleet: str,
        work_queue: sqs.IQueue,
        dead_letter_queues: Mapping[str, sqs.IQueue],
        functions: Mapping[str, lambda_.IFunction],
        in_service: cloudwatch.IMetric,
        api_name: str,
    ) -> cloudwatch.Dashboard:
        def counts(title: str, *names: Metric | tuple[Metric, str]) -> cloudwatch.GraphWidget:
            """A graph of spotguard metrics, summed unless a statistic is named with one."""
            pairs = [name if isinstance(name, tuple) else (name, "Sum") for name in names]
            return graph(title, [spotguard_metric(fleet, name, statistic=stat) for name, stat in pairs])

        def api_errors(metric_name: str, label: str) -> cloudwatch.Metric:
            return cloudwatch.Metric(
                namespace="AWS/ApiGateway",
                metric_name=metric_name,
                dimensions_map={"ApiName": api_name},
                statistic="Sum",
                period=PERIOD,
                label=label,
            )

        dashboard = cloudwatch.Dashboard(self, "Dashboard", dashboard_name=f"spotguard-{fleet}")
        dashboard.add_widgets(
            graph(
                "Work queue depth",
                [
                    work_queue.metric_approximate_number_of_messages_visible(period=PERIOD, label="Visible"),
                    work_queue.metric_approximate_number_of_messages_not_visible(
                        period=PERIOD, label="In flight"
                    ),
                ],
            ),
            graph(
                "Oldest work message (s)",
                [work_queue.metric_approximate_age_of_oldest_message(period=PERIOD, statistic="Maximum")],
            ),
            graph(
                "Dead-letter queues",
                [
                    dlq.metric_approximate_number_of_messages_visible(period=PERIOD, label=name)
                    for name, dlq in dead_letter_queues.items()
                ],
            ),
            counts("Interruptions and signals", *SIGNAL_METRICS),
            counts(
                "Requeues", Metric.MESSAGES_REQUEUED, Metric.REQUEUE_FAILURES, Metric.TASKS_RELEASED_ON_DRAIN
            ),
            graph(
                "Requeue latency (ms)",
                [
                    spotguard_metric(fleet, Metric.REQUEUE_LATENCY, statistic=percentile, label=percentile)
                    for percentile in ("p50", "p99")
                ],
            ),
            graph(
                "Fleet size", [spotguard_metric(fleet, Metric.FLEET_SIZE, statistic="Maximum"), in_service]
            ),
            counts("Bootstrap and watchdog", *WATCHDOG_METRICS),
            counts("Tasks", Metric.TASKS_COMPLETED, Metric.TASKS_FAILED, Metric.POISON_MESSAGES),
            graph(
                "Function errors",
                [f.metric_errors(period=PERIOD, label=name) for name, f in functions.items()],
            ),
            graph(
                "Function duration p99 (ms)",
                [
                    f.metric_duration(period=PERIOD, statistic="p99", label=name)
                    for name, f in functions.items()
                ],
            ),
            graph("API errors", [api_errors("4XXError", "4xx"), api_errors("5XXError", "5xx")]),
            counts("Checkpoints and stopped tasks (agent)", *CHECKPOINT_METRICS),
            counts("Capacity and table health", *CAPACITY_METRICS),
            counts("Migrations and notifications", *MIGRATION_METRICS),
        )
        return dashboard


def graph(title: str, left: list[cloudwatch.IMetric]) -> cloudwatch.GraphWidget:
    """One dashboard graph (three to a row)."""
    return cloudwatch.GraphWidget(title=title, left=left, width=8)
