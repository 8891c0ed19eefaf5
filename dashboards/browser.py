"""Drive headless Chromium over the Chrome DevTools Protocol (CDP): load pages, run JS, take screenshots.

Used by the dashboard's browser tests and to take the screenshots in docs/. It needs only the system
``chromium`` (Debian's package; ``scripts/install_chromium.sh`` installs it) and the ``websockets``
package: no browser download, no chromedriver, so it works offline. One browser process, one page
target attached in "flat" session mode; console errors, uncaught exceptions, failed loads (as Log
entries) and JS dialogs are recorded as ``ConsoleMessage``s so a test can demand there are none.

    with Browser() as b:
        b.goto("http://127.0.0.1:8050/")
        assert not b.errors
        b.screenshot("overview.png")
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_ENV = "TIDE_CHROMIUM"
READY_JS = "document.body && document.body.dataset.ready"  # the dashboard pages set it when rendered


class BrowserError(RuntimeError):
    """Chromium could not be started or a page did not behave; the message says what happened."""


@dataclass(frozen=True)
class ConsoleMessage:
    level: str  # error, warning, exception, dialog, ...
    text: str
    url: str = ""


def find_chromium() -> str | None:
    """$TIDE_CHROMIUM, else the first Chromium/Chrome on PATH."""
    explicit = os.environ.get(CHROMIUM_ENV)
    if explicit:
        return explicit if Path(explicit).exists() else shutil.which(explicit)
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


class Browser:
    """A headless Chromium with one page; use as a context manager so the process always ends."""

    def __init__(self, executable: str | None = None, width: int = 1400, height: int = 900, timeout_s: float = 30.0):
        self.executable = executable or find_chromium()
        if not self.executable:
            raise BrowserError(f"no Chromium found (tried {', '.join(CANDIDATES)} and ${CHROMIUM_ENV}); "
                               "install it with `bash scripts/install_chromium.sh` (apt-get install chromium)")
        self.width, self.height, self.timeout_s = width, height, timeout_s
        self.messages: list[ConsoleMessage] = []
        self._ids = itertools.count(1)
        self._proc: subprocess.Popen | None = None
        self._ws = None
        self._session: str | None = None
        self._profile = Path(tempfile.mkdtemp(prefix="tide-chromium-"))

    # ----------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> Browser:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        from websockets.sync.client import connect

        log = (self._profile / "chromium.log").open("wb")
        self._proc = subprocess.Popen(
            [self.executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
             "--disable-extensions", "--disable-sync", "--mute-audio", "--hide-scrollbars",
             "--disable-features=Translate,MediaRouter", f"--window-size={self.width},{self.height}",
             "--remote-debugging-port=0", f"--user-data-dir={self._profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        log.close()
        # Chromium writes the port it picked and the browser's WebSocket path to this file once listening.
        port_file = self._profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout_s
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                tail = (self._profile / "chromium.log").read_text(errors="replace")[-1500:]
                self.close()
                raise BrowserError(f"{self.executable} did not start (exit code {self._proc.returncode}):\n{tail}")
            time.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        self._ws = connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=self.timeout_s)
        target = self._call("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self._session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                   session=False)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self._call(f"{domain}.enable")
        self._call("Emulation.setDeviceMetricsOverride",
                   {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})

    def close(self) -> None:
        if self._ws is not None:
            try:
                self._ws.close()
            except Exception:  # the browser may already be gone; closing is best effort
                pass
            self._ws = None
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        shutil.rmtree(self._profile, ignore_errors=True)

    # -------------------------------------------------------------------------------- pages

    @property
    def errors(self) -> list[ConsoleMessage]:
        """Everything that would show red in DevTools: console errors, exceptions, failed loads, dialogs."""
        return [m for m in self.messages if m.level in ("error", "exception", "dialog", "assert")]

    def goto(self, url: str, ready_js: str = READY_JS, timeout_s: float | None = None) -> Any:
        """Navigate and wait until ``ready_js`` is truthy; returns its value (the dashboard's: "1" or "error")."""
        result = self._call("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"could not load {url}: {result['errorText']}")
        return self.wait_for(ready_js, timeout_s)

    def wait_for(self, js: str, timeout_s: float | None = None) -> Any:
        """Poll until ``js`` is truthy; errors while a navigation swaps documents count as "not yet"."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        last_error = ""
        while True:
            try:
                value = self.evaluate(js)
                if value:
                    return value
            except BrowserError as exc:
                last_error = f" (last error: {exc})"
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for `{js}` on {self.evaluate('location.href')}{last_error}; "
                                   f"console: {[m.text for m in self.messages[-5:]]}")
            time.sleep(0.05)

    def evaluate(self, js: str) -> Any:
        """The value of a JS expression (promises awaited); a thrown error raises BrowserError."""
        out = self._call("Runtime.evaluate", {"expression": js, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in out:
            details = out["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"JS error in `{js[:120]}`: {text}")
        return out.get("result", {}).get("value")

    def click(self, selector: str) -> None:
        self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                      f"if (!e) throw new Error('no element ' + {json.dumps(selector)}); e.click(); }})()")

    def fill(self, selector: str, value: str) -> None:
        """Set an input's value and fire input + change, as typing would."""
        self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                      f"if (!e) throw new Error('no element ' + {json.dumps(selector)}); e.value = {json.dumps(value)}; "
                      "e.dispatchEvent(new Event('input', {bubbles: true})); "
                      "e.dispatchEvent(new Event('change', {bubbles: true})); })()")

    def screenshot(self, path: str | Path | None = None, full_page: bool = True) -> bytes:
        """PNG of the page (the whole scroll height when ``full_page``, capped at 6000 px)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self._call("Page.getLayoutMetrics")["cssContentSize"]
            height = min(6000, max(self.height, int(size["height"])))
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": self.width, "height": height, "scale": 1})
        png = base64.b64decode(self._call("Page.captureScreenshot", params)["data"])
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_bytes(png)
        return png

    # ------------------------------------------------------------------------------ protocol

    def _call(self, method: str, params: dict | None = None, session: bool = True) -> dict:
        if self._ws is None:
            raise BrowserError("the browser is not running (use `with Browser() as b:`)")
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session and self._session:
            msg["sessionId"] = self._session
        self._ws.send(json.dumps(msg))
        deadline = time.monotonic() + self.timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrowserError(f"no answer from Chromium to {method} within {self.timeout_s:g} s")
            reply = json.loads(self._ws.recv(timeout=remaining))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise BrowserError(f"{method} failed: {reply['error'].get('message')}")
                return reply.get("result", {})
            if "method" in reply:
                self._on_event(reply["method"], reply.get("params", {}))

    def _on_event(self, method: str, p: dict) -> None:
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            self.messages.append(ConsoleMessage(p.get("type", "log"), text))
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            self.messages.append(ConsoleMessage("exception", d.get("exception", {}).get("description") or d.get("text", ""),
                                                d.get("url", "")))
        elif method == "Log.entryAdded":
            e = p.get("entry", {})
            self.messages.append(ConsoleMessage(e.get("level", "info"), e.get("text", ""), e.get("url", "")))
        elif method == "Page.javascriptDialogOpening":
            # A dialog blocks the page; record it (an alert() from data would be an injection) and dismiss it.
            self.messages.append(ConsoleMessage("dialog", p.get("message", "")))
            self._ws.send(json.dumps({"id": next(self._ids), "method": "Page.handleJavaScriptDialog",
                                      "params": {"accept": False}, "sessionId": self._session}))


def main(argv: list[str] | None = None) -> int:
    """python -m dashboards.browser URL OUT.png [--width W --height H]: one screenshot, console errors listed."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("url")
    p.add_argument("out")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=900)
    p.add_argument("--viewport", action="store_true", help="only the first screen, not the whole page")
    a = p.parse_args(argv)
    with Browser(width=a.width, height=a.height) as b:
        state = b.goto(a.url)
        b.screenshot(a.out, full_page=not a.viewport)
        for m in b.errors:
            print(f"{m.level}: {m.text} {m.url}".rstrip())
    print(f"{a.out} ({state})")
    return 1 if state == "error" else 0


if __name__ == "__main__":
    raise SystemExit(main())
