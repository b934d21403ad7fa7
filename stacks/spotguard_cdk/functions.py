"""The control-plane functions, one least-privilege role each.

Plain code assets (no Docker bundling): ``spotguard_core`` + ``spotguard_functions`` are the
asset (staged by ``assets.lambda_source_dir``, from a checkout or an installed wheel); Powertools
(and pydantic) come from the public Powertools layer, boto3 from the runtime.
``POWERTOOLS_SERVICE_NAME`` is deliberately not set: the metric dimension contract is
``Fleet`` only (see ``spotguard_functions.observability``).
"""

from __future__ import annotations

from collections.abc import Mapping

from aws_cdk import Aws, Duration, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct, IConstruct
from spotguard_core import contracts

from spotguard_cdk.assets import lambda_source_dir
from spotguard_cdk.common import cfn_lint_ignore, retention
from spotguard_cdk.nag import acknowledge
from spotguard_cdk.powertools_layer import LayerSpec, build_layer
from spotguard_cdk.settings import Settings

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
    """ARN of the public Powertools for AWS Lambda (Python) v3 layer in the deploy region."""
    return (
        f"arn:{Aws.PARTITION}:lambda:{Aws.REGION}:{POWERTOOLS_ACCOUNT}:layer:"
        f"AWSLambdaPowertoolsPythonV3-python313-x86_64:{version}"
    )


def instance_arn_prefix(scope: IConstruct) -> str:
    """``arn:<partition>:ec2:<region>:<account>:instance/`` of the stack (CDK tokens): the
    prefix of every instance key (``contracts.instance_key``), set for the functions
    (``Env.INSTANCE_ARN_PREFIX``), the agent config and the user data from this one value."""
    stack = Stack.of(scope)
    return contracts.instance_arn_prefix(
        partition=Aws.PARTITION, region=stack.region, account_id=stack.account
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


class FunctionRuntime(Construct):
    """What every control-plane function of a fleet shares: the code asset and the layer."""

    def __init__(self, scope: Construct, construct_id: str, *, settings: Settings) -> None:
        super().__init__(scope, construct_id)
        self.code = lambda_.Code.from_asset(str(lambda_source_dir()), exclude=ASSET_EXCLUDES)
        self.layer = powertools_layer(self, settings)
        self.log_retention_days = settings.control_plane.log_retention_days
        self.reserved_concurrency = settings.control_plane.reserved_concurrency
        self.fleet = settings.fleet.name


class ControlPlaneFunction(Construct):
    """A Python 3.13 function with its own role, log group, X-Ray tracing and the layer.

    ``module`` is the handler module in ``spotguard_functions``; the feature construct that
    creates the function grants its role what it needs.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        runtime: FunctionRuntime,
        module: str,
        description: str,
        timeout_seconds: int,
        environment: Mapping[str, str],
        memory_mb: int = 512,
        reserved_concurrency: int | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        self.log_group = logs.LogGroup(self, "Logs", retention=retention(runtime.log_retention_days))
        self.role = iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description=f"spotguard {runtime.fleet} {module} function",
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
            description=description,
            runtime=FUNCTION_RUNTIME,
            architecture=lambda_.Architecture.X86_64,
            handler=f"spotguard_functions.{module}.handler",
            code=runtime.code,
            layers=[runtime.layer],
            role=self.role,
            timeout=Duration.seconds(timeout_seconds),
            memory_size=memory_mb,
            tracing=lambda_.Tracing.ACTIVE,
            log_group=self.log_group,
            # A bound per function: a signal storm or a burst of API calls cannot take the
            # account's whole concurrency (or each other's).
            reserved_concurrent_executions=reserved_concurrency or runtime.reserved_concurrency,
            environment={
                "POWERTOOLS_METRICS_NAMESPACE": contracts.METRIC_NAMESPACE,
                **environment,
            },
        )
        cfn_function = self.function.node.default_child
        assert isinstance(cfn_function, lambda_.CfnFunction)
        cfn_lint_ignore(cfn_function, {"W3005": CDK_ROLE_DEPENDENCY_REASON})
        acknowledge(
            self.function,
            "AwsSolutions-L1",
            "Functions run Python 3.13 to match the public Powertools layer built for python3.13 "
            "(settings.control_plane.powertools_layer_version).",
        )
