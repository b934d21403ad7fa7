"""Notifications of one fleet: its EventBridge bus ``spotguard-<fleet>`` with a rule (source
``spotguard``) to the notify queue, and the notifier function that signs and delivers webhooks
(with the signing secret when a webhook is set)."""

from __future__ import annotations

from collections.abc import Mapping

from aws_cdk import Duration
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda_event_sources as event_sources
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct
from spotguard_core import contracts, runtime_env

from spotguard_cdk import permissions
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
        self.bus = events.EventBus(
            self,
            "Bus",
            event_bus_name=f"spotguard-{settings.fleet.name}",
            description="spotguard notifications",
        )
        self.rule = events.Rule(
            self,
            "ToNotifyQueue",
            event_bus=self.bus,
            description="spotguard notifications to the webhook notifier",
            event_pattern=events.EventPattern(source=[contracts.NOTIFICATION_EVENT_SOURCE]),
        )
        self.rule.add_target(
            targets.SqsQueue(
                self.notify_queue, dead_letter_queue=self.notify_dlq, max_event_age=Duration.hours(24)
            )
        )
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

    def allow_only(self, roles: list[iam.IRole]) -> None:
        """Deny ``events:PutEvents`` on the bus to every principal but ``roles`` (the notifier
        signs what arrives with the webhook key)."""
        self.bus.add_to_resource_policy(
            iam.PolicyStatement(
                sid="OnlyControlPlaneRolesPutEvents",
                effect=iam.Effect.DENY,
                principals=[iam.AnyPrincipal()],
                actions=["events:PutEvents"],
                resources=[self.bus.event_bus_arn],
                conditions={"ArnNotEquals": {"aws:PrincipalArn": [role.role_arn for role in roles]}},
            )
        )

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
