"""Client-side attestation: prove the server is the expected Fly machine before trusting it.

Theory of operation. The server relays a JWT that Fly's OIDC issuer
(``https://oidc.fly.io/<org>``) minted for it with ``aud`` = the hex TLS exporter of *this*
connection. ``AttestationVerifier.verify`` checks, in order: the header (alg exactly RS256,
a ``kid``), the signature with that key from the issuer's JWKS, the registered claims (iss,
aud, exp/nbf/iat with 60 s leeway), then Fly's claims (``app_name``, and ``machine_id``
whenever the config names one). Every failure is an ``AttestationError`` with a hint; the
access token must only be sent after ``verify`` returned.

``JwksCache`` keeps discovery + JWKS per issuer in memory and in the cache file, so a
verification usually costs no network round trip. It saves round trips only: the signature
and the channel binding are checked on every connection (the original skipped both on a
fingerprint-cache hit, flaw S1).

``AttestationCache`` is the fingerprint cache file. It records what was verified, for
information (``doctor`` can say "seen before"); nothing in it can make a check be skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from jwt.algorithms import RSAAlgorithm

from flyvault.errors import AttestationError, ConfigError, ConnectError, Timeout
from flyvault.paths import cache_dir

logger = logging.getLogger("flyvault.attest")

_T = TypeVar("_T")

FLY_OIDC_BASE = "https://oidc.fly.io"
ALGORITHM = "RS256"
LEEWAY = 60.0  # seconds; jsonwebtoken's default, which the original relied on
CACHE_FILE_NAME = "attestation-cache-v1.json"
CACHE_VERSION = 1

_MAX_TOKEN_CHARS = 16 * 1024  # Fly tokens are ~1.2 KB; refuse absurd input before parsing
_MAX_DOC_BYTES = 1024 * 1024  # cap discovery/JWKS bodies: a hostile issuer must not OOM us
_MAX_REDIRECTS = 3
_MIN_RSA_BITS = 2048
_ORG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")

_HINT_FORGED = (
    "the server's token was not issued by Fly for this org: do not trust this server; "
    "if it persists on a network you trust, report it"
)
_HINT_CLOCK = (
    "check this computer's clock (and the server's): fly-vault allows 60 s of skew; "
    "on Linux `timedatectl status`, on macOS `sntp -sS time.apple.com`"
)


def _show(value: object, limit: int = 80) -> str:
    """Render an untrusted value for an error message: printable, bounded, never huge."""
    text = value if isinstance(value, str) and value.isprintable() else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return (url.scheme, url.host, url.port or default)


def _origin_text(url: str) -> str:
    u = httpx.URL(url)
    return f"{u.scheme}://{u.netloc.decode('ascii', 'replace')}"


# -- claims --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttestationClaims:
    """What a verified token says about the server. Contains no secrets."""

    issuer: str
    app_name: str
    machine_id: str
    org_name: str | None
    machine_name: str | None
    region: str | None
    image: str | None
    image_digest: str | None
    issued_at: int | None
    expires_at: int


# -- cache file ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheEntry:
    """A server that passed full verification: ``(org, app, machine_id, fingerprint)``."""

    org: str
    app: str
    machine_id: str
    fingerprint: str
    verified_at: int
    last_seen_at: int


@dataclass(frozen=True)
class JwksRecord:
    """An issuer's JWKS as fetched, with where and when it came from."""

    jwks_uri: str
    keys: tuple[dict[str, Any], ...]
    fetched_at: float


class _CorruptCache(ValueError):
    pass


@dataclass
class _CacheDoc:
    entries: list[CacheEntry]
    jwks: dict[str, JwksRecord]


