"""A stand-in for the Fly Machine API socket ``/.fly/api`` (token endpoint only).

Inside a Fly Machine, ``init`` POSTs ``{"aud": "<hex exporter>"}`` to
``http://localhost/v1/tokens/oidc`` over the unix socket ``/.fly/api`` and gets back a raw
JWT (``text/plain``) signed by ``https://oidc.fly.io/<org>``. ``FlyApiSocket`` answers that
request over a real unix socket with a token from an ``OidcIssuer``, carrying the claim set
Fly puts in machine tokens, so the server code under test runs unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socketserver
import stat
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

from flyvault.standins.oidc import (
    BackgroundServer,
    OidcIssuer,
    _BaseHandler,
    _TrackingServerMixin,
)

logger = logging.getLogger("flyvault.standins")

TOKEN_PATH = "/v1/tokens/oidc"
TOKEN_TTL = 600  # Fly machine tokens live ten minutes

# sun_path is 108 bytes on Linux (104 on macOS); leave room for the NUL.
_MAX_UNIX_PATH = 103

_ADJECTIVES = ("quiet", "bold", "lively", "misty", "ancient", "crimson", "silent", "young")
_NOUNS = ("sun", "river", "forest", "meadow", "thunder", "glade", "frost", "harbor")


def _digest(*parts: str) -> bytes:
    return hashlib.sha256("\0".join(parts).encode("utf-8")).digest()


@dataclass(frozen=True)
class MachineIdentity:
    """Who the stand-in machine is: the values Fly writes into its OIDC tokens."""

    org: str
    app: str
    machine_id: str
    machine_name: str
    app_id: str
    org_id: str
    image: str
    image_digest: str
    region: str

    @classmethod
    def default(
        cls,
        org: str = "personal",
        app: str = "vault-dev",
        *,
        machine_id: str | None = None,
        region: str = "iad",
    ) -> MachineIdentity:
        """Plausible, deterministic values derived from ``org``/``app`` (and ``machine_id``)."""
        base = _digest("fly-vault-standin", org, app)
        # Fly machine ids are 14 lowercase hex digits, e.g. "3d8d9014b32d68".
        mid = machine_id if machine_id is not None else base[:7].hex()
        m = _digest("machine", org, app, mid)
        name = f"{_ADJECTIVES[m[0] % len(_ADJECTIVES)]}-{_NOUNS[m[1] % len(_NOUNS)]}-{m[2]:03d}"
        deployment = _digest("deployment", org, app).hex()[:26].upper()
        return cls(
            org=org,
            app=app,
            machine_id=mid,
            machine_name=name,
            app_id=str(int.from_bytes(base[8:12], "big") % 10_000_000),
            org_id=str(int.from_bytes(base[12:16], "big") % 10_000_000),
            image=f"registry.fly.io/{app}:deployment-{deployment}",
            image_digest="sha256:" + _digest("image", org, app).hex(),
            region=region,
        )


def fly_claims(
    identity: MachineIdentity,
    *,
    issuer: str,
    aud: str,
    now: float | None = None,
    ttl: int = TOKEN_TTL,
) -> dict[str, Any]:
    """The claim set of a Fly machine OIDC token, as a dict ready for ``OidcIssuer.mint``."""
    iat = int(time.time() if now is None else now)
    return {
        "iss": issuer,
        "aud": aud,
        "sub": f"{identity.org}:{identity.app}:{identity.machine_name}",
        "app_name": identity.app,
        "app_id": identity.app_id,
        "org_name": identity.org,
        "org_id": identity.org_id,
        "machine_id": identity.machine_id,
        "machine_name": identity.machine_name,
        "image": identity.image,
        "image_digest": identity.image_digest,
        "region": identity.region,
        "jti": str(uuid.uuid4()),
        "iat": iat,
        "nbf": iat,
        "exp": iat + ttl,
    }


class FlyApiSocket(BackgroundServer):
    """``/.fly/api`` on a unix socket: ``POST /v1/tokens/oidc`` mints a machine token.

    Bad JSON or a missing ``aud`` get 400 with a plain-text reason. ``fail_next`` injects
    errors (500 by default) the way a sick Fly API would. Thread-safe.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        issuer: OidcIssuer,
        identity: MachineIdentity,
        *,
        ttl: int = TOKEN_TTL,
        trailing_newline: bool = True,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.issuer = issuer
        self.identity = identity
        self.ttl = ttl
        self.trailing_newline = trailing_newline
        self._now = now
        self._lock = threading.Lock()
        self._server: _UnixHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._fail_remaining = 0
        self._fail_status = 500
        self._requests = 0
        self._audiences: list[str] = []

    def start(self) -> Self:
        with self._lock:
            if self._server is not None:
                return self
            raw = os.fsencode(self.path)
            if len(raw) > _MAX_UNIX_PATH:
                raise ValueError(
                    f"unix socket path is too long ({len(raw)} bytes, max {_MAX_UNIX_PATH}): "
                    f"{self.path}"
                )
            self._remove_stale_socket()
            server = _UnixHTTPServer(str(self.path), _FlyApiHandler)
            server.api = self
            # Only this user may mint tokens, as only root may reach /.fly/api on a machine.
            os.chmod(self.path, 0o600)
            self._serve(server, f"fly-api-{self.path.name}")
        logger.debug("fly api stand-in listening on %s", self.path)
        return self

    def _remove_stale_socket(self) -> None:
        # Replace a socket left by a crashed run, but never delete anything else (cf. S7).
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise FileExistsError(f"{self.path} exists and is not a socket")
        os.unlink(self.path)

    def stop(self) -> None:
        if self._shutdown():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def fail_next(self, n: int, status: int = 500) -> None:
        with self._lock:
            self._fail_remaining = n
            self._fail_status = status

    @property
    def requests(self) -> int:
        with self._lock:
            return self._requests

    @property
    def audiences(self) -> list[str]:
        """Every ``aud`` a token was minted for, in order."""
        with self._lock:
            return list(self._audiences)

    def mint_token(self, aud: str) -> str:
        """The token the endpoint would return for ``aud`` (without the trailing newline)."""
        claims = fly_claims(
            self.identity,
            issuer=self.issuer.issuer(self.identity.org),
            aud=aud,
            now=self._now(),
            ttl=self.ttl,
        )
        return self.issuer.mint(claims)

    def _begin_request(self) -> int | None:
        with self._lock:
            self._requests += 1
            if self._fail_remaining > 0:
                self._fail_remaining -= 1
                return self._fail_status
            return None

    def _record_audience(self, aud: str) -> None:
        with self._lock:
            self._audiences.append(aud)


