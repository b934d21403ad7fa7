"""The contracts of spotguard, defined once.

Everything that two parts of the system must agree on lives here: tag keys,
table key schemas and record shapes, metric names, EventBridge patterns,
environment variable names and configuration ranges. The CDK stacks, the Lambda
functions, the instance agent and the local drill all import this module.

This module is shipped inside the agent bundle as well as the Lambda asset, so
it must only use the standard library (instances have python3 and boto3, not
pydantic or Powertools).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, Final

# --------------------------------------------------------------------------------------
# Tags
# --------------------------------------------------------------------------------------
#: Marks an instance (and the ASG, launch template, …) as belonging to a spotguard fleet.
#: Value: the fleet name. IAM conditions on destructive actions use this key
#: (``aws:ResourceTag/spotguard:fleet``), so an instance without it is never touched.
FLEET_TAG_KEY: Final = "spotguard:fleet"
#: Bootstrap outcome written by the instance itself: ``ready`` or ``failed``.
BOOTSTRAP_TAG_KEY: Final = "spotguard:bootstrap"
#: Short reason for a failed bootstrap (tag values are limited to 256 characters).
BOOTSTRAP_REASON_TAG_KEY: Final = "spotguard:bootstrap-reason"
#: Set on instances that should receive AWS FIS spot-interruption drills (staging).
FIS_TARGET_TAG_KEY: Final = "spotguard:fis-target"
#: On a replacement launched by the migration job: the id of the reclaimed instance it replaces.
REPLACES_TAG_KEY: Final = "spotguard:replaces"

# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------
METRIC_NAMESPACE: Final = "Spotguard"
#: Instances publish their own metrics here, never into ``METRIC_NAMESPACE``: the
#: control-plane alarms (watchdog heartbeat, bootstrap failures …) read only metrics that
#: no worker instance can write (the instance role's PutMetricData is conditioned on this
#: namespace with ``cloudwatch:namespace``).
AGENT_METRIC_NAMESPACE: Final = "Spotguard/Agent"
#: The only dimension spotguard metrics carry. Dashboards and alarms use exactly this.
METRIC_DIMENSION_FLEET: Final = "Fleet"


class Metric(StrEnum):
    """CloudWatch metric names. The dashboard and the alarms are built from this list."""

    # dispatcher
    SIGNALS_RECEIVED = "SignalsReceived"
    SIGNALS_REJECTED = "SignalsRejected"  # malformed / unknown / wrong account or region
    SIGNALS_UNMANAGED = "SignalsUnmanagedIgnored"  # valid event about an instance we do not manage
    SIGNALS_DUPLICATE = "SignalsDuplicate"
    INTERRUPTION_WARNINGS = "InterruptionWarnings"
    REBALANCE_RECOMMENDATIONS = "RebalanceRecommendations"
    HEALTH_SCHEDULED_CHANGES = "HealthScheduledChanges"
    INSTANCES_ENDED = "InstancesEnded"
    REPLACEMENTS_REQUESTED = "ReplacementsRequested"
    # requeue (dispatcher, watchdog)
    MESSAGES_REQUEUED = "MessagesRequeued"
    REQUEUE_LATENCY = "RequeueLatency"  # milliseconds, interruption event time -> message visible
    REQUEUE_FAILURES = "RequeueFailures"
    # watchdog
    WATCHDOG_HEARTBEAT = "WatchdogHeartbeat"
    TERMINATED_BY_WATCHDOG = "InstancesTerminatedByWatchdog"
    ORPHAN_LEASES_SWEPT = "OrphanLeasesSwept"
    #: Fleet-table / lease-table items that could not be read (unknown state, not a number,
    #: missing key): skipped one at a time by the watchdog and the dispatcher, counted here.
    UNREADABLE_TABLE_ITEMS = "UnreadableTableItems"
    #: Instances that drained and were ended by the watchdog after an early replacement.
    INSTANCES_RETIRED = "InstancesRetired"
    BOOTSTRAP_FAILURES = "BootstrapFailures"
    FLEET_SIZE = "FleetSize"  # managed instances not ended, emitted by the watchdog
    # reconciler / migration
    MIGRATION_JOBS = "MigrationJobs"
    MIGRATIONS_SUCCEEDED = "MigrationsSucceeded"
    MIGRATIONS_FAILED = "MigrationsFailed"
    MIGRATION_ELIGIBLE = "MigrationEligibleInstances"
    #: ASG fleets: desired capacity minus healthy InService instances (reconciler, each run).
    CAPACITY_SHORTFALL = "CapacityShortfall"
    #: Migration jobs found stuck ``running`` (their reconciler crashed) and ended as failed.
    MIGRATION_JOBS_ABANDONED = "MigrationJobsAbandoned"
    # api
    API_UNREADABLE_RECORDS = "ApiUnreadableRecords"  # fleet table items a fleet view skipped
    API_INTERNAL_ERRORS = "ApiInternalErrors"  # requests answered 500 (logged with the traceback)
    # notifier
    NOTIFICATIONS_PUBLISHED = "NotificationsPublished"
    WEBHOOK_DELIVERED = "WebhookDelivered"
    WEBHOOK_FAILURES = "WebhookFailures"
    # agent (PutMetricData from instances)
    TASKS_COMPLETED = "TasksCompleted"
    TASKS_FAILED = "TasksFailed"
    TASKS_RELEASED_ON_DRAIN = "TasksReleasedOnDrain"
    POISON_MESSAGES = "PoisonMessages"
    CHECKPOINTS_SAVED = "CheckpointsSaved"
    #: Over ``Env.CHECKPOINT_MAX_BYTES`` or not stored (S3 error): the previous one stays.
    CHECKPOINTS_REJECTED = "CheckpointsRejected"
    TASKS_RESUMED = "TasksResumedFromCheckpoint"
    #: Released tasks whose process had to be SIGKILLed after the stop grace time.
    TASKS_KILLED = "ReleasedTasksKilled"


# --------------------------------------------------------------------------------------
# Signals: every source (IMDS, each EventBridge kind, scheduled sweeps) becomes one of these
# --------------------------------------------------------------------------------------
class SignalKind(StrEnum):
    SPOT_INTERRUPTION = "spot_interruption"  # 2-minute warning (IMDS instance-action or EventBridge)
    #: Interruptible Capacity Reservation reclaim: a 2-minute warning like the spot one.
    CAPACITY_RESERVATION_INTERRUPTION = "capacity_reservation_interruption"
    REBALANCE = "rebalance"  # rebalance recommendation
    STATE_CHANGE = "state_change"  # EC2 instance state-change notification
    LIFECYCLE_LAUNCH = "lifecycle_launch"  # ASG launch lifecycle action
    LIFECYCLE_TERMINATE = "lifecycle_terminate"  # ASG terminate lifecycle action / target state
    HEALTH_SCHEDULED = "health_scheduled"  # AWS Health scheduled change for EC2
    BOOTSTRAP_DEADLINE = "bootstrap_deadline"  # watchdog: not ready by the deadline
    HEARTBEAT_STALE = "heartbeat_stale"  # watchdog: agent stopped heartbeating
    DRAIN_DEADLINE = "drain_deadline"  # watchdog: drain deadline passed, no state change seen
    DRAINED = "drained"  # watchdog: a draining agent reported its drain finished (``drained_at``)
    #: watchdog: an instance replaced early has a replacement in service (or waited long enough).
    REPLACEMENT_IN_SERVICE = "replacement_in_service"
    #: IMDS ``events/maintenance/scheduled`` (instance-stop, instance-retirement, system-reboot …):
    #: decided by its code; a reboot is not a termination.
    MAINTENANCE_SCHEDULED = "maintenance_scheduled"


class SignalSource(StrEnum):
    IMDS = "imds"
    EVENTBRIDGE = "eventbridge"
    TEST = "test"  # EventBridge event with source spotguard.test (staging)
    WATCHDOG = "watchdog"


#: How long before the reclaim AWS sends a spot (or capacity reservation) interruption warning
#: (``terminate``/``stop``; a ``hibernate`` action starts at once: its deadline is the event time).
SPOT_WARNING_LEAD: Final = timedelta(minutes=2)
#: IMDS ``events/maintenance/scheduled`` codes after which the instance is gone (stopped or
#: retired at ``NotBefore``): the agent drains by then. ``system-reboot``, ``instance-reboot``
#: and ``system-maintenance`` keep the instance (and its disk): logged and recorded, no drain.
MAINTENANCE_DRAIN_CODES: Final = frozenset({"instance-stop", "instance-retirement"})
#: Scheduled-event states that are history, not a notice.
MAINTENANCE_PAST_STATES: Final = frozenset({"completed", "canceled"})
#: EC2 instance ids: ``i-`` and 8 or 17 hex digits.
INSTANCE_ID_PATTERN: Final = r"i-(?:[0-9a-f]{8}|[0-9a-f]{17})"

#: EC2 states after which the instance does no more work: its leases are requeued.
ENDING_EC2_STATES: Final = frozenset({"stopping", "stopped", "shutting-down", "terminated"})


@dataclass(frozen=True, slots=True)
class Signal:
    """One normalised signal about one instance. Parsed once, then decided on by kind."""

    instance_id: str
    kind: SignalKind
    source: SignalSource
    event_id: str
    received_at: datetime
    #: When the instance goes away (spot warning ``instance-action`` time, health window start).
    deadline: datetime | None = None
    #: EC2 state for ``STATE_CHANGE``; lifecycle transition for lifecycle kinds.
    state: str | None = None
    account: str | None = None
    region: str | None = None
    #: Time of the underlying event (EventBridge ``time``), used for requeue latency.
    event_time: datetime | None = None
    #: Kind-specific extras (lifecycle hook name/token, ASG name, health event type …).
    attributes: Mapping[str, str] = field(default_factory=dict)

    def idempotency_key(self) -> str:
        return f"{self.event_id}:{self.instance_id}:{self.kind.value}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = self.kind.value
        data["source"] = self.source.value
        for key in ("received_at", "deadline", "event_time"):
            value = data[key]
            data[key] = value.isoformat() if value is not None else None
        data["attributes"] = dict(self.attributes)
        return data


# --------------------------------------------------------------------------------------
# EventBridge patterns (used by the stack's rules, `spotguard explain` and the drill)
# --------------------------------------------------------------------------------------
TEST_EVENT_SOURCE: Final = "spotguard.test"
#: Source of the events spotguard itself publishes on its own bus (notifications).
NOTIFICATION_EVENT_SOURCE: Final = "spotguard"


class DetailType(StrEnum):
    SPOT_INTERRUPTION = "EC2 Spot Instance Interruption Warning"
    CAPACITY_RESERVATION_INTERRUPTION = "EC2 Capacity Reservation Instance Interruption Warning"
    REBALANCE = "EC2 Instance Rebalance Recommendation"
    STATE_CHANGE = "EC2 Instance State-change Notification"
    LIFECYCLE_LAUNCH = "EC2 Instance-launch Lifecycle Action"
    LIFECYCLE_TERMINATE = "EC2 Instance-terminate Lifecycle Action"
    HEALTH = "AWS Health Event"


def event_patterns(*, allow_test_events: bool, asg_name: str | None = None) -> dict[str, dict[str, Any]]:
    """The EventBridge rule patterns, by rule name.

    ``aws.ec2`` events cannot be filtered by tag or group, so the EC2 rules see every
    instance in the account and region; the dispatcher acknowledges foreign ones at once.
    With ``allow_test_events`` (staging) each rule also accepts source ``spotguard.test``.
    ``asg_name`` narrows the lifecycle rule to the fleet's group (it may be a CDK token).
    """

    def sources(aws_source: str) -> list[str]:
        return [aws_source, TEST_EVENT_SOURCE] if allow_test_events else [aws_source]

    lifecycle: dict[str, Any] = {
        "source": sources("aws.autoscaling"),
        "detail-type": [DetailType.LIFECYCLE_LAUNCH.value, DetailType.LIFECYCLE_TERMINATE.value],
    }
    if asg_name is not None:
        lifecycle["detail"] = {"AutoScalingGroupName": [asg_name]}
    return {
        "spot-interruption": {
            "source": sources("aws.ec2"),
            "detail-type": [DetailType.SPOT_INTERRUPTION.value],
        },
        "capacity-reservation-interruption": {
            "source": sources("aws.ec2"),
            "detail-type": [DetailType.CAPACITY_RESERVATION_INTERRUPTION.value],
        },
        "rebalance": {
            "source": sources("aws.ec2"),
            "detail-type": [DetailType.REBALANCE.value],
        },
        "state-change": {
            "source": sources("aws.ec2"),
            "detail-type": [DetailType.STATE_CHANGE.value],
            "detail": {"state": sorted(ENDING_EC2_STATES)},
        },
        "lifecycle": lifecycle,
        "health": {
            "source": sources("aws.health"),
            "detail-type": [DetailType.HEALTH.value],
            "detail": {"service": ["EC2"], "eventTypeCategory": ["scheduledChange"]},
        },
    }


class NotificationType(StrEnum):
    """``detail-type`` of events spotguard publishes on its bus and POSTs to webhooks."""

    INSTANCE_INTERRUPTED = "instance.interrupted"
    INSTANCE_REPLACED = "instance.replaced"
    INSTANCE_MIGRATED = "instance.migrated"
    BOOTSTRAP_FAILED = "bootstrap.failed"
    MIGRATION_JOB_COMPLETED = "migration.job.completed"


#: Webhook headers: ``t=<unix seconds>,v1=<hex hmac-sha256 of "<t>.<body>">``.
WEBHOOK_SIGNATURE_HEADER: Final = "X-Spotguard-Signature"
WEBHOOK_EVENT_HEADER: Final = "X-Spotguard-Event"
WEBHOOK_ID_HEADER: Final = "X-Spotguard-Delivery"
#: Receivers reject signatures older than this (replay protection).
WEBHOOK_TOLERANCE_SECONDS: Final = 300

# --------------------------------------------------------------------------------------
# Lease table: who holds which SQS message (single table, two item kinds)
# --------------------------------------------------------------------------------------
LEASE_TABLE_PK: Final = "pk"
LEASE_TABLE_SK: Final = "sk"
#: TTL attribute of every table that has one (epoch seconds).
TTL_ATTRIBUTE: Final = "expires_at"
#: Leases outlive any visibility timeout; the TTL only cleans up after crashes.
LEASE_TTL_SECONDS: Final = 2 * 24 * 3600
#: Requeue counters live as long as the longest SQS retention (14 days).
REQUEUE_COUNTER_TTL_SECONDS: Final = 14 * 24 * 3600


#: Partition keys of an instance's own items (its leases, its fleet record) are the instance's
#: ARN, so the instance role's policy can pin writes to ``dynamodb:LeadingKeys =
#: ${ec2:SourceInstanceARN}`` (the ARN IAM knows for instance-profile credentials): an instance
#: can only touch its own items. The prefix (partition, region, account) is built here once:
#: the stack with CDK tokens, the agent from its config or IMDS, the drill and tests with
#: moto's account and region; the control plane reads it from ``Env.INSTANCE_ARN_PREFIX``.
INSTANCE_KEY_SEPARATOR: Final = ":instance/"
_INSTANCE_ARN_PREFIX = re.compile(r"^arn:aws[a-z-]*:ec2:[a-z0-9-]+:\d{12}:instance/$")


def instance_arn_prefix(*, partition: str, region: str, account_id: str) -> str:
    """``arn:<partition>:ec2:<region>:<account>:instance/`` (values may be CDK tokens)."""
    return f"arn:{partition}:ec2:{region}:{account_id}{INSTANCE_KEY_SEPARATOR}"


def partition_of_region(region: str) -> str:
    """The partition of a commercial, China or GovCloud region (where nothing better says it)."""
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def checked_instance_arn_prefix(value: str | None = None) -> str:
    """``value``, else ``Env.INSTANCE_ARN_PREFIX`` of the environment, checked to be an
    instance ARN prefix of one account and region (a wrong one would key every write
    somewhere the instance role is denied)."""
    prefix = value or os.environ.get(Env.INSTANCE_ARN_PREFIX, "")
    if not _INSTANCE_ARN_PREFIX.match(prefix):
        raise RuntimeError(
            f"instance ARN prefix {prefix!r} is not arn:<partition>:ec2:<region>:<account>:instance/ "
            f"(set {Env.INSTANCE_ARN_PREFIX.value})"
        )
    return prefix


def instance_key(instance_id: str, arn_prefix: str) -> str:
    """The partition key of ``instance_id``'s items: its instance ARN."""
    return f"{arn_prefix}{instance_id}"


