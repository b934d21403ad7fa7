"""The agent's AWS clients: ``spotguard_core.aws``'s one factory, for the instance's region.

Standard retries (not adaptive: a drain's few calls must never wait on a client-side rate
limiter), the fault-injection hook when its variables are set, ``AWS_ENDPOINT_URL``
honoured by boto3 itself (the drill and the tests point it at moto)."""

from __future__ import annotations

from spotguard_core.aws import ClientFactory


class AwsClients(ClientFactory):
    """Lazily created, thread-safe clients for one region (``client(service)``, ``sqs``, ``dynamodb``)."""

    def __init__(self, region: str = "") -> None:
        super().__init__(region or None, retry_mode="standard")
