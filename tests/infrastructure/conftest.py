"""Synthesize the apps once per session, exactly as ``cdk synth`` runs them (``python <app>``
with ``CDK_OUTDIR`` and ``CDK_CONTEXT_JSON``), all at the same time:

- ``default``: cdk.json as shipped (environment-agnostic, production-like);
- ``staging``: every optional part on (test events, FIS, webhook, alarm email, Novita
  provider, minimum capacity, explicit environment with AZs from context);
- ``two_fleets``: a user's own CDK app (``apps/two_fleets.py``) with two ``SpotWorkerFleet``s
  on two of the user's queues in one stack, each with its own workload.

Tests that use these fixtures carry ``@pytest.mark.xdist_group("synth")``; the synth itself
is shared between xdist workers through a file lock, so it runs once per test run.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

STAGING_CONTEXT: dict[str, Any] = {
    "spotguard.fleet.name": "staging",
    "spotguard.fleet.min_capacity": "1",
    "spotguard.fleet.fis_target": "true",
    "spotguard.staging.allow_test_events": "true",
    "spotguard.staging.fis_experiment": "true",
    "spotguard.notifications.webhook_url": "https://hooks.example.com/spotguard",
    "spotguard.observability.alarm_email": "ops@example.com",
    "spotguard.migration.enabled": "false",
    "spotguard.migration.provider": "novita",
    "spotguard.migration.novita_api_key_secret_name": "spotguard/novita-api-key",
    "spotguard.environment.account": "123456789012",
    "spotguard.environment.region": "eu-west-1",
    "spotguard.environment.availability_zones": '["eu-west-1a", "eu-west-1b"]',
}


@dataclass
class Synth:
    name: str
    outdir: Path
    returncode: int
    stderr: str
    seconds: float
    stack_name: str
    template: dict[str, Any] = field(default_factory=dict)

    @property
    def resources(self) -> dict[str, dict[str, Any]]:
        return self.template.get("Resources", {})

    def of_type(self, resource_type: str) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.resources.items() if v["Type"] == resource_type}

    def template_path(self) -> Path:
        return self.outdir / f"{self.stack_name}.template.json"

    def assertions(self) -> Any:
        from aws_cdk.assertions import Template  # noqa: PLC0415 - starts jsii only when needed

        return Template.from_json(self.template)


def synth_environment(outdir: Path, context: Mapping[str, Any]) -> dict[str, str]:
    env = dict(os.environ)
    env["CDK_OUTDIR"] = str(outdir)
    env["CDK_CONTEXT_JSON"] = json.dumps(dict(context))
    env["JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION"] = "20"
    # Prove synth needs no AWS: no credentials, no metadata service.
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        env.pop(key, None)
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    return env


TWO_FLEETS_APP = Path(__file__).resolve().parent / "apps" / "two_fleets.py"


def _start(outdir: Path, context: Mapping[str, Any], app: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(app)],
        cwd=REPO_ROOT,
        env=synth_environment(outdir, context),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


APP = REPO_ROOT / "app.py"
CONFIGS: dict[str, tuple[dict[str, Any], str, Path]] = {
    "default": ({}, "Spotguard-default", APP),
    "staging": (STAGING_CONTEXT, "Spotguard-staging", APP),
    "two_fleets": ({}, "MediaPipeline", TWO_FLEETS_APP),
}
#: The ready app's configurations (``any_synth``); the two-fleet app has its own tests.
APP_CONFIGS = ("default", "staging")


def _shared_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory per test run, shared by all xdist workers of that run."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # .../pytest-N/popen-gwK -> .../pytest-N
    directory = base / "spotguard-synth"
    directory.mkdir(exist_ok=True)
    return directory


def _synthesize_all(directory: Path) -> dict[str, dict[str, Any]]:
    """Both configurations at once (two processes); returns code, stderr and time of each."""
    t0 = time.monotonic()
    started = {name: _start(directory / name, context, app) for name, (context, _, app) in CONFIGS.items()}
    results = {}
    for name, process in started.items():
        _, stderr = process.communicate(timeout=300)
        results[name] = {
            "returncode": process.returncode,
            "stderr": stderr,
            "seconds": time.monotonic() - t0,
        }
    return results


@pytest.fixture(scope="session")
def synths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Synth]:
    """Synthesize once per test run, even across xdist workers: the first worker to get here
    synthesizes under a file lock, the others wait and read its output. (``--dist loadgroup``
    alone does not keep a group on one worker with pytest 9 + xdist 3.8.)"""
    directory = _shared_directory(tmp_path_factory)
    summary = directory / "results.json"
    with (directory / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not summary.exists():
                summary.write_text(json.dumps(_synthesize_all(directory)))
            results = json.loads(summary.read_text())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    synths: dict[str, Synth] = {}
    for name, (_, stack_name, _) in CONFIGS.items():
        result = results[name]
        synth = Synth(
            name=name,
            outdir=directory / name,
            returncode=result["returncode"],
            stderr=result["stderr"],
            seconds=result["seconds"],
            stack_name=stack_name,
        )
        if synth.template_path().exists():
            synth.template = json.loads(synth.template_path().read_text())
        synths[name] = synth
    return synths


def _succeeded(synth: Synth) -> Synth:
    assert synth.returncode == 0, f"synth failed:\n{synth.stderr[-4000:]}"
    return synth


@pytest.fixture(scope="session")
def default_synth(synths: dict[str, Synth]) -> Synth:
    return _succeeded(synths["default"])


@pytest.fixture(scope="session")
def staging_synth(synths: dict[str, Synth]) -> Synth:
    return _succeeded(synths["staging"])


@pytest.fixture(scope="session")
def two_fleets_synth(synths: dict[str, Synth]) -> Synth:
    return _succeeded(synths["two_fleets"])


@pytest.fixture(scope="session", params=list(CONFIGS))
def every_synth(request: pytest.FixtureRequest, synths: dict[str, Synth]) -> Synth:
    """Every synthesized app, the user's two-fleet app included (compliance checks)."""
    return _succeeded(synths[request.param])


@pytest.fixture(scope="session", params=list(APP_CONFIGS))
def any_synth(request: pytest.FixtureRequest, synths: dict[str, Synth]) -> Synth:
    return _succeeded(synths[request.param])