def instance_id_of_key(key: str) -> str:
    """The instance id in an instance key (the control plane trusts the key, never a plain
    ``instance_id`` attribute: the key is what IAM pins to the writer). ``ValueError`` for
    anything else (items of the old key scheme included)."""
    prefix, separator, instance_id = str(key).rpartition(INSTANCE_KEY_SEPARATOR)
    if not separator or not prefix.startswith("arn:") or not instance_id:
        raise ValueError(f"not an instance key: {str(key)[:80]!r}")
    return instance_id


def lease_sk(message_id: str) -> str:
    return f"lease#{message_id}"


def lease_key(instance_id: str, message_id: str, arn_prefix: str) -> dict[str, str]:
    return {LEASE_TABLE_PK: instance_key(instance_id, arn_prefix), LEASE_TABLE_SK: lease_sk(message_id)}


#: Requeue counters are the one shared item kind of the lease table: any worker that releases
#: a message counts it. The instance role may only ``UpdateItem``/``GetItem`` these
#: attributes of keys starting with this prefix (docs/security.md).
REQUEUE_COUNTER_PK_PREFIX: Final = "message#"
REQUEUE_COUNTER_SK: Final = "requeues"


def requeue_counter_key(message_id: str) -> dict[str, str]:
    """Key of the item that counts how often interruptions (not failures) requeued a message."""
    return {LEASE_TABLE_PK: f"{REQUEUE_COUNTER_PK_PREFIX}{message_id}", LEASE_TABLE_SK: REQUEUE_COUNTER_SK}


