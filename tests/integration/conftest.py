"""Fixtures of the integration tests (moto server via ``tests/conftest.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import control_plane_env
from tests.support.agent_sandbox import Sandbox, make_sandbox, unpacked_bundle
from tests.support.workload_env import Workers, World, make_world, workers_fixture


@pytest.fixture
def cp(moto_server, monkeypatch) -> Iterator[control_plane_env.ControlPlaneEnv]:
    """The control plane's tables, queues, bus and fleet ASG in moto, env vars set.

    Metrics are enabled so tests can read the EMF the handlers print."""
    from spotguard_functions import dispatcher  # noqa: PLC0415 - import once moto's env is set

    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    dispatcher.reset_runtime()  # each test has its own tables: a fresh "container"
    yield from control_plane_env.control_plane()
    dispatcher.reset_runtime()


@pytest.fixture
def world(moto_server) -> World:
    """The workload tests' queues, tables and checkpoint bucket in moto (a test file that
    needs more, such as a log group, extends this fixture under the same name)."""
    return make_world()


@pytest.fixture
def workers() -> Iterator[Workers]:
    yield from workers_fixture()


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    """A temporary root with stand-ins for systemctl and friends (services stopped after)."""
    box = make_sandbox(tmp_path / "sandbox")
    yield box
    box.stop_services()


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    """The agent bundle unpacked as stage 1 leaves it for the installer."""
    return unpacked_bundle(tmp_path)
