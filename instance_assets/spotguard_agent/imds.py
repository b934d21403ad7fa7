"""IMDSv2 client (standard library only).

IMDSv2 only: every read carries a session token from ``PUT /latest/api/token``; there is
no fallback to IMDSv1. The token is refreshed well before its TTL ends, and a 401 (token
expired or revoked, e.g. after the instance was stopped and started) drops it and retries
once with a fresh one. Every request has a short timeout and a bounded number of retries:
IMDS does fail in practice (503 throttling, timeouts, hop limit) and the watcher must
survive that rather than crash.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

LOG = logging.getLogger("spotguard.imds")
DEFAULT_IMDS_URL = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"  # noqa: S105 - a URL path
INSTANCE_ID_PATH = "/latest/meta-data/instance-id"
INSTANCE_TYPE_PATH = "/latest/meta-data/instance-type"
AVAILABILITY_ZONE_PATH = "/latest/meta-data/placement/availability-zone"
SPOT_ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
TARGET_LIFECYCLE_STATE_PATH = "/latest/meta-data/autoscaling/target-lifecycle-state"
MAINTENANCE_SCHEDULED_PATH = "/latest/meta-data/events/maintenance/scheduled"
IDENTITY_DOCUMENT_PATH = "/latest/dynamic/instance-identity/document"


class ImdsError(RuntimeError):
    """IMDS did not answer usefully after the retries (the caller logs and carries on)."""


@dataclass(frozen=True)
class ImdsResponse:
    status: int
    body: str

    @property
    def found(self) -> bool:
        return self.status == 200

    def json(self) -> Any:
        return json.loads(self.body)


class ImdsClient:
    def __init__(
        self,
        base_url: str = DEFAULT_IMDS_URL,
        *,
        token_ttl_seconds: int = 21600,
        timeout_seconds: float = 1.0,
        attempts: int = 3,
        retry_delay_seconds: float = 0.1,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token_ttl_seconds = token_ttl_seconds
        self.timeout_seconds = timeout_seconds
        self.attempts = attempts
        self.retry_delay_seconds = retry_delay_seconds
        self._token: str | None = None
        self._token_refresh_at = 0.0
        self._lock = threading.Lock()
        self.tokens_fetched = 0

    # ------------------------------------------------------------------ token
    def _fetch_token(self) -> str:
        request = urllib.request.Request(  # noqa: S310 - IMDS URL from configuration
            self.base_url + TOKEN_PATH,
            method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": str(self.token_ttl_seconds)},
        )
        with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:  # noqa: S310
            token = response.read().decode().strip()
        if not token:
            raise ImdsError("IMDS returned an empty token")
        self.tokens_fetched += 1
        return token

    def token(self, *, force: bool = False) -> str:
        with self._lock:
            if force or self._token is None or time.monotonic() >= self._token_refresh_at:
                self._token = self._fetch_token()
                # Refresh at 80 % of the TTL (and at least a second early): never send a
                # token that expires in flight.
                lifetime = max(1.0, min(self.token_ttl_seconds * 0.8, self.token_ttl_seconds - 1.0))
                self._token_refresh_at = time.monotonic() + lifetime
            return self._token

    def _drop_token(self) -> None:
        with self._lock:
            self._token = None

    # ------------------------------------------------------------------ reads
    def get(self, path: str) -> ImdsResponse:
        """GET ``path``. 200 and 404 are answers; anything else is retried, then raised."""
        last_error: Exception | None = None
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(self.retry_delay_seconds * attempt)
            try:
                token = self.token()
                request = urllib.request.Request(  # noqa: S310 - IMDS URL from configuration
                    self.base_url + path, headers={"X-aws-ec2-metadata-token": token}
                )
                with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:  # noqa: S310
                    return ImdsResponse(response.status, response.read().decode())
            except urllib.error.HTTPError as error:
                if error.code == 404:
                    return ImdsResponse(404, "")
                if error.code == 401:
                    LOG.info("IMDS answered 401 for %s: fetching a new token", path)
                    self._drop_token()
                last_error = error
            except (OSError, ValueError, ImdsError) as error:  # URLError, timeouts, resets
                last_error = error
        raise ImdsError(f"IMDS GET {path} failed after {self.attempts} attempts: {last_error}")

    def instance_id(self) -> str:
        response = self.get(INSTANCE_ID_PATH)
        if not response.found:
            raise ImdsError("IMDS has no instance-id")
        return response.body.strip()

    def optional_text(self, path: str) -> str | None:
        response = self.get(path)
        return response.body.strip() if response.found else None

    def spot_instance_action(self) -> dict[str, Any] | None:
        """``{"action": "terminate"|"stop"|"hibernate", "time": "...Z"}`` or None."""
        return self._json_or_none(SPOT_ACTION_PATH)

    def rebalance_recommendation(self) -> dict[str, Any] | None:
        """``{"noticeTime": "...Z"}`` or None."""
        return self._json_or_none(REBALANCE_PATH)

    def target_lifecycle_state(self) -> str | None:
        """``InService``, ``Terminated``, … or None outside an ASG."""
        return self.optional_text(TARGET_LIFECYCLE_STATE_PATH)

    def scheduled_maintenance(self) -> list[dict[str, Any]]:
        """``[{"Code", "Description", "EventId", "NotBefore", "NotAfter", "State"}, …]``
        (``[]`` when nothing is scheduled)."""
        response = self.get(MAINTENANCE_SCHEDULED_PATH)
        if not response.found or not response.body.strip():
            return []
        try:
            document = response.json()
        except ValueError as error:
            raise ImdsError(f"IMDS {MAINTENANCE_SCHEDULED_PATH} returned invalid JSON") from error
        if not isinstance(document, list) or not all(isinstance(event, dict) for event in document):
            raise ImdsError(
                f"IMDS {MAINTENANCE_SCHEDULED_PATH} returned {type(document).__name__}, not a list"
            )
        return document

    def _json_or_none(self, path: str) -> dict[str, Any] | None:
        response = self.get(path)
        if not response.found:
            return None
        try:
            document = response.json()
        except ValueError as error:
            raise ImdsError(f"IMDS {path} returned invalid JSON: {response.body[:100]!r}") from error
        if not isinstance(document, dict):
            raise ImdsError(f"IMDS {path} returned {type(document).__name__}, not an object")
        return document
