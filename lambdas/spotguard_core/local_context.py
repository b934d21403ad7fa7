"""A minimal Lambda context for running the handlers in-process (drill, tests, benchmarks).

Powertools reads ``function_name``, ``memory_limit_in_mb``, ``invoked_function_arn`` and
``aws_request_id`` (Logger) and ``get_remaining_time_in_millis()`` (Idempotency).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field


@dataclass
class LocalLambdaContext:
    function_name: str = "spotguard-local"
    memory_limit_in_mb: int = 256
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:spotguard-local"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    function_version: str = "$LATEST"
    log_group_name: str = "/aws/lambda/spotguard-local"
    log_stream_name: str = "local"
    timeout_seconds: float = 60.0
    started_at: float = field(default_factory=time.monotonic)

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.timeout_seconds - (time.monotonic() - self.started_at)) * 1000))
