"""``tenant usage-facts --listen ADDR``: a tiny HTTP/1.1 server for metering adapters.

Routes: ``GET /usage-facts`` (the JSON array, recomputed per request) and ``GET /healthz``
(``ok``). Everything else is 404. Differences from the original, each a fix (reference §5):

- The bearer token is compared in constant time (``hmac.compare_digest`` over the whole
  header value), and every request is checked before routing.
- Without a bearer token the server refuses to listen beyond loopback: usage facts name
  every tenant and machine.
- An API failure answers 502 with a fixed message; the upstream body (which could carry
  details of the account) goes only to our stderr, scrubbed.

It is deliberately small: one request per connection (``Connection: close``), a bounded
request head read with a timeout, no request bodies. A slow or hostile client costs one
coroutine for at most ``HEAD_TIMEOUT`` seconds and ``MAX_HEAD`` bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import signal
from typing import Any

from flyvault.errors import UsageError, VaultError
from flyvault.fly.machines import MachinesClient

from .output import note, warn
from .tenants import collect_usage_facts

MAX_HEAD = 8192
HEAD_TIMEOUT = 10.0


def parse_listen(addr: str, *, bearer_token: str | None) -> tuple[str, int]:
    """``IP:port`` or ``[IPv6]:port``; a literal address only (no hostnames)."""
    host, sep, port_text = addr.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        if not sep:
            raise ValueError(addr)
        ip = ipaddress.ip_address(host)
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise ValueError(port_text)
    except ValueError as exc:
        raise UsageError(
            f"parse listen address '{addr}': expected IP:port, e.g. 127.0.0.1:18083",
            hint="use a literal IP address ([::1]:PORT for IPv6), not a hostname",
        ) from exc
    if not ip.is_loopback and not bearer_token:
        raise UsageError(
            f"refusing to serve usage facts on {addr} without --bearer-token",
            hint="set --bearer-token (or FLY_VAULT_USAGE_BEARER_TOKEN), or listen on 127.0.0.1",
        )
    return str(ip), port


class UsageServer:
    def __init__(
        self, api: MachinesClient, bearer_token: str | None, tenant: str | None = None
    ) -> None:
        self.api = api
        self.tenant = tenant
        self._expected = f"Bearer {bearer_token}".encode() if bearer_token else None

    def authorised(self, headers: dict[str, str]) -> bool:
        if self._expected is None:
            return True
        offered = headers.get("authorization", "").strip().encode()
        return hmac.compare_digest(offered, self._expected)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                return
            status, body, content_type = await self.respond(head)
            await self._send(writer, status, body, content_type)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def respond(self, head: bytes) -> tuple[int, bytes, str | None]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return 400, _json({"error": "bad request"}), "application/json"
        method, target = parts[0], parts[1]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        if not self.authorised(headers):
            return 401, _json({"error": "unauthorized"}), "application/json"
        path = target.split("?", 1)[0]
        if method == "GET" and path == "/healthz":
            return 200, b"ok", "text/plain; charset=utf-8"
        if method == "GET" and path == "/usage-facts":
            try:
                facts = await collect_usage_facts(self.api, self.tenant)
            except VaultError as exc:
                warn(f"usage-facts request failed: {exc.message}")
                return 502, _json({"error": "machines api request failed"}), "application/json"
            return 200, json.dumps(facts, separators=(",", ":")).encode(), "application/json"
        return 404, _json({"error": "not found"}), "application/json"

    @staticmethod
    async def _send(
        writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str | None
    ) -> None:
        reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}.get(
            status, "Bad Gateway"
        )
        head = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body)}", "Connection: close"]
        if content_type:
            head.append(f"Content-Type: {content_type}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


async def serve(
    api: MachinesClient,
    host: str,
    port: int,
    bearer_token: str | None,
    *,
    tenant: str | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Serve until SIGINT/SIGTERM (or ``stop`` is set); announce the address on stderr."""
    app = UsageServer(api, bearer_token, tenant)
    try:
        server = await asyncio.start_server(app.handle, host, port, limit=MAX_HEAD)
    except OSError as exc:
        await api.aclose()
        raise UsageError(f"bind usage-facts listener on {host}:{port}: {exc.strerror}") from exc
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, stop.set)
    bound = server.sockets[0].getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    auth = "bearer token required" if bearer_token else "no auth (loopback only)"
    note(f"serving usage facts on http://{shown}:{bound[1]}/usage-facts and /healthz ({auth})")
    async with server, api:
        await stop.wait()
    return 0
