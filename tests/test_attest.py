"""Attestation verification against the loopback Fly stand-ins: real HTTP, real RSA."""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flyvault.attest import (
    FLY_OIDC_BASE,
    AttestationCache,
    AttestationClaims,
    AttestationVerifier,
    JwksCache,
)
from flyvault.errors import AttestationError, ConfigError, ConnectError, Timeout, VaultError
from flyvault.standins import FlyApiSocket, MachineIdentity, OidcIssuer, fly_claims

T = TypeVar("T")
AUD = "5f" * 32
OTHER_AUD = "a0" * 32
IDENT = MachineIdentity.default("acme", "vault")
FP = "0f" * 32


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def issuer() -> Iterator[OidcIssuer]:
    with OidcIssuer() as iss:
        yield iss


@pytest.fixture(autouse=True)
def _fresh_issuer_state(issuer: OidcIssuer) -> Iterator[None]:
    issuer.reset_counters()
    issuer.fail_next(0)
    issuer.set_discovery_overrides(None)
    yield


@pytest.fixture
def store(tmp_path: Path) -> AttestationCache:
    return AttestationCache(tmp_path / "cache" / "attestation-cache-v1.json")


def verifier(
    issuer: OidcIssuer,
    *,
    jwks: JwksCache | None = None,
    org: str = "acme",
    app: str = "vault",
    machine_id: str | None = IDENT.machine_id,
    now: Any = time.time,
) -> AttestationVerifier:
    return AttestationVerifier(
        org, app, machine_id, issuer_base=issuer.base_url, jwks=jwks or JwksCache(), now=now
    )


def claims(issuer: OidcIssuer, **overrides: Any) -> dict[str, Any]:
    base = fly_claims(IDENT, issuer=issuer.issuer("acme"), aud=AUD)
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def refused(
    v: AttestationVerifier, token: str, match: str, *, audience: str = AUD
) -> AttestationError:
    with pytest.raises(AttestationError, match=match) as info:
        run(v.verify(token, audience=audience))
    err = info.value
    # Nothing secret in the message: not the token, not even a recognisable prefix of it.
    if len(token) >= 16:
        assert token.rstrip("\n")[:16] not in str(err)
    assert err.hint
    return err


# -- the good path -------------------------------------------------------------------------------


def test_good_token_passes(issuer: OidcIssuer) -> None:
    token = issuer.mint(claims(issuer))
    result = run(verifier(issuer).verify(token + "\n", audience=AUD))
    assert isinstance(result, AttestationClaims)
    assert result.issuer == issuer.issuer("acme")
    assert (result.app_name, result.machine_id, result.org_name) == (
        "vault",
        IDENT.machine_id,
        "acme",
    )
    assert (result.machine_name, result.region) == (IDENT.machine_name, IDENT.region)
    assert (result.image, result.image_digest) == (IDENT.image, IDENT.image_digest)
    assert result.expires_at == result.issued_at + 600  # type: ignore[operator]


def test_token_from_the_fly_api_socket_passes(issuer: OidcIssuer) -> None:
    d = Path(tempfile.mkdtemp(prefix="fv-", dir="/tmp"))
    try:
        with FlyApiSocket(d / "api.sock", issuer, IDENT):

            async def go() -> AttestationClaims:
                transport = httpx.AsyncHTTPTransport(uds=str(d / "api.sock"))
                async with httpx.AsyncClient(transport=transport, timeout=5) as client:
                    resp = await client.post("http://localhost/v1/tokens/oidc", json={"aud": AUD})
                assert resp.text.endswith("\n")  # Fly's trailing newline, stripped by verify
                return await verifier(issuer).verify(resp.text, audience=AUD)

            assert run(go()).machine_id == IDENT.machine_id
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_direct_mode_without_machine_id_accepts_any_machine(issuer: OidcIssuer) -> None:
    token = issuer.mint(claims(issuer, machine_id="fffffffffffff0"))
    assert run(verifier(issuer, machine_id=None).verify(token, audience=AUD)).machine_id == (
        "fffffffffffff0"
    )


