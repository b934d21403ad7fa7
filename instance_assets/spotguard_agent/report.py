"""What the agent tells the control plane: fleet record, instance tags, lifecycle answers.

Every call here is best effort: a failed report is logged and the agent carries on (the
control plane's watchdog is the backstop), except where the caller asks for ``strict``.
"""

from __future__ import annotations

import logging
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError
from spotguard_core.contracts import (
    BOOTSTRAP_REASON_TAG_KEY,
    BOOTSTRAP_TAG_KEY,
    FLEET_TABLE_PK,
    STATE_RANK,
    BootstrapStatus,
    InstanceState,
    now,
)

from spotguard_agent.awsclients import AwsClients

LOG = logging.getLogger("spotguard.report")
#: botocore raises ResponseParserError (not a BotoCoreError) for a garbled 5xx body.
AWS_ERRORS = (BotoCoreError, ClientError, ResponseParserError)
#: EC2 tag values are limited to 256 characters.
MAX_TAG_VALUE = 256


def _num(value: float) -> dict[str, str]:
    return {"N": f"{value:.3f}"}


class Reporter:
    def __init__(self, clients: AwsClients, *, instance_id: str, fleet: str, fleet_table: str) -> None:
        self.clients = clients
        self.instance_id = instance_id
        self.fleet = fleet
        self.fleet_table = fleet_table

    # ------------------------------------------------------------------ fleet record
    def _update(self, sets: dict[str, dict[str, Any]], *, state: InstanceState | None = None) -> bool:
        """SET the given attributes; move ``state`` only forward (ranks are monotonic)."""
        if not self.fleet_table:
            return False
        names = {f"#a{i}": name for i, name in enumerate(sets)}
        values = {f":v{i}": value for i, value in enumerate(sets.values())}
        assignments = [f"#a{i} = :v{i}" for i in range(len(sets))]
        kwargs: dict[str, Any] = {}
        if state is not None:
            names["#state"], names["#rank"] = "state", "state_rank"
            values[":state"] = {"S": state.value}
            values[":rank"] = {"N": str(STATE_RANK[state])}
            assignments += ["#state = :state", "#rank = :rank"]
            kwargs["ConditionExpression"] = "attribute_not_exists(#rank) OR #rank <= :rank"
        try:
            self.clients.dynamodb.update_item(
                TableName=self.fleet_table,
                Key={FLEET_TABLE_PK: {"S": self.instance_id}},
                UpdateExpression="SET " + ", ".join(assignments),
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
                **kwargs,
            )
            return True
        except ClientError as error:
            if state is not None and error.response["Error"]["Code"] == "ConditionalCheckFailedException":
                LOG.info("fleet record already past %s; updating without the state", state.value)
                return self._update(sets)
            LOG.warning("fleet record update failed: %s", error)
        except (BotoCoreError, ResponseParserError) as error:
            LOG.warning("fleet record update failed: %s", error)
        return False

    def heartbeat(self) -> bool:
        return self._update({"heartbeat_at": _num(now()), "fleet": {"S": self.fleet}})

    def ready(self, *, instance_type: str | None = None, availability_zone: str | None = None) -> bool:
        at = now()
        sets = {
            "fleet": {"S": self.fleet},
            "bootstrap_status": {"S": BootstrapStatus.READY.value},
            "ready_at": _num(at),
            "heartbeat_at": _num(at),
        }
        if instance_type:
            sets["instance_type"] = {"S": instance_type}
        if availability_zone:
            sets["availability_zone"] = {"S": availability_zone}
        return self._update(sets, state=InstanceState.READY)

    def failed(self, reason: str) -> bool:
        return self._update(
            {
                "fleet": {"S": self.fleet},
                "bootstrap_status": {"S": BootstrapStatus.FAILED.value},
                "bootstrap_reason": {"S": reason[:1000]},
            }
        )

    def draining(self, deadline_epoch: float | None, kind: str) -> bool:
        sets: dict[str, dict[str, Any]] = {"heartbeat_at": _num(now()), "fleet": {"S": self.fleet}}
        if deadline_epoch is not None:
            sets["drain_deadline_at"] = _num(deadline_epoch)
        sets["last_signal"] = {
            "M": {
                "kind": {"S": kind},
                "source": {"S": "imds"},
                "event_id": {"S": f"imds:{self.instance_id}:{kind}"},
                "at": {"S": f"{now():.3f}"},
            }
        }
        return self._update(sets, state=InstanceState.DRAINING)

    # ------------------------------------------------------------------ tags
    def tag_bootstrap(self, status: BootstrapStatus, reason: str | None = None) -> bool:
        tags = [{"Key": BOOTSTRAP_TAG_KEY, "Value": status.value}]
        if reason:
            tags.append({"Key": BOOTSTRAP_REASON_TAG_KEY, "Value": reason[:MAX_TAG_VALUE]})
        try:
            self.clients.client("ec2").create_tags(Resources=[self.instance_id], Tags=tags)
            return True
        except AWS_ERRORS as error:
            LOG.warning("tagging %s failed: %s", self.instance_id, error)
            return False

    # ------------------------------------------------------------------ lifecycle hooks
    def complete_lifecycle(self, asg_name: str, hook_name: str, result: str) -> bool:
        if not asg_name or not hook_name:
            LOG.info("no ASG/hook configured: lifecycle answer %s skipped", result)
            return False
        try:
            self.clients.client("autoscaling").complete_lifecycle_action(
                AutoScalingGroupName=asg_name,
                LifecycleHookName=hook_name,
                InstanceId=self.instance_id,
                LifecycleActionResult=result,
            )
            LOG.info("lifecycle hook %s answered %s", hook_name, result)
            return True
        except AWS_ERRORS as error:
            # Outside a lifecycle transition (or on moto) this fails; the hook's own
            # timeout and default result still apply, so log and go on.
            LOG.warning("CompleteLifecycleAction %s %s failed: %s", hook_name, result, error)
            return False

    def lifecycle_heartbeat(self, asg_name: str, hook_name: str) -> bool:
        if not asg_name or not hook_name:
            return False
        try:
            self.clients.client("autoscaling").record_lifecycle_action_heartbeat(
                AutoScalingGroupName=asg_name, LifecycleHookName=hook_name, InstanceId=self.instance_id
            )
            return True
        except AWS_ERRORS as error:
            LOG.warning("RecordLifecycleActionHeartbeat %s failed: %s", hook_name, error)
            return False