#: Number attribute of the requeue counter item (``ADD requeues :1``). Whoever makes a
#: message visible because its instance is going away increments it *before* the
#: visibility change, so the next receiver never counts that receive as a failure.
REQUEUE_COUNTER_ATTRIBUTE: Final = "requeues"


@dataclass(frozen=True, slots=True)
class Lease:
    """Written by the worker before it starts a message; deleted when it deletes or releases it."""

    instance_id: str
    message_id: str
    receipt_handle: str
    queue_url: str
    leased_at: float  # epoch seconds
    heartbeat_at: float  # epoch seconds; refreshed while the task runs
    expires_at: int = 0  # TTL, epoch seconds
    #: The message's interruption requeue count when this lease was taken (the worker knows
    #: it: 0 on a first receive, else it read the counter). Whoever requeues the lease then
    #: *writes* ``count + 1`` (a batch put, idempotent when agent and control plane both
    #: requeue it) instead of one ``ADD`` per message. ``None``: unknown, ``ADD`` is used.
    interruption_requeues: int | None = None

    def key(self, arn_prefix: str) -> dict[str, str]:
        return lease_key(self.instance_id, self.message_id, arn_prefix)

    def to_item(self, arn_prefix: str) -> dict[str, Any]:
        """Plain-Python item (boto3 resource style); adapters serialise it."""
        expires_at = self.expires_at or int(self.leased_at) + LEASE_TTL_SECONDS
        return {
            **self.key(arn_prefix),
            "instance_id": self.instance_id,
            "message_id": self.message_id,
            "receipt_handle": self.receipt_handle,
            "queue_url": self.queue_url,
            "leased_at": _decimal_safe(self.leased_at),
            "heartbeat_at": _decimal_safe(self.heartbeat_at),
            TTL_ATTRIBUTE: expires_at,
            **(
                {"interruption_requeues": self.interruption_requeues}
                if self.interruption_requeues is not None
                else {}
            ),
        }

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> Lease:
        return cls(
            instance_id=instance_id_of_key(item[LEASE_TABLE_PK]),
            message_id=str(item["message_id"]),
            receipt_handle=str(item["receipt_handle"]),
            queue_url=str(item["queue_url"]),
            leased_at=float(item["leased_at"]),
            heartbeat_at=float(item["heartbeat_at"]),
            expires_at=int(item.get(TTL_ATTRIBUTE, 0)),
            interruption_requeues=(
                int(item["interruption_requeues"]) if item.get("interruption_requeues") is not None else None
            ),
        )


