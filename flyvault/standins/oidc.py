"""A stand-in for Fly's OIDC issuer (``https://oidc.fly.io/<org>``) on loopback.

Fly is not reachable from test and dev machines, yet attestation must be exercised for real:
real HTTP, real RSA signatures, real discovery and JWKS documents. ``OidcIssuer`` serves the
same two documents Fly serves, for any org slug, and signs tokens with keys it owns.

Tests also need to *forge* tokens (other key, ``alg: none``, HS256 keyed with the public key,
missing or unknown ``kid``), which pyjwt deliberately refuses to produce, so ``mint`` builds
the compact JWS itself and only borrows pyjwt's primitive signers.

The HTTP plumbing at the bottom (``_TrackingServerMixin``, ``_BaseHandler``) is shared with
``flyvault.standins.flyapi``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, ClassVar, Self
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import HMACAlgorithm, get_default_algorithms

logger = logging.getLogger("flyvault.standins")

SIGNING_ALGORITHM = "RS256"

# Claims Fly's discovery document advertises; kept so clients that read it see the real shape.
FLY_CLAIMS_SUPPORTED = (
    "sub", "iss", "aud", "exp", "iat", "nbf", "jti",
    "app_id", "app_name", "org_id", "org_name", "machine_id", "machine_name",
    "machine_version", "image", "image_digest", "region",
)  # fmt: skip


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_uint(value: int) -> str:
    return b64url(value.to_bytes((value.bit_length() + 7) // 8 or 1, "big"))


def _compact_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=False).encode("utf-8")


def rsa_thumbprint(public_key: rsa.RSAPublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url)."""
    numbers = public_key.public_numbers()
    # RFC 7638: required members only, lexicographic order, no whitespace.
    canonical = _compact_json(
        {"e": _b64url_uint(numbers.e), "kty": "RSA", "n": _b64url_uint(numbers.n)}
    )
    return b64url(hashlib.sha256(canonical).digest())


class SigningKey:
    """One RSA key of the issuer and its published (public) JWK."""

    def __init__(self, private_key: rsa.RSAPrivateKey, kid: str | None = None) -> None:
        self.private_key = private_key
        # A short thumbprint: stable for the key, unique enough, and shaped like Fly's kids.
        self.kid = kid or rsa_thumbprint(private_key.public_key())[:16]

    @classmethod
    def generate(cls, key_size: int = 2048) -> SigningKey:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=key_size))

    def public_jwk(self) -> dict[str, str]:
        numbers = self.private_key.public_key().public_numbers()
        return {
            "kty": "RSA",
            "use": "sig",
            "alg": SIGNING_ALGORITHM,
            "kid": self.kid,
            "n": _b64url_uint(numbers.n),
            "e": _b64url_uint(numbers.e),
        }

    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def sign_jws(header: Mapping[str, Any], claims: Mapping[str, Any], key: Any, algorithm: str) -> str:
    """Serialise and sign a compact JWS without any of pyjwt's safety checks.

    pyjwt refuses to use a PEM as an HMAC secret (good for production, useless for a
    forger), so HMAC secrets are passed straight to the signer.
    """
    signing_input = f"{b64url(_compact_json(dict(header)))}.{b64url(_compact_json(dict(claims)))}"
    if algorithm == "none":
        return signing_input + "."
    algorithms = get_default_algorithms()
    if algorithm not in algorithms:
        raise ValueError(f"unsupported signing algorithm {algorithm!r}")
    signer = algorithms[algorithm]
    if isinstance(signer, HMACAlgorithm):
        secret = key.encode("utf-8") if isinstance(key, str) else bytes(key)
        signature = signer.sign(signing_input.encode("ascii"), secret)
    else:
        signature = signer.sign(signing_input.encode("ascii"), signer.prepare_key(key))
    return f"{signing_input}.{b64url(signature)}"


