"""Fixtures of the integration tests (moto server via ``tests/conftest.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import control_plane_env


@pytest.fixture
def cp(moto_server, monkeypatch) -> Iterator[control_plane_env.ControlPlaneEnv]:
    """The control plane's tables, queues, bus and fleet ASG in moto, env vars set.

    Metrics are enabled so tests can read the EMF the handlers print."""
    from spotguard_functions import dispatcher  # noqa: PLC0415 - import once moto's env is set

    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    dispatcher.reset_runtime()  # each test has its own tables: a fresh "container"
    yield from control_plane_env.control_plane()
    dispatcher.reset_runtime()
