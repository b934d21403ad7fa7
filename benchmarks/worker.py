"""Worker overhead and notice-to-drain latency, on one moto server in one run. Prints JSON.

1. Throughput (steady state, each worker run paired with a bare run just before it): the
   same number of no-op messages consumed (a) by a bare receive/delete
   loop (receive up to 10, one DeleteMessageBatch) and (b) by the spotguard worker (poison
   check, one lease batch per receive, heartbeat thread, handler call, batched deletes of
   messages and leases). ``ratio`` = worker throughput / bare throughput, at concurrency 1
   and 8 with the default settings (prefetch while tasks are short): the median of
   ``--rounds`` paired runs (each pair's ratio listed too).
2. Notice-to-drain latency: a worker with a long task and the IMDS watcher (default 1 s
   poll) against the IMDS emulator; the time from publishing the spot notice to the
   message being receivable by another consumer. p50/p99 over the trials.

Latency model: ``--latency-ms N`` adds N ms before every AWS attempt of both loops and of
the worker (the fault injector, ``spotguard_core.fault_injection``; the observers that
measure use plain clients); moto's own CPU time comes on top.

    .venv/bin/python benchmarks/worker.py [--latency-ms 10] [--messages 300] [--rounds 3] [--trials 12]
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
from spotguard_agent.awsclients import AwsClients
from spotguard_agent.config import AgentConfig
from spotguard_agent.imds import ImdsClient
from spotguard_agent.watcher import Watcher
from spotguard_agent.worker import Worker
from spotguard_core import aws
from spotguard_core.contracts import Env, Metric
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
    """The baseline every SQS consumer has: receive up to 10, delete them in one batch.

    Timed as the worker is: from the moment a producer starts sending ``count`` messages
    (the sends cost the emulator's CPU in both windows) until the last one is deleted."""
    sqs = AwsClients("us-east-1").sqs  # the same factory (and injected latency) as the worker
    producer = threading.Thread(target=fill, args=(queue, count, {"seconds": 0}))
    done = 0
    started = time.perf_counter()
    producer.start()
    while done < count:
        messages = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=1).get(
            "Messages", []
        )
        if messages:
            entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)]
            sqs.delete_message_batch(QueueUrl=queue, Entries=entries)
            done += len(messages)
    elapsed = time.perf_counter() - started
    producer.join()
    return count / elapsed


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
    """Steady-state throughput: a warm-up first starts the worker and its handler processes
    (one per slot, kept for the agent's lifetime), then ``count`` messages are timed."""
    worker = Worker(config(resources, concurrency), instance_id=f"i-bench{concurrency:012d}")
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    warm_up = 2 * concurrency
    fill(resources["queue"], warm_up, {"seconds": 0.3})  # every slot busy at once: all hosts start
    while worker.counters[Metric.TASKS_COMPLETED] < warm_up:
        time.sleep(0.005)
    started = time.perf_counter()
    fill(resources["queue"], count, {"seconds": 0})
    while worker.counters[Metric.TASKS_COMPLETED] < warm_up + count:
        time.sleep(0.005)
    elapsed = time.perf_counter() - started
    worker.request_stop()
    thread.join(timeout=10)
    return count / elapsed


def throughput(messages: int, rounds: int) -> dict[str, Any]:
    """Each worker run is paired with a bare run just before it (the machine's load moves);
    the figures are the medians over ``rounds`` pairs, the ratio the median of the pairs'."""
    results: dict[str, Any] = {"messages": messages, "rounds": rounds}
    for concurrency in (1, 8):
        bare_rates: list[float] = []
        worker_rates: list[float] = []
        for round_index in range(rounds):
            bare = setup(f"bare{concurrency}-{round_index}")
            bare_rates.append(bare_loop(bare["queue"], messages))
            resources = setup(f"worker{concurrency}-{round_index}")
            worker_rates.append(worker_loop(resources, messages, concurrency))
        ratios = [rate / bare_rate for rate, bare_rate in zip(worker_rates, bare_rates, strict=True)]
        results[f"bare_c{concurrency}_msgs_per_s"] = round(statistics.median(bare_rates), 1)
        results[f"worker_c{concurrency}_msgs_per_s"] = round(statistics.median(worker_rates), 1)
        results[f"ratio_c{concurrency}"] = round(statistics.median(ratios), 3)
        results[f"ratios_c{concurrency}"] = [round(ratio, 3) for ratio in ratios]
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
                time.sleep(0.01)
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
    parser.add_argument("--rounds", type=int, default=3, help="paired bare/worker throughput runs")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added before every AWS attempt")
    args = parser.parse_args()
    with running_moto_server():
        # Queues and tables are made with plain clients (no latency); the loops under test
        # build theirs through the factory, which installs the injector from the environment.
        import os  # noqa: PLC0415

        os.environ[Env.AWS_LATENCY_MS.value] = str(args.latency_ms)
        aws.reset_clients()
        result = {
            "benchmark": "worker",
            "backend": "moto server (127.0.0.1)",
            "latency_model": f"{args.latency_ms} ms added before every AWS attempt, plus moto's CPU",
            "throughput": throughput(args.messages, args.rounds),
            "drain_latency": drain_latency(args.trials, 1.0),
        }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
