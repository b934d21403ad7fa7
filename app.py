#!/usr/bin/env python3
"""spotguard CDK app: one stack ``Spotguard-<fleet>`` from the ``spotguard`` context.

A thin user of the construct library (``spotguard_cdk.SpotWorkerFleet``): the settings
come from cdk.json and ``-c`` overrides instead of construct props.

    cdk synth                                   # settings from cdk.json
    cdk synth -c spotguard.fleet.name=batch     # any setting, dotted
    CDK_OUTDIR=cdk.out python app.py            # the same without the CDK CLI

cdk-nag (AwsSolutions) runs as a CDK validation plugin: an unacknowledged finding fails
synth and is listed in ``<outdir>/validation-report.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
# jsii prints a Node.js support banner on every start; it is noise here.
os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")
os.environ.setdefault("JSII_SILENCE_WARNING_UNTESTED_NODE_VERSION", "1")
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

import aws_cdk as cdk  # noqa: E402 - after the environment above
from cdk_nag import AwsSolutionsChecks  # noqa: E402
from spotguard_cdk.app_stack import SpotguardStack  # noqa: E402
from spotguard_cdk.settings import CONTEXT_KEY, ConfigurationError, Settings, overrides_from_context  # noqa: E402


def cdk_json_context() -> dict[str, Any]:
    """cdk.json's context (feature flags, spotguard defaults) as the app's own defaults, so
    ``python app.py`` synthesizes exactly what ``cdk synth`` does; the CLI's context
    (cdk.json, cdk.context.json, -c) takes precedence over these."""
    data = json.loads((ROOT / "cdk.json").read_text())
    context = data.get("context", {})
    return context if isinstance(context, dict) else {}


def load_settings(app: cdk.App) -> Settings:
    overrides = overrides_from_context(app.node.get_all_context())
    return Settings.from_context(app.node.try_get_context, overrides)


def main() -> int:
    app = cdk.App(context=cdk_json_context())
    try:
        settings = load_settings(app)
        SpotguardStack(app, settings=settings)
    except ConfigurationError as exc:
        sys.stderr.write(f"spotguard: {exc}\n")
        return 1
    cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    app.synth()
    return 0


if __name__ == "__main__":
    assert CONTEXT_KEY == "spotguard"
    sys.exit(main())