def test_audience_list_containing_ours_passes(issuer: OidcIssuer) -> None:
    token = issuer.mint(claims(issuer, aud=[OTHER_AUD, AUD]))
    run(verifier(issuer).verify(token, audience=AUD))


# -- forgeries -----------------------------------------------------------------------------------


def test_other_key_with_same_kid_is_refused(issuer: OidcIssuer) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = issuer.mint(claims(issuer), key=other, kid=issuer.current_kid)
    refused(verifier(issuer), token, "signature verification failed")


def test_alg_none_is_refused_without_network(issuer: OidcIssuer) -> None:
    token = issuer.mint(claims(issuer), algorithm="none")
    refused(verifier(issuer), token, r"^jwt algorithm none is not allowed; only RS256$")
    assert issuer.requests == 0


def test_hs256_keyed_with_public_key_pem_is_refused(issuer: OidcIssuer) -> None:
    token = issuer.mint(claims(issuer), algorithm="HS256", key=issuer.public_key_pem())
    refused(verifier(issuer), token, r"^jwt algorithm HS256 is not allowed; only RS256$")
    for alg in ("RS512", "PS256", "HS512"):
        refused(
            verifier(issuer),
            issuer.mint(
                claims(issuer), algorithm=alg, key=b"k" * 64 if alg.startswith("HS") else None
            ),
            f"jwt algorithm {alg} is not allowed",
        )
    assert issuer.requests == 0


def test_missing_kid_is_refused(issuer: OidcIssuer) -> None:
    token = issuer.mint(claims(issuer), headers={"kid": None})
    refused(verifier(issuer), token, r"^jwt header missing kid$")


def test_garbage_header_is_refused(issuer: OidcIssuer) -> None:
    refused(verifier(issuer), "not-a-jwt", "^decode jwt header: ")
    refused(verifier(issuer), "e30.e30.", "alg")  # "{}" header: no alg at all
    refused(verifier(issuer), "", "empty")


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(max_size=300))
def test_arbitrary_input_only_raises_attestation_errors(issuer: OidcIssuer, text: str) -> None:
    try:
        run(verifier(issuer).verify(text, audience=AUD))
    except AttestationError:
        pass
    else:  # pragma: no cover - would be a forgery that passed
        pytest.fail("garbage verified")


def test_unknown_kid_refreshes_once_then_fails(issuer: OidcIssuer) -> None:
    clock = [1_000.0]
    jwks = JwksCache(now=lambda: clock[0])
    v = verifier(issuer, jwks=jwks)
    run(v.verify(issuer.mint(claims(issuer)), audience=AUD))
    assert (issuer.discovery_requests, issuer.jwks_requests) == (1, 1)

    bogus = issuer.mint(claims(issuer), kid="no-such-kid")
    refused(v, bogus, r"^jwk with kid no-such-kid not found$")
    assert (issuer.discovery_requests, issuer.jwks_requests) == (1, 2)  # exactly one refresh
    refused(v, bogus, "not found")
    assert issuer.jwks_requests == 2  # rate limited: no second refresh within 30 s
    clock[0] += 31
    refused(v, bogus, "not found")
    assert issuer.jwks_requests == 3


def test_rotated_key_is_fetched_once_then_cached(issuer: OidcIssuer) -> None:
    v = verifier(issuer)
    run(v.verify(issuer.mint(claims(issuer)), audience=AUD))
    old = issuer.current_kid
    new = issuer.rotate_key()
    try:
        token = issuer.mint(claims(issuer))
        run(v.verify(token, audience=AUD))
        assert (issuer.discovery_requests, issuer.jwks_requests) == (1, 2)
        run(v.verify(token, audience=AUD))
        run(v.verify(issuer.mint(claims(issuer), kid=old), audience=AUD))
        assert issuer.jwks_requests == 2
    finally:
        issuer.retire_key(new)


