"""The Novita client's outbound safety (issue 13): a redirect is an error, never followed
with the Bearer key; an unsafe base URL is refused before any request."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from spotguard_core.contracts import Env
from spotguard_core.migration.models import MigrationError
from spotguard_core.migration.providers.novita import NovitaApiError, NovitaClient, NovitaProvider
from spotguard_tools.novita_contract_server import NovitaState, novita_instance, running_novita_server

pytestmark = pytest.mark.integration


def redirect_to(location: str):
    calls: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            return

        def _redirect(self):
            calls.append(self.path)
            self.send_response(302)
            self.send_header("Location", location + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = _redirect
        do_POST = _redirect

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, calls


def test_a_redirect_is_an_error_and_the_key_stays_home():
    with running_novita_server(NovitaState()) as target:
        target.state.add(novita_instance("inst-1"))
        server, calls = redirect_to(target.url)
        try:
            client = NovitaClient(f"http://127.0.0.1:{server.server_address[1]}", target.state.api_key)
            with pytest.raises(NovitaApiError, match="REDIRECT") as error:
                client.list_instances()
            assert error.value.retryable is False
            provider = NovitaProvider(client)
            candidate = NovitaProvider(NovitaClient(target.url, target.state.api_key)).list_instances()[0]
            with pytest.raises(MigrationError, match="redirect refused"):
                provider.migrate(candidate, job_id="job-1", attempt=1)
        finally:
            server.shutdown()
            server.server_close()
        assert len(calls) == 2  # one list, one migrate: each answered 302 and not repeated
        assert target.state.migrated == []  # the redirect target never saw the key
        assert len(target.state.list_calls) == 1  # only the direct listing above, none redirected
        assert target.state.migrate_calls == []


def test_an_unsafe_base_url_is_refused_before_any_request(monkeypatch):
    monkeypatch.delenv(Env.ALLOW_LOOPBACK_URLS.value, raising=False)
    for url in ("http://api.novita.ai", "https://169.254.169.254", "https://127.0.0.1:8443"):
        with pytest.raises(ValueError, match="Novita API URL"):
            NovitaClient(url, "key")