def _decimal_safe(value: float) -> Any:
    """DynamoDB numbers must not be binary floats; keep millisecond precision."""
    from decimal import Decimal  # noqa: PLC0415 - keep import local: tiny module, hot path elsewhere

    return Decimal(str(round(value, 3)))


# --------------------------------------------------------------------------------------
# Poison rule (who counts what toward the DLQ)
# --------------------------------------------------------------------------------------
#: Message attribute / system attribute names the worker reads.
RECEIVE_COUNT_ATTRIBUTE: Final = "ApproximateReceiveCount"
#: SQS redrive threshold on the work queue. It is only a backstop far above the poison
#: threshold: interruptions make messages visible again (raising ApproximateReceiveCount)
#: without being failures. The worker moves a message to the DLQ itself once
#: ``receive_count - 1 - requeues_by_interruption >= max_failures``.
REDRIVE_BACKSTOP_RECEIVE_COUNT: Final = 100


def genuine_failures(receive_count: int, interruption_requeues: int) -> int:
    """Processing attempts that ended in failure (or a silent visibility timeout).

    ``receive_count`` is SQS's ApproximateReceiveCount *including* the current receive;
    ``interruption_requeues`` counts the times spotguard made the message visible because
    its instance went away. What is left are previous receives that failed.
    """
    return max(0, receive_count - 1 - interruption_requeues)


# --------------------------------------------------------------------------------------
# Fleet table: one record per managed instance
# --------------------------------------------------------------------------------------
#: The instance key (``instance_key``: the instance ARN); ``instance_id`` stays a plain
#: attribute for the views, never trusted over the key.
FLEET_TABLE_PK: Final = "pk"
#: Records of ended instances are kept this long for the fleet views, then expire.
FLEET_RECORD_RETENTION_SECONDS: Final = 30 * 24 * 3600


