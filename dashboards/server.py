"""Serve a built site folder on 127.0.0.1 with the standard library's threaded HTTP server.

The site is static, so serving never touches DuckDB: a pipeline can write the warehouse while the
dashboard is open. Rebuilding swaps the folder in whole; the handler resolves paths per request, so
the next page load shows the new build without restarting the server.
"""

from __future__ import annotations

import functools
import sys
import threading
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HOST = "127.0.0.1"  # never 0.0.0.0: the warehouse is not meant to be published on the network


class _Handler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".json": "application/json", ".js": "text/javascript"}

    def end_headers(self) -> None:
        # JSON and pages change on every build; images never change for a given run and sample id.
        self.send_header("Cache-Control", "max-age=3600" if self.path.startswith("/img/") else "no-cache")
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the stdlib's parameter name)
        pass  # one line per request drowns the terminal; errors still reach the browser


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the browser left the page while an image was in flight: not worth a traceback
        super().handle_error(request, client_address)


@dataclass
class DashboardServer:
    """A running server; ``url`` is where the overview is, ``close()`` stops it."""

    httpd: ThreadingHTTPServer
    thread: threading.Thread | None
    site_dir: Path

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def __enter__(self) -> DashboardServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_server(site_dir: str | Path, port: int = 0) -> DashboardServer:
    """Bind 127.0.0.1:``port`` (0 = any free port) to ``site_dir``; call ``serve_forever`` or ``start``."""
    site = Path(site_dir).resolve()
    if not (site / "index.html").is_file() or not (site / "data" / "site.json").is_file():
        raise FileNotFoundError(f"no dashboard site at {site}: build it first (`tide dashboard --build`)")
    handler = functools.partial(_Handler, directory=str(site))
    try:
        httpd = _Server((HOST, port), handler)
    except OSError as exc:
        raise OSError(f"cannot listen on {HOST}:{port} ({exc.strerror}); pick another --port, or 0 for any free one") from exc
    return DashboardServer(httpd=httpd, thread=None, site_dir=site)


def start(site_dir: str | Path, port: int = 0) -> DashboardServer:
    """Serve in a background thread (tests, notebooks); returns once the socket is listening."""
    server = make_server(site_dir, port)
    server.thread = threading.Thread(target=server.httpd.serve_forever, name="tide-dashboard", daemon=True)
    server.thread.start()
    return server
