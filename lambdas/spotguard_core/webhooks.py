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

from spotguard_core import contracts

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


def verify(
    secret: str,
    header: str | None,
    body: bytes | str,
    tolerance: int = contracts.WEBHOOK_TOLERANCE_SECONDS,
    now: float | None = None,
) -> int:
    """Check a webhook's signature header against its raw body. Returns the signed timestamp.

    Raises ``SignatureError`` when the header is missing or malformed, no ``v1`` signature
    matches (tampered body, wrong secret) or the timestamp is more than ``tolerance``
    seconds away from ``now`` (a replay).
    """
    if not header:
        raise SignatureError("missing signature header")
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise SignatureError("malformed timestamp") from None
        elif key == SIGNATURE_VERSION:
            signatures.append(value)
    if timestamp is None or not signatures:
        raise SignatureError("malformed signature header")
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise SignatureError(f"timestamp outside the {tolerance} s tolerance (possible replay)")
    expected = compute_signature(secret, timestamp, body)
    if not any(hmac.compare_digest(expected, candidate) for candidate in signatures):
        raise SignatureError("signature does not match the body")
    return timestamp


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
    so receivers can drop duplicates after an SQS redelivery."""
    status: int | None = None
    error: str | None = None
    for attempt in range(1, attempts + 1):
        request = urllib.request.Request(  # noqa: S310 - configured https URL (loopback in tests)
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
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
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
