"""Requeue benchmark: dying instances holding leased messages, against a moto server.

Drives the real dispatcher handler with EC2 state-change (terminated) events and reports, as
JSON, the SQS and DynamoDB API calls the handler made (counted with botocore ``before-call``
hooks on the very clients it uses), its wall time, when the last message became receivable
(the last successful ``ChangeMessageVisibilityBatch``, measured from the handler's start),
and whether every message was receivable by another consumer right after.

Latency model: ``--latency-ms N`` adds N ms before every AWS attempt of the handler (the
fault injector, ``spotguard_core.fault_injection``); moto's own CPU time comes on top. The
set-up (sending, receiving and leasing the messages) runs without it. Leases are written as
the worker writes them (they carry the message's requeue count, 0 on a first receive).

Scenarios: one instance holding N leases for each N, and ``--instances I --per-instance L``:
I instances with L leases each, all terminated in ONE batch of signal records (a mass
interruption), run twice: the batch's records one at a time (``records_at_once`` 1, what the
dispatcher did before), then concurrently (its ``RECORD_CONCURRENCY``).

Each run also reports where the time went (``split``): the moto server's CPU time and the
handler process's CPU time during the handler, and per operation the summed time from
sending a request to having its answer (moto serving it) and from the answer to the parsed
result (botocore in this process). moto is one Python process (one interpreter lock) on a
2-core machine shared with other work: its CPU time bounds what concurrency can win.

    python benchmarks/requeue.py --latency-ms 10 --leases 10 100 1000 --instances 100 --per-instance 10
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spotguard_core import aws  # noqa: E402
from spotguard_core.contracts import BootstrapStatus, Env, FleetRecord, InstanceState, Lease  # noqa: E402
from spotguard_core.fleet_store import FleetStore  # noqa: E402
from spotguard_core.lease_store import LeaseStore  # noqa: E402
from spotguard_core.local_context import LocalLambdaContext  # noqa: E402
from spotguard_tools import events  # noqa: E402

from tests.support import control_plane_env  # noqa: E402
from tests.support.moto_server import running_moto_server  # noqa: E402

#: Within this long of the handler's start, every message must be receivable (issue 15).
GOAL_MS = 1000.0


class CallCounter:
    """Counts API calls per ``service.Operation`` via botocore's ``before-call`` event and
    remembers when the last visibility change succeeded."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.last_visible_at: float | None = None
        self.first_start: dict[str, float] = {}
        self.last_end: dict[str, float] = {}
        #: Per operation, summed over its calls: sent → answer read (moto's time serving it,
        #: queueing for moto's one interpreter included) and answer → parsed (this process).
        self.server_ms: dict[str, float] = {}
        self.parse_ms: dict[str, float] = {}
        self._lock = threading.Lock()
        self._local = threading.local()  # one call runs on one thread from send to parse

    def before(self, model: Any, context: Any = None, **_: Any) -> None:
        name = f"{model.service_model.service_name}.{model.name}"
        at = time.perf_counter()
        with self._lock:
            self.calls[name] += 1
            self.first_start.setdefault(name, at)
        if isinstance(context, dict):
            context["spotguard_bench_name"] = name

    def sent(self, **_: Any) -> None:
        self._local.sent_at = time.perf_counter()

    def answered(self, operation_model: Any, **_: Any) -> None:
        at = time.perf_counter()
        name = f"{operation_model.service_model.service_name}.{operation_model.name}"
        with self._lock:
            elapsed = (at - getattr(self._local, "sent_at", at)) * 1000
            self.server_ms[name] = self.server_ms.get(name, 0.0) + elapsed
        self._local.answered_at = at

    def after(self, context: Any = None, **_: Any) -> None:
        name = context.get("spotguard_bench_name") if isinstance(context, dict) else None
        if name:
            at = time.perf_counter()
            with self._lock:
                self.last_end[name] = at
                parsed = (at - getattr(self._local, "answered_at", at)) * 1000
                self.parse_ms[name] = self.parse_ms.get(name, 0.0) + parsed

    def phases(self, started: float) -> dict[str, list[float]]:
        """Per operation: [first call began, last call ended] in ms after the handler started."""
        return {
            name: [round((self.first_start[name] - started) * 1000, 1), round((end - started) * 1000, 1)]
            for name, end in sorted(self.last_end.items(), key=lambda item: self.first_start[item[0]])
        }

    def after_visibility(self, http_response: Any, parsed: Any, **_: Any) -> None:
        if http_response is not None and http_response.status_code < 300 and parsed.get("Successful"):
            with self._lock:
                self.last_visible_at = time.perf_counter()

    def attach(self, client: Any) -> None:
        client.meta.events.register("before-call.*.*", self.before)
        # Last: after the fault injector's hook has slept its latency.
        client.meta.events.register_last("before-send", self.sent)
        client.meta.events.register("before-parse.*.*", self.answered)
        client.meta.events.register("after-call.*.*", self.after)
        client.meta.events.register("after-call.sqs.ChangeMessageVisibilityBatch", self.after_visibility)

    def service_total(self, service: str) -> int:
        return sum(count for name, count in self.calls.items() if name.startswith(f"{service}."))


