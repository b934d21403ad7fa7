"""Powertools Logger, Metrics and Tracer configured the same way in every function.

Metrics go to one namespace with one dimension (``Fleet``) so that the dashboard and
the alarms, built from ``contracts.Metric``, match what the functions emit. The
``service`` dimension Powertools would add is left out for the same reason.
"""

from __future__ import annotations

import os

from aws_lambda_powertools import Logger, Metrics, Tracer
from spotguard_core.contracts import METRIC_DIMENSION_FLEET, METRIC_NAMESPACE, Env


def powertools(service: str) -> tuple[Logger, Metrics, Tracer]:
    logger = Logger(service=service)
    metrics = Metrics(namespace=METRIC_NAMESPACE)
    metrics.set_default_dimensions(**{METRIC_DIMENSION_FLEET: os.environ.get(Env.FLEET_NAME, "unknown")})
    tracer = Tracer(service=service)
    return logger, metrics, tracer