class InstanceState(StrEnum):
    LAUNCHING = "launching"  # launched, bootstrap not finished
    READY = "ready"  # bootstrap verified, agent running
    DRAINING = "draining"  # interruption notice / scale-in: finishing or releasing work
    ENDED = "ended"  # stopped, terminated or terminated by the watchdog


#: Transitions are monotonic: a record only moves to a higher rank (out-of-order events
#: are normal on EventBridge; a terminated instance never goes back to draining).
STATE_RANK: Final[Mapping[InstanceState, int]] = {
    InstanceState.LAUNCHING: 0,
    InstanceState.READY: 1,
    InstanceState.DRAINING: 2,
    InstanceState.ENDED: 3,
}


class BootstrapStatus(StrEnum):
    PENDING = "pending"
    READY = "ready"
    FAILED = "failed"


class EndReason(StrEnum):
    SPOT_RECLAIM = "spot_reclaim"  # stopped/terminated after a spot interruption warning
    #: stopped/terminated after an interruptible Capacity Reservation interruption warning
    CAPACITY_RESERVATION_RECLAIM = "capacity_reservation_reclaim"
    SCALE_IN = "scale_in"  # ASG terminate lifecycle / scale-in
    #: replaced early (rebalance, Health, spot warning), drained, then ended by spotguard
    RETIRED = "retired"
    BOOTSTRAP_FAILED = "bootstrap_failed"  # instance reported a failed bootstrap
    BOOTSTRAP_DEADLINE = "bootstrap_deadline"  # watchdog: not ready by the deadline
    HEARTBEAT_STALE = "heartbeat_stale"  # watchdog: agent silent
    MIGRATED = "migrated"  # reconciler replaced it
    STOPPED = "stopped"  # stopped for another reason
    TERMINATED = "terminated"  # terminated for another reason


#: Poison rule: ends for which the instance went away for a reason other than running the
#: messages it held (a notice came first), so requeueing its leases counts as an interruption.
#: Heartbeat-stale, a failed or late bootstrap and a stop/termination without prior notice are
#: not in it: the message may be what killed its host.
INTERRUPTION_END_REASONS: Final = frozenset(
    {EndReason.SPOT_RECLAIM, EndReason.CAPACITY_RESERVATION_RECLAIM, EndReason.SCALE_IN, EndReason.RETIRED}
)


@dataclass(slots=True)
class FleetRecord:
    """The control plane's and the agent's shared view of one instance.

    It is also the control plane's channel to the agent (the drain order): the agent reads
    its own record on every fleet heartbeat (the heartbeat ``UpdateItem`` returns it), and
    ``state == DRAINING`` tells it to drain by ``drain_deadline_at`` (``None``: finish the
    running tasks, take no new ones), whatever decided it (Health event, early replacement,
    an operator). When its drain has finished (no task running, nothing leased) the agent
    sets ``drained_at``; the watchdog ends a draining instance once it is drained, once its
    replacement is in service, or at its deadline, and never requeues the tasks of an agent
    whose heartbeat is fresh.
    """

    instance_id: str
    fleet: str
    state: InstanceState = InstanceState.LAUNCHING
    bootstrap_status: BootstrapStatus = BootstrapStatus.PENDING
    bootstrap_reason: str | None = None
    launched_at: float | None = None
    bootstrap_deadline_at: float | None = None
    ready_at: float | None = None
    heartbeat_at: float | None = None
    #: Interruption deadline (spot warning time) while draining.
    drain_deadline_at: float | None = None
    ended_at: float | None = None
    end_reason: EndReason | None = None
    ec2_state: str | None = None
    instance_type: str | None = None
    availability_zone: str | None = None
    #: Last signal seen: {"kind", "event_id", "source", "at"}.
    last_signal: dict[str, str] | None = None
    replacement_requested_at: float | None = None
    replaced_by: str | None = None
    expires_at: int | None = None
    #: When a spot interruption warning for this instance was first seen (epoch seconds):
    #: the later stop/termination is then recorded as ``EndReason.SPOT_RECLAIM``.
    interrupted_at: float | None = None
    #: Set by the agent when its drain finished: nothing running, nothing leased.
    drained_at: float | None = None
    #: When the ``instance.interrupted`` notice for this instance was published: the fact
    #: that deduplicates the notice on its own (a retried signal redoes only what is missing).
    interruption_notified_at: float | None = None

    @property
    def state_rank(self) -> int:
        return STATE_RANK[self.state]

    def to_item(self) -> dict[str, Any]:
        """The record's attributes (``instance_id`` plain); ``FleetStore`` adds the key."""
        item: dict[str, Any] = {"state_rank": self.state_rank}
        for key, value in asdict(self).items():
            if value is None:
                continue
            if isinstance(value, float):
                item[key] = _decimal_safe(value)
            elif isinstance(value, StrEnum):
                item[key] = value.value
            else:
                item[key] = value
        return item

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> FleetRecord:
        def num(key: str) -> float | None:
            value = item.get(key)
            return float(value) if value is not None else None

        end_reason = item.get("end_reason")
        expires = item.get(TTL_ATTRIBUTE)
        return cls(
            instance_id=instance_id_of_key(item[FLEET_TABLE_PK]),
            fleet=str(item.get("fleet", "")),
            state=InstanceState(item.get("state", InstanceState.LAUNCHING)),
            bootstrap_status=BootstrapStatus(item.get("bootstrap_status", BootstrapStatus.PENDING)),
            bootstrap_reason=item.get("bootstrap_reason"),
            launched_at=num("launched_at"),
            bootstrap_deadline_at=num("bootstrap_deadline_at"),
            ready_at=num("ready_at"),
            heartbeat_at=num("heartbeat_at"),
            drain_deadline_at=num("drain_deadline_at"),
            ended_at=num("ended_at"),
            end_reason=EndReason(end_reason) if end_reason else None,
            ec2_state=item.get("ec2_state"),
            instance_type=item.get("instance_type"),
            availability_zone=item.get("availability_zone"),
            last_signal=dict(item["last_signal"]) if item.get("last_signal") else None,
            replacement_requested_at=num("replacement_requested_at"),
            replaced_by=item.get("replaced_by"),
            expires_at=int(expires) if expires is not None else None,
            interrupted_at=num("interrupted_at"),
            drained_at=num("drained_at"),
            interruption_notified_at=num("interruption_notified_at"),
        )


