"""The operations API: REST API Gateway, IAM (SigV4) auth on every method, Lambda proxy.

Routes and request bodies are validated by the api function (Powertools Event Handler);
API Gateway validates request parameters. Access logs go to their own log group; the
stage has execution logging, detailed metrics and X-Ray tracing.
"""

from __future__ import annotations

from aws_cdk import RemovalPolicy, Stack
from aws_cdk import aws_apigateway as apigateway
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct
from spotguard_core.contracts import Env

from spotguard_cdk import permissions
from spotguard_cdk.common import retention
from spotguard_cdk.control import FunctionInputs
from spotguard_cdk.nag import acknowledge

API_TIMEOUT_SECONDS = 29


_CLOUDWATCH_ROLE_OWNER = "SpotguardApiGatewayCloudWatchRoleOwner"


class _CloudWatchRoleOwner(Construct):
    """Marks the stack's first operations API: the API Gateway CloudWatch role (an account-wide
    setting) is created once per stack, by that API; the others wait for it."""

    api: apigateway.RestApi | None = None


def _cloudwatch_role_owner(scope: Construct) -> tuple[_CloudWatchRoleOwner, bool]:
    stack = Stack.of(scope)
    existing = stack.node.try_find_child(_CLOUDWATCH_ROLE_OWNER)
    if isinstance(existing, _CloudWatchRoleOwner):
        return existing, False
    return _CloudWatchRoleOwner(stack, _CLOUDWATCH_ROLE_OWNER), True


def api_resource_policy(allowed_principal_arns: list[str]) -> iam.PolicyDocument:
    """Only this account's IAM-authorised principals, or only the named ones."""
    invoke = "execute-api:/*"
    statements = [
        iam.PolicyStatement(
            sid="AccountPrincipalsOnly",
            principals=[iam.AccountRootPrincipal()],
            actions=["execute-api:Invoke"],
            resources=[invoke],
        )
    ]
    if allowed_principal_arns:
        statements.append(
            iam.PolicyStatement(
                sid="OnlyTheNamedPrincipals",
                effect=iam.Effect.DENY,
                principals=[iam.AnyPrincipal()],
                actions=["execute-api:Invoke"],
                resources=[invoke],
                conditions={"ArnNotLike": {"aws:PrincipalArn": list(allowed_principal_arns)}},
            )
        )
    return iam.PolicyDocument(statements=statements)


class OpsApi(Construct):
    """The api function (status, history, trigger) behind a REST API with IAM auth."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        inputs: FunctionInputs,
        reconciler: lambda_.IFunction,
    ) -> None:
        super().__init__(scope, construct_id)
        settings, tables = inputs.settings, inputs.tables
        self.function = inputs.function(
            self,
            "Handler",
            "api",
            "spotguard operations API",
            timeout_seconds=API_TIMEOUT_SECONDS,
            environment={Env.RECONCILER_FUNCTION.value: reconciler.function_name},
        )
        permissions.grant_api(
            self.function.role, jobs=tables.jobs, fleet_table=tables.fleet, reconciler=reconciler
        )
        handler = self.function.function
        owner, first = _cloudwatch_role_owner(self)
        access_logs = logs.LogGroup(
            self, "AccessLogs", retention=retention(settings.control_plane.log_retention_days)
        )
        self.api = apigateway.LambdaRestApi(
            self,
            "Api",
            rest_api_name=f"spotguard-{settings.fleet.name}",
            description="spotguard operations API (IAM auth)",
            handler=handler,
            proxy=True,
            default_method_options=apigateway.MethodOptions(
                authorization_type=apigateway.AuthorizationType.IAM,
            ),
            endpoint_types=[apigateway.EndpointType.REGIONAL],
            # The CloudWatch role is an account-wide API Gateway setting: one per stack.
            cloud_watch_role=first,
            cloud_watch_role_removal_policy=RemovalPolicy.RETAIN if first else None,
            deploy_options=apigateway.StageOptions(
                stage_name="v1",
                access_log_destination=apigateway.LogGroupLogDestination(access_logs),
                access_log_format=apigateway.AccessLogFormat.json_with_standard_fields(
                    caller=True,
                    http_method=True,
                    ip=True,
                    protocol=True,
                    request_time=True,
                    resource_path=True,
                    response_length=True,
                    status=True,
                    user=True,
                ),
                logging_level=apigateway.MethodLoggingLevel.ERROR,
                data_trace_enabled=False,
                metrics_enabled=True,
                tracing_enabled=True,
                throttling_rate_limit=settings.api.throttle_rate_per_second,
                throttling_burst_limit=settings.api.throttle_burst,
            ),
            policy=api_resource_policy(settings.api.allowed_principal_arns),
        )
        # Routes and bodies are validated by the api function against its typed models (it
        # owns the routes behind the proxy, so there are no API Gateway models to check
        # bodies against); the validator still makes API Gateway check declared parameters.
        if first:
            owner.api = self.api
        elif owner.api is not None:
            # Execution logging needs the account's CloudWatch role set by the first API.
            account = owner.api.node.try_find_child("Account")
            if account is not None:
                self.api.deployment_stage.node.add_dependency(account)
        validator = self.api.add_request_validator(
            "RequestValidator", validate_request_parameters=True, validate_request_body=True
        )
        for method in self.api.methods:
            cfn_method = method.node.default_child
            assert isinstance(cfn_method, apigateway.CfnMethod)
            cfn_method.request_validator_id = validator.request_validator_id
        acknowledge(
            self.api,
            "AwsSolutions-APIG3",
            "The API is for operators only: IAM (SigV4) on every method, a resource policy limited to "
            "this account's (or the named) principals, and stage throttling (api.throttle_*); a WAF "
            "web ACL adds cost without protecting anything IAM does not.",
        )
        acknowledge(
            self.api,
            "AwsSolutions-COG4",
            "Callers are AWS principals authorised with IAM (SigV4), not Cognito user pool users.",
        )
        acknowledge(
            self.api,
            "AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/service-role/"
            "AmazonAPIGatewayPushToCloudWatchLogs]",
            "Account-level role API Gateway needs to write execution logs (APIG6); AWS's managed "
            "policy is the documented one and is limited to CloudWatch Logs.",
        )