class _UnixHTTPServer(_TrackingServerMixin, socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    block_on_close = False
    api: FlyApiSocket

    def __init__(self, path: str, handler: type[_BaseHandler]) -> None:
        self._track_init()
        super().__init__(path, handler)


class _FlyApiHandler(_BaseHandler):
    server: _UnixHTTPServer

    def _text(self, status: int, message: str) -> None:
        self.send_body(status, (message + "\n").encode("utf-8"), "text/plain; charset=utf-8")

    def do_POST(self) -> None:
        api = self.server.api
        failure = api._begin_request()
        body = self.read_body()
        if body is None:
            return
        if failure is not None:
            self._text(failure, f"injected failure (status {failure})")
            return
        if urlsplit(self.path).path != TOKEN_PATH:
            self._text(404, f"not found: {urlsplit(self.path).path}")
            return
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            self._text(400, f"invalid JSON body: {exc}")
            return
        aud = doc.get("aud") if isinstance(doc, dict) else None
        if not isinstance(aud, str) or not aud:
            self._text(400, 'invalid request: body must be a JSON object with a non-empty "aud"')
            return
        try:
            token = api.mint_token(aud)
        except Exception as exc:  # an issuer that is not running must not kill the thread
            logger.warning("fly api stand-in could not mint a token: %s", exc)
            self._text(500, f"token minting failed: {exc}")
            return
        api._record_audience(aud)
        if api.trailing_newline:
            token += "\n"
        self.send_body(200, token.encode("ascii"), "text/plain; charset=utf-8")

    def _method_not_allowed(self) -> None:
        self.server.api._begin_request()
        self._text(405, f"method {self.command} not allowed")

    do_GET = do_PUT = do_DELETE = do_PATCH = _method_not_allowed
