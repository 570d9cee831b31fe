"""Structured logs and the loopback status endpoint of vault-proxy.

Logs are one JSON object per line on stderr: ``ts``, ``level``, ``logger``, ``msg``, ``event``
and the event's fields (machine id, session number, counts...). Nothing secret is ever a
field: the API token lives only in the Machines API client's headers.

The status endpoint is plain HTTP on a *loopback* address only (it names machine ids and
client addresses, which are nobody else's business): ``GET /healthz`` (also ``/status``)
answers JSON with the counters, 200 while the machine map is fresh and 503 once the last
successful refresh is older than a few periods (routing may be stale). Requests are read with
a size cap and a timeout, a handful at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("vault-proxy.status")

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
_MAX_REQUEST = 8192
_READ_TIMEOUT = 5.0
_MAX_CLIENTS = 8


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """For a terminal: the message, then the event fields as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(
            f"{k}={v}" for k, v in record.__dict__.items() if k not in _STANDARD and k != "event"
        )
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        text = f"{stamp} {record.levelname.lower():<7} {record.getMessage()}"
        text = f"{text}  {fields}" if fields else text
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure_logging(level: str, fmt: str) -> None:
    import sys

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    from flyvault.redact import install_log_filter

    install_log_filter(root)  # the API token (registered by its client) never reaches a line
    root.setLevel(level.upper())
    # httpx logs every request at INFO, with the URL; the directory logs what matters.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class StatusServer:
    """``report()`` builds the body; ``healthy()`` decides between 200 and 503."""

    def __init__(
        self,
        host: str,
        port: int,
        report: Callable[[], dict[str, Any]],
        healthy: Callable[[], bool],
    ) -> None:
        if not is_loopback(host):
            raise ValueError(f"the status endpoint must listen on a loopback address, not {host}")
        self.host, self.port = host, port
        self._report = report
        self._healthy = healthy
        self._server: asyncio.Server | None = None
        self._active = 0

    async def start(self) -> tuple[str, int]:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, limit=_MAX_REQUEST
        )
        name = self._server.sockets[0].getsockname()
        self.port = name[1]
        return name[0], name[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._active >= _MAX_CLIENTS:
            writer.close()
            return
        self._active += 1
        try:
            status, body = await asyncio.wait_for(self._answer(reader), _READ_TIMEOUT)
            data = json.dumps(body, indent=2, default=str).encode() + b"\n"
            reason = {200: "OK", 503: "Service Unavailable", 404: "Not Found"}.get(
                status, "Bad Request"
            )
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data
            )
            await asyncio.wait_for(writer.drain(), _READ_TIMEOUT)
        except (TimeoutError, OSError, asyncio.LimitOverrunError, asyncio.IncompleteReadError):
            pass
        finally:
            self._active -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
        head = await reader.readuntil(b"\r\n\r\n")
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or parts[0] != b"GET":
            return 400, {"error": "only GET /healthz is served"}
        path = parts[1].split(b"?", 1)[0]
        if path not in (b"/healthz", b"/status", b"/"):
            return 404, {"error": "not found; try /healthz"}
        healthy = self._healthy()
        body = {"ok": healthy, **self._report()}
        return (200 if healthy else 503), body
