"""DynamoDB tables: leases, fleet, jobs and idempotency.

On-demand billing (the load follows the fleet, mostly idle), point-in-time recovery,
encryption at rest and a TTL attribute on each. Key names come from the contracts.
The leases and idempotency tables hold only transient state and are removed with the
stack; the fleet and jobs tables (history) are retained.
"""

from __future__ import annotations

from aws_cdk import RemovalPolicy
from aws_cdk import aws_dynamodb as dynamodb
from constructs import Construct
from spotguard_core import contracts

_STRING = dynamodb.AttributeType.STRING


def _table(
    scope: Construct,
    construct_id: str,
    *,
    pk: str,
    sk: str | None = None,
    ttl: str,
    removal_policy: RemovalPolicy,
) -> dynamodb.Table:
    return dynamodb.Table(
        scope,
        construct_id,
        partition_key=dynamodb.Attribute(name=pk, type=_STRING),
        sort_key=dynamodb.Attribute(name=sk, type=_STRING) if sk else None,
        billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
        point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
            point_in_time_recovery_enabled=True
        ),
        encryption=dynamodb.TableEncryption.AWS_MANAGED,
        time_to_live_attribute=ttl,
        removal_policy=removal_policy,
    )


class Tables(Construct):
    """The fleet's lease, fleet, jobs and idempotency tables."""

    def __init__(self, scope: Construct, construct_id: str) -> None:
        super().__init__(scope, construct_id)
        self.leases = _table(
            self,
            "Leases",
            pk=contracts.LEASE_TABLE_PK,
            sk=contracts.LEASE_TABLE_SK,
            ttl=contracts.TTL_ATTRIBUTE,
            removal_policy=RemovalPolicy.DESTROY,
        )
        self.fleet = _table(
            self,
            "Fleet",
            pk=contracts.FLEET_TABLE_PK,
            ttl=contracts.TTL_ATTRIBUTE,
            removal_policy=RemovalPolicy.RETAIN,
        )
        self.jobs = _table(
            self,
            "Jobs",
            pk=contracts.JOBS_TABLE_PK,
            sk=contracts.JOBS_TABLE_SK,
            ttl=contracts.TTL_ATTRIBUTE,
            removal_policy=RemovalPolicy.RETAIN,
        )
        self.idempotency = _table(
            self,
            "Idempotency",
            pk=contracts.IDEMPOTENCY_TABLE_PK,
            ttl=contracts.IDEMPOTENCY_TTL_ATTRIBUTE,
            removal_policy=RemovalPolicy.DESTROY,
        )
