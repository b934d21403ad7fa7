"""The local Lambda host: the real dispatcher and watchdog, driven like Lambda.

Runs as its own process (``python -m spotguard_tools.drill.lambda_host``), one
invocation at a time like a Lambda function with reserved concurrency 1:

- the signal queue is long-polled and each batch is handed to the real dispatcher as an
  SQS event (what the Lambda event source mapping does); records the handler reports in
  ``batchItemFailures`` stay on the queue and come back after its visibility timeout,
  the others are deleted;
- the real watchdog runs on its schedule (every few seconds of drill time, standing in
  for EventBridge's ``rate(1 minute)``; moto never fires scheduled rules).

Several hosts may dispatch at once (the SQS event source mapping runs several concurrent
batches, each in its own execution environment); one of them runs the watchdog.

Every invocation is appended to a JSON-lines log the drill reads for its report.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import signal
import sys
import time
import traceback
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import boto3
from spotguard_core.local_context import LocalLambdaContext

from spotguard_tools.drill.moto import ACCOUNT_ID, DEFAULT_REGION

DISPATCHER = "spotguard_functions.dispatcher"
WATCHDOG = "spotguard_functions.watchdog"


def _context(function: str) -> LocalLambdaContext:
    return LocalLambdaContext(
        function_name=f"spotguard-drill-{function}",
        invoked_function_arn=f"arn:aws:lambda:{DEFAULT_REGION}:{ACCOUNT_ID}:function:spotguard-drill-{function}",
    )


def sqs_event(messages: Sequence[Mapping[str, Any]], queue_arn: str) -> dict[str, Any]:
    """What the Lambda SQS event source mapping delivers for a received batch."""
    return {
        "Records": [
            {
                "messageId": message["MessageId"],
                "receiptHandle": message["ReceiptHandle"],
                "body": message["Body"],
                "attributes": dict(message.get("Attributes", {})),
                "messageAttributes": {},
                "md5OfBody": message.get("MD5OfBody", ""),
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": DEFAULT_REGION,
            }
            for message in messages
        ]
    }


def scheduled_event(rule_name: str) -> dict[str, Any]:
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": ACCOUNT_ID,
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": DEFAULT_REGION,
        "resources": [f"arn:aws:events:{DEFAULT_REGION}:{ACCOUNT_ID}:rule/{rule_name}"],
        "detail": {},
    }


def _optional_module(name: str) -> Any:
    """The watchdog may be missing while the control plane is being built: say so in the log."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _summary(body: str) -> dict[str, Any]:
    try:
        event = json.loads(body)
        detail = event.get("detail", {})
        return {
            "detail_type": event.get("detail-type"),
            "instance_id": detail.get("instance-id") or detail.get("EC2InstanceId"),
            "state": detail.get("state"),
            "time": event.get("time"),
        }
    except (ValueError, AttributeError):
        return {"detail_type": None}


class LambdaHost:
    def __init__(self, *, signal_queue_url: str, signal_queue_arn: str, watchdog_interval: float, log: Path):
        self.signal_queue_url = signal_queue_url
        self.signal_queue_arn = signal_queue_arn
        self.watchdog_interval = watchdog_interval
        self.log = log
        self.sqs = boto3.client("sqs")
        self.dispatcher = importlib.import_module(DISPATCHER)
        self.watchdog = _optional_module(WATCHDOG)
        self.stopping = False

    def _write(self, record: dict[str, Any]) -> None:
        with self.log.open("a") as out:
            out.write(json.dumps(record, default=str) + "\n")

    def dispatch_once(self, wait_seconds: int) -> None:
        messages = self.sqs.receive_message(
            QueueUrl=self.signal_queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=wait_seconds,
            AttributeNames=["All"],
        ).get("Messages", [])
        if not messages:
            return
        started = time.time()
        record: dict[str, Any] = {
            "fn": "dispatcher",
            "t": started,
            "records": len(messages),
            "events": [_summary(m["Body"]) for m in messages],
        }
        failed: set[str] = set()
        try:
            result = self.dispatcher.handler(
                sqs_event(messages, self.signal_queue_arn), _context("dispatcher")
            )
            failed = {item["itemIdentifier"] for item in (result or {}).get("batchItemFailures", [])}
        except Exception as error:  # noqa: BLE001 - a crashed invocation fails the whole batch, as on Lambda
            failed = {m["MessageId"] for m in messages}
            record["error"] = f"{type(error).__name__}: {error}"
            record["traceback"] = traceback.format_exc()
        record["failed"] = sorted(failed)
        record["duration_s"] = round(time.time() - started, 3)
        done = [m for m in messages if m["MessageId"] not in failed]
        if done:
            self.sqs.delete_message_batch(
                QueueUrl=self.signal_queue_url,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(done)],
            )
        self._write(record)

    def watchdog_once(self) -> None:
        started = time.time()
        record: dict[str, Any] = {"fn": "watchdog", "t": started}
        if self.watchdog is None:
            record["error"] = f"{WATCHDOG} is not available"
            self._write(record)
            return
        try:
            result = self.watchdog.handler(scheduled_event("spotguard-drill-watchdog"), _context("watchdog"))
            record["result"] = result
        except Exception as error:  # noqa: BLE001 - logged; the schedule runs it again
            record["error"] = f"{type(error).__name__}: {error}"
            record["traceback"] = traceback.format_exc()
        record["duration_s"] = round(time.time() - started, 3)
        self._write(record)

    def run(self) -> None:
        """Dispatch until stopped; run the watchdog on its schedule (an interval of 0: this
        host only dispatches, another one runs the watchdog)."""
        schedule = self.watchdog_interval if self.watchdog_interval > 0 else math.inf
        next_watchdog = time.monotonic() + schedule
        while not self.stopping:
            until_watchdog = next_watchdog - time.monotonic()
            if until_watchdog <= 0:
                self.watchdog_once()
                next_watchdog += schedule
                continue
            try:
                self.dispatch_once(wait_seconds=max(0, int(min(1.0, until_watchdog))))
            except Exception as error:  # noqa: BLE001 - the emulator hiccuped; keep the host alive
                self._write({"fn": "host", "t": time.time(), "error": f"{type(error).__name__}: {error}"})
                time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Feed the signal queue to the dispatcher; run the watchdog.")
    parser.add_argument("--signal-queue-url", required=True)
    parser.add_argument("--signal-queue-arn", required=True)
    parser.add_argument(
        "--watchdog-interval", type=float, default=3.0, help="seconds; 0: no watchdog in this host"
    )
    parser.add_argument("--log", type=Path, required=True)
    args = parser.parse_args(argv)
    host = LambdaHost(
        signal_queue_url=args.signal_queue_url,
        signal_queue_arn=args.signal_queue_arn,
        watchdog_interval=args.watchdog_interval,
        log=args.log,
    )

    def stop(signum: int, frame: FrameType | None) -> None:
        host.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host._write({"fn": "host", "t": time.time(), "started": True})
    host.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
