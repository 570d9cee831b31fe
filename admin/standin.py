"""A Fly Machines API stand-in on 127.0.0.1, for tests and for trying fly-vault-admin locally.

    with MachinesStandin(token="secret") as api:
        api.base_url            # http://127.0.0.1:PORT, pass as --api-base / FLY_API_BASE
        api.model.push_image("registry.fly.io/app:v2")
        api.fail("POST", r"/machines$", status=503, times=2)
        api.delay("POST", r"/machines$", seconds=5, after=True)   # act, then answer late
        api.requests            # what was asked (never the Authorization header)

Or from a shell: ``python -m admin.standin --port 4280 --token dev --app vault-tenants``.

The rules of the API live in ``admin.standin_model``; this module is HTTP plumbing, the
bearer-token check and fault injection. It runs a ``ThreadingHTTPServer`` in a daemon thread
so a blocking ``wait`` holds only its own handler thread.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

from admin.standin_model import ApiModel

logger = logging.getLogger("admin.standin")

_MAX_BODY = 1024 * 1024


@dataclass
class Fault:
    """An injected misbehaviour for requests matching ``method`` and ``path`` (a regex)."""

    method: str | None
    path: re.Pattern[str]
    status: int | None = None
    delay: float = 0.0
    after: bool = False  # delay the answer *after* acting (the client sees a timeout)
    times: int | None = 1  # None: forever
    message: str | None = None
    retry_after: float | None = None
    skip: int = 0  # let this many matching requests through first
    query: dict[str, str] | None = None  # these query parameters must match too
    hits: int = 0

    def matches(self, method: str, path: str, query: dict[str, str]) -> bool:
        if self.method is not None and self.method != method:
            return False
        if self.query and any(query.get(k) != v for k, v in self.query.items()):
            return False
        return bool(self.path.search(path))


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    nonce: str | None
    status: int = 0
    at: float = field(default_factory=time.monotonic)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    standin: MachinesStandin

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_all(self) -> None:
        # Idle keep-alive connections would otherwise keep a "stopped" stand-in answering.
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "machines-standin"
    sys_version = ""
    timeout = 30
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug(format, *args)

    def _reply(self, status: int, body: Any, extra: dict[str, str] | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        try:
            self.send_response(status)
            if body is not None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True  # the client gave up (e.g. its timeout fired)

    def _handle(self) -> None:
        standin = self.server.standin
        url = urlsplit(self.path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self._reply(413, {"error": "request body too large"})
            return
        raw = self.rfile.read(length) if length else b""
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                self._reply(400, {"error": "request body is not JSON"})
                return
        nonce = self.headers.get("fly-machine-lease-nonce")
        record = RecordedRequest(self.command, url.path, query, body, nonce)
        standin._record(record)

        if standin.token is not None:
            offered = self.headers.get("Authorization", "")
            expected = f"Bearer {standin.token}"
            if not hmac.compare_digest(offered.encode(), expected.encode()):
                record.status = 401
                self._reply(401, {"error": "Authenticate: token validation error"})
                return

        fault = standin._take_fault(self.command, url.path, query)
        if fault is not None and not fault.after and fault.delay:
            time.sleep(fault.delay)
        if fault is not None and fault.status is not None:
            record.status = fault.status
            extra = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after else None
            message = fault.message or f"injected failure ({fault.status})"
            self._reply(fault.status, {"error": message}, extra)
            return
        status, reply = standin.model.handle(self.command, url.path, query, body, nonce)
        record.status = status
        if fault is not None and fault.after and fault.delay:
            time.sleep(fault.delay)
        self._reply(status, reply)

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle


class MachinesStandin:
    """The stand-in server. ``model`` is the live state; ``requests`` the request log."""

    def __init__(
        self,
        *,
        token: str | None = "standin-token",
        apps: tuple[str, ...] = ("vault-tenants",),
        host: str = "127.0.0.1",
        port: int = 0,
        transition_delay: float = 0.05,
        max_wait: int = 60,
    ) -> None:
        self.token = token
        self.model = ApiModel(apps, transition_delay=transition_delay, max_wait=max_wait)
        self._address = (host, port)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._requests: list[RecordedRequest] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        server = _Server(self._address, _Handler)
        server.standin = self
        self._server = server
        # A short poll interval keeps stop() (and so every test teardown) fast.
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="machines-standin", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.close_all()
            self._server.server_close()
            self._server = None
        with self.model.lock:
            self.model.changed.notify_all()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("stand-in not running")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- fault injection ---------------------------------------------------------------------

    def fail(
        self,
        method: str | None,
        path: str,
        *,
        status: int,
        times: int | None = 1,
        message: str | None = None,
        retry_after: float | None = None,
        delay: float = 0.0,
        skip: int = 0,
        query: dict[str, str] | None = None,
    ) -> Fault:
        """Answer matching requests with ``status`` (``times`` times; None = forever),
        after letting the first ``skip`` of them through."""
        fault = Fault(
            method, re.compile(path), status, delay, False, times, message, retry_after, skip, query
        )
        with self._lock:
            self._faults.append(fault)
        return fault

    def delay(
        self,
        method: str | None,
        path: str,
        *,
        seconds: float,
        after: bool = False,
        times: int | None = 1,
        skip: int = 0,
    ) -> Fault:
        """Hold matching requests ``seconds`` before acting, or after acting (``after``)."""
        fault = Fault(method, re.compile(path), None, seconds, after, times, skip=skip)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, method: str, path: str, query: dict[str, str]) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path, query) and (fault.times is None or fault.times > 0):
                    if fault.skip > 0:
                        fault.skip -= 1
                        continue
                    fault.hits += 1
                    if fault.times is not None:
                        fault.times -= 1
                    return fault
        return None

    # -- request log -------------------------------------------------------------------------

    def _record(self, record: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(record)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def calls(self, method: str, path_regex: str) -> list[RecordedRequest]:
        pattern = re.compile(path_regex)
        return [r for r in self.requests if r.method == method and pattern.search(r.path)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m admin.standin",
        description="Run a Fly Machines API stand-in on 127.0.0.1 until interrupted.",
    )
    parser.add_argument("--port", type=int, default=4280)
    parser.add_argument("--token", default="dev", help="bearer token to require")
    parser.add_argument("--app", action="append", default=None, help="app name (repeatable)")
    args = parser.parse_args(argv)
    apps = tuple(args.app or ["vault-tenants"])
    with MachinesStandin(token=args.token, apps=apps, port=args.port) as standin:
        print(
            f"machines api stand-in on {standin.base_url} (apps: {', '.join(apps)}); "
            "Ctrl-C to stop",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