def test_expired_beyond_leeway_is_refused_within_leeway_passes(issuer: OidcIssuer) -> None:
    now = time.time()
    expired = issuer.mint(claims(issuer, iat=int(now) - 700, nbf=int(now) - 700, exp=int(now) - 90))
    err = refused(verifier(issuer), expired, "expired")
    assert "clock" in (err.hint or "")
    skewed = issuer.mint(claims(issuer, iat=int(now) - 630, nbf=int(now) - 630, exp=int(now) - 30))
    run(verifier(issuer).verify(skewed, audience=AUD))


def test_time_checks_use_the_injected_clock(issuer: OidcIssuer) -> None:
    token = issuer.mint(claims(issuer, iat=10_000, nbf=10_000, exp=10_600))
    run(verifier(issuer, now=lambda: 10_650.0).verify(token, audience=AUD))  # 50 s late: ok
    refused(verifier(issuer, now=lambda: 10_661.0), token, "expired")
    run(verifier(issuer, now=lambda: 9_950.0).verify(token, audience=AUD))  # 50 s early: ok
    refused(verifier(issuer, now=lambda: 9_900.0), token, "not valid yet")


def test_nbf_in_the_future_is_refused(issuer: OidcIssuer) -> None:
    now = int(time.time())
    token = issuer.mint(claims(issuer, iat=now, nbf=now + 300, exp=now + 900))
    err = refused(verifier(issuer), token, "not valid yet")
    assert "clock" in (err.hint or "")
    future_iat = issuer.mint(claims(issuer, iat=now + 300, nbf=None, exp=now + 900))
    refused(verifier(issuer), future_iat, "issued in the future")


def test_missing_exp_is_refused(issuer: OidcIssuer) -> None:
    refused(verifier(issuer), issuer.mint(claims(issuer, exp=None)), "missing the exp claim")
    refused(verifier(issuer), issuer.mint(claims(issuer, exp="soon")), "exp")


def test_other_org_is_refused(issuer: OidcIssuer) -> None:
    token = issuer.mint(claims(issuer, iss=issuer.issuer("evil"), org_name="evil"))
    err = refused(
        verifier(issuer),
        token,
        rf"^attestation org mismatch: issuer={issuer.issuer('evil')} expected={issuer.issuer('acme')}$",
    )
    assert "org" in (err.hint or "")
    # And a verifier for the other org rejects an acme token the same way.
    refused(verifier(issuer, org="evil"), issuer.mint(claims(issuer)), "org mismatch")


def test_other_app_is_refused(issuer: OidcIssuer) -> None:
    token = issuer.mint(claims(issuer, app_name="other-app"))
    err = refused(
        verifier(issuer), token, r"^attestation app mismatch: app_name=other-app expected=vault$"
    )
    assert "`app`" in (err.hint or "")


def test_other_machine_is_refused_whenever_configured(issuer: OidcIssuer) -> None:
    token = issuer.mint(claims(issuer, machine_id="eeeeeeeeeeeeee"))
    err = refused(
        verifier(issuer),
        token,
        rf"^attestation machine mismatch: machine_id=eeeeeeeeeeeeee expected={IDENT.machine_id}$",
    )
    assert "machine_id" in (err.hint or "")


def test_missing_fly_claims_are_refused(issuer: OidcIssuer) -> None:
    refused(verifier(issuer), issuer.mint(claims(issuer, app_name=None)), "app_name is missing")
    refused(
        verifier(issuer),
        issuer.mint(claims(issuer, machine_id=7)),
        "machine_id is missing or not a string",
    )


def test_wrong_audience_is_refused_as_a_possible_relay(issuer: OidcIssuer) -> None:
    token = issuer.mint(claims(issuer, aud=OTHER_AUD))
    err = refused(verifier(issuer), token, "different TLS connection")
    assert "relay" in (err.hint or "")
    refused(verifier(issuer), issuer.mint(claims(issuer, aud=None)), "missing the 'aud' claim|aud")


