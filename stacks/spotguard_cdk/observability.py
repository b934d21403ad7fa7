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
        action = cloudwatch_actions.SnsAction(self.topic)
        self.alarms: dict[str, cloudwatch.Alarm] = {}

        def alarm(
            name: str,
            metric: cloudwatch.IMetric,
            *,
            threshold: float,
            comparison: cloudwatch.ComparisonOperator,
            description: str,
            evaluation_periods: int = 1,
            missing: cloudwatch.TreatMissingData = cloudwatch.TreatMissingData.NOT_BREACHING,
        ) -> cloudwatch.Alarm | None:
            if isinstance(metric, cloudwatch.MathExpression) and not settings.supports(
                EmulatorGap.METRIC_MATH_ALARMS
            ):
                return None
            created = cloudwatch.Alarm(
                self,
                name,
                alarm_description=f"spotguard {fleet}: {description}",
                metric=metric,
                threshold=threshold,
                comparison_operator=comparison,
                evaluation_periods=evaluation_periods,
                treat_missing_data=missing,
            )
            created.add_alarm_action(action)
            created.add_ok_action(action)
            self.alarms[name] = created
            return created

        above = cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD
        for name, dlq in dead_letter_queues.items():
            alarm(
                f"{name}DeadLetterQueueNotEmpty",
                dlq.metric_approximate_number_of_messages_visible(period=PERIOD, statistic="Maximum"),
                threshold=1,
                comparison=above,
                description=f"messages in the {name.lower()} dead-letter queue",
            )
        alarm(
            "OldestWorkMessageTooOld",
            work_queue.metric_approximate_age_of_oldest_message(period=PERIOD, statistic="Maximum"),
            threshold=settings.queue.max_message_age_seconds,
            comparison=above,
            evaluation_periods=3,
            description=f"oldest work message older than {settings.queue.max_message_age_seconds} s",
        )
        for name, function in functions.items():
            alarm(
                f"{name}Errors",
                function.metric_errors(period=Duration.minutes(5), statistic="Sum"),
                threshold=1,
                comparison=above,
                description=f"{name.lower()} function errors",
            )
        alarm(
            "WatchdogSilent",
            spotguard_metric(fleet, Metric.WATCHDOG_HEARTBEAT, period=Duration.minutes(5)),
            threshold=1,
            comparison=cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
            missing=cloudwatch.TreatMissingData.BREACHING,
            description="no watchdog heartbeat for 5 minutes",
        )
        # One unreadable table item is skipped (never stops a sweep): counted, and alarmed here.
        alarm(
            "UnreadableTableItems",
            cloudwatch.MathExpression(
                expression="FILL(sweep, 0) + FILL(api, 0)",
                using_metrics={
                    "sweep": spotguard_metric(
                        fleet, Metric.UNREADABLE_TABLE_ITEMS, period=Duration.minutes(5)
                    ),
                    "api": spotguard_metric(fleet, Metric.API_UNREADABLE_RECORDS, period=Duration.minutes(5)),
                },
                label="Unreadable table items skipped",
                period=Duration.minutes(5),
            ),
            threshold=1,
            comparison=above,
            description="table items the control plane could not read (skipped)",
        )
        alarm(
            "CapacityShortfall",
            spotguard_metric(
                fleet, Metric.CAPACITY_SHORTFALL, period=Duration.minutes(15), statistic="Maximum"
            ),
            threshold=1,
            comparison=above,
            description="the group is stuck below its desired capacity (no spot capacity in its pools)",
        )
        alarm(
            "BootstrapFailures",
            spotguard_metric(fleet, Metric.BOOTSTRAP_FAILURES, period=Duration.minutes(5)),
            threshold=1,
            comparison=above,
            description="instances failed their bootstrap",
        )
        in_service = cloudwatch.Metric(
            namespace="AWS/AutoScaling",
            metric_name="GroupInServiceInstances",
            dimensions_map={"AutoScalingGroupName": asg_name},
            statistic="Minimum",
            period=PERIOD,
        )
        # Always present (also with a minimum of 0): work is waiting and nothing runs it for
        # longer than a bootstrap takes, e.g. no spot capacity in any pool or every launch fails.
        alarm(
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
            threshold=1,
            comparison=above,
            evaluation_periods=settings.bootstrap.deadline_minutes + 5,
            description="work is waiting and no instance is in service",
        )
        if settings.fleet.min_capacity > 0:
            alarm(
                "FleetBelowMinimum",
                in_service,
                threshold=settings.fleet.min_capacity,
                comparison=cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
                evaluation_periods=settings.bootstrap.deadline_minutes + 5,
                missing=cloudwatch.TreatMissingData.BREACHING,
                description=f"fewer than {settings.fleet.min_capacity} instances in service",
            )

        self.dashboard = self._dashboard(
            fleet=fleet,
            work_queue=work_queue,
            dead_letter_queues=dead_letter_queues,
            functions=functions,
            in_service=in_service,
            api_name=api_name,
        )

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
        def m(name: Metric, statistic: str = "Sum") -> cloudwatch.Metric:
            return spotguard_metric(fleet, name, statistic=statistic)

        api_metric = {
            "namespace": "AWS/ApiGateway",
            "dimensions_map": {"ApiName": api_name},
            "statistic": "Sum",
            "period": PERIOD,
        }
        dashboard = cloudwatch.Dashboard(self, "Dashboard", dashboard_name=f"spotguard-{fleet}")
        dashboard.add_widgets(
            cloudwatch.GraphWidget(
                title="Work queue depth",
                left=[
                    work_queue.metric_approximate_number_of_messages_visible(period=PERIOD, label="Visible"),
                    work_queue.metric_approximate_number_of_messages_not_visible(
                        period=PERIOD, label="In flight"
                    ),
                ],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Oldest work message (s)",
                left=[
                    work_queue.metric_approximate_age_of_oldest_message(period=PERIOD, statistic="Maximum")
                ],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Dead-letter queues",
                left=[
                    dlq.metric_approximate_number_of_messages_visible(period=PERIOD, label=name)
                    for name, dlq in dead_letter_queues.items()
                ],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Interruptions and signals",
                left=[
                    m(Metric.INTERRUPTION_WARNINGS),
                    m(Metric.REBALANCE_RECOMMENDATIONS),
                    m(Metric.HEALTH_SCHEDULED_CHANGES),
                    m(Metric.INSTANCES_ENDED),
                    m(Metric.REPLACEMENTS_REQUESTED),
                    m(Metric.SIGNALS_REJECTED),
                    m(Metric.SIGNALS_UNMANAGED),
                ],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Requeues",
                left=[
                    m(Metric.MESSAGES_REQUEUED),
                    m(Metric.REQUEUE_FAILURES),
                    m(Metric.TASKS_RELEASED_ON_DRAIN),
                ],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Requeue latency (ms)",
                left=[
                    spotguard_metric(fleet, Metric.REQUEUE_LATENCY, statistic="p50", label="p50"),
                    spotguard_metric(fleet, Metric.REQUEUE_LATENCY, statistic="p99", label="p99"),
                ],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Fleet size",
                left=[m(Metric.FLEET_SIZE, "Maximum"), in_service],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Bootstrap and watchdog",
                left=[
                    m(Metric.BOOTSTRAP_FAILURES),
                    m(Metric.TERMINATED_BY_WATCHDOG),
                    m(Metric.ORPHAN_LEASES_SWEPT),
                    m(Metric.WATCHDOG_HEARTBEAT),
                ],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Tasks",
                left=[m(Metric.TASKS_COMPLETED), m(Metric.TASKS_FAILED), m(Metric.POISON_MESSAGES)],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Function errors",
                left=[f.metric_errors(period=PERIOD, label=name) for name, f in functions.items()],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Function duration p99 (ms)",
                left=[
                    f.metric_duration(period=PERIOD, statistic="p99", label=name)
                    for name, f in functions.items()
                ],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="API errors",
                left=[
                    cloudwatch.Metric(metric_name="4XXError", label="4xx", **api_metric),  # type: ignore[arg-type]
                    cloudwatch.Metric(metric_name="5XXError", label="5xx", **api_metric),  # type: ignore[arg-type]
                ],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Checkpoints and stopped tasks (agent)",
                left=[
                    m(Metric.CHECKPOINTS_SAVED),
                    m(Metric.CHECKPOINTS_REJECTED),
                    m(Metric.TASKS_RESUMED),
                    m(Metric.TASKS_KILLED),
                ],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Capacity and table health",
                left=[
                    m(Metric.INSTANCES_RETIRED),
                    m(Metric.CAPACITY_SHORTFALL, "Maximum"),
                    m(Metric.UNREADABLE_TABLE_ITEMS),
                    m(Metric.API_UNREADABLE_RECORDS),
                    m(Metric.API_INTERNAL_ERRORS),
                    m(Metric.MIGRATION_JOBS_ABANDONED),
                ],
                width=8,
            ),
            cloudwatch.GraphWidget(
                title="Migrations and notifications",
                left=[
                    m(Metric.MIGRATION_JOBS),
                    m(Metric.MIGRATIONS_SUCCEEDED),
                    m(Metric.MIGRATIONS_FAILED),
                    m(Metric.MIGRATION_ELIGIBLE),
                    m(Metric.WEBHOOK_DELIVERED),
                    m(Metric.WEBHOOK_FAILURES),
                ],
                width=8,
            ),
        )
        return dashboard
