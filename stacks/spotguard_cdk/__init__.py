"""spotguard as a CDK construct library.

    from spotguard_cdk import SpotWorkerFleet, Workload

``SpotWorkerFleet`` is a queue-driven worker fleet on EC2 Spot with its own control plane;
``Workload`` says what it runs per message; ``Settings`` is the typed model of every setting
(the same one the ready app reads from cdk.json). Names are imported lazily, so the asset
helpers (``spotguard_cdk.bundle``) can be used without starting the CDK runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spotguard_cdk.construct import SpotWorkerFleet
    from spotguard_cdk.settings import ConfigurationError, Settings
    from spotguard_cdk.workload import Workload

__all__ = ["ConfigurationError", "Settings", "SpotWorkerFleet", "Workload"]

_WHERE = {
    "SpotWorkerFleet": "spotguard_cdk.construct",
    "Workload": "spotguard_cdk.workload",
    "Settings": "spotguard_cdk.settings",
    "ConfigurationError": "spotguard_cdk.settings",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'spotguard_cdk' has no attribute {name!r}")
