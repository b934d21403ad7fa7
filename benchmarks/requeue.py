"""Requeue benchmark: a dying instance holding N leased messages, against a moto server.

Drives the real dispatcher handler with an EC2 state-change (terminated) event and
reports, as JSON, the SQS and DynamoDB API calls the handler made (counted with botocore
``before-call`` event hooks on the very clients it uses), its wall time, and whether
every message was receivable by another consumer right after. Visibility changes must
grow as ceil(N/10).

Usage: python benchmarks/requeue.py [N ...]   (default: 10 100 1000)
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spotguard_core import aws  # noqa: E402
from spotguard_core.contracts import BootstrapStatus, FleetRecord, InstanceState  # noqa: E402
from spotguard_core.fleet_store import FleetStore  # noqa: E402
from spotguard_core.local_context import LocalLambdaContext  # noqa: E402
from spotguard_tools import events  # noqa: E402

from tests.support import control_plane_env  # noqa: E402
from tests.support.moto_server import running_moto_server  # noqa: E402


class CallCounter:
    """Counts API calls per ``service.Operation`` via botocore's ``before-call`` event."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def __call__(self, model: Any, **_: Any) -> None:
        self.calls[f"{model.service_model.service_name}.{model.name}"] += 1

    def attach(self, client: Any) -> None:
        client.meta.events.register("before-call.*.*", self)

    def service_total(self, service: str) -> int:
        return sum(count for name, count in self.calls.items() if name.startswith(f"{service}."))


def run(leases: int) -> dict[str, Any]:
    import os  # noqa: PLC0415

    os.environ["POWERTOOLS_METRICS_DISABLED"] = "true"
    os.environ["POWERTOOLS_TRACE_DISABLED"] = "true"
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "WARNING")
    saved = control_plane_env.environment_snapshot()
    try:
        env = control_plane_env.build()
        [instance] = env.launch_in_asg(1)
        now = time.time()
        FleetStore().put(
            FleetRecord(
                instance_id=instance,
                fleet=env.fleet,
                state=InstanceState.DRAINING,
                bootstrap_status=BootstrapStatus.READY,
                heartbeat_at=now,
                interrupted_at=now - 100,
                drain_deadline_at=now + 20,
            )
        )
        phase = time.perf_counter()
        held = env.lease_messages(instance, leases)
        print(f"# {leases} leases set up in {time.perf_counter() - phase:.1f}s", file=sys.stderr)
        event = events.state_change(instance, "terminated")

        from spotguard_functions import dispatcher  # noqa: PLC0415

        dispatcher.reset_runtime()  # this run's tables: a new container
        dispatcher.runtime()  # build the clients outside the measurement (warm container)
        counter = CallCounter()
        for service in ("sqs", "dynamodb", "ec2", "autoscaling", "events"):
            counter.attach(aws.client(service))
        counter.attach(aws.resource("dynamodb").meta.client)

        started = time.perf_counter()
        response = dispatcher.handler(events.to_sqs_event(event), LocalLambdaContext())
        wall_ms = (time.perf_counter() - started) * 1000
        print(f"# handler took {wall_ms / 1000:.1f}s", file=sys.stderr)

        # One call instead of receiving everything again (moto's receive is O(queue) per call).
        attributes = env.sqs.get_queue_attributes(
            QueueUrl=env.work_queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        visible = int(attributes["ApproximateNumberOfMessages"])
        invisible = int(attributes["ApproximateNumberOfMessagesNotVisible"])
        visibility_calls = counter.calls["sqs.ChangeMessageVisibilityBatch"]
        return {
            "leases": leases,
            "handler_wall_ms": round(wall_ms, 1),
            "batch_item_failures": len(response["batchItemFailures"]),
            "sqs_calls": counter.service_total("sqs"),
            "dynamodb_calls": counter.service_total("dynamodb"),
            "other_calls": sum(counter.calls.values())
            - counter.service_total("sqs")
            - counter.service_total("dynamodb"),
            "visibility_change_calls": visibility_calls,
            "expected_visibility_change_calls": math.ceil(leases / 10),
            "visibility_calls_are_ceil_n_over_10": visibility_calls == math.ceil(leases / 10),
            "visible_after": visible,
            "still_invisible_after": invisible,
            "all_receivable_after": visible == len(held) and invisible == 0,
            "calls": dict(sorted(counter.calls.items())),
        }
    finally:
        control_plane_env.restore_environment(saved)


def main(argv: list[str]) -> int:
    sizes = [int(a) for a in argv] or [10, 100, 1000]
    results = []
    with running_moto_server() as server:
        for size in sizes:
            server.reset()
            aws.reset_clients()
            results.append(run(size))
    print(
        json.dumps({"benchmark": "requeue", "backend": "moto server (127.0.0.1)", "runs": results}, indent=2)
    )
    ok = all(r["visibility_calls_are_ceil_n_over_10"] and r["all_receivable_after"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