# --------------------------------------------------------------------------------------
# Jobs table: migration / reconcile runs (history API)
# --------------------------------------------------------------------------------------
JOBS_TABLE_PK: Final = "job_kind"  # e.g. "migration"
JOBS_TABLE_SK: Final = "started_key"  # "<iso start time>#<job id>": newest first by Query
JOB_KIND_MIGRATION: Final = "migration"
JOB_RECORD_RETENTION_SECONDS: Final = 90 * 24 * 3600

# --------------------------------------------------------------------------------------
# Idempotency table (Powertools Idempotency's own schema)
# --------------------------------------------------------------------------------------
IDEMPOTENCY_TABLE_PK: Final = "id"
IDEMPOTENCY_TTL_ATTRIBUTE: Final = "expiration"

# --------------------------------------------------------------------------------------
# Configuration ranges shared by the CDK settings and the runtime (seed: auto-migration)
# --------------------------------------------------------------------------------------
MIGRATION_INTERVAL_MINUTES_RANGE: Final = (1, 60)
MIGRATION_JOB_TIMEOUT_MS_RANGE: Final = (60_000, 1_800_000)  # 1-30 minutes
MIGRATION_MAX_CONCURRENT_RANGE: Final = (1, 20)


class RebalancePolicy(StrEnum):
    """What a rebalance recommendation or AWS Health scheduled change does."""

    IGNORE = "ignore"
    REPLACE = "replace"  # request replacement capacity early, keep working
    DRAIN = "drain"  # replace early and drain like a spot warning


# --------------------------------------------------------------------------------------
# Defaults: one value each, read by the CDK settings, the agent's config, the drill and tests
# --------------------------------------------------------------------------------------
DEFAULT_HANDLER: Final = "spotguard_agent.sample_handler:handle"
DEFAULT_CONCURRENCY: Final = 2
DEFAULT_VISIBILITY_TIMEOUT_SECONDS: Final = 120
DEFAULT_MAX_FAILURES: Final = 5
#: Messages the worker may receive ahead of its free task slots (so one receive and one
#: lease batch serve up to ten messages), used only while recent tasks are short.
DEFAULT_PREFETCH: Final = 9
DEFAULT_IMDS_POLL_SECONDS: Final = 1.0
DEFAULT_DRAIN_MARGIN_SECONDS: Final = 15
#: The agent's own health endpoint, which the installer verifies is listening.
DEFAULT_HEALTH_PORT: Final = 9880
DEFAULT_BOOTSTRAP_DEADLINE_MINUTES: Final = 20
DEFAULT_HEARTBEAT_STALE_MINUTES: Final = 5
#: An instance replaced early keeps working until its replacement is in service, then gets
#: a drain order with this long to finish (the watchdog ends it once drained or at that time).
DEFAULT_RETIRE_DRAIN_SECONDS: Final = 600
#: A detached instance whose replacement never comes into service drains anyway after this.
DEFAULT_REPLACEMENT_WAIT_SECONDS: Final = 1800
#: After a spot interruption, replacements avoid its (instance type, zone) pool this long.
RECLAIMED_POOL_AVOID_SECONDS: Final = 15 * 60


