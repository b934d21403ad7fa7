"""Worker overhead and notice-to-drain latency, on one moto server in one run. Prints JSON.

1. Throughput: the same number of no-op messages consumed (a) by a bare receive/delete
   loop and (b) by the spotguard worker (poison check, lease put/delete, heartbeat
   thread, handler call, delete). ``ratio`` = worker throughput / bare throughput.
2. Notice-to-drain latency: a worker with a long task and the IMDS watcher (default 1 s
   poll) against the IMDS emulator; the time from publishing the spot notice to the
   message being receivable by another consumer. p50/p99 over the trials.

    .venv/bin/python benchmarks/worker.py [--messages 300] [--trials 12]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import boto3
from spotguard_agent.config import AgentConfig
from spotguard_agent.imds import ImdsClient
from spotguard_agent.watcher import Watcher
from spotguard_agent.worker import Worker
from spotguard_core.contracts import Metric
from spotguard_tools.imds_emulator import running_imds
from spotguard_tools.local_tables import TableKind, create_table

from tests.support.moto_server import running_moto_server


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def setup(tag: str) -> dict[str, str]:
    sqs = boto3.client("sqs")
    queue = sqs.create_queue(QueueName=f"work-{tag}", Attributes={"VisibilityTimeout": "60"})["QueueUrl"]
    dlq = sqs.create_queue(QueueName=f"dlq-{tag}")["QueueUrl"]
    table = f"leases-{tag}"
    create_table(boto3.client("dynamodb"), TableKind.LEASES, table)
    return {"queue": queue, "dlq": dlq, "table": table}


def fill(queue: str, count: int, body: dict[str, Any]) -> None:
    sqs = boto3.client("sqs")
    for start in range(0, count, 10):
        entries = [{"Id": str(i), "MessageBody": json.dumps(body)} for i in range(min(10, count - start))]
        sqs.send_message_batch(QueueUrl=queue, Entries=entries)


def bare_loop(queue: str, count: int) -> float:
    """The baseline every SQS consumer has: receive up to 10, delete each."""
    sqs = boto3.client("sqs")
    done = 0
    started = time.perf_counter()
    while done < count:
        messages = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=1).get(
            "Messages", []
        )
        for message in messages:
            sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])
            done += 1
    return count / (time.perf_counter() - started)


def config(resources: dict[str, str], concurrency: int) -> AgentConfig:
    return AgentConfig(
        fleet="bench",
        region="us-east-1",
        work_queue_url=resources["queue"],
        work_dlq_url=resources["dlq"],
        lease_table=resources["table"],
        concurrency=concurrency,
        visibility_timeout_seconds=60,
        receive_wait_seconds=1,
        drain_margin_seconds=10,
        health_port=0,
    )


def worker_loop(resources: dict[str, str], count: int, concurrency: int) -> float:
    worker = Worker(config(resources, concurrency), instance_id=f"i-bench{concurrency:012d}")
    thread = threading.Thread(target=worker.run, daemon=True)
    started = time.perf_counter()
    thread.start()
    while worker.counters[Metric.TASKS_COMPLETED] < count:
        time.sleep(0.005)
    elapsed = time.perf_counter() - started
    worker.request_stop()
    thread.join(timeout=10)
    return count / elapsed


def throughput(messages: int) -> dict[str, Any]:
    results: dict[str, Any] = {"messages": messages}
    bare = setup("bare")
    fill(bare["queue"], messages, {"seconds": 0})
    results["bare_msgs_per_s"] = round(bare_loop(bare["queue"], messages), 1)
    for concurrency in (1, 8):
        resources = setup(f"worker{concurrency}")
        fill(resources["queue"], messages, {"seconds": 0})
        rate = worker_loop(resources, messages, concurrency)
        results[f"worker_c{concurrency}_msgs_per_s"] = round(rate, 1)
        results[f"ratio_c{concurrency}"] = round(rate / results["bare_msgs_per_s"], 3)
    return results


def drain_latency(trials: int, poll_seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    sqs = boto3.client("sqs")
    for trial in range(trials):
        resources = setup(f"drain{trial}-{int(poll_seconds * 1000)}")
        fill(resources["queue"], 1, {"seconds": 600})
        with running_imds(f"i-drain{trial:012d}") as imds:
            worker = Worker(config(resources, 1), instance_id=imds.instance_id)
            client = ImdsClient(imds.url, timeout_seconds=min(1.0, poll_seconds))
            watcher = Watcher(client, worker.drain, instance_id=imds.instance_id, poll_seconds=poll_seconds)
            thread = threading.Thread(target=worker.run, daemon=True)
            thread.start()
            watcher.start()
            while not worker.running_tasks():
                time.sleep(0.01)
            time.sleep(poll_seconds * (trial % 4) / 4)  # spread notices over the poll phase
            published = time.perf_counter()
            imds.set_spot_action("terminate", datetime.now(UTC) + timedelta(minutes=2))
            while not sqs.receive_message(QueueUrl=resources["queue"], VisibilityTimeout=60).get("Messages"):
                pass
            latencies.append(time.perf_counter() - published)
            watcher.stop()
            thread.join(timeout=10)
    return {
        "poll_seconds": poll_seconds,
        "trials": trials,
        "notice_to_receivable_p50_ms": round(statistics.median(latencies) * 1000, 1),
        "notice_to_receivable_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "notice_to_receivable_max_ms": round(max(latencies) * 1000, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--trials", type=int, default=12)
    args = parser.parse_args()
    with running_moto_server():
        result = {
            "benchmark": "worker",
            "throughput": throughput(args.messages),
            "drain_latency": drain_latency(args.trials, 1.0),
        }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
