"""MiniStack (a local AWS emulator, pure Python) and the CDK CLI against it, for ``make e2e``.

MiniStack runs from its own virtual environment (``.venv-e2e``, pinned by
``requirements-e2e.lock``, apart from the project's moto): its Python is 3.13, the functions'
runtime, because it also runs the Lambda functions (as local ``python3`` processes, with the
bundled Powertools layer's manylinux cp313 wheels on their path and the venv's boto3 standing
in for the runtime's).

It listens on 127.0.0.1 only (``BIND_HOST``; its default is every interface), on a free port,
with its optional extra listeners (IoT mTLS on 8883, SFTP) off and its state in a temporary
directory. Stopped by its process id.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.moto_server import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
REGION = "us-east-1"
#: A 12-digit access key is MiniStack's account id; the secret is not checked (AUTH off).
ACCOUNT = "000000000000"
#: MiniStack's stub Amazon Linux 2023 image (its EC2 lists it; the public SSM parameter the
#: template resolves by default, .../al2023-ami-kernel-6.1-x86_64, does not exist there).
EMULATOR_AMI = "ami-0c2023a1b2c3d4e5f"
STACK_NAME = "Spotguard-staging"
FLEET = "staging"
#: The staging stack as ``make e2e`` deploys it: test events on, the emulator profile, the
#: bundled layer, MiniStack's AMI. Everything else is cdk.json's.
DEPLOY_CONTEXT: dict[str, str] = {
    "spotguard.fleet.name": FLEET,
    "spotguard.staging.allow_test_events": "true",
    "spotguard.profile": "emulator",
    "spotguard.control_plane.powertools_layer": "bundled",
    "spotguard.fleet.ami_id": EMULATOR_AMI,
}


#: What the emulator (and so every function process) inherits from the caller's environment.
_PASSED_THROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "SSL_CERT_FILE", "SSL_CERT_DIR")


def aws_environment(endpoint: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for every client of the emulator (boto3, the CDK CLI, spotguard's CLI):
    fake credentials, one region, every SDK pointed at the emulator, no profile or IMDS."""
    env = dict(os.environ if base is None else base)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_DEFAULT_PROFILE"):
        env.pop(key, None)
    env.update(
        {
            "AWS_ACCESS_KEY_ID": ACCOUNT,
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20",
            "JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION": "1",
            "JSII_SILENCE_WARNING_UNTESTED_NODE_VERSION": "1",
            "CDK_DISABLE_VERSION_CHECK": "1",
            "CDK_DISABLE_CLI_TELEMETRY": "true",
        }
    )
    return env


@dataclass
class MiniStack:
    venv: Path
    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "ministack.log"

    def environment(self) -> dict[str, str]:
        """A clean environment: MiniStack hands its own environment to the function processes
        it spawns, so nothing of the test process (e.g. tests/conftest.py's
        ``POWERTOOLS_METRICS_DISABLED``) may leak into the functions."""
        tmp = self.workdir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        base = {k: os.environ[k] for k in _PASSED_THROUGH if k in os.environ}
        env = aws_environment(self.endpoint, base)
        env.update(
            {
                # The functions run as `python3` from PATH: the emulator venv's 3.13.
                "PATH": f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
                "BIND_HOST": "127.0.0.1",
                "GATEWAY_PORT": str(self.port),
                "MINISTACK_REGION": REGION,
                "MINISTACK_ACCOUNT_ID": ACCOUNT,
                "IOT_MTLS_ENABLED": "0",
                "SFTP_ENABLED": "0",
                "PERSIST_STATE": "0",
                "S3_PERSIST": "0",
                "S3_DATA_DIR": str(self.workdir / "s3"),
                "TMPDIR": str(tmp),
                "LAMBDA_EXECUTOR": "local",
                # Signatures are not verified nor IAM policies evaluated (docs/testing.md): its
                # AUTH=true mode stops cdk deploy at asset publishing ("Bucket named
                # 'cdk-hnb659fds-assets-…' exists, but we dont have access to it.").
                "AUTH": "false",
            }
        )
        return env

    def start(self, timeout: float = 60.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [str(self.venv / "bin" / "ministack")],
            cwd=self.workdir,
            env=self.environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"MiniStack exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/_ministack/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(
            f"MiniStack did not answer on {self.endpoint} in {timeout:.0f}s:\n{self.log_tail()}"
        )

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.endpoint}/_ministack/health", timeout=5) as response:
            data = json.loads(response.read())
        return data if isinstance(data, dict) else {}

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM to MiniStack's process group (it and the function processes it spawned)."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)


@dataclass
class Cdk:
    """The repository's own CDK CLI (node_modules), run against the emulator."""

    env: Mapping[str, str]
    outdir: Path
    context: Mapping[str, str] = field(default_factory=lambda: dict(DEPLOY_CONTEXT))

    def command(self, *args: str, app: bool = True, synthesized: bool = False) -> list[str]:
        """``cdk <args>``; with ``app`` the spotguard app and the deploy context (bootstrap
        needs neither: it deploys CDK's own template to the given environment); with
        ``synthesized`` the cloud assembly the deploy wrote (destroy needs no new synth)."""
        cli = REPO_ROOT / "node_modules" / ".bin" / "cdk"
        python = REPO_ROOT / ".venv" / "bin" / "python"
        app_args: list[str] = []
        if synthesized:
            app_args = ["--app", str(self.outdir)]
        elif app:
            app_args = ["--app", f"{python} app.py", "--output", str(self.outdir)]
            for key, value in self.context.items():
                app_args += ["-c", f"{key}={value}"]
        return [str(cli), *args, "--no-notices", "--no-version-reporting", *app_args]

    def run(
        self, *args: str, app: bool = True, synthesized: bool = False, timeout: float = 420
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*args, app=app, synthesized=synthesized),
            # Without the app: away from cdk.json, whose "app" the CLI would synthesize.
            cwd=REPO_ROOT if app else self.outdir.parent,
            env=dict(self.env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def run_cli(
    args: Sequence[str], env: Mapping[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """spotguard's operator CLI from the project's venv."""
    return subprocess.run(
        [str(REPO_ROOT / ".venv" / "bin" / "spotguard"), *args],
        cwd=REPO_ROOT,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
