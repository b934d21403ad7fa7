"""``make e2e``: deploy the staging stack to MiniStack and drive it (tests/e2e/test_deployed_stack.py).

The deploy tests run only when ``SPOTGUARD_E2E=1`` (``make e2e`` sets it, with
``SPOTGUARD_E2E_VENV`` naming the emulator's virtual environment); ``make test`` collects only
the template and layer tests of this directory, which need no emulator.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.emulator import ACCOUNT, REGION, REPO_ROOT, STACK_NAME, Cdk, MiniStack, aws_environment
from tests.support.moto_server import restore_environ

E2E_ENABLED = os.environ.get("SPOTGUARD_E2E") == "1"

collect_ignore = [] if E2E_ENABLED else ["test_deployed_stack.py"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: deploys to the local CloudFormation emulator (make e2e)")


@dataclass
class Deployment:
    emulator: MiniStack
    cdk: Cdk
    env: dict[str, str]
    outputs: dict[str, str]
    #: logical id -> (type, physical id), from the emulator's CloudFormation.
    resources: dict[str, tuple[str, str]]
    template: dict[str, Any]
    timings: dict[str, float]
    facts: dict[str, Any] = field(default_factory=dict)
    destroyed: bool = False

    def physical_ids(self, resource_type: str) -> list[str]:
        return sorted(pid for rtype, pid in self.resources.values() if rtype == resource_type)


_REPORT: dict[str, Any] = {}


@pytest.fixture(scope="session")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    venv = Path(os.environ.get("SPOTGUARD_E2E_VENV", REPO_ROOT / ".venv-e2e"))
    workdir = Path(os.environ.get("SPOTGUARD_E2E_DIR") or tmp_path_factory.mktemp("e2e"))
    emulator = MiniStack(venv=venv, workdir=workdir)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    emulator.start()
    timings["emulator_start_s"] = time.monotonic() - t0
    # The CDK CLI, spotguard's CLI and this process: the caller's environment, pointed at the
    # emulator (and with the CLI's own node and python on PATH, not the emulator's).
    env = aws_environment(emulator.endpoint)
    # Clients made in this process (spotguard_core, boto3) talk to the emulator too.
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: v for k, v in env.items() if k.startswith(("AWS_", "JSII_", "CDK_"))})
    cdk = Cdk(env=env, outdir=workdir / "cdk.out")
    try:
        t0 = time.monotonic()
        boot = cdk.run("bootstrap", f"aws://{ACCOUNT}/{REGION}", app=False)
        timings["bootstrap_s"] = time.monotonic() - t0
        assert boot.returncode == 0, f"cdk bootstrap failed:\n{boot.stderr[-3000:]}"
        outputs_file = workdir / "outputs.json"
        t0 = time.monotonic()
        deploy = cdk.run(
            "deploy",
            STACK_NAME,
            "--require-approval",
            "never",
            "--progress",
            "events",
            "--outputs-file",
            str(outputs_file),
        )
        timings["deploy_s"] = time.monotonic() - t0
        (workdir / "deploy.log").write_text(deploy.stderr)
        assert deploy.returncode == 0, (
            f"cdk deploy failed:\n{deploy.stderr[-5000:]}\n--- emulator ---\n{emulator.log_tail()}"
        )
        import boto3  # noqa: PLC0415 - after the environment points at the emulator

        cloudformation = boto3.client("cloudformation")
        resources: dict[str, tuple[str, str]] = {}
        for page in cloudformation.get_paginator("list_stack_resources").paginate(StackName=STACK_NAME):
            for summary in page["StackResourceSummaries"]:
                resources[summary["LogicalResourceId"]] = (
                    summary["ResourceType"],
                    summary.get("PhysicalResourceId", ""),
                )
        template = json.loads((workdir / "cdk.out" / f"{STACK_NAME}.template.json").read_text())
        deployment = Deployment(
            emulator=emulator,
            cdk=cdk,
            env=env,
            outputs=json.loads(outputs_file.read_text())[STACK_NAME],
            resources=resources,
            template=template,
            timings=timings,
        )
        _REPORT["deployment"] = deployment
        yield deployment
        if not deployment.destroyed:
            cdk.run("destroy", STACK_NAME, "--force", synthesized=True)
    finally:
        emulator.stop()
        restore_environ(saved)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    deployment = _REPORT.get("deployment")
    if deployment is None:
        return
    terminalreporter.write_sep("-", "e2e (MiniStack)")
    lines = {
        **{k: f"{v:.1f}" for k, v in deployment.timings.items()},
        "resources_in_template": len(deployment.template.get("Resources", {})),
        "resources_deployed": len(deployment.resources),
        **deployment.facts,
    }
    for key, value in lines.items():
        terminalreporter.write_line(f"{key}: {value}")
