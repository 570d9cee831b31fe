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
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from jwt.algorithms import RSAAlgorithm

if TYPE_CHECKING:
    import httpx

from flyvault.errors import AttestationError, ConfigError, ConnectError, Timeout
from flyvault.paths import cache_dir

logger = logging.getLogger("flyvault.attest")

FLY_OIDC_BASE = "https://oidc.fly.io"
ALGORITHM = "RS256"
LEEWAY = 60.0  # seconds; jsonwebtoken's default, which the original relied on
CACHE_FILE_NAME = "attestation-cache-v1.json"
CACHE_VERSION = 1

_MAX_TOKEN_CHARS = 16 * 1024  # Fly tokens are ~1.2 KB; refuse absurd input before parsing
_MAX_DOC_BYTES = 1024 * 1024  # cap discovery/JWKS bodies: a hostile issuer must not OOM us
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
_HINT_ISSUER = "the Fly OIDC issuer is failing or something rewrites its answers; retry later"
_HINT_NET = "check the network, DNS and any HTTPS_PROXY setting: fly-vault must reach the issuer"
_HINT_NOT_YOURS = "if it is right, this server is not your vault"

_T = TypeVar("_T")


def _err(message: str, hint: str = _HINT_FORGED) -> AttestationError:
    return AttestationError(message, hint=hint)


def _show(value: object, limit: int = 80) -> str:
    """Render an untrusted value for an error message: printable and bounded."""
    text = value if isinstance(value, str) and value.isprintable() else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    return (scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme))


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _same_origin(issuer: str, url: str) -> bool:
    try:
        return _origin(url) == _origin(issuer)
    except (TypeError, ValueError):
        return False


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


@dataclass
class _CacheDoc:
    entries: list[CacheEntry]
    jwks: dict[str, JwksRecord]


class _CorruptCache(ValueError):
    pass


