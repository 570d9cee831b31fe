"""A Fly Machines API stand-in on 127.0.0.1, for tests and for trying fly-vault-admin locally.

    with MachinesStandin(token="secret") as api:
        api.base_url            # http://127.0.0.1:PORT, pass as --api-base / FLY_API_BASE
        api.model.push_image("registry.fly.io/app:v2")
        api.fail("POST", r"/machines$", status=503, times=2)
        api.inject("POST", r"/machines$", "reset-after")   # act, then drop the connection
        api.delay("POST", r"/machines$", seconds=5, after=True)   # act, then answer late
        api.requests            # what was asked (never the Authorization header)

Or from a shell, with faults and image behaviour
(``python -m flyvault.standins.machines --help``)::

    python -m flyvault.standins.machines --port 4280 --token dev --app vault-tenants \
        --fault 'POST:/machines/[0-9a-f]+$:reset-after' --crashing-image REF

Fault kinds (``flyvault.standins.machines_faults``): ``500``, ``429`` (with
``Retry-After: 1``), ``409``, ``412``, ``422-echo`` (a 422 whose body echoes the request,
headers included: a test that no secret is printed), ``hang`` (the API acts, then never
answers), ``hang-before`` (it never answers and does not act), ``reset-before`` (the
connection drops before the API acts) and ``reset-after`` (after it acts).

The rules of the API live in ``flyvault.standins.machines_model``; this module is HTTP
plumbing, the bearer-token check and fault injection. It runs a ``ThreadingHTTPServer`` in a
daemon thread so a blocking ``wait`` holds only its own handler thread.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import logging
import re
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

from flyvault.standins.machines_faults import KINDS, Fault, build_fault, echo_message, parse_fault
from flyvault.standins.machines_model import ApiModel

logger = logging.getLogger("flyvault.standins.machines")

_MAX_BODY = 1024 * 1024


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
    # Headers and body go out in two writes: without TCP_NODELAY the client's delayed ACK
    # would add 40 ms to every call.
    disable_nagle_algorithm = True
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

        if url.path.startswith("/_standin/"):
            self._control(url.path, body, record)
            return
        fault = standin._take_fault(self.command, url.path, query, nonce, record)
        if fault is not None and fault.kind == "reset-before":
            self._reset(record)
            return
        if fault is not None and fault.kind == "hang-before":
            self._hang(record)
            return
        if fault is not None and not fault.after and fault.delay:
            time.sleep(fault.delay)
        if fault is not None and fault.status is not None:
            self._fault_reply(fault, record, body)
            return
        status, reply = standin.model.handle(self.command, url.path, query, body, nonce)
        record.status = status
        if fault is not None and fault.kind == "reset-after":
            self._reset(record)
            return
        if fault is not None and fault.kind == "hang":
            self._hang(record)
            return
        if fault is not None and fault.after and fault.delay:
            time.sleep(fault.delay)
        self._reply(status, reply)

    def _fault_reply(self, fault: Fault, record: RecordedRequest, body: Any) -> None:
        assert fault.status is not None
        record.status = fault.status
        extra = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after else None
        message = fault.message or f"injected failure ({fault.status})"
        if fault.kind == "echo":
            headers = {key: value for key, value in self.headers.items()}
            message = echo_message(self.command, self.path, headers, body)
        self._reply(fault.status, {"error": message}, extra)

    def _reset(self, record: RecordedRequest) -> None:
        """Drop the connection without an answer (an RST where the platform allows)."""
        record.status = -1
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.shutdown(socket.SHUT_RDWR)

    def _hang(self, record: RecordedRequest) -> None:
        """Never answer: hold the connection until the client gives up (or the stand-in
        stops). With ``fast_hang`` (in-process tests) answer 504 + ``X-Standin-Hang``
        at once instead, for a test transport to turn into a read timeout."""
        standin = self.server.standin
        record.status = -2
        if standin.fast_hang:
            self._reply(504, {"error": "hang"}, {"X-Standin-Hang": "1"})
            return
        self.close_connection = True
        deadline = time.monotonic() + standin.hang_max
        while not standin._stopping.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                readable, _, _ = select.select([self.connection], [], [], 0.1)
                if readable:
                    return  # the client closed (or wrote again): stop holding
                continue
            return

    def _control(self, path: str, body: Any, record: RecordedRequest) -> None:
        """``POST /_standin/push-image {"ref"}`` and ``POST /_standin/fault {"spec"}``:
        change the stand-in while it runs (rehearsals from a shell)."""
        standin = self.server.standin
        value = body.get("ref") or body.get("spec") if isinstance(body, dict) else None
        if self.command != "POST" or not isinstance(value, str):
            record.status = 400
            self._reply(400, {"error": 'POST a JSON body {"ref": ...} or {"spec": ...}'})
            return
        try:
            if path == "/_standin/push-image":
                reply: dict[str, Any] = {"ref": value, "digest": standin.model.push_image(value)}
            elif path == "/_standin/fault":
                standin.add_fault(parse_fault(value))
                reply = {"spec": value}
            else:
                record.status = 404
                self._reply(404, {"error": "not found"})
                return
        except ValueError as exc:
            record.status = 400
            self._reply(400, {"error": str(exc)})
            return
        record.status = 200
        self._reply(200, reply)

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
        crash_delay: float = 0.05,  # a crashing image exits at once after starting
    ) -> None:
        self.token = token
        self.model = ApiModel(
            apps, transition_delay=transition_delay, max_wait=max_wait, crash_delay=crash_delay
        )
        self.fast_hang = False  # see _Handler._hang
        self.hang_max = 600.0
        self._stopping = threading.Event()
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
        self._stopping.set()
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
        return self.add_fault(fault)

    def inject(
        self,
        method: str | None,
        path: str,
        kind: str,
        *,
        times: int | None = 1,
        skip: int = 0,
        query: dict[str, str] | None = None,
        nonce: bool | None = None,
        after: tuple[str, str, int] | None = None,
    ) -> Fault:
        """A fault of one of the command line's kinds (``flyvault.standins.machines_faults.KINDS``).
        ``nonce``: only requests with (True) or without (False) a lease nonce; ``after``:
        armed once ``count`` requests matching ``(method, path_regex)`` were seen."""
        fault = build_fault(method, path, kind, times=times, skip=skip)
        fault.query, fault.nonce, fault.armed_after = query, nonce, after
        return self.add_fault(fault)

    def add_fault(self, fault: Fault) -> Fault:
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
        return self.add_fault(
            Fault(method, re.compile(path), None, seconds, after, times, skip=skip)
        )

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(
        self,
        method: str,
        path: str,
        query: dict[str, str],
        nonce: str | None,
        current: RecordedRequest | None = None,
    ) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if not fault.matches(method, path, query, nonce):
                    continue
                if not self._armed(fault, current):
                    continue
                if fault.times is None or fault.times > 0:
                    if fault.skip > 0:
                        fault.skip -= 1
                        continue
                    fault.hits += 1
                    if fault.times is not None:
                        fault.times -= 1
                    return fault
        return None

    def _armed(self, fault: Fault, current: RecordedRequest | None) -> bool:
        """Whether ``count`` requests matching ``armed_after`` came *before* this one."""
        if fault.armed_after is None:
            return True
        method, path, count = fault.armed_after
        pattern = re.compile(path)
        seen = sum(
            1
            for r in self._requests
            if r is not current and r.method == method and pattern.search(r.path)
        )
        return seen >= count

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flyvault.standins.machines",
        description="Run a Fly Machines API stand-in on 127.0.0.1 until interrupted, with "
        "optional fault injection and image behaviour (to rehearse a rollout).",
    )
    parser.add_argument("--port", type=int, default=4280)
    parser.add_argument("--token", default="dev", help="bearer token to require")
    parser.add_argument("--app", action="append", default=None, help="app name (repeatable)")
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="METHOD:PATH_REGEX:KIND[:TIMES[:SKIP]]",
        help="inject a fault (repeatable); KIND: " + ", ".join(KINDS),
    )
    parser.add_argument(
        "--crashing-image", action="append", default=[], metavar="REF",
        help="machines on this image (ref or digest) exit at once after starting",
    )  # fmt: skip
    parser.add_argument(
        "--unhealthy-image", action="append", default=[], metavar="REF",
        help="machines on this image start with failing health checks",
    )  # fmt: skip
    parser.add_argument(
        "--stuck-image", action="append", default=[], metavar="REF",
        help="machines on this image never get past 'starting'",
    )  # fmt: skip
    parser.add_argument(
        "--push-image",
        action="append",
        default=[],
        metavar="REF",
        help="push REF to the registry (repeatable; a later push of a tag gives it a new "
        'digest); POST /_standin/push-image {"ref": REF} does the same while running',
    )
    parser.add_argument(
        "--transition-delay", type=float, default=0.05, metavar="SECS",
        help="time per machine state change",
    )  # fmt: skip
    return parser


def standin_from_args(args: argparse.Namespace) -> MachinesStandin:
    """A stand-in (not started) configured by the command line."""
    try:
        faults = [parse_fault(spec) for spec in args.fault]
    except ValueError as exc:
        raise SystemExit(f"python -m flyvault.standins.machines: error: {exc}") from None
    apps = tuple(args.app or ["vault-tenants"])
    standin = MachinesStandin(
        token=args.token, apps=apps, port=args.port, transition_delay=args.transition_delay
    )
    for fault in faults:
        standin.add_fault(fault)
    model = standin.model
    model.crashing_images.update(args.crashing_image)
    model.unhealthy_images.update(args.unhealthy_image)
    model.stuck_images.update(args.stuck_image)
    for ref in args.push_image:
        print(f"pushed {ref} -> {model.push_image(ref)}", flush=True)
    return standin


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with standin_from_args(args) as standin:
        apps = ", ".join(args.app or ["vault-tenants"])
        print(
            f"machines api stand-in on {standin.base_url} (apps: {apps}); Ctrl-C to stop",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
