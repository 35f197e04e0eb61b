"""HTTP to a server, on the standard library: one JSON request per call, and a retry loop with
exponential backoff that the caller drives (the dispatcher re-asks a server what it is before it trusts
it again after a failure, so retrying is not hidden in here).

Every request has a deadline on the monotonic clock, `timeout` seconds from its start, and each of its
steps gets only the time left: connecting (with TLS), sending, and every read of the headers and the
body. A timeout on each read alone would let a server that sends a byte a second hold a request for
ever. kvedge reads at most `MAX_ANSWER` bytes from a server for one request; an answer that declares
more is refused before its body is read, and one that sends more is cut off there.

A transport failure (refused or reset connection), a deadline passed, an answer cut off (the connection
closed before the declared length, or more sent than declared), a 5xx, 408 or 429 answer are
`Unreachable`: worth retrying, the server may be restarting or busy. A 4xx answer is returned: the
request itself is wrong, and sending it again will not help. An answer over `MAX_ANSWER` is a
`ServerError`: asking again would only fetch it again.
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import json
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import urlsplit

from ..errors import ServerError

try:
    import ssl

    _NOTHING_YET: tuple[type[Exception], ...] = (ssl.SSLWantReadError,)  # TLS's "no data" when not blocking
except ImportError:  # a Python without ssl speaks plain HTTP only
    _NOTHING_YET = ()

T = TypeVar("T")

RETRYABLE = (408, 429)  # a request timeout or a busy server: worth asking again, like a 5xx
BACKOFF_START = 0.5  # seconds before the first retry; doubled each time
BACKOFF_CAP = 8.0
# bytes kvedge reads from a server for one request, headers included: the largest answer expected, Ollama's
# with its `context` list of token ids, stays under 1 MB even at a 128k context (docs/server.md)
MAX_ANSWER = 8 * 2**20
CHUNK = 64 * 2**10  # bytes asked for per read of a body


class Unreachable(Exception):
    """The server did not answer usefully this time (transport error, deadline passed, answer cut off, 5xx).
    `what` says what it did, as the rest of a sentence whose subject is the server."""

    def __init__(self, url: str, what: str, reply: Reply | None = None):
        super().__init__(f"server {url} {what}")
        self.url, self.what = url, what
        self.reply = reply  # the answer, where the server gave one (a 5xx, 408 or 429): the caller may read it


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any  # parsed JSON, or None when the body is not JSON
    text: str  # the raw body, cut for error messages

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def error_message(self) -> str:
        """The server's own words for a failed request, whatever the API's error shape, on one line."""
        b = self.body
        if isinstance(b, dict):
            e = b.get("error", b.get("detail"))
            if isinstance(e, dict):
                e = e.get("message") or e
            if e:
                return one_line(str(e))[:300]
        return one_line(self.text)[:300] or f"HTTP {self.status}"


def one_line(text: str) -> str:
    """A server's text fit for a one-line error: whitespace runs as one space, control characters as '?'."""
    return "".join(c if c.isprintable() else "?" for c in " ".join(text.split()))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _TooLong(Exception):
    """The server sent, or declared, more than MAX_ANSWER bytes."""


class _CutOff(Exception):
    """The body ended before its declared length, or went on past it."""


class _Exchange:
    """One request's deadline, and how far the server got with its answer (for the error message)."""

    def __init__(self, seconds: float, until: float | None):
        self.seconds = seconds
        now = time.monotonic()
        self.end = now + seconds if until is None else min(until, now + seconds)
        self.received = 0  # every byte read for this request, headers included
        self.answered = False  # its status line and headers arrived
        self.declared: int | None = None  # the body's Content-Length
        self.body = 0  # bytes of the body read

    def left(self) -> float:
        """Seconds left for the next step; TimeoutError once none are (a zero timeout means non-blocking)."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.end

    def count(self, n: int) -> None:
        self.received += n
        if self.received > MAX_ANSWER:
            raise _TooLong


class _TimedReader(io.RawIOBase):
    """A connection's socket as a file each read of which waits only for the time left, counting what came.
    With `blocking` off a read takes only what has already arrived."""

    def __init__(self, sock: socket.socket, exchange: _Exchange):
        self._sock, self._file, self._exchange = sock, sock.makefile("rb", buffering=0), exchange
        self.blocking = True

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int | None:
        self._sock.settimeout(self._exchange.left() if self.blocking else 0.0)
        try:
            n = self._file.readinto(b)
        except _NOTHING_YET:
            return None
        if n:
            self._exchange.count(n)
        return n

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


class _Socket:
    """The one thing an HTTPResponse asks of its socket, a file to read: here a `_TimedReader`."""

    def __init__(self, sock: socket.socket, exchange: _Exchange):
        self._sock, self._exchange = sock, exchange

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_TimedReader(self._sock, self._exchange))


def _response(exchange: _Exchange, sock: socket.socket, *args, **kwargs) -> http.client.HTTPResponse:
    return http.client.HTTPResponse(_Socket(sock, exchange), *args, **kwargs)


class _Timed:
    """Mixed into an HTTP(S) connection: each step gets only the time left before the request's deadline."""

    def __init__(self, *args, exchange: _Exchange, **kwargs):
        super().__init__(*args, **kwargs)
        self.exchange = exchange
        self.response_class = functools.partial(_response, exchange)

    def connect(self) -> None:
        self.timeout = self.exchange.left()  # Python bounds a connect, and a TLS handshake, as a whole
        super().connect()

    def send(self, data) -> None:
        if self.sock is None:
            self.connect()
        self.sock.settimeout(self.exchange.left())  # and a sendall
        super().send(data)


