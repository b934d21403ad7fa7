"""A user's Python workload (the two-fleet test app and the README example)."""

from __future__ import annotations

import json
from typing import Any


def handle(body: str, context: Any) -> None:
    task = json.loads(body)
    progress = int(context.resumed or b"0")  # resume after an interruption
    for step in range(progress, int(task.get("steps", 3))):
        context.checkpoint(str(step + 1).encode())
