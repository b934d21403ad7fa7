"""A sandbox for the bootstrap and the installer: commands on PATH stand in for the OS.

* ``systemctl``: a miniature systemd. ``enable`` makes the wants/ symlink like systemd;
  ``start``/``restart`` really start the unit's ``ExecStart`` with its ``EnvironmentFile``
  (so the real agent runs and its health port really listens); ``is-active`` checks the
  process. ``FAKE_SYSTEMCTL_FAIL=start`` makes units never come up.
* ``shutdown``, ``dnf``: record their arguments (``dnf`` fails: no package manager here).
* ``logger``: the journal, appended to ``journal.log``.
* ``sleep``: records the requested seconds and sleeps them times ``FAKE_SLEEP_SCALE``, so
  the bootstrap's 10..50 s backoff runs in milliseconds and the test can read it back.
* ``python3.11``: this test interpreter (it has boto3).

Everything the fakes record lands in ``state/``. Paths on the instance are under
``root/`` (``SPOTGUARD_ROOT``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

SYSTEMCTL = r"""#!{python}
import os, pathlib, shlex, signal, subprocess, sys
state = pathlib.Path(os.environ["FAKE_SYSTEMD_STATE"])
root = pathlib.Path(os.environ.get("SPOTGUARD_ROOT") or "/")
units = root / "etc/systemd/system"
with open(state / "systemctl.log", "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\n")
command, *names = sys.argv[1:]
fail = os.environ.get("FAKE_SYSTEMCTL_FAIL", "").split(",")

def pid_of(name):
    try:
        pid = int((state / (name + ".pid")).read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    try:
        with open(f"/proc/{{pid}}/stat") as stat:
            if stat.read().split(") ")[1].startswith("Z"):
                return None
    except OSError:
        return None
    return pid

def stop(name):
    pid = pid_of(name)
    if pid:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if pid_of(name) is None:
                break
            import time; time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)

def unquote(value):
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1].replace('\\"', '"').replace("\\$", "$").replace("\\\\", "\\")
    return value

def start(name):
    if "start" in fail:
        return
    # Like systemd: the unit sees its EnvironmentFile and Environment= lines, not the
    # caller's environment. Only what stands in for the instance profile and the real AWS
    # endpoint (moto) passes through.
    passed = ["PATH", "HOME", *os.environ.get("FAKE_SYSTEMD_PASSENV", "").split(",")]
    env = {{key: os.environ[key] for key in passed if key in os.environ}}
    command_line = None
    for line in (units / name).read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "EnvironmentFile":
            for entry in pathlib.Path(value.lstrip("-")).read_text().splitlines():
                if entry and not entry.startswith("#") and "=" in entry:
                    k, _, v = entry.partition("=")
                    env[k] = unquote(v)
        elif key == "Environment":
            for token in shlex.split(value):
                k, _, v = token.partition("=")
                env[k] = v
        elif key == "ExecStart":
            command_line = shlex.split(value)
    out = open(state / (name + ".out"), "ab")
    process = subprocess.Popen(command_line, env=env, stdout=out, stderr=out, start_new_session=True)
    (state / (name + ".pid")).write_text(str(process.pid))

if command == "daemon-reload":
    sys.exit(0)
for name in names:
    if command == "enable":
        wants = units / "multi-user.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        link = wants / name
        if not link.is_symlink():
            link.symlink_to(units / name)
    elif command in ("start", "restart"):
        stop(name)
        start(name)
    elif command == "stop":
        stop(name)
    elif command == "is-active":
        active = pid_of(name) is not None
        print("active" if active else "inactive")
        sys.exit(0 if active else 3)
"""

RECORDER = """#!/bin/sh
echo "$*" >> "$FAKE_SYSTEMD_STATE/{name}.log"
exit {code}
"""

SLEEP = """#!/bin/sh
echo "$1" >> "$FAKE_SYSTEMD_STATE/sleep.log"
exec /bin/sleep "$(awk "BEGIN {{ print $1 * ${{FAKE_SLEEP_SCALE:-0.01}} }}")"
"""

LOGGER = """#!/bin/sh
cat >> "$FAKE_SYSTEMD_STATE/journal.log"
"""

PYTHON = """#!/bin/sh
exec {python} "$@"
"""


#: What the fake systemd passes to units besides their env file: credentials and the
#: endpoint that stand in for the instance profile and AWS.
PASSENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_EC2_METADATA_DISABLED",
    "AWS_MAX_ATTEMPTS",
)


@dataclass
class Sandbox:
    base: Path

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def bin(self) -> Path:
        return self.base / "bin"

    @property
    def state(self) -> Path:
        return self.base / "state"

    def env(self, **extra: str) -> dict[str, str]:
        venv_bin = str(Path(sys.executable).parent)
        return {
            **os.environ,
            "PATH": f"{self.bin}:{venv_bin}:/usr/bin:/bin",
            "SPOTGUARD_ROOT": str(self.root),
            "FAKE_SYSTEMD_STATE": str(self.state),
            # moto answers 500 to lifecycle actions: do not spend seconds retrying that.
            "AWS_MAX_ATTEMPTS": "1",
            "FAKE_SYSTEMD_PASSENV": ",".join(PASSENV),
            **extra,
        }

    def recorded(self, name: str) -> list[str]:
        path = self.state / f"{name}.log"
        return path.read_text().splitlines() if path.exists() else []

    def text(self, name: str) -> str:
        path = self.state / name
        return path.read_text() if path.exists() else ""

    def stop_services(self) -> None:
        """Kill what the fake systemd started (only those processes, by pid)."""
        for pid_file in self.state.glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def make_sandbox(base: Path) -> Sandbox:
    sandbox = Sandbox(base)
    for directory in (sandbox.root, sandbox.bin, sandbox.state):
        directory.mkdir(parents=True, exist_ok=True)
    scripts = {
        "systemctl": SYSTEMCTL.format(python=sys.executable),
        "shutdown": RECORDER.format(name="shutdown", code=0),
        "dnf": RECORDER.format(name="dnf", code=1),
        "sleep": SLEEP,
        "logger": LOGGER,
        "python3.11": PYTHON.format(python=sys.executable),
    }
    for name, text in scripts.items():
        path = sandbox.bin / name
        path.write_text(text)
        path.chmod(0o755)
    return sandbox


def unpacked_bundle(base: Path) -> Path:
    """The agent bundle built as CDK ships it, unpacked as stage 1 does (the installer's
    staging directory)."""
    from spotguard_tools.bundle import build_bundle  # noqa: PLC0415 - only the installer tests need it

    info = build_bundle(base / "dist")
    target = base / "staging"
    with tarfile.open(info.path) as archive:
        archive.extractall(target, filter="data")
    return target
