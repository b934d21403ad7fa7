"""The control-plane functions, one least-privilege role each.

Plain code assets (no Docker bundling): the ``lambdas/`` directory is the asset; Powertools
(and pydantic) come from the public Powertools layer, boto3 from the runtime.
``POWERTOOLS_SERVICE_NAME`` is deliberately not set: the metric dimension contract is
``Fleet`` only (see ``spotguard_functions.observability``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aws_cdk import Aws, Duration
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct
from spotguard_core import contracts

from stacks.common import cfn_lint_ignore, retention
from stacks.nag import acknowledge
from stacks.powertools_layer import LayerSpec, build_layer
from stacks.settings import Settings

LAMBDA_SOURCE = Path(__file__).resolve().parents[1] / "lambdas"
ASSET_EXCLUDES = [
    "tests",
    "**/tests",
    "__pycache__",
    "**/__pycache__",
    "*.pyc",
    "**/*.pyc",
    "*.egg-info",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
]
POWERTOOLS_ACCOUNT = "017000801446"
#: cfn-lint W3005 on CDK's own output (a DependsOn on the role next to the GetAtt of it).
CDK_ROLE_DEPENDENCY_REASON = (
    "CDK adds an explicit DependsOn on the function's role (and its policy) next to the GetAtt "
    "of the role; the redundant dependency is harmless."
)
#: Every function role gets X-Ray write access (active tracing) on ``Resource: *``; some
#: also have describe calls there. One finding id per role, so one reason for both.
RESOURCE_STAR_REASON = (
    "xray:PutTraceSegments/PutTelemetryRecords (active tracing) and the EC2/Auto Scaling "
    "describe actions some roles have do not support resource-level permissions; they only "
    "write traces or read state, and every destructive statement is scoped to this fleet."
)


def powertools_layer_arn(version: int) -> str:
    return (
        f"arn:{Aws.PARTITION}:lambda:{Aws.REGION}:{POWERTOOLS_ACCOUNT}:layer:"
        f"AWSLambdaPowertoolsPythonV3-python313-x86_64:{version}"
    )


FUNCTION_RUNTIME = lambda_.Runtime.PYTHON_3_13


def powertools_layer(scope: Construct, settings: Settings) -> lambda_.ILayerVersion:
    """The public Powertools layer, or one bundled from requirements.lock (``powertools_layer``)."""
    if settings.control_plane.powertools_layer == "public":
        return lambda_.LayerVersion.from_layer_version_arn(
            scope, "Powertools", powertools_layer_arn(settings.control_plane.powertools_layer_version)
        )
    spec = LayerSpec.from_lock(python_version=FUNCTION_RUNTIME.name.removeprefix("python"))
    return lambda_.LayerVersion(
        scope,
        "Powertools",
        code=lambda_.Code.from_asset(str(build_layer(spec))),
        compatible_runtimes=[FUNCTION_RUNTIME],
        compatible_architectures=[lambda_.Architecture.X86_64],
        description="Powertools, pydantic and the X-Ray SDK pinned by spotguard's requirements.lock",
    )


@dataclass(frozen=True)
class FunctionSpec:
    name: str  # construct id, e.g. "Dispatcher"
    module: str  # spotguard_functions.<module>
    description: str
    timeout_seconds: int
    memory_mb: int = 512


class ControlPlaneFunction(Construct):
    """A Python 3.13 function with its own role, log group, X-Ray tracing and the layer."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        spec: FunctionSpec,
        settings: Settings,
        code: lambda_.Code,
        layer: lambda_.ILayerVersion,
        environment: Mapping[str, str],
    ) -> None:
        super().__init__(scope, construct_id)
        self.log_group = logs.LogGroup(
            self, "Logs", retention=retention(settings.control_plane.log_retention_days)
        )
        self.role = iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description=f"spotguard {settings.fleet.name} {spec.module} function",
        )
        # Instead of the AWSLambdaBasicExecutionRole managed policy: write to its own log group.
        self.role.add_to_policy(
            iam.PolicyStatement(
                sid="WriteOwnLogs",
                actions=["logs:CreateLogStream", "logs:PutLogEvents"],
                resources=[self.log_group.log_group_arn],
            )
        )
        acknowledge(self.role, "AwsSolutions-IAM5[Resource::*]", RESOURCE_STAR_REASON)
        self.function = lambda_.Function(
            self,
            "Function",
            description=spec.description,
            runtime=FUNCTION_RUNTIME,
            architecture=lambda_.Architecture.X86_64,
            handler=f"spotguard_functions.{spec.module}.handler",
            code=code,
            layers=[layer],
            role=self.role,
            timeout=Duration.seconds(spec.timeout_seconds),
            memory_size=spec.memory_mb,
            tracing=lambda_.Tracing.ACTIVE,
            log_group=self.log_group,
            environment={
                "POWERTOOLS_METRICS_NAMESPACE": contracts.METRIC_NAMESPACE,
                **environment,
            },
        )
        cfn_function = self.function.node.default_child
        assert isinstance(cfn_function, lambda_.CfnFunction)
        cfn_lint_ignore(cfn_function, {"W3005": CDK_ROLE_DEPENDENCY_REASON})


class Functions(Construct):
    """dispatcher, watchdog, reconciler, api and notifier."""

    SPECS = (
        FunctionSpec("Dispatcher", "dispatcher", "Normalises interruption signals and requeues work", 60),
        FunctionSpec("Watchdog", "watchdog", "Ends instances past their bootstrap or heartbeat deadline", 55),
        FunctionSpec("Reconciler", "reconciler", "Migrates or replaces spot-reclaimed instances", 900, 1024),
        FunctionSpec("Api", "api", "spotguard operations API", 29),
        FunctionSpec("Notifier", "notifier", "Signs and delivers webhooks", 90),
    )

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: Settings,
        environment: Mapping[str, str],
        extra_environment: Mapping[str, Mapping[str, str]],
    ) -> None:
        super().__init__(scope, construct_id)
        code = lambda_.Code.from_asset(str(LAMBDA_SOURCE), exclude=ASSET_EXCLUDES)
        layer = powertools_layer(self, settings)
        self.by_name: dict[str, ControlPlaneFunction] = {}
        for spec in self.SPECS:
            timeout = spec.timeout_seconds
            if spec.name == "Reconciler":
                # Stop at the job timeout plus a margin; Lambda's own limit is 15 minutes.
                timeout = min(settings.migration.job_timeout_ms // 1000 + 60, 900)
            self.by_name[spec.name] = ControlPlaneFunction(
                self,
                spec.name,
                spec=FunctionSpec(spec.name, spec.module, spec.description, timeout, spec.memory_mb),
                settings=settings,
                code=code,
                layer=layer,
                environment={**environment, **extra_environment.get(spec.name, {})},
            )

    @property
    def dispatcher(self) -> ControlPlaneFunction:
        return self.by_name["Dispatcher"]

    @property
    def watchdog(self) -> ControlPlaneFunction:
        return self.by_name["Watchdog"]

    @property
    def reconciler(self) -> ControlPlaneFunction:
        return self.by_name["Reconciler"]

    @property
    def api(self) -> ControlPlaneFunction:
        return self.by_name["Api"]

    @property
    def notifier(self) -> ControlPlaneFunction:
        return self.by_name["Notifier"]
