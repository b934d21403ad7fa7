"""The ready app's stack: one ``SpotWorkerFleet`` from the cdk.json settings.

It is the first user of the construct library; ``app.py`` creates it. The stack adds only
what belongs to a stack: its name and environment (``settings.environment``) and, for an
environment-specific stack, the availability zones from settings (so synth needs no lookup).
"""

from __future__ import annotations

from typing import Any

from aws_cdk import Environment, Stack
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
        self.fleet = SpotWorkerFleet(self, APP_FLEET_ID, settings=settings)

    @property
    def availability_zones(self) -> list[str]:
        """AZs from settings when given: an environment-specific stack then needs no AZ lookup."""
        return list(self._configured_azs or super().availability_zones)
