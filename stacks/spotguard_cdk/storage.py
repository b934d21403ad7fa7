"""What the workers keep outside the instance: checkpoints (S3) and logs (CloudWatch Logs),
and the fleet's KMS key (alarm topic and log group).

- Checkpoint bucket: encrypted, TLS only, public access blocked, objects under
  ``contracts.CHECKPOINT_KEY_PREFIX`` expire after the work queue's retention (a checkpoint
  of a message SQS no longer holds is useless). The instance role may touch only
  ``checkpoints/<fleet>/*`` (see ``permissions.InstanceRole``).
- Log group ``/spotguard/<fleet>/instances``: one stream per instance, retention from the
  settings, encrypted with the fleet key.
"""

from __future__ import annotations

from aws_cdk import ArnFormat, Aws, Duration, RemovalPolicy, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from constructs import Construct
from spotguard_core import contracts

from spotguard_cdk.common import retention
from spotguard_cdk.nag import acknowledge


def instance_log_group_name(fleet: str) -> str:
    """The fleet's instance log group, ``/spotguard/<fleet>/instances``."""
    return f"/spotguard/{fleet}/instances"


class FleetKey(Construct):
    """A customer managed key the fleet's alarm topic and instance log group are encrypted with
    (CloudWatch alarms and CloudWatch Logs cannot use the AWS managed keys for these)."""

    def __init__(self, scope: Construct, construct_id: str, *, fleet: str) -> None:
        super().__init__(scope, construct_id)
        self.key = kms.Key(
            self,
            "Key",
            description=f"spotguard {fleet}: alarm topic and instance logs",
            enable_key_rotation=True,
        )
        source_account = {"StringEquals": {"aws:SourceAccount": Aws.ACCOUNT_ID}}
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="CloudWatchAlarmsPublish",
                principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
                actions=["kms:Decrypt", "kms:GenerateDataKey"],
                resources=["*"],
                conditions=source_account,
            )
        )
        log_group_arn = Stack.of(self).format_arn(
            service="logs",
            resource="log-group",
            resource_name=instance_log_group_name(fleet),
            arn_format=ArnFormat.COLON_RESOURCE_NAME,
        )
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="CloudWatchLogsInstanceLogs",
                principals=[iam.ServicePrincipal(f"logs.{Aws.REGION}.amazonaws.com")],
                actions=[
                    "kms:Encrypt*",
                    "kms:Decrypt*",
                    "kms:ReEncrypt*",
                    "kms:GenerateDataKey*",
                    "kms:Describe*",
                ],
                resources=["*"],
                conditions={"ArnEquals": {"kms:EncryptionContext:aws:logs:arn": log_group_arn}},
            )
        )


class WorkerStorage(Construct):
    """The fleet's checkpoint bucket and instance log group."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        fleet: str,
        key: kms.IKey,
        checkpoint_retention_days: int,
        log_retention_days: int,
    ) -> None:
        super().__init__(scope, construct_id)
        self.checkpoint_bucket = s3.Bucket(
            self,
            "Checkpoints",
            encryption=s3.BucketEncryption.S3_MANAGED,
            enforce_ssl=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            versioned=False,
            lifecycle_rules=[
                s3.LifecycleRule(
                    id="ExpireCheckpointsAfterQueueRetention",
                    prefix=contracts.CHECKPOINT_KEY_PREFIX,
                    expiration=Duration.days(checkpoint_retention_days),
                    abort_incomplete_multipart_upload_after=Duration.days(1),
                )
            ],
            # Transient task state: kept on destroy only until the lifecycle rule expires it.
            removal_policy=RemovalPolicy.RETAIN,
        )
        acknowledge(
            self.checkpoint_bucket,
            "AwsSolutions-S1",
            "Checkpoints are transient task state written and read only by this fleet's instance "
            "role under its own prefix and expired after the queue retention; S3 server access "
            "logs would need another bucket per fleet for no new information (CloudTrail data "
            "events cover object access when an account enables them).",
        )
        self.log_group = logs.LogGroup(
            self,
            "InstanceLogs",
            log_group_name=instance_log_group_name(fleet),
            retention=retention(log_retention_days),
            encryption_key=key,
            removal_policy=RemovalPolicy.RETAIN,
        )