def lease_messages(env: Any, instance_id: str, count: int) -> list[Lease]:
    """Send ``count`` messages, receive them as the worker would, lease them in batches."""
    sqs = env.sqs
    for start in range(0, count, 10):
        entries = [{"Id": str(i), "MessageBody": f"task-{i}"} for i in range(start, min(count, start + 10))]
        sqs.send_message_batch(QueueUrl=env.work_queue_url, Entries=entries)
    leases: list[Lease] = []
    while len(leases) < count:
        messages = sqs.receive_message(
            QueueUrl=env.work_queue_url, MaxNumberOfMessages=10, VisibilityTimeout=900, WaitTimeSeconds=0
        ).get("Messages", [])
        if not messages:
            break
        at = time.time()
        leases.extend(
            control_plane_env.lease_of(
                m, instance_id=instance_id, queue_url=env.work_queue_url, at=at, interruption_requeues=0
            )
            for m in messages
        )
    LeaseStore().put_many(leases)
    return leases


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(
    instances: int,
    per_instance: int,
    latency_ms: float,
    *,
    server_pid: int,
    record_concurrency: int | None = None,
) -> dict[str, Any]:
    """One scenario. ``record_concurrency=1``: the batch's records one after another (the
    dispatcher before it handled them concurrently), for the before/after in one run."""
    os.environ["POWERTOOLS_METRICS_DISABLED"] = "true"
    os.environ["POWERTOOLS_TRACE_DISABLED"] = "true"
    os.environ.setdefault("POWERTOOLS_LOG_LEVEL", "WARNING")
    saved = control_plane_env.environment_snapshot()
    try:
        env = control_plane_env.build()
        ids = env.launch_in_asg(instances)
        now = time.time()
        phase = time.perf_counter()
        held: list[Lease] = []
        for instance in ids:
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
            held.extend(lease_messages(env, instance, per_instance))
        print(f"# {len(held)} leases set up in {time.perf_counter() - phase:.1f}s", file=sys.stderr)
        records = [events.to_sqs_event(events.state_change(i, "terminated"))["Records"][0] for i in ids]
        for index, record in enumerate(records):
            record["messageId"] = f"signal-{index}"

        # From here on every AWS call of the handler pays the injected latency.
        os.environ[Env.AWS_LATENCY_MS.value] = str(latency_ms)
        aws.reset_clients()
        from spotguard_functions import dispatcher  # noqa: PLC0415

        dispatcher.reset_runtime()  # this run's tables: a new container
        default_concurrency = dispatcher.RECORD_CONCURRENCY
        if record_concurrency is not None:
            dispatcher.RECORD_CONCURRENCY = record_concurrency
        dispatcher.runtime()  # build the clients outside the measurement (warm container)
        counter = CallCounter()
        for service in ("sqs", "dynamodb", "ec2", "autoscaling", "events"):
            counter.attach(aws.client(service))
        counter.attach(aws.resource("dynamodb").meta.client)

        server_cpu, handler_cpu = cpu_seconds(server_pid), time.process_time()
        started = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # Powertools' EMF lines stay out of the JSON
            response = dispatcher.handler({"Records": records}, LocalLambdaContext())
        wall_ms = (time.perf_counter() - started) * 1000
        server_cpu, handler_cpu = cpu_seconds(server_pid) - server_cpu, time.process_time() - handler_cpu
        dispatcher.RECORD_CONCURRENCY = default_concurrency
        dispatcher.reset_runtime()
        print(f"# handler took {wall_ms / 1000:.2f}s", file=sys.stderr)
        os.environ.pop(Env.AWS_LATENCY_MS.value, None)
        aws.reset_clients()

        # One call instead of receiving everything again (moto's receive is O(queue) per call).
        attributes = env.sqs.get_queue_attributes(
            QueueUrl=env.work_queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        visible = int(attributes["ApproximateNumberOfMessages"])
        invisible = int(attributes["ApproximateNumberOfMessagesNotVisible"])
        visibility_calls = counter.calls["sqs.ChangeMessageVisibilityBatch"]
        expected_calls = instances * math.ceil(per_instance / 10)
        receivable_ms = (
            round((counter.last_visible_at - started) * 1000, 1)
            if counter.last_visible_at is not None
            else None
        )
        return {
            "instances": instances,
            "records_at_once": record_concurrency or default_concurrency,
            "leases_per_instance": per_instance,
            "leases": len(held),
            "latency_ms_per_call": latency_ms,
            "handler_wall_ms": round(wall_ms, 1),
            "all_receivable_after_ms": receivable_ms,
            "within_goal": receivable_ms is not None and receivable_ms <= GOAL_MS,
            "batch_item_failures": len(response["batchItemFailures"]),
            "sqs_calls": counter.service_total("sqs"),
            "dynamodb_calls": counter.service_total("dynamodb"),
            "other_calls": sum(counter.calls.values())
            - counter.service_total("sqs")
            - counter.service_total("dynamodb"),
            "visibility_change_calls": visibility_calls,
            "expected_visibility_change_calls": expected_calls,
            "visibility_calls_are_ceil_n_over_10": visibility_calls == expected_calls,
            "visible_after": visible,
            "still_invisible_after": invisible,
            "all_receivable_after": visible == len(held) and invisible == 0,
            "calls": dict(sorted(counter.calls.items())),
            "phases_ms": counter.phases(started),
            # Where the wall time went: moto is one Python process on this shared machine.
            "split": {
                "moto_server_cpu_ms": round(server_cpu * 1000, 1),
                "handler_process_cpu_ms": round(handler_cpu * 1000, 1),
                "server_ms_by_operation": {k: round(v, 1) for k, v in sorted(counter.server_ms.items())},
                "parse_ms_by_operation": {k: round(v, 1) for k, v in sorted(counter.parse_ms.items())},
            },
        }
    finally:
        os.environ.pop(Env.AWS_LATENCY_MS.value, None)
        control_plane_env.restore_environment(saved)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sizes", nargs="*", type=int, help="(legacy) lease counts for one instance")
    parser.add_argument("--leases", nargs="*", type=int, default=None, help="lease counts for one instance")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added before every AWS attempt")
    parser.add_argument("--instances", type=int, default=0, help="mass interruption: instances in one batch")
    parser.add_argument("--per-instance", type=int, default=10, help="mass interruption: leases each")
    args = parser.parse_args(argv)
    sizes = args.leases if args.leases is not None else (args.sizes or [10, 100, 1000])
    scenarios: list[tuple[int, int, int | None]] = [(1, size, None) for size in sizes]
    if args.instances:
        # The mass interruption twice: records one at a time (before), then concurrently.
        scenarios += [(args.instances, args.per_instance, 1), (args.instances, args.per_instance, None)]
    results = []
    with running_moto_server() as server:
        server_pid = server._process.pid  # type: ignore[union-attr]  # the server's CPU time: the split
        for instances, per_instance, record_concurrency in scenarios:
            server.reset()
            aws.reset_clients()
            results.append(
                run(
                    instances,
                    per_instance,
                    args.latency_ms,
                    server_pid=server_pid,
                    record_concurrency=record_concurrency,
                )
            )
    print(
        json.dumps(
            {
                "benchmark": "requeue",
                "backend": "moto server (127.0.0.1)",
                "latency_model": f"{args.latency_ms} ms added before every AWS attempt, plus moto's CPU",
                "goal": f"all messages receivable within {GOAL_MS:.0f} ms of the handler start",
                "runs": results,
            },
            indent=2,
        )
    )
    ok = all(r["visibility_calls_are_ceil_n_over_10"] and r["all_receivable_after"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
