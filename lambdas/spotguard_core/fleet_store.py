"""DynamoDB adapter of the fleet table: one ``contracts.FleetRecord`` per managed instance.

State transitions are monotonic (``contracts.STATE_RANK``): every state change is a
conditional write that only succeeds when the stored record is absent or of a lower (or,
if allowed, equal) rank. Out-of-order events therefore cannot move a terminated instance
back to draining, whatever order they arrive in.

Records are keyed by the instance key (the instance ARN, ``contracts.instance_key``) so the
instance role can be limited to its own record; ``instance_id`` is a plain attribute of
every record written here (the views read it, the control plane trusts the key).

The agent and the control plane both use this class (standard library + boto3 only: the
agent bundle ships it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from boto3.dynamodb.conditions import Attr
from botocore.exceptions import ClientError

from spotguard_core import aws, dynamo
from spotguard_core.contracts import (
    FLEET_TABLE_PK,
    STATE_RANK,
    Env,
    FleetRecord,
    InstanceState,
    checked_instance_arn_prefix,
    instance_key,
)

#: Attributes the store owns: the key and the plain id always match the instance written.
_OWN_FIELDS = (FLEET_TABLE_PK, "instance_id", "fleet")


def _conditional_failed(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"


class FleetStore:
    """Reads and writes fleet records. The table name comes from ``SPOTGUARD_FLEET_TABLE`` and
    the instance ARN prefix from ``SPOTGUARD_INSTANCE_ARN_PREFIX`` unless given."""

    def __init__(
        self,
        table_name: str | None = None,
        *,
        table: Any = None,
        clients: aws.ClientFactory | None = None,
        arn_prefix: str | None = None,
    ) -> None:
        self.table = table if table is not None else dynamo.table(Env.FLEET_TABLE, table_name, clients)
        self.arn_prefix = checked_instance_arn_prefix(arn_prefix)

    def key(self, instance_id: str) -> dict[str, str]:
        return {FLEET_TABLE_PK: instance_key(instance_id, self.arn_prefix)}

    def get_item(self, instance_id: str) -> dict[str, Any] | None:
        """The raw item of ``instance_id`` (strongly consistent), None when absent."""
        item: dict[str, Any] | None = self.table.get_item(Key=self.key(instance_id), ConsistentRead=True).get(
            "Item"
        )
        return item

    # -- reads ---------------------------------------------------------------------------
    def get(self, instance_id: str) -> FleetRecord | None:
        """One strongly consistent GetItem (the dispatcher's whole "managed?" check when present)."""
        item = self.get_item(instance_id)
        return FleetRecord.from_item(item) if item else None

    def scan(self, states: Iterable[InstanceState] | None = None) -> Iterator[FleetRecord]:
        """Every record (optionally only those in ``states``), paginated."""
        kwargs: dict[str, Any] = {}
        if states is not None:
            wanted = [InstanceState(s).value for s in states]
            kwargs["FilterExpression"] = Attr("state").is_in(wanted)
        while True:
            page = self.table.scan(**kwargs)
            for item in page.get("Items", []):
                yield FleetRecord.from_item(item)
            if "LastEvaluatedKey" not in page:
                return
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    # -- writes --------------------------------------------------------------------------
    def put(self, record: FleetRecord) -> None:
        """Unconditional write of a whole record (seeding, tests, the drill)."""
        self.table.put_item(Item={**record.to_item(), **self.key(record.instance_id)})

    def touch(self, instance_id: str, *, fleet: str, fields: Mapping[str, Any]) -> FleetRecord:
        """Set ``fields`` (creating the record if absent, state untouched) and return the whole
        record as stored afterwards (``ReturnValues=ALL_NEW``): the agent's heartbeat, which
        is also how it reads the control plane's drain order without another call."""
        updates = {k: v for k, v in fields.items() if k not in _OWN_FIELDS}
        expression, names, values = dynamo.update_expression(updates)
        names["#fleet"] = "fleet"
        values[":fleet"] = fleet
        names["#id"] = "instance_id"
        values[":id"] = instance_id
        fleet_set = "#fleet = if_not_exists(#fleet, :fleet), #id = :id"
        if "SET " in expression:
            expression = expression.replace("SET ", f"SET {fleet_set}, ", 1)
        else:
            expression = f"SET {fleet_set} {expression}"
        response = self.table.update_item(
            Key=self.key(instance_id),
            UpdateExpression=expression.strip(),
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
            ReturnValues="ALL_NEW",
        )
        return FleetRecord.from_item(response["Attributes"])

    def advance(
        self,
        instance_id: str,
        *,
        fleet: str,
        state: InstanceState,
        fields: Mapping[str, Any] | None = None,
        allow_same_rank: bool = True,
    ) -> bool:
        """Move the record to ``state`` and set ``fields``, creating it if absent.

        Returns False (and changes nothing) when the stored record is already of a higher
        rank, or of the same rank and ``allow_same_rank`` is False.
        """
        rank = STATE_RANK[InstanceState(state)]
        updates: dict[str, Any] = {"state": InstanceState(state).value, "state_rank": rank}
        updates.update({k: v for k, v in (fields or {}).items() if k not in _OWN_FIELDS})
        expression, names, values = dynamo.update_expression(updates)
        names["#fleet"] = "fleet"
        names["#id"] = "instance_id"
        values[":id"] = instance_id
        names["#rank"] = "state_rank"
        names["#pk"] = FLEET_TABLE_PK
        values[":fleet"] = fleet
        values[":rank"] = rank
        expression = expression.replace("SET ", "SET #fleet = if_not_exists(#fleet, :fleet), #id = :id, ", 1)
        comparison = "<=" if allow_same_rank else "<"
        try:
            self.table.update_item(
                Key=self.key(instance_id),
                UpdateExpression=expression,
                # No rank yet: the record was created by a heartbeat alone, or by the bootstrap's
                # failure report (user data writes only its status): the lowest rank, not above all.
                ConditionExpression=(
                    f"attribute_not_exists(#pk) OR attribute_not_exists(#rank) OR #rank {comparison} :rank"
                ),
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
        except ClientError as error:
            if _conditional_failed(error):
                return False
            raise
        return True

    def update_fields(
        self, instance_id: str, fields: Mapping[str, Any], *, max_state: InstanceState | None = None
    ) -> bool:
        """Set ``fields`` on an existing record (only while its state is at most ``max_state``)."""
        if not fields:
            return True
        expression, names, values = dynamo.update_expression(fields)
        names["#pk"] = FLEET_TABLE_PK
        condition = "attribute_exists(#pk)"
        if max_state is not None:
            names["#rank"] = "state_rank"
            values[":max_rank"] = STATE_RANK[InstanceState(max_state)]
            condition += " AND #rank <= :max_rank"
        kwargs: dict[str, Any] = {
            "Key": self.key(instance_id),
            "UpdateExpression": expression,
            "ConditionExpression": condition,
            "ExpressionAttributeNames": names,
        }
        if values:
            kwargs["ExpressionAttributeValues"] = values
        try:
            self.table.update_item(**kwargs)
        except ClientError as error:
            if _conditional_failed(error):
                return False
            raise
        return True
