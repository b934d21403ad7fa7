"""Operator commands: send-test-event against moto EventBridge, and status/history/trigger
against the real api handler behind a local SigV4-verifying HTTP server."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from spotguard_core import contracts
from spotguard_core.contracts import Env
from spotguard_core.migration.models import JobRecord, JobStatus, JobSummary, JobTrigger
from spotguard_core.migration.store import JobStore
from spotguard_functions import api
from spotguard_tools.cli import main
from spotguard_tools.novita_contract_server import NovitaState, novita_instance, running_novita_server

from tests.integration.ops_fixtures import (
    FakeLambdaContext,
    create_tables,
    reconciler_runs_inline,
    rest_event,
)
from tests.support.http_stub import QuietHandler, redirecting_handler, serving

pytestmark = pytest.mark.integration
INSTANCE = "i-0123456789abcdef0"

# kind -> (rule in contracts.event_patterns, extra CLI arguments)
KINDS = {
    "spot-interruption": ("spot-interruption", []),
    "rebalance": ("rebalance", []),
    "state-change": ("state-change", ["--state", "stopped"]),
    "lifecycle-launch": ("lifecycle", []),
    "lifecycle-terminate": ("lifecycle", []),
    "health": ("health", []),
}


def route_rules_to_queue(*, allow_test_events: bool) -> str:
    """The stack's rules (same patterns) on the default bus, all targeting one queue."""
    sqs, eventbridge = boto3.client("sqs"), boto3.client("events")
    queue_url = sqs.create_queue(QueueName="signals")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    for name, pattern in contracts.event_patterns(allow_test_events=allow_test_events).items():
        eventbridge.put_rule(Name=f"spotguard-{name}", EventPattern=json.dumps(pattern))
        eventbridge.put_targets(Rule=f"spotguard-{name}", Targets=[{"Id": "signals", "Arn": queue_arn}])
    return queue_url


def received(queue_url: str) -> list[dict]:
    messages = (
        boto3.client("sqs")
        .receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0)
        .get("Messages", [])
    )
    return [json.loads(m["Body"]) for m in messages]