def test_bad_config_is_a_config_error(issuer: OidcIssuer) -> None:
    for org in ("", "a/b", "..", "x y"):
        with pytest.raises(ConfigError):
            verifier(issuer, org=org)
    with pytest.raises(ConfigError, match="machine_id must not be empty"):
        verifier(issuer, machine_id="")
    v = AttestationVerifier("acme", "vault", None, jwks=JwksCache())
    assert v.issuer == f"{FLY_OIDC_BASE}/acme"


# -- JWKS cache ----------------------------------------------------------------------------------


def test_second_verify_makes_no_http_request(issuer: OidcIssuer) -> None:
    v = verifier(issuer)
    run(v.verify(issuer.mint(claims(issuer)), audience=AUD))
    before = issuer.requests
    run(v.verify(issuer.mint(claims(issuer)), audience=AUD))
    assert issuer.requests == before == 2


def test_ttl_expiry_refetches(issuer: OidcIssuer) -> None:
    clock = [5_000.0]
    v = verifier(issuer, jwks=JwksCache(ttl=3600, now=lambda: clock[0]))
    token = issuer.mint(claims(issuer))
    run(v.verify(token, audience=AUD))
    clock[0] += 3599
    run(v.verify(token, audience=AUD))
    assert (issuer.discovery_requests, issuer.jwks_requests) == (1, 1)
    clock[0] += 2
    run(v.verify(token, audience=AUD))
    assert (issuer.discovery_requests, issuer.jwks_requests) == (2, 2)


def test_persisted_jwks_is_reused_by_a_new_instance(
    issuer: OidcIssuer, store: AttestationCache
) -> None:
    token = issuer.mint(claims(issuer))
    run(verifier(issuer, jwks=JwksCache(cache=store)).verify(token, audience=AUD))
    assert issuer.requests == 2
    doc = json.loads(store.path.read_text())
    record = doc["jwks"][issuer.issuer("acme")]
    assert record["jwks_uri"] == f"{issuer.issuer('acme')}/.well-known/jwks"
    assert [k["kid"] for k in record["keys"]] == [issuer.current_kid]
    assert abs(record["fetched_at"] - time.time()) < 60

    fresh = JwksCache(cache=AttestationCache(store.path))
    run(verifier(issuer, jwks=fresh).verify(token, audience=AUD))
    assert issuer.requests == 2  # served from the file
    stale = JwksCache(cache=AttestationCache(store.path), now=lambda: time.time() + 4000)
    run(verifier(issuer, jwks=stale, now=lambda: time.time()).verify(token, audience=AUD))
    assert issuer.requests == 4  # the persisted entry was too old


def test_issuer_down_is_a_connect_error(issuer: OidcIssuer) -> None:
    down = OidcIssuer().start()
    base = down.base_url
    token = down.mint(fly_claims(IDENT, issuer=f"{base}/acme", aud=AUD))
    down.stop()
    v = AttestationVerifier("acme", "vault", None, issuer_base=base, jwks=JwksCache())
    with pytest.raises(ConnectError, match="cannot reach") as info:
        run(v.verify(token, audience=AUD))
    assert f"{base}/acme/.well-known/openid-configuration" in str(info.value)
    assert "network" in (info.value.hint or "")
    assert not isinstance(info.value, AttestationError)


def test_issuer_error_status_names_url_and_status(issuer: OidcIssuer) -> None:
    issuer.fail_next(1, status=503)
    err = refused(
        verifier(issuer),
        issuer.mint(claims(issuer)),
        rf"^oidc discovery error status 503 from {issuer.issuer('acme')}/.well-known/openid-configuration$",
    )
    assert err.hint
    assert issuer.discovery_requests == 1 and issuer.jwks_requests == 0
    # Discovery fine, JWKS not: the error names the JWKS URL.
    v = verifier(issuer)
    issuer.set_discovery_overrides({"jwks_uri": lambda org: f"{issuer.base_url}/{org}/nope"})
    refused(v, issuer.mint(claims(issuer)), r"^jwks error status 404 from .*/acme/nope$")


