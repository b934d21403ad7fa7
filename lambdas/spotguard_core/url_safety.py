"""Outbound URL safety: where the control plane may send an HTTP request at all.

Webhook deliveries carry an HMAC signature and Novita calls a Bearer key, and both go
to a URL that comes from configuration. ``check_outbound_url`` is the one rule for such
URLs, used by the settings validators (synth time), the notifier and the Novita
provider (request time):

- ``https`` only (no downgrade; the signature and the key never travel in clear text);
- no userinfo (``https://user:pass@host`` hides the real host from a reader);
- a public host: not ``localhost``, not a literal IP (v4, v6, v4-mapped) in a private,
  loopback, link-local (169.254.169.254, the metadata service, is one), shared,
  multicast, reserved or unspecified range; at request time every address the name
  resolves to must be public too;
- the caller opens it with ``no_redirect_opener()``: a redirect is an error, never
  followed (a 302 to another host would forward the signature or the key there).

Local runs and tests talk to receivers on 127.0.0.1 over plain http. They set
``contracts.Env.ALLOW_LOOPBACK_URLS``; that admits loopback hosts (and http for them
only) and nothing else. The stack never sets it, and anyone who could set it on a
function could change the URL itself.

Standard library only: the CDK settings import it too.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from typing import IO, Any, NoReturn

from spotguard_core.contracts import Env

#: Host names that always mean this machine (besides literal loopback addresses).
LOCAL_HOST_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
_NUMERIC_LABEL = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)")
_TRUE = frozenset({"1", "true", "yes", "on"})

Resolver = Callable[[str], Iterable[str]]


class UnsafeUrlError(ValueError):
    """The URL may not be used for an outbound request (the message says why)."""


def loopback_allowed() -> bool:
    """True only where ``SPOTGUARD_ALLOW_LOOPBACK_URLS`` is set (local runs and tests)."""
    return os.environ.get(Env.ALLOW_LOOPBACK_URLS, "").strip().lower() in _TRUE


def _address_problem(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:  # noqa: PLR0911
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return _address_problem(address.ipv4_mapped)
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local (the instance metadata service lives there)"
    if address.is_multicast:
        return "multicast"
    if address.is_reserved or address.is_unspecified:
        return "reserved"
    if address.is_private:
        return "private"
    if not address.is_global:
        return "not globally routable"
    return None


def _is_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def _system_resolver(host: str) -> list[str]:
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos]


def check_outbound_url(  # noqa: PLR0912 - one branch per rule, in the order of the docstring
    url: str,
    *,
    allow_loopback: bool | None = None,
    resolve: Resolver | None = None,
) -> urllib.parse.SplitResult:
    """The parsed ``url`` if it may be requested; else ``UnsafeUrlError`` saying why.

    ``allow_loopback`` defaults to ``loopback_allowed()``. ``resolve`` (a host → addresses
    function; ``resolve_with_system_dns`` at request time) also checks every address the
    name resolves to; without it only the name and literal addresses are checked (synth
    time, where no DNS is wanted).
    """
    loopback_ok = loopback_allowed() if allow_loopback is None else allow_loopback
    if not isinstance(url, str) or not url or url != url.strip() or any(ord(c) < 0x21 for c in url):
        raise UnsafeUrlError("must be a URL without spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        _ = parts.port  # a non-numeric or out-of-range port raises ValueError here
    except ValueError as exc:
        raise UnsafeUrlError(f"is not a valid URL ({exc})") from None
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise UnsafeUrlError("must not carry user information (user:password@)")
    if not host:
        raise UnsafeUrlError("must name a host")
    host = host.rstrip(".").lower()
    literal = _literal_address(host)
    is_loopback_host = host in LOCAL_HOST_NAMES or host.endswith(".localhost")
    if literal is not None:
        is_loopback_host = _is_loopback(literal)
    if is_loopback_host:
        if not loopback_ok:
            raise UnsafeUrlError(f"must name a public host, not {host} (loopback)")
        if parts.scheme not in ("http", "https"):
            raise UnsafeUrlError("must be an https:// URL")
        return parts
    if parts.scheme != "https":
        raise UnsafeUrlError("must be an https:// URL (requests are only sent over TLS)")
    if literal is not None:
        problem = _address_problem(literal)
        if problem is not None:
            raise UnsafeUrlError(f"must name a public host, not {host} ({problem})")
    elif "." not in host:
        raise UnsafeUrlError(f"must name a public host, not {host} (a single-label name)")
    elif _NUMERIC_LABEL.fullmatch(host.rsplit(".", 1)[-1]):
        # No top-level domain is numeric: "0x7f.1" or "127.1" is an address in another spelling.
        raise UnsafeUrlError(f"must name a public host, not {host} (an address in a non-standard form)")
    if resolve is not None and literal is None:
        try:
            addresses = list(resolve(host))
        except OSError as exc:
            raise UnsafeUrlError(f"host {host} does not resolve ({exc})") from None
        if not addresses:
            raise UnsafeUrlError(f"host {host} does not resolve")
        for text in addresses:
            address = _literal_address(text)
            problem = "unparseable address" if address is None else _address_problem(address)
            if problem is not None:
                raise UnsafeUrlError(f"host {host} resolves to {text} ({problem})")
    return parts


def resolve_with_system_dns(host: str) -> list[str]:
    """Every address the system resolver gives for ``host`` (the request-time check)."""
    return _system_resolver(host)


def require_safe_url(url: str) -> str:
    """``url`` checked for a request now: name, literal addresses and resolved addresses."""
    check_outbound_url(url, resolve=resolve_with_system_dns)
    return url


class RedirectRefusedError(urllib.error.HTTPError):
    """The server answered with a redirect; spotguard never follows one."""


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(  # noqa: PLR0917 - urllib's signature
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> NoReturn:
        raise RedirectRefusedError(req.full_url, code, f"redirect refused (to {newurl})", headers, fp)


def no_redirect_opener() -> urllib.request.OpenerDirector:
    """An opener whose 3xx answers are errors (``RedirectRefusedError``), never followed."""
    return urllib.request.build_opener(_RefuseRedirects())
