"""HTTP to a server, on the standard library: one JSON request per call, and a retry loop with
exponential backoff that the caller drives (the dispatcher re-asks a server what it is before it trusts
it again after a failure, so retrying is not hidden in here).

A transport failure (refused or reset connection, timeout), a 5xx, 408 or 429 answer are `Unreachable`:
worth retrying, the server may be restarting or busy. A 4xx answer is returned: the request itself is wrong,
and sending it again will not help.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

RETRYABLE = (408, 429)  # a request timeout or a busy server: worth asking again, like a 5xx
BACKOFF_START = 0.5  # seconds before the first retry; doubled each time
BACKOFF_CAP = 8.0


class Unreachable(Exception):
    """The server did not answer usefully this time (transport error, timeout, 5xx)."""


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any  # parsed JSON, or None when the body is not JSON
    text: str  # the raw body, cut for error messages

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def error_message(self) -> str:
        """The server's own words for a failed request, whatever the API's error shape."""
        b = self.body
        if isinstance(b, dict):
            e = b.get("error", b.get("detail"))
            if isinstance(e, dict):
                e = e.get("message") or e
            if e:
                return str(e)[:300]
        return self.text[:300] or f"HTTP {self.status}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Client:
    """JSON over HTTP to one server. `timeout` bounds each request (connect and every read)."""

    def __init__(self, base_url: str, timeout: float):
        self.base_url, self.timeout = base_url.rstrip("/"), timeout
        host = urlsplit(self.base_url).hostname or ""
        # a proxy from the environment must not carry loopback traffic
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(host) else []
        self._opener = urllib.request.build_opener(*handlers)

    def call(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Reply:
        data = json.dumps(body).encode("utf-8") if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with self._opener.open(req, timeout=timeout or self.timeout) as resp:
                return _reply(resp.status, resp.read())
        except urllib.error.HTTPError as exc:
            try:
                raw = exc.read()
            except (OSError, http.client.HTTPException):
                raw = b""
            if exc.code >= 500 or exc.code in RETRYABLE:
                raise Unreachable(f"HTTP {exc.code} from {self.base_url}{path}: {_reply(exc.code, raw).error_message()}") from None
            return _reply(exc.code, raw)
        except (urllib.error.URLError, OSError, http.client.HTTPException, socket.timeout) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(f"{self.base_url}{path}: {reason}") from None

    def get(self, path: str, timeout: float | None = None) -> Reply:
        return self.call("GET", path, timeout=timeout)

    def post(self, path: str, body: Any, timeout: float | None = None) -> Reply:
        return self.call("POST", path, body, timeout=timeout)


def _reply(status: int, raw: bytes) -> Reply:
    text = raw.decode("utf-8", "replace")
    try:
        body = json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        body = None
    return Reply(status, body, text[:2000])


def backoff() -> Iterator[float]:
    delay = BACKOFF_START
    while True:
        yield delay
        delay = min(BACKOFF_CAP, delay * 2)


def retry(attempt: Callable[[], T], patience: float, between: Callable[[], None] | None = None,
          sleep: Callable[[float], None] = time.sleep) -> tuple[T, int]:
    """Call `attempt` until it does not raise `Unreachable`, waiting with exponential backoff, for at
    most `patience` seconds of failures. `between` runs before each retry; its `Unreachable` counts as a
failed attempt, anything else it raises ends the loop. Returns the
    result and the number of attempts; re-raises the last `Unreachable` once patience runs out."""
    start = time.monotonic()
    delays = backoff()
    attempts = 0
    while True:
        attempts += 1
        try:
            if attempts > 1 and between is not None:
                between()
            return attempt(), attempts
        except Unreachable:
            delay = next(delays)
            if time.monotonic() - start + delay > patience:
                raise
            sleep(delay)
