"""Signed webhooks: signing, the receiver's verification function, and delivery.

Signature header (``contracts.WEBHOOK_SIGNATURE_HEADER``)::

    X-Spotguard-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>

Signing the timestamp together with the body makes a captured request useless after
``contracts.WEBHOOK_TOLERANCE_SECONDS``: receivers call ``verify`` on the *raw* body and
reject old or future timestamps. ``verify`` is the function the documentation gives to
users (it needs only the standard library; copy it as is).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from spotguard_core import contracts, url_safety

SIGNATURE_VERSION = "v1"
#: Attempts per delivery inside one notifier invocation; then SQS redelivers the record.
DELIVERY_ATTEMPTS = 3
DELIVERY_BACKOFF_SECONDS = 0.25
DELIVERY_TIMEOUT_SECONDS = 5.0


class SignatureError(ValueError):
    """The webhook signature is missing, malformed, wrong or too old."""


def _as_bytes(body: bytes | str) -> bytes:
    return body.encode() if isinstance(body, str) else body


def compute_signature(secret: str, timestamp: int, body: bytes | str) -> str:
    message = str(timestamp).encode() + b"." + _as_bytes(body)
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes | str, *, timestamp: int | None = None) -> str:
    """The signature header value for ``body`` at ``timestamp`` (now by default)."""
    moment = int(time.time()) if timestamp is None else int(timestamp)
    return f"t={moment},{SIGNATURE_VERSION}={compute_signature(secret, moment, body)}"


#: Longest header ``verify`` reads (a real one is about 80 characters; rotation adds 68 each).
MAX_HEADER_LENGTH = 1024
#: At most this many ``v1`` signatures (one per secret while a secret is being rotated).
MAX_SIGNATURES = 8
_TIMESTAMP_DIGITS = 10  # unix seconds up to the year 2286; longer is not a timestamp
_HEX = frozenset("0123456789abcdef")


def _parse_header(header: object) -> tuple[int, list[str]]:
    """``(t, [v1 …])`` of a well-formed header, else ``SignatureError``. Strict: ASCII only,
    exactly one ``t`` of at most 10 digits, 1..8 ``v1`` of 64 lowercase hex digits, no empty or
    repeated parts; other well-formed ``key=value`` parts (future versions) are ignored."""
    if not header:
        raise SignatureError("missing signature header")
    if not isinstance(header, str) or len(header) > MAX_HEADER_LENGTH or not header.isascii():
        raise SignatureError("malformed signature header")
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        key, separator, value = part.strip().partition("=")
        if not separator or not key.isalnum() or not value:
            raise SignatureError("malformed signature header")
        if key == "t":
            if timestamp is not None or len(value) > _TIMESTAMP_DIGITS or not value.isdigit():
                raise SignatureError("malformed timestamp")
            timestamp = int(value)
        elif key == SIGNATURE_VERSION:
            if len(value) != 64 or not set(value) <= _HEX or value in signatures:
                raise SignatureError("malformed signature")
            signatures.append(value)
    if timestamp is None or not signatures or len(signatures) > MAX_SIGNATURES:
        raise SignatureError("malformed signature header")
    return timestamp, signatures


def verify(
    secret: str,
    header: str | None,
    body: bytes | str,
    tolerance: int = contracts.WEBHOOK_TOLERANCE_SECONDS,
    now: float | None = None,
) -> int:
    """Check a webhook's signature header against its raw body. Returns the signed timestamp.

    Raises ``SignatureError`` — and never anything else, whatever the header and body — when
    the header is missing or malformed, no ``v1`` signature matches (tampered body, wrong
    secret) or the timestamp is more than ``tolerance`` seconds away from ``now`` (a replay).
    """
    timestamp, signatures = _parse_header(header)
    current = time.time() if now is None else now
    if not abs(current - timestamp) <= tolerance:
        raise SignatureError(f"timestamp outside the {tolerance} s tolerance (possible replay)")
    try:
        expected = compute_signature(secret, timestamp, body)
    except (UnicodeEncodeError, AttributeError, TypeError):
        raise SignatureError("secret or body is not text/bytes") from None
    if not any(hmac.compare_digest(expected, candidate) for candidate in signatures):
        raise SignatureError("signature does not match the body")
    return timestamp


def is_authentic(
    secret: str,
    header: str | None,
    body: bytes | str,
    tolerance: int = contracts.WEBHOOK_TOLERANCE_SECONDS,
    now: float | None = None,
) -> bool:
    """``verify`` as a yes/no answer: True for a current signature over ``body``, False for
    anything else (never an exception)."""
    try:
        verify(secret, header, body, tolerance, now)
    except SignatureError:
        return False
    return True


# ------------------------------------------------------------------------------ payload
def webhook_payload(event: Mapping[str, Any]) -> dict[str, Any]:
    """The webhook body for a spotguard bus event: the seed's shape (``event``,
    ``timestamp``, ``instanceId`` …) — the notification's detail, with the event name and
    time filled in from the envelope when the detail does not carry them."""
    detail = event.get("detail")
    payload: dict[str, Any] = dict(detail) if isinstance(detail, Mapping) else {}
    payload.setdefault("event", str(event.get("detail-type", "")))
    payload.setdefault("timestamp", str(event.get("time", "")))
    payload.setdefault("id", str(event.get("id", "")))
    return payload


# ------------------------------------------------------------------------------ delivery
@dataclass(frozen=True, slots=True)
class DeliveryResult:
    delivered: bool
    attempts: int
    status: int | None
    error: str | None = None


def _retryable(status: int | None) -> bool:
    # Network errors, timeouts, throttling and server errors may pass on another try;
    # other 4xx answers will not (the record is failed at once and ends in the DLQ).
    return status is None or status in (408, 409, 425, 429) or status >= 500


def deliver(
    url: str,
    secret: str,
    *,
    event_name: str,
    delivery_id: str,
    body: bytes,
    attempts: int = DELIVERY_ATTEMPTS,
    backoff: float = DELIVERY_BACKOFF_SECONDS,
    timeout: float = DELIVERY_TIMEOUT_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
) -> DeliveryResult:
    """POST one signed webhook with bounded retries (exponential back-off). A fresh
    signature per attempt keeps the timestamp current; the delivery id stays the same,
    so receivers can drop duplicates after an SQS redelivery.

    Only to a URL ``url_safety`` allows (https, a public host: checked again here, with
    DNS, because the name may have changed since synth) and never through a redirect: a
    3xx answer fails the delivery without a retry."""
    try:
        url_safety.require_safe_url(url)
    except url_safety.UnsafeUrlError as exc:
        return DeliveryResult(delivered=False, attempts=0, status=None, error=f"webhook URL {exc}")
    opener = url_safety.no_redirect_opener()
    status: int | None = None
    error: str | None = None
    for attempt in range(1, attempts + 1):
        request = urllib.request.Request(  # noqa: S310 - checked by url_safety above
            url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "User-Agent": "spotguard-webhook/1",
                contracts.WEBHOOK_SIGNATURE_HEADER: sign(secret, body),
                contracts.WEBHOOK_EVENT_HEADER: event_name,
                contracts.WEBHOOK_ID_HEADER: delivery_id,
            },
        )
        try:
            with opener.open(request, timeout=timeout) as response:
                status = int(response.status)
                return DeliveryResult(delivered=True, attempts=attempt, status=status)
        except urllib.error.HTTPError as exc:
            status, error = exc.code, f"HTTP {exc.code}"
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            status, error = None, f"{type(exc).__name__}: {exc}"
        if not _retryable(status) or attempt == attempts:
            return DeliveryResult(delivered=False, attempts=attempt, status=status, error=error)
        sleep(backoff * 2 ** (attempt - 1))
    return DeliveryResult(delivered=False, attempts=attempts, status=status, error=error)  # pragma: no cover


def encode_body(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True, default=str).encode()
