"""Bad configuration fails synth with a message naming the setting and the allowed range."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from tests.infrastructure.conftest import REPO_ROOT, synth_environment

pytestmark = [pytest.mark.infrastructure]


def run_app(tmp_path: Path, context: Mapping[str, object]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "app.py"],
        cwd=REPO_ROOT,
        env=synth_environment(tmp_path, context),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_out_of_range_setting_fails_synth_clearly(tmp_path: Path) -> None:
    result = run_app(tmp_path, {"spotguard.migration.interval_minutes": "90"})
    assert result.returncode == 1
    assert "spotguard.migration.interval_minutes: must be between 1 and 60 (got '90')" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_object_context_fails_synth_clearly(tmp_path: Path) -> None:
    context = {"spotguard": json.dumps({"fleet": {"name": "Bad_Name", "max_capacity": 0}})}
    result = run_app(tmp_path, context)
    assert result.returncode == 1
    assert "spotguard.fleet.name: must be 3-32 characters" in result.stderr
    assert "spotguard.fleet.max_capacity: must be between 1 and 1000 (got 0)" in result.stderr
