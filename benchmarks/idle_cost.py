"""Idle cost of a fleet (nothing queued, zero instances), from the synthesized templates.

Synthesizes the user's two-fleet app (tests/infrastructure/apps/two_fleets.py) and counts,
per fleet, what bills while idle: alarms (per metric they read), the dashboard, the KMS key,
scheduled invocations (watchdog every minute, reconciler every interval), the SQS event
source mappings' idle polling and the custom metrics the watchdog emits every minute.
Prices: AWS list prices, us-east-1 (USD per month, 730 hours); first-3-dashboards and other
free tiers are ignored so the figure is what one more fleet adds. Prints JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "tests" / "infrastructure" / "apps" / "two_fleets.py"
FLEETS = ("RenderFleet", "EncodeFleet")
MINUTES_PER_MONTH = 730 * 60

PRICE = {
    "alarm_metric": 0.10,  # standard resolution, per metric an alarm reads
    "dashboard": 3.00,
    "kms_key": 1.00,
    "lambda_request": 0.20 / 1_000_000,
    "lambda_gb_second": 0.0000166667,
    "sqs_request": 0.40 / 1_000_000,
    "custom_metric": 0.30,
    "secret": 0.40,
}
#: Idle figures assumed per invocation / poller (measured durations on AWS are lower for an
#: empty fleet; these keep the estimate on the safe side).
WATCHDOG_SECONDS = 0.5
RECONCILER_SECONDS = 1.0
#: Lambda's SQS event source keeps ~5 long-polling connections (20 s) on an idle queue.
IDLE_POLLERS_PER_MAPPING = 5
#: Metrics the watchdog emits every minute, per fleet (heartbeat, fleet size).
WATCHDOG_METRICS = 2


def synth(outdir: Path) -> tuple[dict[str, Any], float]:
    env = {**os.environ, "CDK_OUTDIR": str(outdir), "AWS_EC2_METADATA_DISABLED": "true"}
    started = time.monotonic()
    subprocess.run([sys.executable, str(APP)], check=True, env=env, capture_output=True, timeout=600)
    seconds = time.monotonic() - started
    return json.loads((outdir / "MediaPipeline.template.json").read_text())["Resources"], seconds


def alarm_metrics(props: dict[str, Any]) -> int:
    if "Metrics" in props:
        return sum(1 for m in props["Metrics"] if "MetricStat" in m)
    return 1


def fleet_costs(resources: dict[str, Any], prefix: str) -> dict[str, Any]:
    mine = {k: v for k, v in resources.items() if k.startswith(prefix)}
    counts: dict[str, int] = defaultdict(int)
    for resource in mine.values():
        counts[resource["Type"]] += 1
    metrics_in_alarms = sum(
        alarm_metrics(r["Properties"]) for r in mine.values() if r["Type"] == "AWS::CloudWatch::Alarm"
    )
    functions = [
        r for r in mine.values() if str(r["Properties"].get("Handler", "")).startswith("spotguard_functions.")
    ]
    memory = {
        r["Properties"]["Handler"].split(".")[1]: r["Properties"].get("MemorySize", 128) for r in functions
    }
    schedules = {
        r["Properties"]["Description"]: r["Properties"]
        for r in mine.values()
        if r["Type"] == "AWS::Events::Rule" and "ScheduleExpression" in r["Properties"]
    }
    reconciler_rate = schedules["spotguard migration/reconcile job"]["ScheduleExpression"]
    reconciler_minutes = int(reconciler_rate.removeprefix("rate(").split()[0])
    watchdog_runs = MINUTES_PER_MONTH
    reconciler_runs = MINUTES_PER_MONTH // reconciler_minutes
    lambda_cost = (watchdog_runs + reconciler_runs) * PRICE["lambda_request"] + PRICE["lambda_gb_second"] * (
        watchdog_runs * WATCHDOG_SECONDS * memory["watchdog"] / 1024
        + reconciler_runs * RECONCILER_SECONDS * memory["reconciler"] / 1024
    )
    mappings = counts["AWS::Lambda::EventSourceMapping"]
    polling = mappings * IDLE_POLLERS_PER_MAPPING * 3 * MINUTES_PER_MONTH * PRICE["sqs_request"]
    items = {
        "alarms": round(metrics_in_alarms * PRICE["alarm_metric"], 2),
        "dashboard": round(counts["AWS::CloudWatch::Dashboard"] * PRICE["dashboard"], 2),
        "kms_key": round(counts["AWS::KMS::Key"] * PRICE["kms_key"], 2),
        "scheduled_functions": round(lambda_cost, 2),
        "event_source_polling": round(polling, 2),
        "watchdog_custom_metrics": round(WATCHDOG_METRICS * PRICE["custom_metric"], 2),
        "secrets": round(counts["AWS::SecretsManager::Secret"] * PRICE["secret"], 2),
    }
    return {
        "functions": len(functions),
        "alarms": counts["AWS::CloudWatch::Alarm"],
        "metrics_in_alarms": metrics_in_alarms,
        "dashboards": counts["AWS::CloudWatch::Dashboard"],
        "kms_keys": counts["AWS::KMS::Key"],
        "event_source_mappings": mappings,
        "scheduled_invocations_per_month": watchdog_runs + reconciler_runs,
        "resources": len(mine),
        "usd_per_month": items,
        "usd_per_month_total": round(sum(items.values()), 2),
    }


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="spotguard-idle-") as outdir:
        resources, seconds = synth(Path(outdir))
    per_fleet = {prefix: fleet_costs(resources, prefix) for prefix in FLEETS}
    print(
        json.dumps(
            {
                "benchmark": "idle_cost",
                "region_prices": "us-east-1 list prices, USD/month",
                "synth_seconds_two_fleets": round(seconds, 1),
                "per_fleet": per_fleet,
                "stack_resources": len(resources),
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
