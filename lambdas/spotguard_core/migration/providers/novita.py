"""Novita GPU cloud provider (the seed's platform), over its public GPU-instance API.

Documented contract (https://novita.ai/docs/api-reference/):

- ``GET  {base}/gpu-instance/openapi/v1/gpu/instances?pageSize=&pageNum=`` lists instances:
  ``{"instances": [...], "total": n}``; ``pageNum`` starts at 1.
- ``POST {base}/gpu-instance/openapi/v1/gpu/instance/migrate`` with ``{"instanceId": id}``
  migrates one (new data on system/local disks is not preserved).
- ``Authorization: Bearer <API key>``, ``Content-Type: application/json``.
- Errors: 400 bad parameters, 401 missing/wrong key, 403, 429 rate limited, 5xx; bodies
  ``{"code": …, "reason": …, "message": …, "metadata": {…}}``.

Eligibility is exactly the seed's: ``status == "exited"`` and ``spotReclaimTime`` not
``"0"`` and ``spotStatus`` present and non-empty.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

from spotguard_core import aws, url_safety
from spotguard_core.contracts import Env
from spotguard_core.migration.models import CandidateInstance, MigrationError, MigrationResult

LIST_PATH = "/gpu-instance/openapi/v1/gpu/instances"
MIGRATE_PATH = "/gpu-instance/openapi/v1/gpu/instance/migrate"
DEFAULT_BASE_URL = "https://api.novita.ai"
PAGE_SIZE = 100
#: Attempts per HTTP call for 429 and 5xx (the job adds its own per-instance retries).
HTTP_ATTEMPTS = 3
HTTP_TIMEOUT_SECONDS = 15.0
MAX_RETRY_AFTER_SECONDS = 10.0


class NovitaApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"Novita API {status} {reason}: {message}")
        self.status = status
        self.reason = reason

    @property
    def retryable(self) -> bool:
        return self.status == 429 or self.status >= 500


def eligibility(instance: Mapping[str, Any]) -> tuple[bool, str]:
    """The seed's rule, with the reason an instance is skipped."""
    status = instance.get("status")
    if status != "exited":
        return False, f"status is {status!r}, not 'exited'"
    reclaim = instance.get("spotReclaimTime")
    if reclaim is None or str(reclaim) == "0":
        return False, "spotReclaimTime is '0' (normal termination)"
    if not instance.get("spotStatus"):
        return False, "spotStatus is empty (not a spot instance)"
    return True, f"spot reclaimed at {reclaim} (spotStatus {instance.get('spotStatus')})"