class BackgroundServer:
    """The lifecycle both stand-ins share: one socketserver served by a daemon thread,
    started by ``start()`` (or ``with``), stopped by ``stop()``."""

    _lock: threading.Lock
    _server: Any = None
    _thread: threading.Thread | None = None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        self._shutdown()

    def _serve(self, server: Any, name: str) -> None:
        """Call with ``_lock`` held."""
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=name, daemon=True
        )
        self._thread.start()

    def _shutdown(self) -> bool:
        """Stop serving; False if it was not running."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return False
        server.shutdown()
        server.close_all_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        return True

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
    def running(self) -> bool:
        return self._server is not None


class OidcIssuer(BackgroundServer):
    """Fly's OIDC issuer on ``127.0.0.1``: discovery + JWKS for every org, and a token minter.

    ``base_url`` is ``http://127.0.0.1:PORT``; the issuer of org ``o`` is ``{base_url}/o``,
    mirroring ``https://oidc.fly.io/o``. Keys are generated at ``start()``. Thread-safe: the
    HTTP server runs in a daemon thread while tests mint, rotate and inject failures.
    """

    def __init__(self, port: int = 0, *, host: str = "127.0.0.1", key_size: int = 2048) -> None:
        self._host = host
        self._port = port
        self._key_size = key_size
        self._lock = threading.Lock()
        self._keys: list[SigningKey] = []  # published keys; the last one signs by default
        self._server: _IssuerHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._fail_remaining = 0
        self._fail_status = 503
        self._discovery_overrides: dict[str, Any] = {}
        self._discovery_requests = 0
        self._jwks_requests = 0
        self._requests = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        with self._lock:
            if self._server is not None:
                return self
            if not self._keys:
                self._keys.append(SigningKey.generate(self._key_size))
            server = _IssuerHTTPServer((self._host, self._port), _IssuerHandler)
            server.issuer = self
            self._serve(server, f"oidc-issuer-{server.server_address[1]}")
        logger.debug("oidc issuer listening on %s", self.base_url)
        return self

    @property
    def port(self) -> int:
        server = self._server
        if server is None:
            raise RuntimeError("OidcIssuer is not running; call start() first")
        return int(server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def issuer(self, org: str) -> str:
        return f"{self.base_url}/{org}"

    # -- keys ------------------------------------------------------------------------------

    @property
    def current_kid(self) -> str:
        return self._current_key().kid

    @property
    def kids(self) -> list[str]:
        with self._lock:
            return [k.kid for k in self._keys]

    def _current_key(self) -> SigningKey:
        with self._lock:
            if not self._keys:
                raise RuntimeError("OidcIssuer has no keys yet; call start() first")
            return self._keys[-1]

    def _key_by_kid(self, kid: str) -> SigningKey | None:
        with self._lock:
            return next((k for k in self._keys if k.kid == kid), None)

    def private_key(self, kid: str | None = None) -> rsa.RSAPrivateKey:
        key = self._current_key() if kid is None else self._key_by_kid(kid)
        if key is None:
            raise KeyError(kid)
        return key.private_key

    def public_key_pem(self, kid: str | None = None) -> bytes:
        key = self._current_key() if kid is None else self._key_by_kid(kid)
        if key is None:
            raise KeyError(kid)
        return key.public_pem()

    def rotate_key(self) -> str:
        """Add a new signing key; older keys stay published (as Fly does during rotation)."""
        key = SigningKey.generate(self._key_size)
        with self._lock:
            self._keys.append(key)
        return key.kid

    def retire_key(self, kid: str) -> None:
        """Stop publishing a key (the end of a rotation)."""
        with self._lock:
            remaining = [k for k in self._keys if k.kid != kid]
            if len(remaining) == len(self._keys):
                raise KeyError(kid)
            if not remaining:
                raise ValueError("cannot retire the last key")
            self._keys = remaining

    # -- documents -------------------------------------------------------------------------

    def jwks(self) -> dict[str, Any]:
        with self._lock:
            return {"keys": [k.public_jwk() for k in self._keys]}

    def discovery(self, org: str) -> dict[str, Any]:
        issuer = self.issuer(org)
        doc: dict[str, Any] = {
            "issuer": issuer,
            "jwks_uri": f"{issuer}/.well-known/jwks",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [SIGNING_ALGORITHM],
            "scopes_supported": ["openid"],
            "claims_supported": list(FLY_CLAIMS_SUPPORTED),
        }
        with self._lock:
            overrides = dict(self._discovery_overrides)
        for name, value in overrides.items():
            # A callable override gets the org, so a test can point jwks_uri per org.
            doc[name] = value(org) if callable(value) else value
        return doc

    def set_discovery_overrides(
        self, overrides: Mapping[str, Any | Callable[[str], Any]] | None
    ) -> None:
        """Replace fields of every discovery document (e.g. a hostile ``jwks_uri``)."""
        with self._lock:
            self._discovery_overrides = dict(overrides or {})

    # -- minting ---------------------------------------------------------------------------

    def mint(
        self,
        claims: Mapping[str, Any],
        *,
        kid: str | None = None,
        algorithm: str = SIGNING_ALGORITHM,
        key: Any = None,
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """Sign ``claims`` exactly as given (nothing is added or checked).

        - ``kid``: header kid; defaults to the current key's kid. When ``key`` is not given,
          a known ``kid`` signs with that key and an unknown one with the current key.
        - ``key``: override the signing key (an RSA private key or PEM for RS*, a secret
          ``str``/``bytes`` for HS* -- a public-key PEM is accepted on purpose). For HS* the
          default secret is the current public key PEM: the classic key-confusion forgery.
        - ``headers``: merged over the default header; a value of ``None`` removes that
          member, so ``headers={"kid": None}`` mints a token without a kid.
        """
        current = self._current_key()
        header_kid = kid if kid is not None else current.kid
        if key is None:
            named = self._key_by_kid(header_kid)
            signer_key = named or current
            key = signer_key.public_pem() if algorithm.startswith("HS") else signer_key.private_key
        header: dict[str, Any] = {"alg": algorithm, "typ": "JWT", "kid": header_kid}
        header.update(headers or {})
        header = {name: value for name, value in header.items() if value is not None}
        return sign_jws(header, claims, key, algorithm)

    # -- failure injection and counters ----------------------------------------------------

    def fail_next(self, n: int, status: int = 503) -> None:
        """Answer the next ``n`` requests (any path) with ``status``."""
        with self._lock:
            self._fail_remaining = n
            self._fail_status = status

    def _take_failure(self) -> int | None:
        with self._lock:
            if self._fail_remaining <= 0:
                return None
            self._fail_remaining -= 1
            return self._fail_status

    def _count(self, kind: str) -> None:
        with self._lock:
            self._requests += 1
            if kind == "discovery":
                self._discovery_requests += 1
            elif kind == "jwks":
                self._jwks_requests += 1

    @property
    def discovery_requests(self) -> int:
        with self._lock:
            return self._discovery_requests

    @property
    def jwks_requests(self) -> int:
        with self._lock:
            return self._jwks_requests

    @property
    def requests(self) -> int:
        with self._lock:
            return self._requests

    def reset_counters(self) -> None:
        with self._lock:
            self._discovery_requests = self._jwks_requests = self._requests = 0


# -- shared HTTP plumbing ------------------------------------------------------------------


class _TrackingServerMixin:
    """Remembers open connections so ``stop()`` can cut idle keep-alives.

    Without this a handler thread parked on a keep-alive connection would keep answering
    after ``stop()``, and an "issuer down" test would still see a live issuer.
    """

    _conns: set[socket.socket]
    _conns_lock: threading.Lock

    def _track_init(self) -> None:
        self._conns = set()
        self._conns_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)  # type: ignore[misc]

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)  # type: ignore[misc]

    def close_all_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _IssuerHTTPServer(_TrackingServerMixin, ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    issuer: OidcIssuer

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self._track_init()
        super().__init__(address, handler)


class _BaseHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers; every reply has a length
    timeout = 10  # idle keep-alive connections end on their own
    server_version = "flyvault-standin"
    sys_version = ""
    max_body: ClassVar[int] = 64 * 1024

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s: " + format, type(self).__name__, *args)

    def address_string(self) -> str:
        # AF_UNIX peers have no address tuple; the default implementation would crash.
        return str(self.client_address[0]) if self.client_address else "unix"

    def send_body(
        self, status: int, body: bytes, content_type: str, extra: Mapping[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, doc: Any) -> None:
        self.send_body(status, json.dumps(doc).encode("utf-8"), "application/json")

    def read_body(self) -> bytes | None:
        """Read the request body; None (after replying) if it is unusable."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.send_body(411, b"chunked bodies are not supported\n", "text/plain")
            return None
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            self.send_body(400, b"invalid Content-Length\n", "text/plain")
            return None
        if length < 0 or length > self.max_body:
            self.send_body(413, b"request body too large\n", "text/plain")
            self.close_connection = True
            return None
        return self.rfile.read(length)


class _IssuerHandler(_BaseHandler):
    server: _IssuerHTTPServer

    def do_GET(self) -> None:
        issuer = self.server.issuer
        path = urlsplit(self.path).path
        parts = path.split("/")
        # ["", org, ".well-known", doc]; the org must be one non-empty path segment.
        kind = None
        if len(parts) == 4 and parts[0] == "" and parts[1] and parts[2] == ".well-known":
            kind = {"openid-configuration": "discovery", "jwks": "jwks"}.get(parts[3])
        issuer._count(kind or "other")
        status = issuer._take_failure()
        if status is not None:
            self.send_json(status, {"error": "injected failure", "status": status})
            return
        if kind == "discovery":
            self.send_json(200, issuer.discovery(parts[1]))
        elif kind == "jwks":
            self.send_json(200, issuer.jwks())
        else:
            self.send_json(404, {"error": "not found"})

    do_HEAD = do_GET
