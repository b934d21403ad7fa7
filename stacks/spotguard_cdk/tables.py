"""DynamoDB tables: leases, fleet, jobs and idempotency.

On-demand billing (the load follows the fleet, mostly idle), point-in-time recovery,
encryption at rest and a TTL attribute on each. Key names come from the contracts.
The leases and idempotency tables hold only transient state and are removed with the
stack; the fleet and jobs tables (history) are retained.
"""

from __future__ import annotations

from typing import NamedTuple

from aws_cdk import RemovalPolicy
from aws_cdk import aws_dynamodb as dynamodb
from constructs import Construct
from spotguard_core import contracts

_STRING = dynamodb.AttributeType.STRING


class TableSpec(NamedTuple):
    """One table's key names (from the contracts), TTL attribute and fate on stack deletion."""

    pk: str
    sk: str | None = None
    ttl: str = contracts.TTL_ATTRIBUTE
    #: History, kept when the stack is deleted (transient state is removed with it).
    retain: bool = False


#: The fleet's tables by construct id.
TABLE_SPECS = {
    "Leases": TableSpec(contracts.LEASE_TABLE_PK, contracts.LEASE_TABLE_SK),
    "Fleet": TableSpec(contracts.FLEET_TABLE_PK, retain=True),
    "Jobs": TableSpec(contracts.JOBS_TABLE_PK, contracts.JOBS_TABLE_SK, retain=True),
    "Idempotency": TableSpec(contracts.IDEMPOTENCY_TABLE_PK, ttl=contracts.IDEMPOTENCY_TTL_ATTRIBUTE),
}


def _table(scope: Construct, construct_id: str, spec: TableSpec) -> dynamodb.Table:
    return dynamodb.Table(
        scope,
        construct_id,
        partition_key=dynamodb.Attribute(name=spec.pk, type=_STRING),
        sort_key=dynamodb.Attribute(name=spec.sk, type=_STRING) if spec.sk else None,
        billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
        point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
            point_in_time_recovery_enabled=True
        ),
        encryption=dynamodb.TableEncryption.AWS_MANAGED,
        time_to_live_attribute=spec.ttl,
        removal_policy=RemovalPolicy.RETAIN if spec.retain else RemovalPolicy.DESTROY,
    )


class Tables(Construct):
    """The fleet's lease, fleet, jobs and idempotency tables."""

    def __init__(self, scope: Construct, construct_id: str) -> None:
        super().__init__(scope, construct_id)
        tables = {name: _table(self, name, spec) for name, spec in TABLE_SPECS.items()}
        self.leases = tables["Leases"]
        self.fleet = tables["Fleet"]
        self.jobs = tables["Jobs"]
        self.idempotency = tables["Idempotency"]
