"""Fixtures shared by every test directory.

Integration tests talk to moto in server mode over HTTP on 127.0.0.1 (one server per
pytest worker, reset before each test). Nothing here reaches AWS.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.moto_server import MotoServer, running_moto_server

# No test may ever reach a real AWS endpoint or the real instance metadata service.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
for _key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
    os.environ.pop(_key, None)
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
# Powertools: metrics print EMF to stdout; keep that out of test output.
os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")
os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "true")
# Webhook receivers and the Novita contract server listen on http://127.0.0.1: let the
# outbound URL check admit loopback (only loopback; tests of the default unset it).
os.environ.setdefault("SPOTGUARD_ALLOW_LOOPBACK_URLS", "true")


@pytest.fixture(scope="session")
def moto_server_session() -> Iterator[MotoServer]:
    with running_moto_server() as server:
        yield server


@pytest.fixture
def moto_server(moto_server_session: MotoServer) -> MotoServer:
    """A clean moto server for this test (state from earlier tests is wiped)."""
    moto_server_session.reset()
    return moto_server_session
