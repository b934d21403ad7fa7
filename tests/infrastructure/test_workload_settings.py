"""Workload settings and construct props: bad configuration fails at synth (or construction)
with a message that says what to change; both front doors share the one settings model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from spotguard_cdk.settings import ConfigurationError, Settings
from spotguard_core import contracts

from tests.infrastructure.conftest import REPO_ROOT, synth_environment

pytestmark = [pytest.mark.infrastructure]


def error_of(overrides: dict[str, Any]) -> str:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_mapping({}, overrides)
    return str(caught.value)


@pytest.fixture
def worker(tmp_path: Path) -> Path:
    directory = tmp_path / "my-worker"
    (directory / "pkg").mkdir(parents=True)
    (directory / "tasks.py").write_text("def handle(body, context):\n    return None\n")
    (directory / "pkg" / "__init__.py").write_text("")
    (directory / "pkg" / "jobs.py").write_text("def run(body, context):\n    return None\n")
    return directory


def test_defaults_run_the_sample_handler_with_contract_defaults() -> None:
    fleet = Settings().fleet
    assert fleet.workload.path is None
    assert fleet.effective_handler == contracts.DEFAULT_HANDLER
    assert fleet.workload.stop_grace_seconds == contracts.DEFAULT_STOP_GRACE_SECONDS
    assert fleet.workload.checkpoint_max_bytes == contracts.DEFAULT_CHECKPOINT_MAX_BYTES


def test_python_and_command_mode_are_accepted(worker: Path) -> None:
    python = Settings.from_mapping({}, {"fleet.workload.path": str(worker), "fleet.handler": "pkg.jobs:run"})
    assert python.fleet.effective_handler == "pkg.jobs:run"
    command = Settings.from_mapping(
        {}, {"fleet.workload.path": str(worker), "fleet.workload.command": "python3 tasks.py --fast"}
    )
    assert command.fleet.effective_handler is None
    assert command.fleet.workload.command == "python3 tasks.py --fast"


def test_missing_workload_directory(tmp_path: Path) -> None:
    message = error_of({"fleet.workload.path": str(tmp_path / "nope"), "fleet.handler": "tasks:handle"})
    assert "spotguard.fleet: workload.path" in message and "is not a directory" in message


def test_handler_module_not_in_the_directory(worker: Path) -> None:
    message = error_of({"fleet.workload.path": str(worker), "fleet.handler": "missing.module:handle"})
    assert "handler module 'missing.module' is not in workload.path" in message
    assert "missing/module.py" in message


def test_both_or_neither_of_handler_and_command(worker: Path) -> None:
    both = error_of(
        {
            "fleet.workload.path": str(worker),
            "fleet.handler": "tasks:handle",
            "fleet.workload.command": "./run",
        }
    )
    assert "exactly one of handler" in both and "both are" in both
    neither = error_of({"fleet.workload.path": str(worker)})
    assert "exactly one of handler" in neither and "neither is" in neither


def test_a_handler_or_command_without_a_workload() -> None:
    assert "needs workload.path" in error_of({"fleet.handler": "tasks:handle"})
    assert "workload.command needs workload.path" in error_of({"fleet.workload.command": "./run"})


def test_stop_grace_range() -> None:
    message = error_of({"fleet.workload.stop_grace_seconds": 0})
    assert "spotguard.fleet.workload.stop_grace_seconds: must be between 1 and 110 (got 0)" in message


def test_synth_fails_with_the_message(tmp_path: Path) -> None:
    context = {
        "spotguard.fleet.workload.path": str(tmp_path / "absent"),
        "spotguard.fleet.handler": "tasks:handle",
    }
    result = subprocess.run(
        [sys.executable, "app.py"],
        cwd=REPO_ROOT,
        env=synth_environment(tmp_path / "out", context),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert "is not a directory" in result.stderr and "Traceback" not in result.stderr


def test_construct_props_fail_at_construction_with_the_same_messages(worker: Path) -> None:
    import aws_cdk as cdk  # noqa: PLC0415 - starts the CDK runtime only here
    from spotguard_cdk import SpotWorkerFleet, Workload  # noqa: PLC0415

    stack = cdk.Stack(cdk.App(), "Props")
    with pytest.raises(ConfigurationError) as caught:
        SpotWorkerFleet(stack, "Bad", min_capacity=5, max_capacity=2)
    assert "min_capacity (5) must not exceed max_capacity (2)" in str(caught.value)
    assert "SpotWorkerFleet props" in str(caught.value)
    with pytest.raises(ConfigurationError, match=r"handler module 'nothere' is not in workload\.path"):
        SpotWorkerFleet(stack, "Bad2", workload=Workload.python(worker, handler="nothere:handle"))
    with pytest.raises(ConfigurationError, match="must be 'module:function'"):
        SpotWorkerFleet(stack, "Bad3", workload=Workload.python(worker, handler="tasks.handle"))
    assert stack.node.try_find_child("Bad") is None  # nothing half-built is left in the stack


def test_fleet_names_default_from_the_construct_id_and_must_be_unique(worker: Path) -> None:
    import aws_cdk as cdk  # noqa: PLC0415
    from spotguard_cdk import SpotWorkerFleet, Workload  # noqa: PLC0415
    from spotguard_cdk.construct import fleet_name_from_id, resolve_settings  # noqa: PLC0415

    assert fleet_name_from_id("RenderFleet") == "render-fleet"
    assert fleet_name_from_id("GPU2Workers") == "gpu2-workers"
    settings = resolve_settings(
        "RenderFleet", None, {"max_capacity": 3}, Workload.python(worker, handler="tasks:handle")
    )
    assert settings.fleet.name == "render-fleet" and settings.fleet.max_capacity == 3
    # A name set in the settings wins over the construct id.
    named = resolve_settings("X", Settings.from_mapping({"fleet": {"name": "batch"}}), {}, None)
    assert named.fleet.name == "batch"

    stack = cdk.Stack(cdk.App(), "Names")
    SpotWorkerFleet(stack, "Render", name="same")
    with pytest.raises(ConfigurationError, match=r"'same' is already used by Names/Render"):
        SpotWorkerFleet(stack, "Other", name="same")
