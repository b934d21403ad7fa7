"""Notifications of one fleet: its EventBridge bus, the notify queue and the notifier
function that signs and delivers webhooks (with the signing secret when a webhook is set)."""

from __future__ import annotations

from collections.abc import Mapping

from aws_cdk import aws_lambda_event_sources as event_sources
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct
from spotguard_core import runtime_env

from spotguard_cdk import permissions
from spotguard_cdk.events import NotificationBus
from spotguard_cdk.functions import ControlPlaneFunction, FunctionRuntime
from spotguard_cdk.nag import acknowledge
from spotguard_cdk.queues import consumer_queue
from spotguard_cdk.settings import Settings

NOTIFIER_TIMEOUT_SECONDS = 90
#: A webhook delivery can take ~18 s in the worst case (three timed-out attempts): four per
#: batch fit the notifier's timeout; the rest would only be sent back.
NOTIFIER_BATCH_SIZE = 4


class Notifications(Construct):
    """The fleet's bus, notify queue + DLQ, webhook secret (when configured) and notifier."""

    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings) -> None:
        super().__init__(scope, construct_id)
        self.notify_queue, self.notify_dlq = consumer_queue(
            self, "Notify", consumer_timeout_seconds=NOTIFIER_TIMEOUT_SECONDS
        )
        self.bus_construct = NotificationBus(
            self, "Bus", settings=settings, notify_queue=self.notify_queue, notify_dlq=self.notify_dlq
        )
        self.bus = self.bus_construct.bus
        self.webhook_secret: secretsmanager.ISecret | None = None
        if settings.notifications.webhook_url:
            secret = secretsmanager.Secret(
                self,
                "WebhookSecret",
                description=f"spotguard {settings.fleet.name}: HMAC-SHA256 key for webhook signatures",
                generate_secret_string=secretsmanager.SecretStringGenerator(
                    exclude_punctuation=True, password_length=64
                ),
            )
            acknowledge(
                secret,
                "AwsSolutions-SMG4",
                "The webhook signing key is shared with the receiver out of band; automatic rotation "
                "would break every receiver. Rotate by updating the secret and the receivers together.",
            )
            self.webhook_secret = secret

    def add_notifier(
        self, *, runtime: FunctionRuntime, environment: Mapping[str, str], settings: Settings
    ) -> None:
        """The notifier function (it shares the fleet's environment, built after the bus)."""
        self.notifier = ControlPlaneFunction(
            self,
            "Notifier",
            runtime=runtime,
            module="notifier",
            description="Signs and delivers webhooks",
            timeout_seconds=NOTIFIER_TIMEOUT_SECONDS,
            environment={
                **environment,
                **runtime_env.notifier_env(
                    webhook_url=settings.notifications.webhook_url,
                    webhook_secret_arn=self.webhook_secret.secret_arn if self.webhook_secret else None,
                ),
            },
        )
        permissions.grant_notifier(self.notifier.role, webhook_secret=self.webhook_secret)
        self.notifier.function.add_event_source(
            event_sources.SqsEventSource(
                self.notify_queue, batch_size=NOTIFIER_BATCH_SIZE, report_batch_item_failures=True
            )
        )
