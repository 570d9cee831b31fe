"""Streamable HTTP on loopback, behind a bearer token.

The MCP server can run commands on the user's vaults, so an HTTP listener is a remote
shell for whoever can reach it. Hence: loopback addresses only (a non-loopback bind is
refused, not warned about), a bearer token on every request (compared in constant time
over SHA-256 digests, so neither its bytes nor its length leak through timing), DNS
rebinding protection (Host and Origin must be loopback), and the token never appears in a
log line or a result (it is registered with the scrubber as well).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import os
import socket
import stat
import sys
from pathlib import Path
from typing import Any

from mcp.server.transport_security import TransportSecuritySettings

from flyvault.config import parse_address
from flyvault.errors import ConfigError, UsageError
from flyvault.redact import register

log = logging.getLogger("mcp_server")

DEFAULT_TOKEN_ENV = "FLY_VAULT_MCP_TOKEN"
MIN_TOKEN_LENGTH = 16
MCP_PATH = "/mcp"


def parse_loopback(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` on a loopback address; anything else is refused."""
    try:
        host, port = parse_address(addr, allow_any_port=True)
    except ConfigError as exc:
        raise UsageError(f"--http: {exc.message}") from None
    loopback = host == "localhost"
    with contextlib.suppress(ValueError):
        loopback = loopback or ipaddress.ip_address(host).is_loopback
    if not loopback:
        raise UsageError(
            f"--http {addr}: refusing to listen on a non-loopback address ({host}); the MCP "
            "server runs commands on your vaults",
            hint="use 127.0.0.1:PORT (or [::1]:PORT); reach it from elsewhere through an SSH "
            "tunnel if you must",
        )
    return host, port


def load_token(token_file: str | None, token_env: str) -> str:
    if token_file:
        path = Path(token_file).expanduser()
        try:
            info = path.stat()
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UsageError(f"--token-file {path}: {exc.strerror}") from None
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("token file %s is readable by other users; chmod 600 it", path)
        where = f"--token-file {path}"
    else:
        token = (os.environ.get(token_env) or "").strip()
        where = f"${token_env}"
    register(token)  # before anything can print it
    if not token:
        raise UsageError(
            f"--http needs a bearer token: {where} is empty or not set",
            hint=f"generate one, e.g. `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`, "
            f"and pass it in {token_env} or with --token-file PATH (mode 600)",
        )
    if len(token) < MIN_TOKEN_LENGTH:
        raise UsageError(
            f"the bearer token from {where} is shorter than {MIN_TOKEN_LENGTH} characters"
        )
    return token


class BearerAuth:
    """ASGI middleware: every HTTP request needs ``Authorization: Bearer <token>``."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self._digest = hashlib.sha256(token.encode()).digest()

    def _authorized(self, scope: dict[str, Any]) -> bool:
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                scheme, _, credential = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    return False
                digest = hashlib.sha256(credential.strip()).digest()
                return hmac.compare_digest(digest, self._digest)
        return False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not self._authorized(scope):
            body = b'{"error":"unauthorized: a valid bearer token is required"}'
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"www-authenticate", b'Bearer realm="fly-vault-mcp"'),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def security_settings(host: str) -> TransportSecuritySettings:
    hosts = ["127.0.0.1:*", "localhost:*", "[::1]:*"]
    shown = f"[{host}]" if ":" in host else host
    if f"{shown}:*" not in hosts:
        hosts.append(f"{shown}:*")
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=hosts,
        allowed_origins=[f"http://{h}" for h in hosts],
    )


def build_app(server: Any, host: str, token: str) -> Any:
    app = server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        transport_security=security_settings(host),
        host=host,
    )
    return BearerAuth(app, token)


def _bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to the --http address (uvicorn listens on it)."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise UsageError(f"--http {shown}: cannot listen there: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UsageError(
            f"--http {shown}: cannot listen there: {exc.strerror or exc}",
            hint="pick another port, or port 0 for any free one",
        ) from None
    return sock


async def serve(server: Any, host: str, port: int, token: str) -> None:
    import uvicorn

    config = uvicorn.Config(
        build_app(server, host, token),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
    http = uvicorn.Server(config)
    # Bound here, not by uvicorn: a port in use is then a usage error, not uvicorn's exit.
    listener = _bind(host, port)
    task = asyncio.ensure_future(http.serve(sockets=[listener]))
    while not http.started and not task.done():
        await asyncio.sleep(0.05)
    if http.started:
        sockets = [s for srv in http.servers for s in srv.sockets]
        bound = sockets[0].getsockname()[1] if sockets else port
        shown = f"[{host}]" if ":" in host else host
        print(
            f"fly-vault-mcp: listening on http://{shown}:{bound}{MCP_PATH}",
            file=sys.stderr,
            flush=True,
        )
    await task
