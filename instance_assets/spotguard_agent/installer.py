"""The installer: the one owner of every step after the bundle was downloaded and checked.

Run by the stage-1 user data (``install.py`` in the bundle) under the remaining bootstrap
deadline. Steps, each logged:

1. wait until cloud-init's earlier stages are done (we run inside its final stage, so
   waiting for cloud-init to *finish* would wait for ourselves);
2. make sure boto3 is importable by the agent's interpreter;
3. read the agent configuration (SSM parameter, JSON of ``contracts.Env`` names);
4. the user's workload, when the configuration names one (``Env.WORKLOAD_URL`` and
   ``Env.WORKLOAD_SHA256``): download it (boto3, retries), check its sha256, unpack it
   safely into ``contracts.WORKLOAD_DIR`` and build ``contracts.WORKLOAD_VENV`` from its
   ``requirements.txt`` (from its ``wheelhouse/`` only, when it has one);
5. write ``/etc/spotguard/agent.env`` (with ``WORKLOAD_DIR``/``WORKLOAD_PYTHON``);
6. put the agent's code in its final place (``/opt/spotguard/lib``) and a
   ``/usr/local/bin/spotguard-agent`` wrapper;
7. install, enable and (re)start the systemd unit;
8. verify: unit active and the health port listening;
9. report ready (fleet record, tag, launch hook CONTINUE).

On failure it writes the reason to ``/opt/spotguard/install-failure`` and exits 1; the
stage-1 script records it, answers ABANDON and shuts the instance down. The file says
"deadline passed in install" while the installer runs: when stage 1's ``timeout`` ends it at
the bootstrap deadline, that is the reason recorded.
Safe to run twice: files are replaced, not duplicated; ``enable`` is idempotent.
Every path is under ``--root`` so tests install into a temporary directory.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Mapping
from pathlib import Path

from spotguard_core.contracts import (
    AGENT_ENV_FILE,
    BOOTSTRAP_LOG_FILE,
    DEFAULT_HANDLER,
    INSTALL_ROOT,
    WORKLOAD_DIR,
    WORKLOAD_REQUIREMENTS,
    WORKLOAD_VENV,
    WORKLOAD_WHEELHOUSE,
    Env,
    agent_config_parameter,
)

from spotguard_agent import archives
from spotguard_agent.config import ConfigError, load_config
from spotguard_agent.execution import WorkloadConfig, WorkloadError

LOG = logging.getLogger("spotguard.installer")
UNIT_NAME = "spotguard-agent.service"
UNIT_DIR = "etc/systemd/system"
WRAPPER = "usr/local/bin/spotguard-agent"
FAILURE_FILE = "install-failure"
PACKAGES = ("spotguard_agent", "spotguard_core")
CLOUD_INIT_STATUS = "run/cloud-init/status.json"
#: cloud-init's copy of the instance id (read from IMDS in its first stage).
CLOUD_INIT_INSTANCE_ID = "var/lib/cloud/data/instance-id"
#: What the failure file says while the installer runs (see the module docstring).
DEADLINE_REASON = "deadline passed in install"
MAX_REASON_CHARS = 200
#: cloud-init runs user-data scripts in its final stage: once that stage (or none) is
#: current, the earlier stages (network, packages, users) are done.
CLOUD_INIT_READY_STAGES = (None, "modules-final")
VERIFY_DEADLINE_MARGIN_SECONDS = 5.0


class InstallError(RuntimeError):
    """A step failed; the message is the reason recorded for the instance."""


class Installer:
    def __init__(
        self,
        *,
        root: Path,
        bundle: Path,
        instance_id: str | None = None,
        deadline_epoch: float | None = None,
        python: str | None = None,
        config_parameter: str | None = None,
        environ: Mapping[str, str] | None = None,
        verify_timeout_seconds: float = 60.0,
    ) -> None:
        self.root = root
        self.bundle = bundle
        self.instance_id = instance_id
        self.deadline_epoch = deadline_epoch
        self.python = python or sys.executable
        self.environ = dict(os.environ if environ is None else environ)
        fleet = self.environ.get(Env.FLEET_NAME.value, "")
        self.config_parameter = (
            config_parameter
            or self.environ.get(Env.AGENT_CONFIG_PARAMETER.value)
            or (agent_config_parameter(fleet) if fleet else "")
        )
        self.verify_timeout_seconds = verify_timeout_seconds

    # ------------------------------------------------------------------ paths
    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    @property
    def install_root(self) -> Path:
        return self.path(INSTALL_ROOT)

    @property
    def lib_dir(self) -> Path:
        return self.install_root / "lib"

    @property
    def env_file(self) -> Path:
        return self.path(AGENT_ENV_FILE)

    @property
    def unit_file(self) -> Path:
        return self.root / UNIT_DIR / UNIT_NAME

    def seconds_left(self) -> float:
        if self.deadline_epoch is None:
            return float("inf")
        return self.deadline_epoch - time.time()

    # ------------------------------------------------------------------ steps
    def run(self) -> dict[str, str]:
        self.install_root.mkdir(parents=True, exist_ok=True)
        lock_path = self.install_root / ".install.lock"
        with lock_path.open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one installer at a time
            (self.install_root / FAILURE_FILE).write_text(DEADLINE_REASON + "\n")
            if self.seconds_left() <= 0:
                raise InstallError("deadline passed before install")
            self.wait_for_cloud_init()
            self.ensure_boto3()
            env = self.agent_environment()
            self.check_config(env)
            self.install_workload(env)
            self.check_handler(env)
            self.write_env_file(env)
            if env.get(Env.INSTALL_VERIFY_SECONDS.value):  # the fleet's configuration wins
                self.verify_timeout_seconds = float(env[Env.INSTALL_VERIFY_SECONDS.value])
            self.place_files()
            self.install_unit()
            self.start_and_verify(int(env.get(Env.HEALTH_PORT.value, "8080")))
            self.report_ready(env)
            (self.install_root / FAILURE_FILE).unlink(missing_ok=True)
        LOG.info("install complete")
        return env

    def wait_for_cloud_init(self, poll_seconds: float = 2.0) -> None:
        status_file = self.path(CLOUD_INIT_STATUS)
        while True:
            try:
                stage = json.loads(status_file.read_text()).get("v1", {}).get("stage")
            except FileNotFoundError:
                LOG.info("no cloud-init status: not waiting")
                return
            except (OSError, ValueError) as error:
                LOG.info("cloud-init status unreadable (%s): not waiting", error)
                return
            if stage in CLOUD_INIT_READY_STAGES:
                LOG.info("cloud-init stage %s: ready", stage)
                return
            if self.seconds_left() < 30:
                raise InstallError(f"cloud-init still in stage {stage} near the deadline")
            LOG.info("waiting for cloud-init (stage %s)", stage)
            time.sleep(poll_seconds)

    def ensure_boto3(self) -> None:
        def importable() -> bool:
            check = [self.python, "-c", "import boto3"]
            return subprocess.run(check, capture_output=True, check=False).returncode == 0  # noqa: S603

        if importable():
            return
        attempts = (
            ["dnf", "install", "-y", "python3-boto3"],
            [self.python, "-m", "pip", "install", "-q", "boto3"],
        )
        for command in attempts:
            LOG.info("boto3 missing: %s", " ".join(command))
            subprocess.run(  # noqa: S603 - fixed argv
                command, capture_output=True, check=False, timeout=min(600, max(30, self.seconds_left()))
            )
            if importable():
                return
        raise InstallError(f"boto3 is not importable by {self.python} (dnf and pip failed)")

    def read_agent_config(self) -> dict[str, str]:
        if not self.config_parameter:
            LOG.info("no agent config parameter: using the environment only")
            return {}
        import boto3  # noqa: PLC0415 - only after ensure_boto3
        from botocore.config import Config  # noqa: PLC0415

        region = self.environ.get(Env.REGION.value) or self.environ.get("AWS_DEFAULT_REGION") or None
        ssm = boto3.client(
            "ssm", region_name=region, config=Config(retries={"mode": "standard", "max_attempts": 8})
        )
        try:
            value = ssm.get_parameter(Name=self.config_parameter, WithDecryption=True)["Parameter"]["Value"]
        except Exception as error:
            raise InstallError(
                f"agent config parameter {self.config_parameter} unreadable: {error}"
            ) from error
        try:
            document = json.loads(value)
        except ValueError as error:
            raise InstallError(f"agent config parameter {self.config_parameter} is not JSON") from error
        if not isinstance(document, dict):
            raise InstallError(f"agent config parameter {self.config_parameter} is not a JSON object")
        return {str(k): str(v) for k, v in document.items()}

    def agent_environment(self) -> dict[str, str]:
        env: dict[str, str] = {}
        # What stage 1 knows, then the fleet's configuration on top.
        for name in (
            Env.FLEET_NAME,
            Env.REGION,
            Env.FLEET_TABLE,
            Env.ASG_NAME,
            Env.LAUNCH_HOOK_NAME,
            Env.AGENT_CONFIG_PARAMETER,
            Env.IMDS_URL,
        ):
            if self.environ.get(name.value):
                env[name.value] = self.environ[name.value]
        env.update(self.read_agent_config())
        # systemd starts the agent with this file only: it must name the region itself.
        region = (
            env.get(Env.REGION.value)
            or self.environ.get("AWS_DEFAULT_REGION")
            or self.environ.get("AWS_REGION")
        )
        if region:
            env.setdefault(Env.REGION.value, region)
            env.setdefault("AWS_DEFAULT_REGION", region)
        return env

    def write_env_file(self, env: Mapping[str, str]) -> None:
        lines = [f"{key}={_quote(value)}" for key, value in sorted(env.items())]
        _write_atomic(
            self.env_file, "# written by the spotguard installer\n" + "\n".join(lines) + "\n", 0o600
        )
        LOG.info("wrote %s (%d settings)", self.env_file, len(env))

    def check_config(self, env: Mapping[str, str]) -> None:
        """Fail the bootstrap with a clear reason instead of a unit that restarts forever."""
        try:
            load_config(env).validate_worker()
            WorkloadConfig.from_environ(env)
        except (ConfigError, WorkloadError) as error:
            raise InstallError(f"agent configuration invalid: {error}") from error
        if bool(env.get(Env.WORKLOAD_URL.value)) != bool(env.get(Env.WORKLOAD_SHA256.value)):
            raise InstallError(
                f"agent configuration invalid: set both {Env.WORKLOAD_URL.value} and "
                f"{Env.WORKLOAD_SHA256.value}, or neither"
            )

    # ------------------------------------------------------------------ the workload
    @property
    def workload_dir(self) -> Path:
        return self.path(WORKLOAD_DIR)

    @property
    def workload_venv(self) -> Path:
        return self.path(WORKLOAD_VENV)

    def install_workload(self, env: dict[str, str]) -> None:
        """Download, check, unpack the workload and build its venv; adds WORKLOAD_DIR and
        WORKLOAD_PYTHON to ``env``. Nothing to do without ``Env.WORKLOAD_URL``."""
        url = env.get(Env.WORKLOAD_URL.value, "")
        if not url:
            LOG.info("no workload configured: the agent runs its sample handler or the configured module")
            return
        data = self.download(url, env)
        digest = hashlib.sha256(data).hexdigest()
        if digest != env[Env.WORKLOAD_SHA256.value].strip().lower():
            raise InstallError(f"workload sha256 mismatch ({url}: {digest})")
        staging = self.workload_dir.with_name(self.workload_dir.name + ".new")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            files = archives.extract_bytes(data, staging)
        except (archives.UnsafeArchive, tarfile.TarError, OSError) as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise InstallError(f"workload archive rejected: {error}") from error
        _replace_dir(staging, self.workload_dir)
        LOG.info("workload unpacked: %d files in %s", files, self.workload_dir)
        python = self.python
        if (self.workload_dir / WORKLOAD_REQUIREMENTS).is_file():
            python = self.build_workload_venv()
        env[Env.WORKLOAD_DIR.value] = self.real_path(self.workload_dir)
        env[Env.WORKLOAD_PYTHON.value] = python

    def check_handler(self, env: Mapping[str, str]) -> None:
        """Import the Python handler the way the agent will (its host process, the workload
        python and directory): a handler that cannot be imported fails the bootstrap with
        the import error, instead of an agent that restarts forever."""
        if env.get(Env.COMMAND.value):
            return
        spec = env.get(Env.HANDLER.value) or DEFAULT_HANDLER
        python = env.get(Env.WORKLOAD_PYTHON.value) or self.python
        directory = env.get(Env.WORKLOAD_DIR.value)
        paths = [p for p in (directory, str(self.bundle.resolve())) if p]
        child_env = {**self.environ, **env, "PYTHONPATH": os.pathsep.join(paths)}
        try:
            result = subprocess.run(  # noqa: S603 - the agent's own host module
                [python, "-m", "spotguard_agent.handler_host", spec],
                input="",
                capture_output=True,
                text=True,
                env=child_env,
                cwd=directory or None,
                check=False,
                timeout=120,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise InstallError(f"handler {spec} not checked: {error}") from error
        first = (result.stdout.splitlines() or ["{}"])[0]
        try:
            ready = json.loads(first)
        except ValueError:
            ready = {"error": (result.stderr.strip().splitlines() or [first])[-1]}
        if ready.get("t") != "ready" or ready.get("error"):
            raise InstallError(str(ready.get("error") or f"handler {spec} does not start"))
        LOG.info("handler %s imports under %s", spec, python)

    def download(self, url: str, env: Mapping[str, str]) -> bytes:
        if not url.startswith("s3://") or "/" not in url[5:]:
            raise InstallError(f"{Env.WORKLOAD_URL.value} must be s3://bucket/key, got {url!r}")
        bucket, _, key = url[5:].partition("/")
        import boto3  # noqa: PLC0415 - only after ensure_boto3
        from botocore.config import Config  # noqa: PLC0415

        region = env.get(Env.REGION.value) or None
        s3 = boto3.client(
            "s3",
            region_name=region,
            config=Config(
                retries={"mode": "standard", "max_attempts": 8}, connect_timeout=10, read_timeout=60
            ),
        )
        try:
            body: bytes = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as error:
            raise InstallError(f"workload download failed ({url}): {error}") from error
        LOG.info("workload downloaded: %s (%d bytes)", url, len(body))
        return body

    def build_workload_venv(self) -> str:
        """``requirements.txt`` into a fresh venv: from the wheelhouse only when there is one.

        Built in place (a venv's scripts name their own path); a failed build fails the
        install, so a half-built venv is never used."""
        venv = self.workload_venv
        shutil.rmtree(venv, ignore_errors=True)
        self._run([self.python, "-m", "venv", str(venv)], "workload venv")
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        wheelhouse = self.workload_dir / WORKLOAD_WHEELHOUSE
        if wheelhouse.is_dir():
            pip += ["--no-index", "--find-links", str(wheelhouse)]
        pip += ["-r", str(self.workload_dir / WORKLOAD_REQUIREMENTS)]
        self._run(pip, "workload requirements")
        LOG.info(
            "workload venv built: %s (%s)", venv, "wheelhouse" if wheelhouse.is_dir() else "package index"
        )
        # Not resolved: bin/python is a link to the base interpreter, the venv is its path.
        return str(venv.resolve() / "bin" / "python")

    def _run(self, command: list[str], what: str) -> None:
        timeout = max(30.0, min(900.0, self.seconds_left() - VERIFY_DEADLINE_MARGIN_SECONDS - 60))
        try:
            result = subprocess.run(  # noqa: S603 - fixed argv
                command, capture_output=True, text=True, check=False, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise InstallError(f"{what}: timed out after {timeout:.0f} s") from None
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise InstallError(f"{what} failed: {detail[-1] if detail else result.returncode}")

    def place_files(self) -> None:
        staging = self.install_root / "lib.new"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for package in PACKAGES:
            source = self.bundle / package
            if not source.is_dir():
                raise InstallError(f"bundle has no {package}/")
            shutil.copytree(source, staging / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        old = self.install_root / "lib.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.lib_dir.exists():
            self.lib_dir.rename(old)
        staging.rename(self.lib_dir)
        shutil.rmtree(old, ignore_errors=True)
        wrapper = (
            "#!/bin/sh\n# spotguard agent CLI (installed by the spotguard installer)\n"
            f'PYTHONPATH={self.real_path(self.lib_dir)} exec {self.python} -m spotguard_agent.cli "$@"\n'
        )
        _write_atomic(self.root / WRAPPER, wrapper, 0o755)
        LOG.info("agent code in %s", self.lib_dir)

    def real_path(self, path: Path) -> str:
        """The absolute path as the running system sees it (the root prefix included)."""
        return str(path.resolve())

    def install_unit(self) -> None:
        template = (self.bundle / "systemd" / UNIT_NAME).read_text()
        unit = (
            template.replace("@ENV_FILE@", self.real_path(self.env_file))
            .replace("@LIB_DIR@", self.real_path(self.lib_dir))
            .replace("@PYTHON@", self.python)
        )
        _write_atomic(self.unit_file, unit, 0o644)
        self.systemctl("daemon-reload")
        self.systemctl("enable", UNIT_NAME)
        LOG.info("unit %s installed and enabled", UNIT_NAME)

    def start_and_verify(self, health_port: int) -> None:
        self.systemctl("restart", UNIT_NAME)
        # Leave the stage-1 script a few seconds to record the failure before its deadline.
        budget = min(
            self.verify_timeout_seconds, max(1.0, self.seconds_left() - VERIFY_DEADLINE_MARGIN_SECONDS)
        )
        deadline = time.monotonic() + budget
        active = listening = False
        while time.monotonic() < deadline:
            active = self.systemctl("is-active", UNIT_NAME, check=False).returncode == 0
            listening = _port_open(health_port)
            if active and listening:
                LOG.info("verified: %s active, port %d listening", UNIT_NAME, health_port)
                return
            time.sleep(0.5)
        if not active:
            raise InstallError(f"verification failed: {UNIT_NAME} not active")
        raise InstallError(f"verification failed: health port {health_port} not listening")

    def report_ready(self, env: Mapping[str, str]) -> None:
        command = [self.python, "-m", "spotguard_agent.cli", "report", "ready"]
        if self.instance_id:
            command += ["--instance-id", self.instance_id]
        child_env = {**self.environ, **env, "PYTHONPATH": self.real_path(self.lib_dir)}
        result = subprocess.run(  # noqa: S603 - fixed argv
            command, capture_output=True, text=True, env=child_env, check=False, timeout=120
        )
        if result.returncode != 0:
            raise InstallError(f"report ready failed: {result.stderr.strip()[-200:]}")
        LOG.info("reported ready: %s", result.stdout.strip())

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False, timeout=60)  # noqa: S603, S607
        if check and result.returncode != 0:
            raise InstallError(f"systemctl {' '.join(args)} failed: {result.stderr.strip()[-200:]}")
        return result


def _replace_dir(staging: Path, target: Path) -> None:
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _quote(value: str) -> str:
    """systemd EnvironmentFile quoting."""
    if value and all(c.isalnum() or c in "-_./:=@,+%" for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def _write_atomic(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    temporary.chmod(mode)
    temporary.replace(path)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="spotguard installer (stage 2)")
    # SPOTGUARD_ROOT: a path prefix for tests (stage 1 honours it too).
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("SPOTGUARD_ROOT") or "/"))
    parser.add_argument("--bundle", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--instance-id")
    parser.add_argument("--deadline-epoch", type=float)
    parser.add_argument("--python", help="interpreter for the agent (default: this one)")
    parser.add_argument("--config-parameter")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s installer %(levelname)s: %(message)s")
    installer = Installer(
        root=args.root,
        bundle=args.bundle,
        instance_id=args.instance_id or _cloud_init_instance_id(args.root),
        deadline_epoch=args.deadline_epoch,
        python=args.python,
        config_parameter=args.config_parameter,
        verify_timeout_seconds=float(os.environ.get(Env.INSTALL_VERIFY_SECONDS.value) or 60),
    )
    try:
        installer.run()
    except Exception as error:  # noqa: BLE001 - every failure becomes the recorded reason
        reason = str(error) if isinstance(error, InstallError) else f"{type(error).__name__}: {error}"
        LOG.error("install failed: %s (log: %s)", reason, BOOTSTRAP_LOG_FILE)
        installer.install_root.mkdir(parents=True, exist_ok=True)
        reason = reason.replace("\n", " ")[:MAX_REASON_CHARS]
        (installer.install_root / FAILURE_FILE).write_text(reason + "\n")
        return 1
    return 0


def _cloud_init_instance_id(root: Path) -> str | None:
    """The instance id cloud-init stored (None: the agent asks IMDS when it reports)."""
    try:
        return (root / CLOUD_INIT_INSTANCE_ID).read_text().strip() or None
    except OSError:
        return None