# --------------------------------------------------------------------------------------
# Environment variables (Lambda functions and the agent read these; CDK and the drill set them)
# --------------------------------------------------------------------------------------
class Env(StrEnum):
    FLEET_NAME = "SPOTGUARD_FLEET_NAME"
    WORK_QUEUE_URL = "SPOTGUARD_WORK_QUEUE_URL"
    WORK_DLQ_URL = "SPOTGUARD_WORK_DLQ_URL"
    LEASE_TABLE = "SPOTGUARD_LEASE_TABLE"
    FLEET_TABLE = "SPOTGUARD_FLEET_TABLE"
    #: ``arn:<partition>:ec2:<region>:<account>:instance/``: instance ids become table keys
    #: with it (``instance_key``); the stack sets it from CDK tokens, the agent config too.
    INSTANCE_ARN_PREFIX = "SPOTGUARD_INSTANCE_ARN_PREFIX"
    JOBS_TABLE = "SPOTGUARD_JOBS_TABLE"
    IDEMPOTENCY_TABLE = "SPOTGUARD_IDEMPOTENCY_TABLE"
    ASG_NAME = "SPOTGUARD_ASG_NAME"
    LAUNCH_TEMPLATE_ID = "SPOTGUARD_LAUNCH_TEMPLATE_ID"
    NOTIFICATION_BUS = "SPOTGUARD_NOTIFICATION_BUS"
    WEBHOOK_URL = "SPOTGUARD_WEBHOOK_URL"
    WEBHOOK_SECRET_ARN = "SPOTGUARD_WEBHOOK_SECRET_ARN"  # noqa: S105 - a name, not a secret
    NOVITA_API_KEY_SECRET_ARN = "SPOTGUARD_NOVITA_API_KEY_SECRET_ARN"  # noqa: S105
    NOVITA_API_URL = "SPOTGUARD_NOVITA_API_URL"
    #: Local runs and tests only (never set by the stack): webhook and Novita URLs may name
    #: a loopback host over http (``spotguard_core.url_safety``).
    ALLOW_LOOPBACK_URLS = "SPOTGUARD_ALLOW_LOOPBACK_URLS"
    ACCOUNT_ID = "SPOTGUARD_ACCOUNT_ID"
    REGION = "SPOTGUARD_REGION"
    REBALANCE_POLICY = "SPOTGUARD_REBALANCE_POLICY"
    EARLY_REPLACEMENT = "SPOTGUARD_EARLY_REPLACEMENT"
    HEARTBEAT_STALE_SECONDS = "SPOTGUARD_HEARTBEAT_STALE_SECONDS"
    BOOTSTRAP_DEADLINE_SECONDS = "SPOTGUARD_BOOTSTRAP_DEADLINE_SECONDS"
    REQUEUE_ENABLED = "SPOTGUARD_REQUEUE_ENABLED"  # drill baseline mode turns it off
    #: Optional (default ``DEFAULT_RETIRE_DRAIN_SECONDS``): drain time of an instance replaced early.
    RETIRE_DRAIN_SECONDS = "SPOTGUARD_RETIRE_DRAIN_SECONDS"
    #: Optional (default ``DEFAULT_REPLACEMENT_WAIT_SECONDS``): a detached instance drains after this
    #: even if no replacement came into service.
    REPLACEMENT_WAIT_SECONDS = "SPOTGUARD_REPLACEMENT_WAIT_SECONDS"
    #: "true" only in staging: the dispatcher accepts source ``spotguard.test`` (else rejects it).
    ALLOW_TEST_EVENTS = "SPOTGUARD_ALLOW_TEST_EVENTS"
    MAX_FAILURES = "SPOTGUARD_MAX_FAILURES"  # poison threshold (genuine failures)
    MIGRATION_ENABLED = "MIGRATION_ENABLED"
    MIGRATION_INTERVAL_MINUTES = "MIGRATION_INTERVAL_MINUTES"
    MIGRATION_JOB_TIMEOUT_MS = "MIGRATION_JOB_TIMEOUT_MS"
    MIGRATION_MAX_CONCURRENT = "MIGRATION_MAX_CONCURRENT"
    MIGRATION_DRY_RUN = "MIGRATION_DRY_RUN"
    MIGRATION_RETRY_FAILED = "MIGRATION_RETRY_FAILED"
    MIGRATION_LOG_LEVEL = "MIGRATION_LOG_LEVEL"
    MIGRATION_PROVIDER = "MIGRATION_PROVIDER"
    RECONCILER_FUNCTION = "SPOTGUARD_RECONCILER_FUNCTION"  # the api invokes it for /migration/trigger
    SIGNAL_QUEUE_URL = "SPOTGUARD_SIGNAL_QUEUE_URL"
    SUBNET_IDS = "SPOTGUARD_SUBNET_IDS"  # comma-separated fleet subnets (reconciler launches)
    #: Comma-separated instance types the reconciler adds to the ASG's pools when capacity stays
    #: below desired (empty: report the shortfall only).
    FALLBACK_INSTANCE_TYPES = "SPOTGUARD_FALLBACK_INSTANCE_TYPES"
    # instance agent (written to /etc/spotguard/agent.env by the installer)
    HANDLER = "SPOTGUARD_HANDLER"  # module:function run for each message
    CONCURRENCY = "SPOTGUARD_CONCURRENCY"
    PREFETCH = "SPOTGUARD_PREFETCH"  # messages received ahead of free slots (0 = none)
    VISIBILITY_TIMEOUT_SECONDS = "SPOTGUARD_VISIBILITY_TIMEOUT_SECONDS"
    IMDS_URL = "SPOTGUARD_IMDS_URL"
    IMDS_POLL_SECONDS = "SPOTGUARD_IMDS_POLL_SECONDS"
    HEALTH_PORT = "SPOTGUARD_HEALTH_PORT"
    DRAIN_MARGIN_SECONDS = "SPOTGUARD_DRAIN_MARGIN_SECONDS"
    LAUNCH_HOOK_NAME = "SPOTGUARD_LAUNCH_HOOK_NAME"
    TERMINATE_HOOK_NAME = "SPOTGUARD_TERMINATE_HOOK_NAME"
    AGENT_CONFIG_PARAMETER = "SPOTGUARD_AGENT_CONFIG_PARAMETER"
    BUNDLE_URL = "SPOTGUARD_BUNDLE_URL"
    BUNDLE_SHA256 = "SPOTGUARD_BUNDLE_SHA256"
    INSTALL_VERIFY_SECONDS = "SPOTGUARD_INSTALL_VERIFY_SECONDS"  # installer: wait for unit + port
    # the user's workload (an S3 asset next to the agent bundle; see "Workload" below)
    WORKLOAD_URL = "SPOTGUARD_WORKLOAD_URL"  # s3://bucket/key of the workload tar.gz (agent config)
    WORKLOAD_SHA256 = "SPOTGUARD_WORKLOAD_SHA256"  # hex sha256 of that file (agent config)
    WORKLOAD_DIR = "SPOTGUARD_WORKLOAD_DIR"  # where it is unpacked (installer -> agent.env; drill)
    WORKLOAD_PYTHON = "SPOTGUARD_WORKLOAD_PYTHON"  # python of the workload's venv (installer -> agent)
    COMMAND = "SPOTGUARD_COMMAND"  # command mode: run per message (exclusive with HANDLER)
    STOP_GRACE_SECONDS = "SPOTGUARD_STOP_GRACE_SECONDS"  # SIGTERM -> SIGKILL for a released task
    CHECKPOINT_BUCKET = "SPOTGUARD_CHECKPOINT_BUCKET"
    CHECKPOINT_MAX_BYTES = "SPOTGUARD_CHECKPOINT_MAX_BYTES"
    LOG_GROUP = "SPOTGUARD_LOG_GROUP"  # CloudWatch Logs group of the fleet (agent + task output)
    # AWS latency and fault injection (benchmarks and the drill only; never set by the stack)
    AWS_LATENCY_MS = "SPOTGUARD_AWS_LATENCY_MS"  # added before every AWS call
    AWS_FAULT_RATE = "SPOTGUARD_AWS_FAULT_RATE"  # fraction of calls answered with throttling/5xx
    AWS_FAULT_SEED = "SPOTGUARD_AWS_FAULT_SEED"  # seeds the choice, so a run repeats
    AWS_FAULT_LOG_DIR = "SPOTGUARD_AWS_FAULT_LOG_DIR"  # each process writes faults-<pid>.json here