@pytest.mark.parametrize("kind", list(KINDS))
def test_test_event_is_routed_when_test_events_are_allowed(moto_server, capsys, kind):
    queue_url = route_rules_to_queue(allow_test_events=True)
    rule, extra = KINDS[kind]
    assert main(["send-test-event", kind, "--instance", INSTANCE, "--region", "us-east-1", *extra]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["source"] == contracts.TEST_EVENT_SOURCE
    delivered = received(queue_url)
    assert len(delivered) == 1
    assert delivered[0]["source"] == contracts.TEST_EVENT_SOURCE
    assert delivered[0]["detail-type"] == printed["detail-type"]
    assert INSTANCE in json.dumps(delivered[0]["detail"])
    assert rule in contracts.event_patterns(allow_test_events=True)


@pytest.mark.parametrize("kind", ["spot-interruption", "state-change", "health"])
def test_test_event_is_ignored_when_test_events_are_not_allowed(moto_server, capsys, kind):
    queue_url = route_rules_to_queue(allow_test_events=False)
    assert (
        main(["send-test-event", kind, "--instance", INSTANCE, "--region", "us-east-1", *KINDS[kind][1]]) == 0
    )
    assert received(queue_url) == []


def test_dry_run_sends_nothing(moto_server, capsys):
    queue_url = route_rules_to_queue(allow_test_events=True)
    assert main(["send-test-event", "rebalance", "--instance", INSTANCE, "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["detail"]["instance-id"] == INSTANCE
    assert received(queue_url) == []


def test_bad_instance_id_is_refused(moto_server, capsys):
    assert main(["send-test-event", "rebalance", "--instance", "web-1", "--dry-run"]) == 2
    assert "instance id" in capsys.readouterr().err


# ------------------------------------------------------------------ status / history / trigger
@contextmanager
def local_api(stage: str = "v1") -> Iterator[dict]:
    """API Gateway stand-in: checks the SigV4 signature like IAM auth would (recomputing it
    with the test credentials), then hands a REST proxy event to the real api handler."""
    seen: dict = {"requests": 0, "rejected": 0}

    class Handler(QuietHandler):
        def _handle(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
            if not self._signature_valid(body):
                seen["rejected"] += 1
                self._reply(403, {"message": "The request signature we calculated does not match"})
                return
            seen["requests"] += 1
            split = urllib.parse.urlsplit(self.path)
            path = split.path.removeprefix(f"/{stage}")
            query = dict(urllib.parse.parse_qsl(split.query)) or None
            event = rest_event(self.command, path, query=query, raw_body=body.decode() if body else None)
            if path.startswith("/fleet/"):
                event["resource"] = "/fleet/{instanceId}"
                event["pathParameters"] = {"instanceId": path.rsplit("/", 1)[1]}
            response = api.handler(event, FakeLambdaContext())
            self._reply(response["statusCode"], json.loads(response["body"]))

        def _signature_valid(self, body):
            authorization = self.headers.get("Authorization", "")
            if not authorization.startswith("AWS4-HMAC-SHA256 "):
                return False
            fields = dict(
                part.strip().split("=", 1) for part in authorization[len("AWS4-HMAC-SHA256 ") :].split(",")
            )
            _, _, region, service, _ = fields["Credential"].split("/")
            if service != "execute-api":
                return False
            signed_names = fields["SignedHeaders"].split(";")
            headers = {
                name: self.headers[name] for name in signed_names if self.headers.get(name) is not None
            }
            request = AWSRequest(
                method=self.command,
                url=f"http://{self.headers['Host']}{self.path}",
                data=body,
                headers=headers,
            )
            request.context["timestamp"] = self.headers["X-Amz-Date"]
            auth = SigV4Auth(Credentials("testing", "testing", "testing"), service, region)
            canonical = auth.canonical_request(request)
            expected = auth.signature(auth.string_to_sign(request, canonical), request)
            return expected == fields["Signature"]

        def _reply(self, status, payload):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = _handle
        do_POST = _handle

    with serving(Handler) as url:
        seen["url"] = f"{url}/{stage}/"
        yield seen


@pytest.fixture
def ops_env(moto_server, monkeypatch):
    create_tables(monkeypatch)
    monkeypatch.setenv(Env.FLEET_NAME.value, "workers")
    monkeypatch.delenv(Env.RECONCILER_FUNCTION.value, raising=False)
    reconciler_runs_inline(monkeypatch)  # in place of Lambda's asynchronous invoke
    with running_novita_server(NovitaState()) as novita:
        novita.state.add(
            novita_instance("inst-1"), novita_instance("inst-2"), novita_instance("inst-3", status="running")
        )
        secret = boto3.client("secretsmanager").create_secret(
            Name="novita", SecretString=novita.state.api_key
        )
        monkeypatch.setenv("MIGRATION_PROVIDER", "novita")
        # The "API" runs in this process: keep its job logs out of the CLI output under test.
        monkeypatch.setenv("MIGRATION_LOG_LEVEL", "error")
        monkeypatch.setenv(Env.NOVITA_API_URL.value, novita.url)
        monkeypatch.setenv(Env.NOVITA_API_KEY_SECRET_ARN.value, secret["ARN"])
        with local_api() as server:
            yield server, novita


def test_trigger_status_history_tables_and_json(ops_env, capsys):
    server, novita = ops_env
    url = server["url"]
    assert main(["trigger", "--api-url", url, "--region", "us-east-1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "completed (dry run)" in out and "would_migrate" in out
    assert novita.state.migrate_calls == []

    assert (
        main(["trigger", "--api-url", url, "--region", "us-east-1", "--max-migrations", "1", "--json"]) == 0
    )
    triggered = json.loads(capsys.readouterr().out)
    assert triggered["status"] == "completed" and triggered["job"]["summary"]["migratedInstances"] == 1

    assert main(["history", "--api-url", url, "--region", "us-east-1"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["JOB", "TRIGGER", "STARTED", "STATUS"]
    assert triggered["jobId"] in lines[2]  # newest first
    assert "jobs 1-2 of 2" in out

    assert (
        main(
            ["history", "--api-url", url, "--region", "us-east-1", "--limit", "1", "--offset", "1", "--json"]
        )
        == 0
    )
    page = json.loads(capsys.readouterr().out)
    assert (page["total"], page["limit"], page["offset"], len(page["jobs"])) == (2, 1, 1, 1)

    assert main(["status", "--api-url", url, "--region", "us-east-1"]) == 0
    out = capsys.readouterr().out
    assert "spotguard fleet workers: healthy" in out
    assert "2 (2 ok, 0 failed)" in out and "novita" in out

    assert main(["status", "--api-url", url, "--region", "us-east-1", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["migration"]["statistics"]["totalMigrations"] == 1
    assert status["health"]["migrationService"]["enabled"] is True
    # status makes two calls; trigger two (the hand-over, then one history poll that finds
    # the job finished, since the reconciler ran in-process)
    assert server["rejected"] == 0 and server["requests"] == 10


def test_api_errors_are_printed_clearly(ops_env, capsys):
    server, _ = ops_env
    assert main(["history", "--api-url", server["url"], "--region", "us-east-1", "--limit", "500"]) == 1
    err = capsys.readouterr().err
    assert "HTTP 400" in err and "limit" in err


def test_unsigned_requests_are_rejected_by_the_stand_in(ops_env):

    server, _ = ops_env
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(server["url"] + "health", timeout=5)
    assert error.value.code == 403 and server["rejected"] == 1


def test_missing_api_url_is_explained(moto_server, capsys, monkeypatch):
    monkeypatch.delenv("SPOTGUARD_API_URL", raising=False)
    assert main(["status"]) == 1
    assert "--api-url" in capsys.readouterr().err


def test_trigger_no_wait_prints_the_hand_over_only(ops_env, capsys):
    server, _ = ops_env
    args = ["trigger", "--api-url", server["url"], "--region", "us-east-1", "--dry-run", "--no-wait"]
    assert main([*args, "--json"]) == 0
    captured = capsys.readouterr()
    answer = json.loads(captured.out)  # the whole of stdout is the JSON document
    assert answer["status"] == "accepted" and "job" not in answer and answer["dryRun"] is True
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "job " in out and ": accepted (dry run)" in out and "spotguard history --limit 1" in out
    assert server["requests"] == 2  # no polling


def test_table_cells_are_printed_as_they_are(ops_env, capsys):
    """API values are data, never rich markup (an error text with [brackets] stays whole)."""
    JobStore().record_finished(
        JobRecord(
            job_id="migration-job-[bold]x[/bold]",
            trigger=JobTrigger.MANUAL,
            provider="aws",
            dry_run=False,
            status=JobStatus.FAILED,
            started_at=datetime.now(UTC),
            summary=JobSummary(error_count=1),
        )
    )
    server, _ = ops_env
    assert main(["history", "--api-url", server["url"], "--region", "us-east-1"]) == 0
    assert "migration-job-[bold]x[/bold]" in capsys.readouterr().out


def test_the_cli_does_not_follow_a_redirect_with_its_signature(moto_server, capsys):
    seen: list[str] = []
    with serving(redirecting_handler("/elsewhere", seen)) as url:
        assert main(["history", "--api-url", f"{url}/v1/", "--region", "us-east-1"]) == 1
    assert "HTTP 302" in capsys.readouterr().err
    assert seen == ["/v1/migration/history?limit=20&offset=0"]  # the redirect was not followed