def test_jwks_uri_off_the_issuer_origin_is_refused(issuer: OidcIssuer) -> None:
    with OidcIssuer() as evil:
        issuer.set_discovery_overrides({"jwks_uri": f"{evil.issuer('acme')}/.well-known/jwks"})
        token = evil.mint(claims(issuer), kid=issuer.current_kid)
        refused(verifier(issuer), token, "is not on the issuer origin")
        assert evil.requests == 0


def test_discovery_naming_another_issuer_is_refused(issuer: OidcIssuer) -> None:
    issuer.set_discovery_overrides({"issuer": "https://oidc.fly.io/acme"})
    refused(verifier(issuer), issuer.mint(claims(issuer)), "issuer mismatch")


def test_hung_issuer_times_out() -> None:
    with socket.socket() as listener:  # accepts the TCP connection, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        base = f"http://127.0.0.1:{listener.getsockname()[1]}"
        v = AttestationVerifier(
            "acme", "vault", None, issuer_base=base, jwks=JwksCache(total_timeout=0.5)
        )
        with OidcIssuer() as iss:
            token = iss.mint(fly_claims(IDENT, issuer=f"{base}/acme", aud=AUD))
        started = time.monotonic()
        with pytest.raises(Timeout):
            run(v.verify(token, audience=AUD))
        # The 0.5 s given, not the 10 s default: a bound with room for a loaded machine.
        assert time.monotonic() - started < 8


# -- fingerprint cache ---------------------------------------------------------------------------


def test_record_and_lookup(store: AttestationCache) -> None:
    assert store.lookup("acme", "vault", "m1", FP) is None  # no file yet
    assert store.record_verified("acme", "vault", "m1", FP.upper())
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700  # created private
    assert stat.S_IMODE(store.lock_path.stat().st_mode) == 0o600
    hit = store.lookup("acme", "vault", "m1", FP)
    assert hit is not None and (hit.machine_id, hit.fingerprint) == ("m1", FP)
    assert store.lookup("acme", "vault", None, FP) == hit  # any machine
    assert store.lookup("acme", "vault", "m2", FP) is None
    assert store.lookup("acme", "other", "m1", FP) is None
    assert store.lookup("acme", "vault", "m1", "1" * 64) is None
    doc = json.loads(store.path.read_text())
    assert doc["version"] == 1 and len(doc["entries"]) == 1
    assert set(doc["entries"][0]) == {
        "org",
        "app",
        "machine_id",
        "fingerprint",
        "verified_at",
        "last_seen_at",
    }
    with pytest.raises(ValueError):
        store.record_verified("acme", "vault", "m1", "not-a-fingerprint")


def test_record_updates_and_caps(tmp_path: Path) -> None:
    clock = [100.0]
    cache = AttestationCache(tmp_path / "c.json", max_entries=3, now=lambda: clock[0])
    for i in range(4):
        clock[0] += 1
        cache.record_verified("acme", "vault", f"m{i}", FP)
    assert [e.machine_id for e in cache.entries()] == ["m1", "m2", "m3"]  # oldest dropped
    clock[0] += 1
    cache.record_verified("acme", "vault", "m1", FP)
    entries = cache.entries()
    assert sorted(e.machine_id for e in entries) == ["m1", "m2", "m3"]  # updated, not duplicated
    hit = cache.lookup("acme", "vault", "m1", FP)
    assert hit is not None and hit.verified_at == hit.last_seen_at == 105


def test_cache_file_mode_is_0600_and_lock_is_not_left_stale(store: AttestationCache) -> None:
    store.lock_path.parent.mkdir(parents=True)
    store.lock_path.write_text("")  # a leftover lock file (crash) must not block writes (B6)
    store.record_verified("acme", "vault", "m1", FP)
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert store.record_verified("acme", "vault", "m2", FP)
    assert not [p for p in store.path.parent.iterdir() if p.suffix == ".tmp"]


