"""HTTP stand-ins on 127.0.0.1 for the tests: a request handler class served from a thread.

Webhook receivers, an API Gateway stand-in, a slow CloudWatch and redirecting servers all
start and stop the same way; only their handlers differ.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class QuietHandler(BaseHTTPRequestHandler):
    """A handler that keeps pytest's output free of one access-log line per request."""

    def log_message(self, *args: Any) -> None:
        return


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve ``handler`` on a free loopback port; yield its base URL, ``http://127.0.0.1:PORT``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def redirecting_handler(location: str, calls: list[str]) -> type[QuietHandler]:
    """A handler answering every GET and POST with a 302 to ``location`` + the request path,
    appending each path to ``calls`` (so a test can see that a redirect was not followed)."""

    class Redirect(QuietHandler):
        def _redirect(self) -> None:
            calls.append(self.path)
            self.send_response(302)
            self.send_header("Location", location + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = _redirect
        do_POST = _redirect

    return Redirect