def _parse_cache(raw: bytes) -> _CacheDoc:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _CorruptCache(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _CorruptCache("top level is not an object")
    # The original wrote no "version"; its entries have the same shape, so accept them.
    version = doc.get("version", CACHE_VERSION)
    if version != CACHE_VERSION:
        raise _CorruptCache(f"unsupported version {_show(version)}")
    raw_entries = doc.get("entries", [])
    raw_jwks = doc.get("jwks", {})
    if not isinstance(raw_entries, list) or not isinstance(raw_jwks, dict):
        raise _CorruptCache("entries/jwks have the wrong type")
    entries: list[CacheEntry] = []
    for item in raw_entries:
        # One bad entry (hand edit, older bug) should not cost the others.
        try:
            entry = CacheEntry(
                org=item["org"],
                app=item["app"],
                machine_id=item["machine_id"],
                fingerprint=item["fingerprint"],
                verified_at=int(item["verified_at"]),
                last_seen_at=int(item["last_seen_at"]),
            )
        except (KeyError, TypeError, ValueError, OverflowError):
            continue
        if all(isinstance(v, str) for v in (entry.org, entry.app, entry.machine_id)) and (
            isinstance(entry.fingerprint, str)
        ):
            entries.append(entry)
    jwks: dict[str, JwksRecord] = {}
    for issuer, item in raw_jwks.items():
        try:
            keys = item["keys"]
            record = JwksRecord(
                jwks_uri=str(item["jwks_uri"]),
                keys=tuple(k for k in keys if isinstance(k, dict)),
                fetched_at=float(item["fetched_at"]),
            )
        except (KeyError, TypeError, ValueError):
            continue
        if isinstance(keys, list) and math.isfinite(record.fetched_at):
            jwks[issuer] = record
    return _CacheDoc(entries, jwks)


def _serialise_cache(doc: _CacheDoc) -> bytes:
    out = {
        "version": CACHE_VERSION,
        "entries": [asdict(e) for e in doc.entries],
        "jwks": {
            issuer: {"jwks_uri": r.jwks_uri, "keys": list(r.keys), "fetched_at": r.fetched_at}
            for issuer, r in doc.jwks.items()
        },
    }
    return (json.dumps(out, indent=2) + "\n").encode("utf-8")


def _keep_newest(items: list[_T], limit: int, key: Callable[[_T], float]) -> list[_T]:
    """Drop the oldest items beyond ``limit``, keeping file order for the rest."""
    if len(items) <= limit:
        return items
    ranked = sorted(range(len(items)), key=lambda i: (key(items[i]), i), reverse=True)
    keep = set(ranked[:limit])
    return [item for i, item in enumerate(items) if i in keep]


class AttestationCache:
    """The attestation cache file: fingerprints of verified servers, and JWKS per issuer.

    Reads need no lock (writes replace the file atomically). Every write is a
    read-modify-write under ``fcntl.flock`` on a sibling ``.lock`` file: concurrent clients
    no longer overwrite each other's entries, and a crash cannot leave a stale lock because
    the kernel drops flock locks with the process (flaw B6). The lock file itself is never
    deleted: unlinking a flock file lets two processes lock different inodes.

    Failures to read or write are warnings, never errors: the cache only saves work.
    """

    def __init__(
        self,
        path: Path | None = None,
        *,
        max_entries: int = 256,
        max_issuers: int = 32,
        lock_timeout: float = 5.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path) if path is not None else cache_dir() / CACHE_FILE_NAME
        self.lock_path = self.path.with_suffix(".lock")
        self.max_entries = max_entries
        self.max_issuers = max_issuers
        self.lock_timeout = lock_timeout
        self._now = now

    # -- reading ---------------------------------------------------------------------------

    def _read(self) -> _CacheDoc:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return _CacheDoc([], {})
        except OSError as exc:
            logger.warning("cannot read attestation cache %s: %s", self.path, exc)
            return _CacheDoc([], {})
        try:
            return _parse_cache(raw)
        except _CorruptCache as exc:
            logger.warning(
                "attestation cache %s is corrupt (%s); ignoring it, it will be rebuilt",
                self.path,
                exc,
            )
            return _CacheDoc([], {})

    def entries(self) -> list[CacheEntry]:
        return self._read().entries

    def lookup(
        self, org: str, app: str, machine_id: str | None, fingerprint: str
    ) -> CacheEntry | None:
        """The entry recorded for this server, if any -- for display only.

        ``machine_id=None`` matches any machine. A hit means "this certificate passed full
        verification before"; it is not a reason to verify less.
        """
        fingerprint = fingerprint.lower()
        for entry in self._read().entries:
            if (
                entry.org == org
                and entry.app == app
                and entry.fingerprint == fingerprint
                and (machine_id is None or entry.machine_id == machine_id)
            ):
                return entry
        return None

    def load_jwks(self, issuer: str) -> JwksRecord | None:
        return self._read().jwks.get(issuer)

    # -- writing ---------------------------------------------------------------------------

    def record(self, org: str, app: str, machine_id: str, fingerprint: str) -> bool:
        """Record a server that just passed full verification. True if it was persisted.

        ``fingerprint`` is the lowercase hex SHA-256 of the server's leaf certificate.
        """
        fingerprint = fingerprint.lower()
        if not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
            raise ValueError("fingerprint must be 64 hex digits (SHA-256 of the leaf DER)")
        now = int(self._now())

        def update(doc: _CacheDoc) -> None:
            key = (org, app, machine_id, fingerprint)
            for i, e in enumerate(doc.entries):
                if (e.org, e.app, e.machine_id, e.fingerprint) == key:
                    doc.entries[i] = CacheEntry(*key, verified_at=now, last_seen_at=now)
                    break
            else:
                doc.entries.append(CacheEntry(*key, verified_at=now, last_seen_at=now))
            doc.entries = _keep_newest(doc.entries, self.max_entries, lambda e: e.last_seen_at)

        return self._modify(update)

    def store_jwks(self, issuer: str, record: JwksRecord) -> bool:
        def update(doc: _CacheDoc) -> None:
            doc.jwks[issuer] = record
            if len(doc.jwks) > self.max_issuers:
                kept = _keep_newest(
                    list(doc.jwks.items()), self.max_issuers, lambda i: i[1].fetched_at
                )
                doc.jwks = dict(kept)

        return self._modify(update)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            # Poll instead of blocking forever: a peer stopped with SIGSTOP must not hang us.
            deadline = time.monotonic() + self.lock_timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise TimeoutError(
                            f"timed out acquiring cache lock {self.lock_path}"
                        ) from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _modify(self, update: Callable[[_CacheDoc], None]) -> bool:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with self._locked():
                doc = self._read()  # re-read under the lock: the true read-modify-write
                update(doc)
                self._write(_serialise_cache(doc))
            return True
        except (OSError, TimeoutError) as exc:
            logger.warning("cannot update attestation cache %s: %s", self.path, exc)
            return False

    def _write(self, data: bytes) -> None:
        # mkstemp creates the file 0600; os.replace makes readers see old or new, never half.
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        # Persist the rename itself; best effort (not every filesystem allows it).
        with contextlib.suppress(OSError):
            dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


# -- JWKS ----------------------------------------------------------------------------------


def _rsa_key_from_jwk(jwk: dict[str, Any], kid: str) -> RSAPublicKey:
    def bad(reason: str) -> AttestationError:
        return AttestationError(
            f"build decoding key from jwk {_show(kid)}: {reason}", hint=_HINT_FORGED
        )

    if jwk.get("kty") != "RSA":
        raise bad(f"key type {_show(jwk.get('kty'))} is not RSA")
    if jwk.get("alg", ALGORITHM) != ALGORITHM:
        raise bad(f"key is for {_show(jwk.get('alg'))}, not {ALGORITHM}")
    if jwk.get("use", "sig") != "sig":
        raise bad(f"key use is {_show(jwk.get('use'))}, not sig")
    n, e = jwk.get("n"), jwk.get("e")
    if not isinstance(n, str) or not isinstance(e, str):
        raise bad("missing n or e")
    try:
        # Only the public members: a JWKS that leaks "d" must not yield a private key.
        key = RSAAlgorithm.from_jwk({"kty": "RSA", "n": n, "e": e})
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise bad(str(exc)) from None
    if not isinstance(key, RSAPublicKey):
        raise bad("not an RSA public key")
    if key.key_size < _MIN_RSA_BITS:
        raise bad(f"RSA key is {key.key_size} bits; at least {_MIN_RSA_BITS} required")
    return key


class JwksCache:
    """Discovery + JWKS per issuer, in memory and (with ``store``) in the cache file.

    - An entry older than ``ttl`` is refetched (discovery, then JWKS).
    - A ``kid`` not in the cached set forces one JWKS refetch, at most once per
      ``refresh_interval`` per issuer, so a stream of bogus kids cannot hammer the issuer.
    - ``jwks_uri`` must be on the issuer's origin (scheme, host, port), and redirects may
      not leave it: the discovery document alone cannot send us to other keys (flaw S6).

    ``client`` is used as is (its owner closes it); otherwise a short-lived client is made
    per fetch, which keeps the cache usable across event loops.
    """

    def __init__(
        self,
        store: AttestationCache | None = None,
        *,
        client: httpx.AsyncClient | None = None,
        ttl: float = 3600.0,
        refresh_interval: float = 30.0,
        connect_timeout: float = 5.0,
        total_timeout: float = 10.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.refresh_interval = refresh_interval
        self._client = client
        self._connect_timeout = connect_timeout
        self._total_timeout = total_timeout
        self._now = now
        self._records: dict[str, JwksRecord] = {}
        self._last_forced: dict[str, float] = {}

    def cached(self, issuer: str) -> JwksRecord | None:
        """The record in memory (or in the store), fresh or not; no network."""
        record = self._records.get(issuer)
        if record is None and self.store is not None:
            record = self.store.load_jwks(issuer)
            # The file is ours, but do not let an edited file bypass the origin rule.
            if record is not None and not self._same_origin(issuer, record.jwks_uri):
                logger.warning(
                    "ignoring cached jwks for %s: jwks_uri off the issuer origin", issuer
                )
                record = None
            if record is not None:
                self._records[issuer] = record
        return record

    def _fresh(self, record: JwksRecord) -> bool:
        age = self._now() - record.fetched_at
        # A timestamp far in the future means the clock jumped back: treat it as stale.
        return -300.0 <= age < self.ttl

    async def get_key(self, issuer: str, kid: str) -> RSAPublicKey:
        record = self.cached(issuer)
        if record is None or not self._fresh(record):
            record = await self.refresh(issuer)
        jwk = self._find(record, kid)
        if jwk is None:
            now = self._now()
            last = self._last_forced.get(issuer)
            if last is None or now - last >= self.refresh_interval:
                self._last_forced[issuer] = now
                # Keys may have rotated since we cached them: one JWKS refetch.
                record = await self.refresh(issuer, discovery=False)
                jwk = self._find(record, kid)
        if jwk is None:
            raise AttestationError(
                f"jwk with kid {_show(kid)} not found",
                hint=f"{issuer} does not publish this key: {_HINT_FORGED}",
            )
        return _rsa_key_from_jwk(jwk, kid)

    @staticmethod
    def _find(record: JwksRecord, kid: str) -> dict[str, Any] | None:
        return next((k for k in record.keys if k.get("kid") == kid), None)

    @staticmethod
    def _same_origin(issuer: str, url: str) -> bool:
        try:
            return _origin(httpx.URL(url)) == _origin(httpx.URL(issuer))
        except (httpx.InvalidURL, TypeError, ValueError):
            return False

    async def refresh(self, issuer: str, *, discovery: bool = True) -> JwksRecord:
        """Fetch the JWKS now (and the discovery document first, unless told not to)."""
        record = self._records.get(issuer)
        try:
            async with contextlib.AsyncExitStack() as stack:
                client = self._client
                if client is None:
                    client = await stack.enter_async_context(
                        httpx.AsyncClient(
                            timeout=httpx.Timeout(
                                self._total_timeout, connect=self._connect_timeout
                            ),
                            follow_redirects=False,
                        )
                    )
                # httpx timeouts are per operation; this bounds the whole exchange.
                async with asyncio.timeout(self._total_timeout):
                    if discovery or record is None:
                        jwks_uri = await self._discover(client, issuer)
                    else:
                        jwks_uri = record.jwks_uri
                    keys = await self._fetch_jwks(client, issuer, jwks_uri)
        except TimeoutError:
            raise Timeout(
                f"fetch jwks for {issuer}: no answer within {self._total_timeout:g} s",
                hint="check the network path to the Fly OIDC issuer (oidc.fly.io), then retry",
            ) from None
        except httpx.InvalidURL as exc:
            raise ConfigError(
                f"invalid OIDC issuer URL {_show(issuer)}: {exc}",
                hint="check `org` in the config (it must be the org slug)",
            ) from None
        record = JwksRecord(jwks_uri=jwks_uri, keys=tuple(keys), fetched_at=self._now())
        self._records[issuer] = record
        if self.store is not None:
            self.store.store_jwks(issuer, record)
        return record

    async def _discover(self, client: httpx.AsyncClient, issuer: str) -> str:
        url = f"{issuer}/.well-known/openid-configuration"
        doc = await self._get_json(client, issuer, url, "oidc discovery")
        if not isinstance(doc, dict):
            raise AttestationError(f"parse oidc discovery: not a JSON object ({url})")
        # OpenID Connect Discovery §4.3: the document must name the issuer we asked.
        if doc.get("issuer") != issuer:
            raise AttestationError(
                f"oidc discovery issuer mismatch: document says {_show(doc.get('issuer'))}, "
                f"expected {issuer}",
                hint="something between you and the issuer is rewriting its documents",
            )
        jwks_uri = doc.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise AttestationError(f"parse oidc discovery: missing jwks_uri ({url})")
        if not self._same_origin(issuer, jwks_uri):
            raise AttestationError(
                f"oidc discovery jwks_uri {_show(jwks_uri)} is not on the issuer origin "
                f"{_origin_text(issuer)}",
                hint="refusing keys from another host: the discovery document may be forged",
            )
        return jwks_uri

    async def _fetch_jwks(
        self, client: httpx.AsyncClient, issuer: str, jwks_uri: str
    ) -> list[dict[str, Any]]:
        doc = await self._get_json(client, issuer, jwks_uri, "jwks")
        keys = doc.get("keys") if isinstance(doc, dict) else None
        if not isinstance(keys, list):
            raise AttestationError(f'parse jwks: no "keys" array ({jwks_uri})')
        return [k for k in keys if isinstance(k, dict)]

    async def _get_json(self, client: httpx.AsyncClient, issuer: str, url: str, what: str) -> Any:
        for _ in range(_MAX_REDIRECTS + 1):
            status, location, body = await self._get(client, url, what)
            if status in (301, 302, 303, 307, 308) and location:
                target = str(httpx.URL(url).join(location))
                if not self._same_origin(issuer, target):
                    raise AttestationError(
                        f"fetch {what}: {url} redirects to {_show(target)}, off the issuer origin",
                        hint="refusing to follow: the issuer's documents must come from the issuer",
                    )
                url = target
                continue
            if not 200 <= status < 300:
                raise AttestationError(
                    f"{what} error status {status} from {url}",
                    hint=(
                        "an unknown org gives 404: check `org` in the config"
                        if status == 404
                        else "the Fly OIDC issuer is failing; retry in a moment"
                    ),
                )
            try:
                return json.loads(body)
            except (ValueError, RecursionError) as exc:
                raise AttestationError(f"parse {what}: {exc} ({url})") from None
        raise AttestationError(f"fetch {what}: too many redirects ({url})")

    async def _get(
        self, client: httpx.AsyncClient, url: str, what: str
    ) -> tuple[int, str | None, bytes]:
        try:
            async with client.stream(
                "GET", url, headers={"Accept": "application/json"}, follow_redirects=False
            ) as resp:
                body = bytearray()
                if 200 <= resp.status_code < 300:
                    async for chunk in resp.aiter_bytes():
                        body += chunk
                        if len(body) > _MAX_DOC_BYTES:
                            raise AttestationError(
                                f"parse {what}: response larger than {_MAX_DOC_BYTES} bytes ({url})"
                            )
                return resp.status_code, resp.headers.get("location"), bytes(body)
        except httpx.TimeoutException:
            raise Timeout(
                f"fetch {what}: timed out ({url})",
                hint="check the network path to the Fly OIDC issuer, then retry",
            ) from None
        except httpx.HTTPError as exc:
            # Connect failures, resets, TLS and protocol errors: the issuer is unreachable.
            raise ConnectError(
                f"fetch {what}: cannot reach {url}: {exc or type(exc).__name__}",
                hint=(
                    "fly-vault must reach the Fly OIDC issuer to verify the server: check "
                    "the network, DNS and any HTTPS_PROXY setting"
                ),
            ) from None


# -- verification --------------------------------------------------------------------------


def _number(payload: dict[str, Any], name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AttestationError(f"attestation token claim {name} is not a number", hint=_HINT_FORGED)
    return float(value)


class AttestationVerifier:
    """Verifies the attestation JWT of one vault (``org``/``app``, optionally ``machine_id``)."""

    def __init__(
        self,
        org: str,
        app: str,
        machine_id: str | None,
        *,
        issuer_base: str = FLY_OIDC_BASE,
        jwks: JwksCache,
        now: Callable[[], float] = time.time,
        leeway: float = LEEWAY,
    ) -> None:
        if not isinstance(org, str) or not _ORG_RE.fullmatch(org) or org in {".", ".."}:
            raise ConfigError(
                f"invalid org slug {_show(org)}",
                hint="set `org` to the Fly organisation slug (see `fly orgs list`)",
            )
        if not isinstance(app, str) or not app:
            raise ConfigError("app must not be empty", hint="set `app` in the config")
        if machine_id is not None and not machine_id:
            raise ConfigError("machine_id must not be empty", hint="set `machine_id` or remove it")
        self.org = org
        self.app = app
        self.machine_id = machine_id
        self.issuer = f"{issuer_base.rstrip('/')}/{org}"
        self._jwks = jwks
        self._now = now
        self._leeway = leeway

    async def verify(self, token: str, *, audience: str) -> AttestationClaims:
        """Verify ``token`` for this connection's ``audience`` (hex TLS exporter)."""
        if not isinstance(token, str):
            raise AttestationError("attestation token is not text", hint=_HINT_FORGED)
        token = token.rstrip("\r\n")
        if not token:
            raise AttestationError("attestation token is empty", hint=_HINT_FORGED)
        if len(token) > _MAX_TOKEN_CHARS:
            raise AttestationError(
                f"attestation token is too large ({len(token)} chars)", hint=_HINT_FORGED
            )
        if not isinstance(audience, str) or not audience:
            # Without the channel binding the token proves nothing about this connection.
            raise AttestationError("no channel binding value to verify the token against")

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AttestationError(f"decode jwt header: {exc}", hint=_HINT_FORGED) from None
        alg = header.get("alg")
        if alg != ALGORITHM:
            # Checked before any key is fetched: "none" and HS256-keyed-with-the-public-key
            # forgeries never reach a verifier that could be confused by them.
            raise AttestationError(
                f"jwt algorithm {_show(alg, 20)} is not allowed; only {ALGORITHM}",
                hint=_HINT_FORGED,
            )
        if "crit" in header or "b64" in header:
            raise AttestationError("jwt header uses unsupported extensions", hint=_HINT_FORGED)
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AttestationError("jwt header missing kid", hint=_HINT_FORGED)

        key = await self._jwks.get_key(self.issuer, kid)
        payload = self._decode(token, key, audience)
        return self._check_claims(payload)

    def _decode(self, token: str, key: RSAPublicKey, audience: str) -> dict[str, Any]:
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=audience,
                issuer=self.issuer,
                leeway=self._leeway,
                options={
                    "require": ["exp", "iss", "aud"],
                    # Times are checked in _check_times against the injectable clock.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "strict_aud": False,  # a string aud or a list containing ours, as Fly/Rust
                },
            )
        except jwt.InvalidSignatureError:
            raise AttestationError(
                "verify jwt: signature verification failed", hint=_HINT_FORGED
            ) from None
        except jwt.InvalidIssuerError:
            # The signature was good (pyjwt checks it first): a real token of another org.
            iss = self._unverified_claim(token, "iss")
            raise self._org_mismatch(iss) from None
        except jwt.MissingRequiredClaimError as exc:
            raise AttestationError(
                f"attestation token is missing the {_show(exc.claim)} claim", hint=_HINT_FORGED
            ) from None
        except jwt.InvalidAudienceError:
            raise AttestationError(
                "attestation token was minted for a different TLS connection (aud does not "
                "match this connection's channel binding)",
                hint=(
                    "someone may be relaying another connection's token (a man in the middle); "
                    "do not retry over this network path until you know why"
                ),
            ) from None
        except jwt.InvalidAlgorithmError:
            raise AttestationError(
                f"jwt algorithm is not allowed; only {ALGORITHM}", hint=_HINT_FORGED
            ) from None
        except jwt.PyJWTError as exc:
            raise AttestationError(f"verify jwt: {exc}", hint=_HINT_FORGED) from None
        except (ValueError, TypeError) as exc:
            # Fail closed on anything pyjwt did not classify.
            raise AttestationError(f"verify jwt: {type(exc).__name__}", hint=_HINT_FORGED) from None

    @staticmethod
    def _unverified_claim(token: str, name: str) -> object:
        try:
            return jwt.decode(token, options={"verify_signature": False}).get(name)
        except (jwt.PyJWTError, ValueError, TypeError):
            return None

    def _org_mismatch(self, iss: object) -> AttestationError:
        return AttestationError(
            f"attestation org mismatch: issuer={_show(iss)} expected={self.issuer}",
            hint=(
                "the server proved it belongs to another Fly organisation: check `org` in the "
                "config; if it is right, this server is not your vault"
            ),
        )

    def _check_times(self, payload: dict[str, Any]) -> tuple[int | None, int]:
        now = self._now()
        exp = _number(payload, "exp")
        if exp is None:
            raise AttestationError("attestation token is missing the exp claim", hint=_HINT_FORGED)
        if exp <= now - self._leeway:
            raise AttestationError(
                f"attestation token has expired ({int(now - exp)} s ago, allowed skew "
                f"{self._leeway:g} s)",
                hint=_HINT_CLOCK + "; the server mints a fresh token per connection, so an "
                "expired one also points at a replayed token",
            )
        nbf = _number(payload, "nbf")
        if nbf is not None and nbf > now + self._leeway:
            raise AttestationError(
                f"attestation token is not valid yet (nbf is {int(nbf - now)} s in the future, "
                f"allowed skew {self._leeway:g} s)",
                hint=_HINT_CLOCK,
            )
        iat = _number(payload, "iat")
        if iat is not None and iat > now + self._leeway:
            raise AttestationError(
                f"attestation token was issued in the future (iat is {int(iat - now)} s ahead, "
                f"allowed skew {self._leeway:g} s)",
                hint=_HINT_CLOCK,
            )
        return (int(iat) if iat is not None else None), int(exp)

    def _check_claims(self, payload: dict[str, Any]) -> AttestationClaims:
        issued_at, expires_at = self._check_times(payload)
        iss = payload.get("iss")
        if iss != self.issuer:  # pyjwt checked it already; kept as a second lock
            raise self._org_mismatch(iss)
        required: dict[str, str] = {}
        for name in ("app_name", "machine_id"):
            value = payload.get(name)
            if not isinstance(value, str) or not value:
                raise AttestationError(
                    f"attestation token claim {name} is missing or not a string",
                    hint="the token is not a Fly machine token",
                )
            required[name] = value
        if required["app_name"] != self.app:
            raise AttestationError(
                f"attestation app mismatch: app_name={_show(required['app_name'])} "
                f"expected={self.app}",
                hint=(
                    "another app of your org answered: check `app` in the config; if it is "
                    "right, this server is not your vault"
                ),
            )
        # Checked whenever machine_id is configured, not only behind the proxy (flaw S2):
        # otherwise any machine of a shared tenant app passes for any tenant.
        if self.machine_id is not None and required["machine_id"] != self.machine_id:
            raise AttestationError(
                f"attestation machine mismatch: machine_id={_show(required['machine_id'])} "
                f"expected={self.machine_id}",
                hint=(
                    "another machine of the same app answered: check `machine_id` in the "
                    "config; if it is right, this server is not your vault"
                ),
            )

        def optional(name: str) -> str | None:
            value = payload.get(name)
            return value if isinstance(value, str) else None

        return AttestationClaims(
            issuer=self.issuer,
            app_name=required["app_name"],
            machine_id=required["machine_id"],
            org_name=optional("org_name"),
            machine_name=optional("machine_name"),
            region=optional("region"),
            image=optional("image"),
            image_digest=optional("image_digest"),
            issued_at=issued_at,
            expires_at=expires_at,
        )
