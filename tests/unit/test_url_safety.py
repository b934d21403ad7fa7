"""Outbound URL safety (issue 13): one rule for webhook and Novita URLs, at synth time
(settings) and at request time (notifier, Novita provider)."""

from __future__ import annotations

import pytest
from spotguard_cdk.settings import ConfigurationError, Settings
from spotguard_core.contracts import Env
from spotguard_core.url_safety import UnsafeUrlError, check_outbound_url


@pytest.fixture(autouse=True)
def production_default(monkeypatch):
    """The tests run with loopback admitted (tests/conftest.py); these check the default."""
    monkeypatch.delenv(Env.ALLOW_LOOPBACK_URLS.value, raising=False)


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/spotguard",
        "https://api.novita.ai",
        "https://hooks.example.com:8443/a/b?c=d",
        "https://93.184.216.34/hook",  # a public literal address
        "https://[2606:4700:4700::1111]/hook",
    ],
)
def test_public_https_urls_are_allowed(url):
    assert check_outbound_url(url).scheme == "https"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://hooks.example.com/spotguard", "https"),
        ("ftp://hooks.example.com/", "https"),
        ("https://user:pass@hooks.example.com/", "user information"),
        ("https://hooks.example.com@evil.example/", "user information"),
        ("https://localhost/hook", "loopback"),
        ("https://LOCALHOST./hook", "loopback"),
        ("https://app.localhost/hook", "loopback"),
        ("https://127.0.0.1/hook", "loopback"),
        ("https://127.8.9.10/hook", "loopback"),
        ("https://[::1]/hook", "loopback"),
        ("https://[::ffff:127.0.0.1]/hook", "loopback"),
        ("https://169.254.169.254/latest/meta-data/", "link-local"),
        ("https://[fe80::1]/hook", "link-local"),
        ("https://[::ffff:169.254.169.254]/", "link-local"),
        ("https://10.0.0.5/hook", "private"),
        ("https://172.16.3.4/hook", "private"),
        ("https://192.168.1.1/hook", "private"),
        ("https://[fd00::1]/hook", "private"),
        ("https://100.64.0.1/hook", "not globally routable"),  # carrier-grade NAT
        ("https://0.0.0.0/hook", "reserved"),
        ("https://224.0.0.1/hook", "multicast"),
        ("https://240.0.0.1/hook", "reserved"),
        ("https://2130706433/hook", "single-label"),  # 127.0.0.1 as one decimal number
        ("https://0x7f.1/hook", "non-standard"),
        ("https://127.1/hook", "non-standard"),
        ("https://intranet/hook", "single-label"),
        ("https:///hook", "host"),
        ("https://hooks.example.com:99999/", "valid URL"),
        (" https://hooks.example.com/", "spaces"),
        ("https://hooks.example.com/\n", "control"),
        ("", "spaces"),
    ],
)
def test_unsafe_urls_are_rejected_with_the_reason(url, why):
    with pytest.raises(UnsafeUrlError, match=why):
        check_outbound_url(url)


def test_resolved_addresses_must_be_public_too():
    def resolver(answer):
        return lambda host: answer

    assert check_outbound_url("https://hooks.example.com/", resolve=resolver(["93.184.216.34"]))
    with pytest.raises(UnsafeUrlError, match=r"resolves to 169\.254\.169\.254"):
        check_outbound_url(
            "https://hooks.example.com/", resolve=resolver(["93.184.216.34", "169.254.169.254"])
        )
    with pytest.raises(UnsafeUrlError, match="does not resolve"):
        check_outbound_url("https://hooks.example.com/", resolve=resolver([]))

    def failing(host):
        raise OSError("Name or service not known")

    with pytest.raises(UnsafeUrlError, match="does not resolve"):
        check_outbound_url("https://hooks.example.com/", resolve=failing)


def test_loopback_only_where_explicitly_allowed(monkeypatch):
    with pytest.raises(UnsafeUrlError):
        check_outbound_url("http://127.0.0.1:8080/hook")
    monkeypatch.setenv(Env.ALLOW_LOOPBACK_URLS.value, "true")
    assert check_outbound_url("http://127.0.0.1:8080/hook").port == 8080
    # the switch admits loopback, nothing else: private, link-local and plain http stay out
    for url in ("http://10.0.0.5/", "https://169.254.169.254/", "http://hooks.example.com/"):
        with pytest.raises(UnsafeUrlError):
            check_outbound_url(url)


@pytest.mark.parametrize(
    ("field", "url"),
    [
        ("notifications.webhook_url", "https://169.254.169.254/latest/meta-data/"),
        ("notifications.webhook_url", "https://user:secret@hooks.example.com/"),
        ("notifications.webhook_url", "https://localhost/hook"),
        ("notifications.webhook_url", "https://10.1.2.3/hook"),
        ("migration.novita_api_url", "http://api.novita.ai"),
        ("migration.novita_api_url", "https://192.168.0.10"),
        ("migration.novita_api_url", "https://127.0.0.1:9000"),
    ],
)
def test_settings_reject_unsafe_urls_at_synth(field, url, monkeypatch):
    monkeypatch.setenv(Env.ALLOW_LOOPBACK_URLS.value, "true")  # never affects synth
    section, name = field.split(".")
    with pytest.raises(ConfigurationError, match=f"spotguard.{field}: must"):
        Settings.from_mapping({section: {name: url}})


def test_settings_accept_public_https_urls():
    settings = Settings.from_mapping(
        {
            "notifications": {"webhook_url": "https://hooks.example.com/spotguard"},
            "migration": {"novita_api_url": "https://api.novita.ai"},
        }
    )
    assert settings.notifications.webhook_url == "https://hooks.example.com/spotguard"


def test_novita_client_refuses_an_unsafe_base_url():
    from spotguard_core.migration.providers.novita import NovitaClient  # noqa: PLC0415

    with pytest.raises(ValueError, match="Novita API URL"):
        NovitaClient("http://api.novita.ai", "key")
    with pytest.raises(ValueError, match="link-local"):
        NovitaClient("https://169.254.169.254", "key")
