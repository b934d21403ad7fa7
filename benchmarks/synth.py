"""Benchmark: where the synth of the ready app (``python app.py``, cdk-nag on) spends its time.

One run, three child processes, one JSON document:

1. ``python app.py`` as ``make synth`` runs it (``CDK_OUTDIR`` set, cdk-nag as a validation
   plugin): the wall time to compare with the split.
2. The same steps, timed one by one in a second process (``--phases``):

   - ``interpreter_s``: the Python interpreter up to this module's first line;
   - ``import_aws_cdk_s``: ``import aws_cdk``, which starts the jsii kernel (Node.js) and
     loads the aws-cdk-lib assembly: the Python/jsii start-up;
   - ``import_cdk_nag_s``, ``import_spotguard_cdk_s`` (the construct library, with the
     aws_cdk submodules it imports);
   - ``construct_tree_s``: ``cdk.App`` + settings + ``SpotguardStack``. It includes the asset
     work done while constructs are created, reported inside it: the Python-side preparation
     (``asset_preparation_s``: the Lambda source copied into a staging directory, the agent
     bundle packed as a deterministic tar.gz), and CDK's own staging (fingerprint + copy
     into the cloud assembly), measured apart by staging the same sources again into a
     scratch assembly (``asset_staging_s``, an estimate: warm file cache);
   - ``template_writing_s``: ``app.synth()`` without the cdk-nag plugin (prepare, validate,
     resolve, write the templates and the asset manifest). Inside it (``details``): the
     calls of ``SpotguardStack._allocate_logical_id``, a Python override JS calls back into
     for every logical id it resolves (``logical_id_callbacks``, ``logical_id_callbacks_s``);
   - ``cdk_nag_s``: the AwsSolutions pack run over the same tree (``validate_scope``, what
     the plugin does inside ``app.synth()`` in app.py);
   - ``exit_s``: from the last phase to the process's end (the jsii kernel shutting down).
3. ``cfn-lint`` on the templates (the Makefile's ``synth`` target runs it after the synth;
   ``app.py`` does not).

``--variant-optimized`` adds a ``python -O app.py`` run: the same templates without the
runtime type checks (typeguard ``check_type``) that the jsii bindings run on every call
under ``__debug__``.

    .venv/bin/python benchmarks/synth.py [--variant-optimized] [--keep DIR]

Offline (no credentials, no network: the default settings use the public Powertools layer
ARN, nothing is built with pip).
"""

# ruff: noqa: PLC0415 - the imports inside the phases are what is timed
from __future__ import annotations

import argparse
import contextlib
import filecmp
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: Set by the parent just before it starts the phases child: the interpreter's own start-up.
SPAWNED_AT_ENV = "SPOTGUARD_BENCH_SPAWNED_AT"
FIRST_LINE_AT = time.time()
#: app.py's defaults: jsii's Node.js version banners off.
JSII_QUIET = {
    "JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION": "1",
    "JSII_SILENCE_WARNING_UNTESTED_NODE_VERSION": "1",
    "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20",
}


# ---------------------------------------------------------------------- phases (child)
class Clock:
    """Phase durations in the order they ran."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.details: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = round(time.perf_counter() - started, 3)

    def timed(self, name: str, function: Callable[..., Any], *, calls: str = "") -> Callable[..., Any]:
        """``function``, adding its time to ``details[name]`` (and 1 to ``details[calls]``)
        on every call."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                self.details[name] = round(self.details.get(name, 0.0) + elapsed, 3)
                if calls:
                    self.details[calls] = self.details.get(calls, 0) + 1

        return wrapper


def _stage_again(clock: Clock, outdir: Path) -> None:
    """CDK's asset staging (fingerprint + copy) of the app's sources, into a scratch assembly."""
    import aws_cdk as cdk
    from spotguard_cdk import functions
    from spotguard_cdk.bundle import build_bundle

    app = cdk.App(outdir=str(outdir))
    stack = cdk.Stack(app, "Staging")
    with tempfile.TemporaryDirectory(prefix="spotguard-bench-bundle-") as build_dir:
        bundle = build_bundle(Path(build_dir))
        started = time.perf_counter()
        cdk.AssetStaging(
            stack, "Lambda", source_path=str(functions.lambda_source_dir()), exclude=functions.ASSET_EXCLUDES
        )
        cdk.AssetStaging(stack, "AgentBundle", source_path=str(bundle.path))
        clock.details["asset_staging_s"] = round(time.perf_counter() - started, 3)