class _TimedHandler:
    """Mixed into urllib's HTTP(S) handler: its connections are `_Timed` ones on one request's exchange."""

    def __init__(self, exchange: _Exchange):
        super().__init__()
        self.exchange = exchange

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(functools.partial(_TIMED[http_class], exchange=self.exchange), req, **kwargs)


class _TimedHTTP(_Timed, http.client.HTTPConnection):
    pass


class _TimedHTTPHandler(_TimedHandler, urllib.request.HTTPHandler):
    pass


_TIMED: dict[type, type] = {http.client.HTTPConnection: _TimedHTTP}
_HANDLERS: list[type] = [_TimedHTTPHandler]
if hasattr(urllib.request, "HTTPSHandler"):  # a Python with ssl

    class _TimedHTTPS(_Timed, http.client.HTTPSConnection):
        pass

    class _TimedHTTPSHandler(_TimedHandler, urllib.request.HTTPSHandler):
        pass

    _TIMED[http.client.HTTPSConnection] = _TimedHTTPS
    _HANDLERS.append(_TimedHTTPSHandler)


class Client:
    """JSON over HTTP to one server. Each request may take `timeout` seconds in all (connect, headers,
    body); with `until` (a time on the monotonic clock) none ends later, so that the several requests
    that ask a server one thing share one deadline."""

    def __init__(self, base_url: str, timeout: float, until: float | None = None):
        self.base_url, self.timeout, self.until = base_url.rstrip("/"), timeout, until
        host = urlsplit(self.base_url).hostname or ""
        # a proxy from the environment must not carry loopback traffic
        self._proxy = [urllib.request.ProxyHandler({})] if _is_loopback(host) else []

    def call(self, method: str, path: str, body: Any = None) -> Reply:
        ex = _Exchange(self.timeout, self.until)
        try:
            status, raw = self._exchange(method, path, body, ex)
        except _TooLong:
            raise ServerError(f"server {self.base_url} {_too_long(ex, method, path)}") from None
        except (OSError, http.client.HTTPException, _CutOff) as exc:
            raise Unreachable(self.base_url, _failure(exc, ex, method, path)) from None
        reply = _reply(status, raw)
        if status >= 500 or status in RETRYABLE:
            raise Unreachable(self.base_url, f"answered {method} {path} with HTTP {status}: {reply.error_message()}",
                              reply)
        return reply

    def _exchange(self, method: str, path: str, body: Any, ex: _Exchange) -> tuple[int, bytes]:
        data = json.dumps(body).encode("utf-8") if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        opener = urllib.request.build_opener(*self._proxy, *(h(ex) for h in _HANDLERS))
        try:
            resp = opener.open(req, timeout=ex.left())
        except urllib.error.HTTPError as exc:  # a 4xx or 5xx: its body holds the server's reason
            with exc:
                return exc.code, _read_body(exc.fp, ex)
        with resp:
            return resp.status, _read_body(resp, ex)

    def get(self, path: str) -> Reply:
        return self.call("GET", path)

    def post(self, path: str, body: Any) -> Reply:
        return self.call("POST", path, body)


def _read_body(resp: http.client.HTTPResponse, ex: _Exchange) -> bytes:
    """The body, a chunk per read (each with the time left); `_TooLong` unread when it declares more
    than MAX_ANSWER, `_CutOff` when it ends short of its declared length or goes on past it."""
    ex.answered, ex.declared = True, resp.length  # http.client's Content-Length: None if chunked or absent
    if ex.declared is not None and ex.declared > MAX_ANSWER:
        raise _TooLong
    chunks = []
    while chunk := resp.read1(CHUNK):
        chunks.append(chunk)
        ex.body += len(chunk)
    if ex.declared is not None and (ex.body < ex.declared or _sent_more(resp)):
        raise _CutOff
    return b"".join(chunks)


def _sent_more(resp: http.client.HTTPResponse) -> bool:
    """Whether bytes past the declared length have arrived, looking only at what is already there (a
    server that keeps the connection open sends nothing more, and must not be waited for)."""
    if resp.fp is None:
        return False
    resp.fp.raw.blocking = False
    try:
        return bool(resp.fp.peek(1))
    except OSError:
        return False


def _failure(exc: BaseException, ex: _Exchange, method: str, path: str) -> str:
    """What the server did, for a request that ended in `exc`."""
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, TimeoutError) or ex.expired:
        if not ex.answered:
            return f"sent no answer to {method} {path} within the {ex.seconds:g} s deadline"
        return f"sent its answer too slowly: the {ex.seconds:g} s deadline passed after {ex.body} bytes of {path}"
    if not ex.answered:
        return f"did not answer {method} {path} ({one_line(str(reason)) or type(reason).__name__})"
    if ex.declared is None:
        return f"broke off its answer to {path} after {ex.body} bytes"
    if ex.body < ex.declared:
        return f"closed the connection after {ex.body} of the {ex.declared} bytes it declared for {path}"
    return f"sent more than the {ex.declared} bytes it declared for {path}"


def _too_long(ex: _Exchange, method: str, path: str) -> str:
    cap = f"kvedge reads at most {MAX_ANSWER // 2**20} MiB of an answer"
    if ex.declared is not None and ex.declared > MAX_ANSWER:
        return f"declared a {ex.declared}-byte answer to {method} {path}: {cap}"
    return f"sent more than {MAX_ANSWER // 2**20} MiB for {method} {path}: {cap}"


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
    failed attempt, anything else it raises ends the loop. Returns the result and the number of attempts;
    re-raises the last `Unreachable` once patience runs out. A retry's backoff ends within `patience` of
    the start, so with `between` and `attempt` each bounded by a deadline of T seconds the loop ends within
    patience + 2 T."""
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
