"""The recorded EventBridge events under ``tests/events`` (real shapes, one instance id)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EVENTS_DIR = Path(__file__).resolve().parents[1] / "events"
#: The instance every recorded event is about.
SAMPLE_INSTANCE = "i-1234567890abcdef0"


def load_event(name: str) -> dict[str, Any]:
    """``tests/events/<name>.json``."""
    return dict(json.loads((EVENTS_DIR / f"{name}.json").read_text()))
