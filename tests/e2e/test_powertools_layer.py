"""The bundled Powertools layer builder (stacks/spotguard_cdk/powertools_layer.py)."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import sys
from pathlib import Path

import pytest
from spotguard_cdk import powertools_layer
from spotguard_cdk.powertools_layer import (
    LAYER_DISTRIBUTIONS,
    POWERTOOLS_EXTRAS,
    LayerBuildError,
    LayerSpec,
    build_layer,
    cache_root,
    closure_gaps,
    normalize,
    pip_command,
    read_pins,
)


def test_the_spec_pins_every_layer_distribution_from_the_lock() -> None:
    pins = read_pins()
    spec = LayerSpec.from_lock(python_version="3.13")
    assert len(spec.requirements) == len(LAYER_DISTRIBUTIONS)
    for name in LAYER_DISTRIBUTIONS:
        assert f"{normalize(name)}=={pins[normalize(name)]}" in spec.requirements
    assert not any(r.startswith(("boto3==", "botocore==")) for r in spec.requirements)


def test_the_layer_set_is_closed_under_the_installed_requirements() -> None:
    """Everything the layer's distributions require (with Powertools' parser and tracer
    extras) is in the layer or in the Lambda runtime: ``--no-deps`` leaves nothing out."""
    requires = {name: importlib.metadata.requires(name) or [] for name in LAYER_DISTRIBUTIONS}
    assert closure_gaps(requires, {"aws-lambda-powertools": POWERTOOLS_EXTRAS}) == {}
    # and the check itself notices a missing dependency
    assert closure_gaps(
        {"aws-lambda-powertools": ["redis>=4; extra == 'redis'", "jmespath"]},
        {"aws-lambda-powertools": ("redis",)},
    ) == {"aws-lambda-powertools": {"redis"}}


def test_what_the_functions_import_is_in_the_layer() -> None:
    """Third-party imports of lambdas/ are the layer's distributions or the runtime's boto3."""
    layer_modules = {"aws_lambda_powertools", "pydantic", "pydantic_settings", "aws_xray_sdk", "jmespath"}
    runtime_modules = {"boto3", "botocore"}
    lambdas = Path(powertools_layer.REPO_ROOT) / "lambdas"
    imported: set[str] = set()
    for source in lambdas.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and not m.startswith("spotguard_")}
    third_party.discard("__future__")
    assert third_party <= layer_modules | runtime_modules, third_party - layer_modules - runtime_modules


def test_pip_builds_manylinux_wheels_for_the_runtime_without_dependencies(tmp_path: Path) -> None:
    spec = LayerSpec.from_lock(python_version="3.13")
    command = pip_command(spec, tmp_path / "python")
    assert command[1:4] == ["-m", "pip", "install"]
    for flag in ("--no-deps", "--no-compile", "--only-binary=:all:"):
        assert flag in command
    assert command[command.index("--platform") + 1] == "manylinux2014_x86_64"
    assert command[command.index("--python-version") + 1] == "3.13"
    assert command[command.index("--target") + 1] == str(tmp_path / "python")


def test_the_cache_key_follows_pins_runtime_and_platform() -> None:
    spec = LayerSpec.from_lock(python_version="3.13")
    assert spec.digest == LayerSpec.from_lock(python_version="3.13").digest
    assert spec.digest != LayerSpec.from_lock(python_version="3.12").digest
    bumped = LayerSpec(requirements=(*spec.requirements[:-1], "wrapt==0.0.1"), python_version="3.13")
    assert bumped.digest != spec.digest
    assert LayerSpec(spec.requirements, "3.13", platform="manylinux2014_aarch64").digest != spec.digest


def test_a_warm_cache_is_used_without_running_pip(tmp_path: Path) -> None:
    # A spec pip could never satisfy: the build must not be attempted when the cache has it.
    spec = LayerSpec(requirements=("spotguard-no-such-distribution==0.0.0",), python_version="3.13")
    entry = tmp_path / spec.digest
    (entry / "python").mkdir(parents=True)
    (entry / ".spotguard-layer.json").write_text(json.dumps({"requirements": spec.requirements}))
    assert build_layer(spec, cache=tmp_path) == entry


def test_a_failed_build_says_what_happened_and_leaves_no_partial_entry(tmp_path: Path) -> None:
    spec = LayerSpec(requirements=("spotguard-no-such-distribution==0.0.0",), python_version="3.13")
    with pytest.raises(LayerBuildError, match="bundled Powertools layer failed"):
        build_layer(spec, cache=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_lock_without_a_pin_fails_with_what_to_change(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text("pydantic==2.0.0\n")
    with pytest.raises(LayerBuildError, match="does not pin aws-lambda-powertools"):
        LayerSpec.from_lock(python_version="3.13", lock_file=lock)


def test_the_cache_lives_outside_the_repository() -> None:
    assert cache_root({}) == Path.home() / ".cache" / "spotguard" / "layers"
    assert cache_root({"SPOTGUARD_LAYER_CACHE": "/c"}) == Path("/c")
    assert cache_root({"XDG_CACHE_HOME": "/x"}) == Path("/x/spotguard/layers")
    assert powertools_layer.REPO_ROOT not in cache_root().parents


def test_the_built_layer_holds_exactly_the_pinned_distributions() -> None:
    spec = LayerSpec.from_lock(python_version="3.13")
    layer = build_layer(spec)  # the synth of the bundled configuration built or reused it
    found = {
        normalize(p.name.removesuffix(".dist-info").rsplit("-", 1)[0])
        + "=="
        + p.name.removesuffix(".dist-info").rsplit("-", 1)[1]
        for p in (layer / "python").glob("*.dist-info")
    }
    assert found == set(spec.requirements)
    assert not (layer / "python" / "bin").exists()
    assert not list((layer / "python").rglob("__pycache__"))
    assert list((layer / "python" / "pydantic_core").glob("_pydantic_core.cpython-313-x86_64-linux-gnu.so"))