def test_corrupt_file_is_a_warning_and_is_rebuilt(
    store: AttestationCache, caplog: pytest.LogCaptureFixture
) -> None:
    store.path.parent.mkdir(parents=True)
    for junk in (b"{not json", b"[]", b'{"version": 99, "entries": []}'):
        store.path.write_bytes(junk)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="flyvault.attest"):
            assert store.lookup("acme", "vault", "m1", FP) is None
            assert store.record_verified("acme", "vault", "m1", FP)
        assert "corrupt" in caplog.text
        assert store.lookup("acme", "vault", "m1", FP) is not None


def test_invalid_entries_are_dropped_and_legacy_file_is_read(store: AttestationCache) -> None:
    store.path.parent.mkdir(parents=True)
    good = {
        "org": "acme",
        "app": "vault",
        "machine_id": "m1",
        "fingerprint": FP,
        "verified_at": 1,
        "last_seen_at": 2,
    }
    store.path.write_text(json.dumps({"entries": [good, {"org": 1}, "x"]}))  # original's format
    assert [e.machine_id for e in store.entries()] == ["m1"]


def _record_many(path: str, worker: int, count: int, go: Any) -> None:
    cache = AttestationCache(Path(path), lock_timeout=30)
    go.wait(30)  # start together so the writers really interleave
    for i in range(count):
        assert cache.record_verified("acme", "vault", f"w{worker}-{i}", FP)


def test_concurrent_writers_lose_no_entries(store: AttestationCache) -> None:
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    workers, count = 4, 40  # 160 entries: under the 256 cap, so every one must survive
    procs = [
        ctx.Process(target=_record_many, args=(str(store.path), w, count, go))
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    time.sleep(0.2)
    go.set()
    for p in procs:
        p.join(timeout=60)
    for p in procs:
        if p.is_alive():  # pragma: no cover - bounded even on failure
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0] * workers
    ids = {e.machine_id for e in store.entries()}
    assert ids == {f"w{w}-{i}" for w in range(workers) for i in range(count)}


def test_unwritable_cache_is_only_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = AttestationCache(blocker / "sub" / "c.json")  # parent is a file: cannot mkdir
    with caplog.at_level(logging.WARNING, logger="flyvault.attest"):
        assert cache.record_verified("acme", "vault", "m1", FP) is False
    assert "cannot update attestation cache" in caplog.text


def test_default_path_is_in_the_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr("sys.platform", "linux")
    cache = AttestationCache()
    assert cache.path == tmp_path / "fly-vault" / "attestation-cache-v1.json"
    assert cache.lock_path == tmp_path / "fly-vault" / "attestation-cache-v1.lock"


def test_no_error_escapes_the_tree(issuer: OidcIssuer) -> None:
    # Every failure above is a VaultError; spot-check a mixed bag in one place.
    bad = [
        issuer.mint(claims(issuer), algorithm="none"),
        "a.b.c",
        issuer.mint(claims(issuer, aud=OTHER_AUD)),
    ]
    for token in bad:
        with pytest.raises(VaultError):
            run(verifier(issuer).verify(token, audience=AUD))


def test_injected_client_is_used_and_redirects_are_not_followed(issuer: OidcIssuer) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(302, headers={"location": "https://evil.example/jwks"})

    async def go() -> None:
        async with httpx.AsyncClient(
            transport=httpx.MockTransport(handler), follow_redirects=True
        ) as client:
            v = verifier(issuer, jwks=JwksCache(client=client))
            await v.verify(issuer.mint(claims(issuer)), audience=AUD)

    with pytest.raises(AttestationError, match="oidc discovery error status 302"):
        run(go())
    assert seen == [f"{issuer.issuer('acme')}/.well-known/openid-configuration"]
