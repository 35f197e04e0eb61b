"""A headless Chromium driven over the DevTools protocol, for the HTML report tests.

The protocol runs over a pipe (`--remote-debugging-pipe`: commands on fd 3, replies on fd 4, each
message a JSON object ended by a NUL byte), so no port, no websocket library and no network is needed.
`load(path)` opens a file, waits for its load event, and returns what a person would care about: the
console errors and uncaught exceptions, every request the page made, the number of plots, whether the
page is wider than a phone's screen, a screenshot and a printed PDF.

Run as a script to screenshot a report: `python tests/support/browser.py report.html out.png [width]`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--remote-debugging-pipe")
REQUIRE_ENV = "KVEDGE_REQUIRE_BROWSER"  # .ci/run sets it: a missing browser then fails the test


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageLoad:
    errors: list[str] = field(default_factory=list)  # console errors, uncaught exceptions, failed loads
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    plots: int = 0  # figure.plot elements holding an svg
    figures: int = 0  # figure.plot elements
    overflow_px: int = 0  # how much wider than the viewport the page is
    title: str = ""
    screenshot: bytes = b""
    pdf: bytes = b""


class _Pipe:
    def __init__(self, binary: str, user_dir: str):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def fds() -> None:  # in the child: the protocol's two fds
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={user_dir}", "about:blank"],
                                     pass_fds=(3, 4), preexec_fn=fds,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _recv(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            if time.time() > deadline:
                raise TimeoutError("the browser did not answer in time")
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise EOFError("the browser closed the pipe")
            self._buf += chunk
        msg, _, self._buf = self._buf.partition(b"\0")
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            reply = self._recv(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._recv(deadline))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (OSError, EOFError, TimeoutError, RuntimeError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def _errors(events: list[dict]) -> list[str]:
    out = []
    for e in events:
        p = e.get("params", {})
        if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif e.get("method") == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append("exception: " + d.get("text", "") + " " + d.get("exception", {}).get("description", ""))
        elif e.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            out.append(f"log: {p['entry'].get('text', '')} {p['entry'].get('url', '')}")
        elif e.get("method") == "Network.loadingFailed":
            out.append(f"network: {p.get('errorText', '')}")
    return out


_PROBE = """JSON.stringify({
  figures: document.querySelectorAll('figure.plot').length,
  plots: document.querySelectorAll('figure.plot > svg').length,
  overflow: Math.max(0, document.documentElement.scrollWidth - window.innerWidth),
  title: document.title })"""


def load(path: str | Path, width: int = 1000, height: int = 1400, binary: str | None = None,
         full_page: bool = False, pdf: bool = True) -> PageLoad:
    """Open `path` in headless Chromium at `width` x `height` CSS pixels and report on it."""
    binary = binary or find_chromium()
    if not binary:
        raise FileNotFoundError("no chromium found")
    url = Path(path).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="kvedge-chromium-") as user_dir:
        pipe = _Pipe(binary, user_dir)
        try:
            target = pipe.send("Target.createTarget", {"url": "about:blank"})
            s = pipe.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})["sessionId"]
            for domain in ("Runtime", "Log", "Page", "Network"):
                pipe.send(f"{domain}.enable", session=s)
            pipe.send("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600}, session=s)
            pipe.send("Page.navigate", {"url": url}, session=s)
            pipe.wait_for("Page.loadEventFired")
            probe = json.loads(pipe.send("Runtime.evaluate", {"expression": _PROBE, "returnByValue": True},
                                         session=s)["result"]["value"])
            shot = pipe.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": full_page}, session=s)
            printed = pipe.send("Page.printToPDF", {}, session=s, timeout=120) if pdf else {"data": ""}
            result = PageLoad(
                errors=_errors(pipe.events),
                requests=[e["params"]["request"]["url"] for e in pipe.events
                          if e.get("method") == "Network.requestWillBeSent"],
                plots=probe["plots"], figures=probe["figures"], overflow_px=probe["overflow"], title=probe["title"],
                screenshot=base64.b64decode(shot["data"]), pdf=base64.b64decode(printed["data"]))
        finally:
            pipe.close()
    return result


def browser_or_skip() -> str:
    """The Chromium binary; without one the test is skipped, or fails where REQUIRE_ENV demands a browser."""
    import pytest

    binary = find_chromium()
    if binary:
        return binary
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but no chromium found (apt-get install -y chromium)")
    pytest.skip("no chromium found: apt-get install -y chromium (CI sets KVEDGE_REQUIRE_BROWSER=1)")


if __name__ == "__main__":
    page = load(sys.argv[1], width=int(sys.argv[3]) if len(sys.argv) > 3 else 1000, pdf=False)
    Path(sys.argv[2]).write_bytes(page.screenshot)
    print(f"{page.plots} plots, {len(page.errors)} errors, overflow {page.overflow_px}px -> {sys.argv[2]}")
