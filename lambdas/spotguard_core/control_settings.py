"""Runtime settings of the control plane (dispatcher, watchdog, ``spotguard explain``).

Read from the ``contracts.Env`` variables the stack sets; an invalid value fails at start
with a message naming the variable and what it accepts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from spotguard_core.contracts import (
    DEFAULT_REPLACEMENT_WAIT_SECONDS,
    DEFAULT_RETIRE_DRAIN_SECONDS,
    Env,
    RebalancePolicy,
    asg_name,
)

DEFAULT_BOOTSTRAP_DEADLINE_SECONDS = 20 * 60
DEFAULT_HEARTBEAT_STALE_SECONDS = 5 * 60

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class SettingsError(ValueError):
    """A control-plane environment variable has a value it cannot use."""


def _flag(env: Mapping[str, str], name: Env, default: bool) -> bool:
    value = env.get(name.value)
    if value is None or value.strip() == "":
        return default
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise SettingsError(f"{name.value}={value!r}: use true or false")


def _seconds(env: Mapping[str, str], name: Env, default: int) -> int:
    value = env.get(name.value)
    if value is None or value.strip() == "":
        return default
    try:
        seconds = int(value)
    except ValueError:
        raise SettingsError(f"{name.value}={value!r}: use a whole number of seconds") from None
    if seconds <= 0:
        raise SettingsError(f"{name.value}={value!r}: must be positive")
    return seconds


@dataclass(frozen=True, slots=True)
class ControlSettings:
    fleet: str
    asg_name: str
    account_id: str | None = None
    region: str | None = None
    early_replacement: bool = True
    rebalance_policy: RebalancePolicy = RebalancePolicy.REPLACE
    bootstrap_deadline_seconds: int = DEFAULT_BOOTSTRAP_DEADLINE_SECONDS
    heartbeat_stale_seconds: int = DEFAULT_HEARTBEAT_STALE_SECONDS
    requeue_enabled: bool = True
    #: Staging only: accept events with source ``spotguard.test`` (rejected otherwise).
    allow_test_events: bool = False
    retire_drain_seconds: int = DEFAULT_RETIRE_DRAIN_SECONDS
    replacement_wait_seconds: int = DEFAULT_REPLACEMENT_WAIT_SECONDS

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ControlSettings:
        env = os.environ if env is None else env
        fleet = env.get(Env.FLEET_NAME.value, "").strip()
        if not fleet:
            raise SettingsError(f"{Env.FLEET_NAME.value} is not set: the fleet name decides what is managed")
        policy_text = env.get(Env.REBALANCE_POLICY.value, "").strip().lower() or RebalancePolicy.REPLACE.value
        try:
            policy = RebalancePolicy(policy_text)
        except ValueError:
            allowed = ", ".join(p.value for p in RebalancePolicy)
            raise SettingsError(
                f"{Env.REBALANCE_POLICY.value}={policy_text!r}: use one of {allowed}"
            ) from None
        return cls(
            fleet=fleet,
            asg_name=env.get(Env.ASG_NAME.value, "").strip() or asg_name(fleet),
            account_id=env.get(Env.ACCOUNT_ID.value, "").strip() or None,
            region=env.get(Env.REGION.value, "").strip() or None,
            early_replacement=_flag(env, Env.EARLY_REPLACEMENT, True),
            rebalance_policy=policy,
            bootstrap_deadline_seconds=_seconds(
                env, Env.BOOTSTRAP_DEADLINE_SECONDS, DEFAULT_BOOTSTRAP_DEADLINE_SECONDS
            ),
            heartbeat_stale_seconds=_seconds(
                env, Env.HEARTBEAT_STALE_SECONDS, DEFAULT_HEARTBEAT_STALE_SECONDS
            ),
            requeue_enabled=_flag(env, Env.REQUEUE_ENABLED, True),
            allow_test_events=_flag(env, Env.ALLOW_TEST_EVENTS, False),
            retire_drain_seconds=_seconds(env, Env.RETIRE_DRAIN_SECONDS, DEFAULT_RETIRE_DRAIN_SECONDS),
            replacement_wait_seconds=_seconds(
                env, Env.REPLACEMENT_WAIT_SECONDS, DEFAULT_REPLACEMENT_WAIT_SECONDS
            ),
        )
