"""The Novita client's outbound safety (issue 13): a redirect is an error, never followed
with the Bearer key; an unsafe base URL is refused before any request."""

from __future__ import annotations

import pytest
from spotguard_core.contracts import Env
from spotguard_core.migration.models import MigrationError
from spotguard_core.migration.providers.novita import NovitaApiError, NovitaClient, NovitaProvider
from spotguard_tools.novita_contract_server import NovitaState, novita_instance, running_novita_server

from tests.support.http_stub import redirecting_handler, serving

pytestmark = pytest.mark.integration


def test_a_redirect_is_an_error_and_the_key_stays_home():
    with running_novita_server(NovitaState()) as target:
        target.state.add(novita_instance("inst-1"))
        calls: list[str] = []
        with serving(redirecting_handler(target.url, calls)) as redirecting_url:
            client = NovitaClient(redirecting_url, target.state.api_key)
            with pytest.raises(NovitaApiError, match="REDIRECT") as error:
                client.list_instances()
            assert error.value.retryable is False
            provider = NovitaProvider(client)
            candidate = NovitaProvider(NovitaClient(target.url, target.state.api_key)).list_instances()[0]
            with pytest.raises(MigrationError, match="redirect refused"):
                provider.migrate(candidate, job_id="job-1", attempt=1)
        assert len(calls) == 2  # one list, one migrate: each answered 302 and not repeated
        assert target.state.migrated == []  # the redirect target never saw the key
        assert len(target.state.list_calls) == 1  # only the direct listing above, none redirected
        assert target.state.migrate_calls == []


def test_an_unsafe_base_url_is_refused_before_any_request(monkeypatch):
    monkeypatch.delenv(Env.ALLOW_LOOPBACK_URLS.value, raising=False)
    for url in ("http://api.novita.ai", "https://169.254.169.254", "https://127.0.0.1:8443"):
        with pytest.raises(ValueError, match="Novita API URL"):
            NovitaClient(url, "key")
