"""The ready app's stack: one ``SpotWorkerFleet`` from the cdk.json settings.

It is the first user of the construct library; ``app.py`` creates it. The stack adds only
what belongs to a stack: its name and environment (``settings.environment``) and, for an
environment-specific stack, the availability zones from settings (so synth needs no lookup).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from aws_cdk import CfnElement, Environment, Stack
from constructs import Construct

from spotguard_cdk.construct import SpotWorkerFleet
from spotguard_cdk.settings import Settings

#: Construct id of the app's fleet (resource logical ids start with it).
APP_FLEET_ID = "Fleet"


def stack_environment(settings: Settings) -> Environment | None:
    """The stack's account/region from ``settings.environment`` (None: environment-agnostic)."""
    env = settings.environment
    if env.account is None and env.region is None:
        return None  # environment-agnostic template
    return Environment(account=env.account, region=env.region)


class SpotguardStack(Stack):
    """``Spotguard-<fleet>``: the fleet, its work queue (stack-owned) and its control plane."""

    def __init__(self, scope: Construct, *, settings: Settings, **kwargs: Any) -> None:
        super().__init__(
            scope,
            settings.stack_name,
            env=stack_environment(settings),
            description=f"spotguard fleet '{settings.fleet.name}': spot workers that do not lose work",
            **kwargs,
        )
        self._configured_azs = settings.environment.availability_zones
        self._path_depth: int | None = None
        self.fleet = SpotWorkerFleet(self, APP_FLEET_ID, settings=settings)

    def _allocate_logical_id(self, cfn_element: CfnElement) -> str:
        """Logical ids as if the fleet's resources were the stack's own (``Tables/Fleet``, not
        ``Fleet/Tables/Fleet``): the ready app kept them when it became a user of
        ``SpotWorkerFleet``, so an existing deployment keeps its tables and work queue."""
        # One jsii round trip (the element's path) instead of ~13 per element (each scope's
        # ``node.id``): this callback runs for every element and was most of the synth time.
        # Construct ids cannot contain "/" (the constructs library rejects it), so the path splits.
        if self._path_depth is None:
            self._path_depth = len(self.node.path.split("/"))
        components = cfn_element.node.path.split("/")[self._path_depth :]
        if len(components) > 1 and components[0] == APP_FLEET_ID:
            components = components[1:]
        return cdk_unique_id(components)

    @property
    def availability_zones(self) -> list[str]:
        """AZs from settings when given: an environment-specific stack then needs no AZ lookup."""
        return list(self._configured_azs or super().availability_zones)


def cdk_unique_id(components: list[str]) -> str:
    """CDK's own logical id algorithm (``makeUniqueId``): the human-readable path plus an
    8-character hash of the full path ("Default" hidden, "Resource" hidden from the human part)."""
    path = [c for c in components if c != "Default"]
    if len(path) == 1:
        candidate = _alphanumeric(path[0])
        if len(candidate) <= 255:
            return candidate
    digest = hashlib.md5("/".join(path).encode(), usedforsecurity=False).hexdigest()[:8].upper()
    human: list[str] = []
    for component in path:
        if not human or not human[-1].endswith(component):
            human.append(component)
    readable = "".join(_alphanumeric(c) for c in human if c != "Resource")
    return readable[:240] + digest


def _alphanumeric(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "", text)