class NovitaClient:
    """Minimal client of the documented endpoints (standard library HTTP).

    The Bearer key goes only to the configured base URL: https to a public host
    (``url_safety``, checked here and, with DNS, before every request), and a redirect is
    an error (``REDIRECT``), never followed to wherever it points."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = HTTP_TIMEOUT_SECONDS) -> None:
        try:
            url_safety.check_outbound_url(base_url)
        except url_safety.UnsafeUrlError as exc:
            raise ValueError(f"Novita API URL {base_url!r} {exc}") from None
        self._base = base_url.rstrip("/")
        self._key = api_key
        self._timeout = timeout
        self._opener = url_safety.no_redirect_opener()

    def list_instances(self, *, page_size: int = PAGE_SIZE) -> list[dict[str, Any]]:
        instances: list[dict[str, Any]] = []
        page = 1
        while True:
            body = self._request("GET", LIST_PATH, query={"pageSize": page_size, "pageNum": page})
            batch = list(body.get("instances") or [])
            instances.extend(batch)
            total = body.get("total")
            if (
                not batch
                or (total is not None and len(instances) >= int(total))
                or (total is None and len(batch) < page_size)
            ):
                return instances
            page += 1

    def migrate(self, instance_id: str) -> dict[str, Any]:
        return self._request("POST", MIGRATE_PATH, body={"instanceId": instance_id})

    def _request(
        self, method: str, path: str, *, query: Mapping[str, Any] | None = None, body: Any = None
    ) -> dict[str, Any]:
        url = self._base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        try:
            url_safety.require_safe_url(url)
        except url_safety.UnsafeUrlError as exc:
            raise NovitaApiError(0, "UNSAFE_URL", f"Novita API URL {exc}") from None
        data = json.dumps(body).encode() if body is not None else None
        last: NovitaApiError | None = None
        for attempt in range(1, HTTP_ATTEMPTS + 1):
            request = urllib.request.Request(  # noqa: S310 - checked by url_safety above
                url,
                data=data,
                method=method,
                headers={"Authorization": f"Bearer {self._key}", "Content-Type": "application/json"},
            )
            try:
                with self._opener.open(request, timeout=self._timeout) as response:
                    raw = response.read()
                    return dict(json.loads(raw)) if raw.strip() else {}
            except url_safety.RedirectRefusedError as exc:
                raise NovitaApiError(exc.code, "REDIRECT", "redirect refused (never followed)") from None
            except urllib.error.HTTPError as exc:
                last = _api_error(exc)
                # 429 means "not processed": always safe to repeat. A 5xx is repeated only for
                # reads; a failed migrate is retried by the job (which decides how often).
                repeatable = last.status == 429 or (last.retryable and method == "GET")
                if not repeatable or attempt == HTTP_ATTEMPTS:
                    raise last from None
                time.sleep(_retry_after(exc, attempt))
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last = NovitaApiError(503, "NETWORK", str(exc))
                if attempt == HTTP_ATTEMPTS or method != "GET":
                    raise last from None
                time.sleep(0.2 * attempt)
        raise last or NovitaApiError(
            0, "UNKNOWN", "no response"
        )  # pragma: no cover - loop always returns/raises


def _api_error(exc: urllib.error.HTTPError) -> NovitaApiError:
    try:
        payload = json.loads(exc.read() or b"{}")
    except (ValueError, OSError):
        payload = {}
    return NovitaApiError(
        exc.code, str(payload.get("reason") or exc.reason), str(payload.get("message") or "")
    )


def _retry_after(exc: urllib.error.HTTPError, attempt: int) -> float:
    header = exc.headers.get("Retry-After") if exc.headers else None
    try:
        return (
            min(float(header), MAX_RETRY_AFTER_SECONDS) if header is not None else 0.25 * 2 ** (attempt - 1)
        )
    except ValueError:
        return 0.25 * 2 ** (attempt - 1)


def api_key_from_secret(secret_arn: str) -> str:
    """The API key stored in Secrets Manager: the plain secret string, or ``{"apiKey": …}``."""
    value = str(aws.client("secretsmanager").get_secret_value(SecretId=secret_arn)["SecretString"]).strip()
    if value.startswith("{"):
        data = json.loads(value)
        for key in ("apiKey", "api_key", "NOVITA_API_KEY", "key"):
            if data.get(key):
                return str(data[key])
        raise ValueError(f"secret {secret_arn} holds JSON without an apiKey field")
    return value


class NovitaProvider:
    name = "novita"

    def __init__(self, client: NovitaClient) -> None:
        self._client = client

    @classmethod
    def from_environment(cls) -> NovitaProvider:
        secret_arn = os.environ.get(Env.NOVITA_API_KEY_SECRET_ARN)
        if not secret_arn:
            raise RuntimeError(f"provider 'novita' needs {Env.NOVITA_API_KEY_SECRET_ARN.value}")
        base_url = os.environ.get(Env.NOVITA_API_URL) or DEFAULT_BASE_URL
        return cls(NovitaClient(base_url, api_key_from_secret(secret_arn)))

    def list_instances(self) -> list[CandidateInstance]:
        candidates = []
        for raw in self._client.list_instances():
            eligible, reason = eligibility(raw)
            candidates.append(
                CandidateInstance(
                    instance_id=str(raw.get("id")),
                    status=str(raw.get("status")),
                    eligible=eligible,
                    reason=reason,
                    name=raw.get("name"),
                    attributes={"productName": raw.get("productName"), "clusterId": raw.get("clusterId")},
                )
            )
        return candidates

    def migrate(self, instance: CandidateInstance, *, job_id: str, attempt: int) -> MigrationResult:
        try:
            response = self._client.migrate(instance.instance_id)
        except NovitaApiError as exc:
            raise MigrationError(str(exc), retryable=exc.retryable) from None
        # Novita migrates the instance in place (same id) unless the response names another.
        new_id = str(response.get("instanceId") or response.get("id") or instance.instance_id)
        return MigrationResult(
            new_instance_id=new_id,
            status=str(response.get("status") or "migrating"),
            details={"provider": "novita", "attempt": str(attempt)},
        )
