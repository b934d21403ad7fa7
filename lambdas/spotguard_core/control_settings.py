"""Runtime settings of the control plane (dispatcher, watchdog, ``spotguard explain``).

One typed class, read from the ``contracts.Env`` variables that ``runtime_env`` builds for the
stack, the drill and the tests; defaults are ``contracts.DEFAULT_*``. An invalid value fails
at start with a message naming the variable and what it accepts.

It is a pydantic model rather than a pydantic-settings ``BaseSettings``: the functions get
pydantic from the public Powertools layer, which does not carry pydantic-settings, and the
Lambda asset is plain code (no bundling). ``from_env`` does the one thing BaseSettings would
add here: read the variables by name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spotguard_core import contracts
from spotguard_core.contracts import Env, RebalancePolicy, asg_name

DEFAULT_BOOTSTRAP_DEADLINE_SECONDS = contracts.DEFAULT_BOOTSTRAP_DEADLINE_MINUTES * 60
DEFAULT_HEARTBEAT_STALE_SECONDS = contracts.DEFAULT_HEARTBEAT_STALE_MINUTES * 60

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class SettingsError(ValueError):
    """A control-plane environment variable has a value it cannot use."""


def _parse_flag(value: Any) -> Any:
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError("use true or false")
    return value


def _parse_seconds(value: Any) -> Any:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError("use a whole number of seconds") from None
    return value


class ControlSettings(BaseModel):
    """What the dispatcher and watchdog decide with. Field names are the Python API; the
    ``validation_alias`` of each is the environment variable it is read from."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    fleet: str = Field(validation_alias=Env.FLEET_NAME.value, min_length=1)
    asg_name: str = Field(default="", validation_alias=Env.ASG_NAME.value)
    account_id: str | None = Field(default=None, validation_alias=Env.ACCOUNT_ID.value)
    region: str | None = Field(default=None, validation_alias=Env.REGION.value)
    early_replacement: bool = Field(default=True, validation_alias=Env.EARLY_REPLACEMENT.value)
    rebalance_policy: RebalancePolicy = Field(
        default=RebalancePolicy.REPLACE, validation_alias=Env.REBALANCE_POLICY.value
    )
    bootstrap_deadline_seconds: int = Field(
        default=DEFAULT_BOOTSTRAP_DEADLINE_SECONDS,
        gt=0,
        validation_alias=Env.BOOTSTRAP_DEADLINE_SECONDS.value,
    )
    heartbeat_stale_seconds: int = Field(
        default=DEFAULT_HEARTBEAT_STALE_SECONDS, gt=0, validation_alias=Env.HEARTBEAT_STALE_SECONDS.value
    )
    requeue_enabled: bool = Field(default=True, validation_alias=Env.REQUEUE_ENABLED.value)
    #: Staging only: accept ``spotguard.test`` events (else the dispatcher rejects them).
    allow_test_events: bool = Field(default=False, validation_alias=Env.ALLOW_TEST_EVENTS.value)
    #: Drain time of an instance replaced early.
    retire_drain_seconds: int = Field(
        default=contracts.DEFAULT_RETIRE_DRAIN_SECONDS, gt=0, validation_alias=Env.RETIRE_DRAIN_SECONDS.value
    )
    #: A detached instance drains after this long even if its replacement is not in service.
    replacement_wait_seconds: int = Field(
        default=contracts.DEFAULT_REPLACEMENT_WAIT_SECONDS,
        gt=0,
        validation_alias=Env.REPLACEMENT_WAIT_SECONDS.value,
    )

    @field_validator("early_replacement", "requeue_enabled", "allow_test_events", mode="before")
    @classmethod
    def _flags(cls, value: Any) -> Any:
        return _parse_flag(value)

    @field_validator(
        "bootstrap_deadline_seconds",
        "heartbeat_stale_seconds",
        "retire_drain_seconds",
        "replacement_wait_seconds",
        mode="before",
    )
    @classmethod
    def _seconds(cls, value: Any) -> Any:
        return _parse_seconds(value)

    @field_validator("rebalance_policy", mode="before")
    @classmethod
    def _policy(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower()
            allowed = [p.value for p in RebalancePolicy]
            if value not in allowed:
                raise ValueError(f"use one of {', '.join(allowed)}")
        return value

    @field_validator("fleet", "asg_name", "account_id", "region", mode="before")
    @classmethod
    def _strip(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _default_asg(self) -> ControlSettings:
        if not self.asg_name:
            object.__setattr__(self, "asg_name", asg_name(self.fleet))
        for name in ("account_id", "region"):
            if getattr(self, name) == "":
                object.__setattr__(self, name, None)
        return self

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ControlSettings:
        env = os.environ if env is None else env
        known = {str(f.validation_alias) for f in cls.model_fields.values()}
        # An empty variable means "not set" (the default), as in a Lambda environment block.
        values = {key: value for key, value in env.items() if key in known and value.strip() != ""}
        if Env.FLEET_NAME.value not in values:
            raise SettingsError(f"{Env.FLEET_NAME.value} is not set: the fleet name decides what is managed")
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise SettingsError(_describe(exc, values)) from None


def _describe(exc: ValidationError, values: Mapping[str, str]) -> str:
    problems = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else "settings"
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "greater_than":
            message = "must be positive"
        problems.append(f"{name}={values.get(name)!r}: {message}")
    return "; ".join(problems)
