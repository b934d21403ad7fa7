"""The local drill: the whole system on one machine, interruptions injected, work counted.

``spotguard drill`` (``make demo``) starts an AWS emulator (moto server) on 127.0.0.1,
creates the fleet's queues, tables, ASG and EventBridge rules from the same contracts as
the stack, runs the real agent on every simulated instance and the real dispatcher and
watchdog in a local Lambda host, plays a seeded chaos plan, and reports what happened to every
task. See docs/drill.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spotguard_tools.drill.config import DrillConfig
    from spotguard_tools.drill.run_loop import Drill

__all__ = ["Drill", "DrillConfig"]
_WHERE = {"Drill": "spotguard_tools.drill.run_loop", "DrillConfig": "spotguard_tools.drill.config"}


def __getattr__(name: str) -> Any:
    """Imported on first use: the drill's task handler (``drill.task``) runs in every handler
    process of every simulated instance and needs none of the run loop, boto3 or rich."""
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'spotguard_tools.drill' has no attribute {name!r}")
