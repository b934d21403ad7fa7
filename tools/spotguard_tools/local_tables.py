"""The spotguard tables with their contract key schemas, for a local AWS emulator.

The drill, the tests and the benchmarks create tables in moto; the key schemas come from
``contracts`` (as in ``stacks/tables.py``), so every place builds them the same way.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Final

from spotguard_core import contracts


class TableKind(StrEnum):
    LEASES = "leases"
    FLEET = "fleet"
    JOBS = "jobs"
    IDEMPOTENCY = "idempotency"


#: (attribute, key type) pairs of each table, all string attributes.
TABLE_KEYS: Final[dict[TableKind, list[tuple[str, str]]]] = {
    TableKind.LEASES: [(contracts.LEASE_TABLE_PK, "HASH"), (contracts.LEASE_TABLE_SK, "RANGE")],
    TableKind.FLEET: [(contracts.FLEET_TABLE_PK, "HASH")],
    TableKind.JOBS: [(contracts.JOBS_TABLE_PK, "HASH"), (contracts.JOBS_TABLE_SK, "RANGE")],
    TableKind.IDEMPOTENCY: [(contracts.IDEMPOTENCY_TABLE_PK, "HASH")],
}


def create_table(dynamodb: Any, kind: TableKind, name: str) -> str:
    """Create table ``name`` of ``kind`` with a boto3 DynamoDB client; returns the name."""
    keys = TABLE_KEYS[kind]
    dynamodb.create_table(
        TableName=name,
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": key, "AttributeType": "S"} for key, _ in keys],
        KeySchema=[{"AttributeName": key, "KeyType": key_type} for key, key_type in keys],
    )
    return name
