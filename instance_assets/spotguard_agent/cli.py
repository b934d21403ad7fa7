"""``spotguard-agent``: the instance agent's command line.

    spotguard-agent run [--imds-url URL] [...]     watcher + worker + health endpoint
    spotguard-agent watch --imds-url URL            print one JSON line per IMDS notice
    spotguard-agent report ready|failed [--reason]  fleet record, tag, launch hook answer

Configuration comes from ``contracts.Env`` variables (systemd loads
``/etc/spotguard/agent.env``); flags override them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from spotguard_core.contracts import (
    BootstrapStatus,
    RebalancePolicy,
    Signal,
    SignalKind,
    SignalSource,
)

from spotguard_agent.awsclients import AwsClients
from spotguard_agent.config import AgentConfig, ConfigError, load_config, with_instance_arn_prefix
from spotguard_agent.fleet_reporter import FleetReporter
from spotguard_agent.health import HealthServer
from spotguard_agent.imds import (
    AVAILABILITY_ZONE_PATH,
    INSTANCE_TYPE_PATH,
    ImdsClient,
    ImdsError,
)
from spotguard_agent.watcher import Watcher
from spotguard_agent.worker import PROCESS_STOP_ORIGIN, Worker

LOG = logging.getLogger("spotguard.agent")
#: Without a notice, SIGTERM (systemctl stop, shutdown, reboot) gives the worker this long;
#: the unit's TimeoutStopSec is larger.
SIGTERM_GRACE_SECONDS = 60


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("botocore").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def _config(args: argparse.Namespace) -> AgentConfig:
    config = load_config()
    return config.with_overrides(
        imds_url=getattr(args, "imds_url", None),
        instance_id=getattr(args, "instance_id", None),
        work_queue_url=getattr(args, "queue_url", None),
        handler=getattr(args, "handler", None),
        concurrency=getattr(args, "concurrency", None),
        health_port=getattr(args, "health_port", None),
        imds_poll_seconds=getattr(args, "poll_seconds", None),
        visibility_timeout_seconds=getattr(args, "visibility_timeout", None),
        receive_wait_seconds=getattr(args, "receive_wait", None),
        failure_backoff_seconds=getattr(args, "failure_backoff", None),
        fleet_heartbeat_seconds=getattr(args, "fleet_heartbeat", None),
    )


def _instance_id(config: AgentConfig, imds: ImdsClient) -> str:
    if config.instance_id:
        return config.instance_id
    deadline = time.monotonic() + 60
    while True:
        try:
            return imds.instance_id()
        except ImdsError as error:
            if time.monotonic() > deadline:
                raise
            LOG.warning("waiting for IMDS: %s", error)
            time.sleep(1)


# ---------------------------------------------------------------------- run
def cmd_run(args: argparse.Namespace) -> int:
    config = _config(args)
    imds = ImdsClient(config.imds_url, timeout_seconds=min(1.0, max(0.2, config.imds_poll_seconds)))
    instance_id = _instance_id(config, imds)
    config = with_instance_arn_prefix(config.with_overrides(instance_id=instance_id), imds)
    clients = AwsClients(config.region)
    worker = Worker(config, instance_id=instance_id, clients=clients)
    health = HealthServer(config.health_port, worker.status).start()
    watcher = Watcher(
        imds,
        worker.drain,
        instance_id=instance_id,
        poll_seconds=config.imds_poll_seconds,
        rebalance_policy=config.rebalance_policy,
        on_notice=worker.reporter.notice,
    ).start()

    def on_sigterm(signum: int, _frame: Any) -> None:
        received = datetime.now(UTC)
        LOG.warning("signal %d: draining", signum)
        notice = Signal(
            instance_id=instance_id,
            kind=SignalKind.STATE_CHANGE,
            source=SignalSource.IMDS,
            event_id=f"signal:{instance_id}:{signum}:{int(received.timestamp())}",
            received_at=received,
            deadline=received + timedelta(seconds=SIGTERM_GRACE_SECONDS),
            state="shutting-down",
            attributes={"origin": PROCESS_STOP_ORIGIN, "signal": signal.Signals(signum).name},
        )
        # Never block a signal handler on AWS calls.
        threading.Thread(target=worker.drain, args=(notice,), daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigterm)
    LOG.info("agent running: instance %s, health port %d", instance_id, health.port)
    code = worker.run()
    watcher.stop()
    health.stop()
    logging.shutdown()
    sys.stdout.flush()
    # Released tasks' handler threads may still be winding down; their messages are back
    # on the queue already, so do not wait for them.
    os._exit(code)


# ---------------------------------------------------------------------- watch
def cmd_watch(args: argparse.Namespace) -> int:
    config = _config(args)
    imds = ImdsClient(config.imds_url, timeout_seconds=min(1.0, max(0.2, config.imds_poll_seconds)))
    seen = threading.Event()
    count = 0
    lock = threading.Lock()

    def emit(notice: Signal) -> None:
        nonlocal count
        line = {
            "instance_id": notice.instance_id,
            "kind": notice.kind.value,
            "deadline": notice.deadline.isoformat() if notice.deadline else None,
            "state": notice.state,
            "received_at": notice.received_at.isoformat(),
            "attributes": dict(notice.attributes),
        }
        with lock:
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()
            count += 1
            if args.count and count >= args.count:
                seen.set()

    policy = RebalancePolicy(args.rebalance_policy) if args.rebalance_policy else RebalancePolicy.DRAIN
    watcher = Watcher(
        imds,
        emit,
        instance_id=config.instance_id or None,
        poll_seconds=config.imds_poll_seconds,
        rebalance_policy=policy,
        on_notice=emit,
    ).start()
    with contextlib.suppress(KeyboardInterrupt):
        seen.wait(args.timeout if args.timeout else None)
    watcher.stop()
    return 0


# ---------------------------------------------------------------------- report
def cmd_report(args: argparse.Namespace) -> int:
    config = _config(args)
    imds = ImdsClient(config.imds_url, timeout_seconds=2.0)
    try:
        instance_id = _instance_id(config, imds)
        config = with_instance_arn_prefix(config, imds)
    except ImdsError as error:
        sys.stderr.write(json.dumps({"error": f"no instance id: {error}"}) + "\n")
        return 2
    clients = AwsClients(config.region)
    reporter = FleetReporter(
        clients,
        instance_id=instance_id,
        fleet=config.fleet,
        fleet_table=config.fleet_table,
        arn_prefix=config.instance_arn_prefix,
    )
    if args.outcome == "ready":
        try:
            instance_type = imds.optional_text(INSTANCE_TYPE_PATH)
            zone = imds.optional_text(AVAILABILITY_ZONE_PATH)
        except ImdsError:
            instance_type = zone = None
        result = {
            "fleet_record": reporter.ready(instance_type=instance_type, availability_zone=zone),
            "tag": reporter.tag_bootstrap(BootstrapStatus.READY),
            "lifecycle": reporter.complete_lifecycle(config.asg_name, config.launch_hook_name, "CONTINUE"),
        }
    else:
        reason = args.reason or "bootstrap failed"
        result = {
            "fleet_record": reporter.failed(reason),
            "tag": reporter.tag_bootstrap(BootstrapStatus.FAILED, reason),
            "lifecycle": reporter.complete_lifecycle(config.asg_name, config.launch_hook_name, "ABANDON"),
        }
    sys.stdout.write(json.dumps({"instance_id": instance_id, "outcome": args.outcome, **result}) + "\n")
    return 0


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spotguard-agent", description="spotguard instance agent")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--imds-url", help="IMDS base URL (default http://169.254.169.254)")
        p.add_argument("--instance-id", help="skip the IMDS instance-id lookup")

    run = sub.add_parser("run", help="run the IMDS watcher, the worker and the health endpoint")
    common(run)
    run.add_argument("--queue-url")
    run.add_argument("--handler", help="module:function")
    run.add_argument("--concurrency", type=int)
    run.add_argument("--health-port", type=int, help="0 picks a free port")
    run.add_argument("--poll-seconds", type=float)
    run.add_argument("--visibility-timeout", type=int)
    run.add_argument("--receive-wait", type=int, help="long-poll seconds per receive (0-20)")
    run.add_argument("--failure-backoff", type=float, help="first release delay after a failure")
    run.add_argument("--fleet-heartbeat", type=float, help="seconds between fleet record heartbeats")
    run.set_defaults(func=cmd_run)

    watch = sub.add_parser("watch", help="print one JSON line per IMDS notice")
    common(watch)
    watch.add_argument("--poll-seconds", type=float)
    watch.add_argument("--rebalance-policy", choices=[p.value for p in RebalancePolicy])
    watch.add_argument("--count", type=int, default=0, help="exit after N notices")
    watch.add_argument("--timeout", type=float, default=0, help="exit after S seconds")
    watch.set_defaults(func=cmd_watch)

    report = sub.add_parser("report", help="report the bootstrap outcome")
    common(report)
    report.add_argument("outcome", choices=["ready", "failed"])
    report.add_argument("--reason")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        result: int = args.func(args)
    except ConfigError as error:
        sys.stderr.write(f"spotguard-agent: configuration error: {error}\n")
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