class TaskEnv(StrEnum):
    """Environment of a command-mode task (and of a Python handler's child process)."""

    MESSAGE_ID = "SPOTGUARD_MESSAGE_ID"
    RECEIVE_COUNT = "SPOTGUARD_RECEIVE_COUNT"
    CHECKPOINT_DIR = "SPOTGUARD_CHECKPOINT_DIR"
    #: ISO 8601 UTC time the instance goes away; set only while the agent drains.
    DEADLINE = "SPOTGUARD_DEADLINE"
    #: A file holding that same ISO 8601 time, written by the agent as soon as a drain with a
    #: deadline begins (before the SIGTERM of a release): a command started before the drain
    #: cannot see a new environment variable, but it can read this file.
    DEADLINE_FILE = "SPOTGUARD_DEADLINE_FILE"


# --------------------------------------------------------------------------------------
# Fleet naming and the bootstrap contract (CDK <-> user data <-> installer <-> agent)
# --------------------------------------------------------------------------------------
def asg_name(fleet: str) -> str:
    """The ASG name is fixed from the fleet name: the launch template's user data needs
    it (to answer the lifecycle hook) and cannot reference the ASG without a cycle."""
    return f"spotguard-{fleet}"


LAUNCH_HOOK_NAME: Final = "spotguard-launch"
TERMINATE_HOOK_NAME: Final = "spotguard-terminate"


def agent_config_parameter(fleet: str) -> str:
    """SSM parameter holding the agent's configuration as a JSON object of ``Env`` names to
    values (queue URL, tables, handler …). Keeps the user data tiny; read by the installer."""
    return f"/spotguard/{fleet}/agent-config"


#: Files on the instance.
AGENT_ENV_FILE: Final = "/etc/spotguard/agent.env"
BOOTSTRAP_LOG_FILE: Final = "/var/log/spotguard-bootstrap.log"
INSTALL_ROOT: Final = "/opt/spotguard"
#: User data template inside instance_assets/, rendered by CDK with ``Fn::Sub``. Its
#: ``${Name}`` placeholders are exactly the keys of ``BOOTSTRAP_PLACEHOLDERS``.
USER_DATA_TEMPLATE: Final = "bootstrap/user-data.sh"
BOOTSTRAP_PLACEHOLDERS: Final[Mapping[str, str]] = {
    "Fleet": "fleet name",
    "Region": "AWS region",
    "BundleUrl": "s3://bucket/key of the agent bundle (tar.gz)",
    "BundleSha256": "hex sha256 of the bundle file",
    "DeadlineSeconds": "bootstrap deadline, seconds after boot",
    "FleetTable": "fleet table name (failure record)",
    "InstanceArnPrefix": "instance ARN prefix (the failure record's key: contracts.instance_key)",
    "AsgName": "ASG name (lifecycle answer)",
    "LaunchHook": "launch lifecycle hook name",
    "ConfigParameter": "SSM parameter name of the agent config",
}


# --------------------------------------------------------------------------------------
# The user's workload and checkpoints (CDK <-> installer <-> agent <-> drill)
# --------------------------------------------------------------------------------------
#: Where the installer unpacks the workload tar.gz and builds its virtual environment.
WORKLOAD_DIR: Final = f"{INSTALL_ROOT}/workload"
WORKLOAD_VENV: Final = f"{INSTALL_ROOT}/workload-venv"
#: Inside the workload directory: installed into WORKLOAD_VENV when present, from the
#: wheelhouse directory (``pip --no-index --find-links``) when that exists too.
WORKLOAD_REQUIREMENTS: Final = "requirements.txt"
WORKLOAD_WHEELHOUSE: Final = "wheelhouse"
DEFAULT_STOP_GRACE_SECONDS: Final = 10
DEFAULT_CHECKPOINT_MAX_BYTES: Final = 64 * 1024 * 1024
#: Every checkpoint object lives under this prefix of the checkpoint bucket; the bucket's
#: lifecycle rule expires it and the instance role may touch only ``<prefix><fleet>/*``.
CHECKPOINT_KEY_PREFIX: Final = "checkpoints/"


def checkpoint_key(fleet: str, message_id: str) -> str:
    """One object per message: PutObject is atomic, so a checkpoint is whole or absent."""
    return f"{CHECKPOINT_KEY_PREFIX}{fleet}/{message_id}"


def now() -> float:
    """Wall-clock epoch seconds (one place, so tests and the drill read the same clock)."""
    return time.time()


def utc_from_epoch(value: float) -> datetime:
    return datetime.fromtimestamp(value, tz=UTC)