def _parse_cache(raw: bytes) -> _CacheDoc:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _CorruptCache(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _CorruptCache("top level is not an object")
    # The original wrote no "version"; its entries have the same shape, so accept them.
    if doc.get("version", CACHE_VERSION) != CACHE_VERSION:
        raise _CorruptCache(f"unsupported version {_show(doc.get('version'))}")
    raw_entries, raw_jwks = doc.get("entries", []), doc.get("jwks", {})
    if not isinstance(raw_entries, list) or not isinstance(raw_jwks, dict):
        raise _CorruptCache("entries/jwks have the wrong type")
    # One bad item (hand edit, older bug) must not cost the others: skip it.
    entries: list[CacheEntry] = []
    for item in raw_entries:
        with contextlib.suppress(KeyError, TypeError, ValueError, OverflowError):
            names = [item[k] for k in ("org", "app", "machine_id", "fingerprint")]
            times = [int(item[k]) for k in ("verified_at", "last_seen_at")]
            if all(isinstance(v, str) for v in names):
                entries.append(CacheEntry(*names, *times))
    jwks: dict[str, JwksRecord] = {}
    for issuer, item in raw_jwks.items():
        with contextlib.suppress(KeyError, TypeError, ValueError):
            uri, keys, fetched_at = item["jwks_uri"], item["keys"], float(item["fetched_at"])
            if isinstance(uri, str) and isinstance(keys, list) and math.isfinite(fetched_at):
                good = tuple(k for k in keys if isinstance(k, dict))
                jwks[issuer] = JwksRecord(uri, good, fetched_at)
    return _CacheDoc(entries, jwks)


def _serialise_cache(doc: _CacheDoc) -> bytes:
    jwks = {i: {**asdict(r), "keys": list(r.keys)} for i, r in doc.jwks.items()}
    out = {"version": CACHE_VERSION, "entries": [asdict(e) for e in doc.entries], "jwks": jwks}
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

    Failures to read or write are warnings, never errors: the cache only saves work. The I/O
    is synchronous; it is a few small writes per connection, under a lock held for
    milliseconds.
    """

    def __init__(
        self,
        path: Path | None = None,
        *,
        max_entries: int = 256,
        max_issuers: int = 32,
        lock_timeout: float = 2.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path) if path is not None else cache_dir() / CACHE_FILE_NAME
        self.lock_path = self.path.with_suffix(".lock")
        self.max_entries = max_entries
        self.max_issuers = max_issuers
        self.lock_timeout = lock_timeout
        self._now = now

    def _read(self) -> _CacheDoc:
        try:
            return _parse_cache(self.path.read_bytes())
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("cannot read attestation cache %s: %s", self.path, exc)
        except _CorruptCache as exc:
            logger.warning("attestation cache %s is corrupt (%s); rebuilding it", self.path, exc)
        return _CacheDoc([], {})

    def entries(self) -> list[CacheEntry]:
        return self._read().entries

    def lookup(
        self, org: str, app: str, machine_id: str | None, fingerprint: str
    ) -> CacheEntry | None:
        """The entry recorded for this server, if any -- for display only.

        ``machine_id=None`` matches any machine. A hit means "this certificate passed full
        verification before"; it is never a reason to verify less.
        """
        want = (org, app, fingerprint.lower())
        for e in self._read().entries:
            if (e.org, e.app, e.fingerprint) == want and machine_id in (None, e.machine_id):
                return e
        return None

    def load_jwks(self, issuer: str) -> JwksRecord | None:
        return self._read().jwks.get(issuer)

    def record_verified(self, org: str, app: str, machine_id: str, fingerprint: str) -> bool:
        """Record a server that just passed full verification. True if it was persisted.

        ``fingerprint`` is the hex SHA-256 of the server's leaf certificate (DER).
        """
        fingerprint = fingerprint.lower()
        if not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
            raise ValueError("fingerprint must be 64 hex digits (SHA-256 of the leaf DER)")
        key, now = (org, app, machine_id, fingerprint), int(self._now())

        def update(doc: _CacheDoc) -> None:
            others = [e for e in doc.entries if (e.org, e.app, e.machine_id, e.fingerprint) != key]
            fresh = CacheEntry(*key, verified_at=now, last_seen_at=now)
            doc.entries = _keep_newest([*others, fresh], self.max_entries, lambda e: e.last_seen_at)

        return self._modify(update)

    def store_jwks(self, issuer: str, record: JwksRecord) -> bool:
        def update(doc: _CacheDoc) -> None:
            doc.jwks[issuer] = record
            items = _keep_newest(
                list(doc.jwks.items()), self.max_issuers, lambda i: i[1].fetched_at
            )
            doc.jwks = dict(items)

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
                        raise TimeoutError(f"timed out acquiring lock {self.lock_path}") from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _modify(self, update: Callable[[_CacheDoc], None]) -> bool:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with self._locked():
                doc = self._read()  # re-read under the lock: a true read-modify-write
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
        with contextlib.suppress(OSError):  # persist the rename too, where the fs allows it
            dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


# -- JWKS ----------------------------------------------------------------------------------


def _rsa_key_from_jwk(jwk: dict[str, Any], kid: str) -> RSAPublicKey:
    def bad(reason: str) -> AttestationError:
        return _err(f"build decoding key from jwk {_show(kid)}: {reason}")

    if jwk.get("kty") != "RSA":
        raise bad(f"key type {_show(jwk.get('kty'))} is not RSA")
    if jwk.get("alg", ALGORITHM) != ALGORITHM or jwk.get("use", "sig") != "sig":
        raise bad(f"key is for {_show(jwk.get('alg'))}/{_show(jwk.get('use'))}, not RS256/sig")
    try:
        # Only the public members: a JWKS that leaks "d" must not yield a private key.
        key = RSAAlgorithm.from_jwk({"kty": "RSA", "n": jwk["n"], "e": jwk["e"]})
    except (jwt.PyJWTError, KeyError, ValueError, TypeError) as exc:
        raise bad(f"invalid RSA key ({type(exc).__name__})") from None
    if not isinstance(key, RSAPublicKey) or key.key_size < _MIN_RSA_BITS:
        raise bad(f"not an RSA public key of at least {_MIN_RSA_BITS} bits")
    return key


class JwksCache:
    """Discovery + JWKS per issuer, in memory and (with ``cache``) in the cache file.

    - An entry older than ``ttl`` is refetched (discovery, then JWKS).
    - A ``kid`` not in the cached set forces one JWKS refetch, at most once per
      ``refresh_interval`` per issuer, so a stream of bogus kids cannot hammer the issuer.
    - ``jwks_uri`` must be on the issuer's origin (scheme, host, port), and no redirect is
      followed: the discovery document cannot send us to someone else's keys (flaw S6).

    ``client`` is used as is (its owner closes it); otherwise a short-lived client is made
    per fetch, which keeps the cache usable across event loops.
    """

    def __init__(
        self,
        cache: AttestationCache | None = None,
        *,
        client: httpx.AsyncClient | None = None,
        ttl: float = 3600.0,
        refresh_interval: float = 30.0,
        connect_timeout: float = 5.0,
        total_timeout: float = 10.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.cache = cache
        self.ttl = ttl
        self.refresh_interval = refresh_interval
        self._client = client
        self._connect_timeout = connect_timeout
        self._total_timeout = total_timeout
        self._now = now
        self._records: dict[str, JwksRecord] = {}
        self._last_forced: dict[str, float] = {}

    def cached(self, issuer: str) -> JwksRecord | None:
        """The record in memory, else in the cache file, fresh or not; no network."""
        record = self._records.get(issuer)
        if record is None and self.cache is not None:
            record = self.cache.load_jwks(issuer)
            # The file is ours, but an edited file must not bypass the origin rule either.
            if record is not None and _same_origin(issuer, record.jwks_uri):
                self._records[issuer] = record
            else:
                record = None
        return record

    def _fresh(self, record: JwksRecord) -> bool:
        age = self._now() - record.fetched_at
        return -300.0 <= age < self.ttl  # far in the future: the clock jumped back; refetch

    async def get_key(self, issuer: str, kid: str) -> RSAPublicKey:
        record = self.cached(issuer)
        if record is None or not self._fresh(record):
            record = await self.refresh(issuer)
        else:
            logger.debug("jwks for %s: cached, %.0f s old", issuer, self._now() - record.fetched_at)
        jwk = self._find(record, kid)
        if jwk is None:
            now, last = self._now(), self._last_forced.get(issuer)
            if last is None or now - last >= self.refresh_interval:
                self._last_forced[issuer] = now
                # Keys may have rotated since we cached them: one JWKS refetch.
                record = await self.refresh(issuer, discovery=False)
                jwk = self._find(record, kid)
        if jwk is None:
            raise _err(
                f"jwk with kid {_show(kid)} not found", f"{issuer} has no such key; {_HINT_FORGED}"
            )
        return _rsa_key_from_jwk(jwk, kid)

    @staticmethod
    def _find(record: JwksRecord, kid: str) -> dict[str, Any] | None:
        return next((k for k in record.keys if k.get("kid") == kid), None)

    async def refresh(self, issuer: str, *, discovery: bool = True) -> JwksRecord:
        """Fetch the JWKS now (and the discovery document first, unless told not to)."""
        # httpx is imported only when keys must be fetched: with the JWKS cached, a CLI
        # run never pays for importing it.
        import httpx

        known = self._records.get(issuer)
        started = time.perf_counter()
        try:
            async with contextlib.AsyncExitStack() as stack:
                client = self._client
                if client is None:
                    timeout = httpx.Timeout(self._total_timeout, connect=self._connect_timeout)
                    client = httpx.AsyncClient(timeout=timeout, follow_redirects=False)
                    await stack.enter_async_context(client)
                # httpx timeouts are per operation; this bounds the whole exchange.
                async with asyncio.timeout(self._total_timeout):
                    if discovery or known is None:
                        jwks_uri = await self._discover(client, issuer)
                    else:
                        jwks_uri = known.jwks_uri
                    doc = await self._get_json(client, jwks_uri, "jwks")
        except TimeoutError:
            msg = f"fetch oidc discovery/jwks for {issuer}: no answer in {self._total_timeout:g} s"
            raise Timeout(msg, hint=_HINT_NET) from None
        except httpx.InvalidURL as exc:
            msg = f"invalid OIDC issuer URL {_show(issuer)}: {exc}"
            raise ConfigError(msg, hint="check `org` (the org slug) in the config") from None
        keys = doc.get("keys") if isinstance(doc, dict) else None
        if not isinstance(keys, list):
            raise _err(f'parse jwks: no "keys" array ({jwks_uri})', _HINT_ISSUER)
        good = tuple(k for k in keys if isinstance(k, dict))
        logger.info(
            "fetched %sjwks for %s in %.1f ms (%d keys)",
            "oidc discovery and " if discovery or known is None else "",
            issuer,
            (time.perf_counter() - started) * 1000,
            len(good),
        )
        record = JwksRecord(jwks_uri=jwks_uri, keys=good, fetched_at=self._now())
        self._records[issuer] = record
        if self.cache is not None:
            self.cache.store_jwks(issuer, record)
        return record

    async def _discover(self, client: httpx.AsyncClient, issuer: str) -> str:
        url = f"{issuer}/.well-known/openid-configuration"
        doc = await self._get_json(client, url, "oidc discovery")
        if not isinstance(doc, dict):
            raise _err(f"parse oidc discovery: not a JSON object ({url})", _HINT_ISSUER)
        # OpenID Connect Discovery 1.0 §4.3: the document must name the issuer we asked.
        if doc.get("issuer") != issuer:
            msg = f"oidc discovery issuer mismatch: {_show(doc.get('issuer'))} expected={issuer}"
            raise _err(msg, _HINT_ISSUER)
        jwks_uri = doc.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise _err(f"parse oidc discovery: missing jwks_uri ({url})", _HINT_ISSUER)
        if not _same_origin(issuer, jwks_uri):
            raise _err(
                f"oidc discovery jwks_uri {_show(jwks_uri)} is not on the issuer origin",
                "refusing keys from another host: the discovery document may be forged",
            )
        return jwks_uri

    async def _get_json(self, client: httpx.AsyncClient, url: str, what: str) -> Any:
        import httpx

        try:
            # No redirects at all: Fly serves both documents directly, and following one
            # could leave the issuer's origin.
            headers = {"Accept": "application/json"}
            req = client.stream("GET", url, headers=headers, follow_redirects=False)
            async with req as resp:
                if not 200 <= resp.status_code < 300:
                    unknown_org = "an unknown org gives 404: check `org` in the config"
                    hint = unknown_org if resp.status_code == 404 else _HINT_ISSUER
                    raise _err(f"{what} error status {resp.status_code} from {url}", hint)
                body = bytearray()
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > _MAX_DOC_BYTES:
                        raise _err(
                            f"parse {what}: over {_MAX_DOC_BYTES} bytes ({url})", _HINT_ISSUER
                        )
        except httpx.TimeoutException:
            raise Timeout(f"fetch {what}: timed out ({url})", hint=_HINT_NET) from None
        except httpx.HTTPError as exc:
            # Connect failures, resets, TLS and protocol errors: the issuer is unreachable.
            reason = str(exc) or type(exc).__name__
            raise ConnectError(
                f"fetch {what}: cannot reach {url}: {reason}", hint=_HINT_NET
            ) from None
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise _err(f"parse {what}: {exc} ({url})", _HINT_ISSUER) from None


# -- verification --------------------------------------------------------------------------


def _number(payload: dict[str, Any], name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _err(f"attestation token claim {name} is not a number")
    return float(value)


def _required_str(payload: dict[str, Any], name: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value:
        raise _err(f"attestation token claim {name} is missing or not a string")
    return value


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
            hint = "set `org` to the Fly organisation slug (see `fly orgs list`)"
            raise ConfigError(f"invalid org slug {_show(org)}", hint=hint)
        if not isinstance(app, str) or not app:
            raise ConfigError("app must not be empty", hint="set `app` in the config")
        if machine_id is not None and not machine_id:
            raise ConfigError("machine_id must not be empty", hint="set `machine_id` or remove it")
        self.org, self.app, self.machine_id = org, app, machine_id
        self.issuer = f"{issuer_base.rstrip('/')}/{org}"
        self._jwks = jwks
        self._now = now
        self._leeway = leeway

    async def verify(self, token: str, *, audience: str) -> AttestationClaims:
        """Verify ``token`` for this connection's ``audience`` (hex TLS exporter)."""
        if not isinstance(token, str):
            raise _err("attestation token is not text")
        token = token.rstrip("\r\n")
        if not token:
            raise _err("attestation token is empty")
        if len(token) > _MAX_TOKEN_CHARS:
            raise _err(f"attestation token is too large ({len(token)} chars)")
        if not isinstance(audience, str) or not audience:
            # Without the channel binding the token proves nothing about this connection.
            raise _err("no channel binding value to verify the token against", "this is a bug")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _err(f"decode jwt header: {exc}") from None
        alg = header.get("alg")
        if alg != ALGORITHM:
            # Checked before any key is fetched: "none" and HS256-keyed-with-the-public-key
            # forgeries never reach a verifier that could be confused by them.
            raise _err(f"jwt algorithm {_show(alg, 20)} is not allowed; only {ALGORITHM}")
        if "crit" in header or "b64" in header:
            raise _err("jwt header uses unsupported extensions")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise _err("jwt header missing kid")
        key = await self._jwks.get_key(self.issuer, kid)
        return self._check_claims(self._decode(token, key, audience))

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
                    # Times are checked in _check_times, against the injectable clock.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "strict_aud": False,  # a string aud or a list holding ours, as Fly/Rust
                },
            )
        except jwt.InvalidSignatureError:
            raise _err("verify jwt: signature verification failed") from None
        except jwt.InvalidIssuerError:
            # The signature was good (pyjwt checks it first): a real token of another org.
            iss = jwt.decode(token, options={"verify_signature": False}).get("iss")
            raise self._org_mismatch(iss) from None
        except jwt.MissingRequiredClaimError as exc:
            raise _err(f"attestation token is missing the {_show(exc.claim)} claim") from None
        except jwt.InvalidAudienceError:
            raise _err(
                "attestation token was minted for a different TLS connection (aud does not "
                "match this connection's channel binding)",
                "someone may be relaying another connection's token (a man in the middle); "
                "do not retry over this network path until you know why",
            ) from None
        except jwt.PyJWTError as exc:
            raise _err(f"verify jwt: {exc}") from None
        except (ValueError, TypeError) as exc:  # fail closed on anything pyjwt did not classify
            raise _err(f"verify jwt: {type(exc).__name__}") from None

    def _org_mismatch(self, iss: object) -> AttestationError:
        return _err(
            f"attestation org mismatch: issuer={_show(iss)} expected={self.issuer}",
            f"the server belongs to another Fly org: check `org` in the config; {_HINT_NOT_YOURS}",
        )

    def _check_times(self, payload: dict[str, Any]) -> tuple[int | None, int]:
        now, skew = self._now(), f"allowed skew {self._leeway:g} s"
        exp = _number(payload, "exp")
        if exp is None:
            raise _err("attestation token is missing the exp claim")
        if exp <= now - self._leeway:
            raise _err(
                f"attestation token has expired ({int(now - exp)} s ago, {skew})",
                _HINT_CLOCK + "; tokens are minted per connection, so it may also be replayed",
            )
        nbf = _number(payload, "nbf")
        if nbf is not None and nbf > now + self._leeway:
            msg = f"attestation token is not valid yet (nbf {int(nbf - now)} s ahead, {skew})"
            raise _err(msg, _HINT_CLOCK)
        iat = _number(payload, "iat")
        if iat is not None and iat > now + self._leeway:
            msg = (
                f"attestation token was issued in the future (iat {int(iat - now)} s ahead, {skew})"
            )
            raise _err(msg, _HINT_CLOCK)
        return (None if iat is None else int(iat)), int(exp)

    def _check_claims(self, payload: dict[str, Any]) -> AttestationClaims:
        issued_at, expires_at = self._check_times(payload)
        if payload.get("iss") != self.issuer:  # pyjwt checked it already; a second lock
            raise self._org_mismatch(payload.get("iss"))
        app_name, machine_id = (
            _required_str(payload, "app_name"),
            _required_str(payload, "machine_id"),
        )
        if app_name != self.app:
            raise _err(
                f"attestation app mismatch: app_name={_show(app_name)} expected={self.app}",
                f"another app of your org answered: check `app` in the config; {_HINT_NOT_YOURS}",
            )
        # Checked whenever machine_id is configured, not only behind the proxy (flaw S2):
        # otherwise any machine of a shared tenant app passes for any tenant.
        if self.machine_id is not None and machine_id != self.machine_id:
            raise _err(
                f"attestation machine mismatch: machine_id={_show(machine_id)} "
                f"expected={self.machine_id}",
                "another machine of the same app answered: check `machine_id` in the config; "
                + _HINT_NOT_YOURS,
            )

        def opt(name: str) -> str | None:  # informational claims: absent or odd means unknown
            value = payload.get(name)
            return value if isinstance(value, str) else None

        return AttestationClaims(
            issuer=self.issuer,
            app_name=app_name,
            machine_id=machine_id,
            org_name=opt("org_name"),
            machine_name=opt("machine_name"),
            region=opt("region"),
            image=opt("image"),
            image_digest=opt("image_digest"),
            issued_at=issued_at,
            expires_at=expires_at,
        )
