"""Client of the spotguard operations API: SigV4-signed requests (IAM auth).

Requests are signed with botocore's ``SigV4Auth`` for service ``execute-api`` using the
caller's normal AWS credentials (profile, environment, SSO …) and sent with ``urllib``.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from spotguard_core import url_safety

SERVICE = "execute-api"
_REGION_IN_HOST = re.compile(r"\.execute-api\.([a-z0-9-]+)\.amazonaws\.com")


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


@dataclass
class OpsApiClient:
    """``base_url`` is the stage URL printed by ``cdk deploy`` (…/v1/)."""

    base_url: str
    region: str | None = None
    timeout: float = 30.0
    session: Any = None

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        self.session = self.session or boto3.session.Session()
        if self.region is None:
            match = _REGION_IN_HOST.search(urllib.parse.urlsplit(self.base_url).netloc)
            self.region = match.group(1) if match else (self.session.region_name or "us-east-1")

    # ------------------------------------------------------------------ routes
    def health(self) -> dict[str, Any]:
        return self.request("GET", "/health")

    def migration_status(self) -> dict[str, Any]:
        return self.request("GET", "/migration/status")

    def history(self, *, limit: int = 20, offset: int = 0) -> dict[str, Any]:
        return self.request("GET", "/migration/history", query={"limit": limit, "offset": offset})

    def trigger(self, *, dry_run: bool = False, max_migrations: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"dryRun": dry_run}
        if max_migrations is not None:
            body["maxMigrations"] = max_migrations
        return self.request("POST", "/migration/trigger", body=body)

    # ------------------------------------------------------------------ transport
    def request(
        self, method: str, path: str, *, query: dict[str, Any] | None = None, body: Any = None
    ) -> dict[str, Any]:
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        credentials = self.session.get_credentials()
        if credentials is None:
            raise ApiError(
                0, "no AWS credentials found to sign the request (configure a profile or env vars)"
            )
        signed = AWSRequest(method=method, url=url, data=data, headers=headers)
        SigV4Auth(credentials.get_frozen_credentials(), SERVICE, str(self.region)).add_auth(signed)
        request = urllib.request.Request(  # noqa: S310 - operator-supplied API URL
            url, data=data, method=method, headers=dict(signed.headers.items())
        )
        try:
            # Never through a redirect: the SigV4 headers would go along to wherever it points.
            with url_safety.no_redirect_opener().open(request, timeout=self.timeout) as response:
                return dict(json.loads(response.read() or b"{}"))
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                message = str(json.loads(raw).get("message", raw.decode(errors="replace")))
            except ValueError:
                message = raw.decode(errors="replace") or str(exc.reason)
            raise ApiError(exc.code, message) from None
        except urllib.error.URLError as exc:
            raise ApiError(0, f"cannot reach {self.base_url}: {exc.reason}") from None