def run_phases(outdir: Path) -> dict[str, Any]:
    clock = Clock()
    spawned_at = float(os.environ.get(SPAWNED_AT_ENV) or FIRST_LINE_AT)
    clock.phases["interpreter_s"] = round(FIRST_LINE_AT - spawned_at, 3)
    sys.path.insert(0, str(ROOT))
    os.environ["CDK_OUTDIR"] = str(outdir)
    for name, value in JSII_QUIET.items():  # as app.py sets them before its imports
        os.environ.setdefault(name, value)
    with clock.phase("import_aws_cdk_s"):
        import aws_cdk as cdk
    with clock.phase("import_cdk_nag_s"):
        from cdk_nag import AwsSolutionsChecks
    with clock.phase("import_spotguard_cdk_s"):
        from spotguard_cdk import agent_bundle, functions
        from spotguard_cdk.app_stack import SpotguardStack
    import app as ready_app  # its helpers; everything it imports is loaded by now

    # The Python-side asset preparation, timed where the constructs call it.
    agent_bundle.build_bundle = clock.timed("asset_preparation_s", agent_bundle.build_bundle)
    # (a cached function replaced by a plain one: mypy sees another type)
    functions.lambda_source_dir = clock.timed(  # type: ignore[assignment]
        "asset_preparation_s", functions.lambda_source_dir
    )
    # The stack's logical-id override is a jsii callback: JS calls into Python for every
    # reference it resolves, and each call asks JS for the element's scopes and ids.
    SpotguardStack._allocate_logical_id = clock.timed(  # type: ignore[method-assign]
        "logical_id_callbacks_s", SpotguardStack._allocate_logical_id, calls="logical_id_callbacks"
    )
    with clock.phase("construct_tree_s"):
        app = cdk.App(context=ready_app.cdk_json_context())
        SpotguardStack(app, settings=ready_app.load_settings(app))
    with clock.phase("template_writing_s"):
        assembly = app.synth()
    with clock.phase("cdk_nag_s"):
        report = AwsSolutionsChecks(app).validate_scope(app)
    _stage_again(clock, outdir.parent / f"{outdir.name}-staging")
    templates = [str(Path(stack.template_full_path)) for stack in assembly.stacks]
    return {
        "phases": clock.phases,
        "details": clock.details,
        "templates": templates,
        "cdk_nag_success": report.success,
        "cdk_nag_violations": len(report.violations),
        "phases_done_at": time.time(),
    }


# ---------------------------------------------------------------------- parent
def _python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _timed_run(argv: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.time()
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    return round(time.time() - started, 2), result


def _app_run(outdir: Path, *flags: str) -> dict[str, Any]:
    env = {**os.environ, "CDK_OUTDIR": str(outdir)}
    wall, result = _timed_run([_python(), *flags, "app.py"], env)
    if result.returncode != 0:
        raise SystemExit(f"python {' '.join(flags)} app.py failed:\n{result.stderr[-4000:]}")
    return {"wall_s": wall, "templates": sorted(p.name for p in outdir.glob("*.template.json"))}


def _same_templates(left: Path, right: Path) -> bool:
    names = sorted(p.name for p in left.glob("*.template.json"))
    return bool(names) and all(filecmp.cmp(left / n, right / n, shallow=False) for n in names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant-optimized", action="store_true", help="also time python -O app.py")
    parser.add_argument("--keep", help="write the cloud assemblies here instead of a temporary directory")
    parser.add_argument("--phases", help=argparse.SUPPRESS)  # the child: the split, as JSON
    args = parser.parse_args(argv)
    if args.phases:
        print(json.dumps(run_phases(Path(args.phases))))
        return 0
    with contextlib.ExitStack() as stack:
        base = Path(args.keep) if args.keep else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        base.mkdir(parents=True, exist_ok=True)
        document: dict[str, Any] = {"benchmark": "synth", "cpus": os.cpu_count()}
        document["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
        document["app_py"] = _app_run(base / "app")
        env = {**os.environ, SPAWNED_AT_ENV: str(time.time())}
        wall, result = _timed_run([_python(), __file__, "--phases", str(base / "phases")], env)
        ended = time.time()
        if result.returncode != 0:
            raise SystemExit(f"the phases run failed:\n{result.stderr[-4000:]}")
        split = json.loads(result.stdout.strip().splitlines()[-1])
        phases = split["phases"]
        phases["exit_s"] = round(ended - split["phases_done_at"], 3)
        lint_wall, lint = _timed_run(
            [str(Path(_python()).with_name("cfn-lint")), *split["templates"]], dict(os.environ)
        )
        document["split_s"] = phases
        document["details"] = split["details"]
        document["phases_wall_s"] = wall
        document["cdk_nag"] = {"success": split["cdk_nag_success"], "violations": split["cdk_nag_violations"]}
        document["cfn_lint_s"] = lint_wall
        document["cfn_lint_exit_code"] = lint.returncode
        if args.variant_optimized:
            optimized = _app_run(base / "app-optimized", "-O")
            optimized["same_templates"] = _same_templates(base / "app", base / "app-optimized")
            document["app_py_optimized"] = optimized
        document["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
