"""The Fly stand-ins speak the real protocols: HTTP on loopback, HTTP over a unix socket."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from flyvault.standins import FlyApiSocket, MachineIdentity, OidcIssuer, fly_claims

AUD = "ab" * 32
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def issuer() -> Iterator[OidcIssuer]:
    with OidcIssuer() as iss:
        yield iss


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # pytest's tmp_path can exceed the 108-byte sun_path limit; /tmp paths stay short.
    d = Path(tempfile.mkdtemp(prefix="fv-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _uds_post(path: Path, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.AsyncHTTPTransport(uds=str(path))
        async with httpx.AsyncClient(transport=transport, timeout=5) as client:
            resp = await client.post("http://localhost/v1/tokens/oidc", **kwargs)
            await resp.aread()
            return resp

    return asyncio.run(go())


def _public_key(issuer: OidcIssuer, token: str) -> Any:
    kid = jwt.get_unverified_header(token)["kid"]
    jwks = httpx.get(f"{issuer.issuer('x')}/.well-known/jwks", timeout=5).json()
    jwk = next(k for k in jwks["keys"] if k["kid"] == kid)
    return jwt.PyJWK(jwk).key


# -- OidcIssuer ------------------------------------------------------------------------------


def test_issuer_serves_discovery_and_jwks_for_any_org(issuer: OidcIssuer) -> None:
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", issuer.base_url)
    for org in ("personal", "acme-corp"):
        resp = httpx.get(f"{issuer.issuer(org)}/.well-known/openid-configuration", timeout=5)
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "application/json"
        doc = resp.json()
        assert doc["issuer"] == f"{issuer.base_url}/{org}"
        assert doc["jwks_uri"] == f"{issuer.base_url}/{org}/.well-known/jwks"
        assert doc["id_token_signing_alg_values_supported"] == ["RS256"]
        jwks = httpx.get(doc["jwks_uri"], timeout=5).json()
        (key,) = jwks["keys"]
        assert key["kid"] == issuer.current_kid
        assert {key["kty"], key["alg"], key["use"]} == {"RSA", "RS256", "sig"}
        assert "d" not in key  # never publish private material
        assert jwt.PyJWK(key).key.key_size == 2048
    assert issuer.discovery_requests == 2
    assert issuer.jwks_requests == 2


def test_issuer_unknown_path_is_404(issuer: OidcIssuer) -> None:
    for path in ("/", "/acme", "/acme/.well-known/other", "/a/b/.well-known/jwks"):
        assert httpx.get(issuer.base_url + path, timeout=5).status_code == 404
    assert issuer.discovery_requests == 0 and issuer.jwks_requests == 0


def test_mint_signs_verifiable_tokens_and_rotation_keeps_old_keys(issuer: OidcIssuer) -> None:
    claims = {"iss": issuer.issuer("acme"), "aud": AUD, "exp": 2**31, "x": 1}
    first = issuer.mint(claims)
    assert jwt.get_unverified_header(first) == {
        "alg": "RS256",
        "typ": "JWT",
        "kid": issuer.current_kid,
    }
    key = _public_key(issuer, first)
    assert jwt.decode(first, key, algorithms=["RS256"], audience=AUD)["x"] == 1

    old_kid = issuer.current_kid
    new_kid = issuer.rotate_key()
    assert new_kid != old_kid and issuer.current_kid == new_kid
    published = [
        k["kid"] for k in httpx.get(f"{issuer.issuer('o')}/.well-known/jwks").json()["keys"]
    ]
    assert published == [old_kid, new_kid]
    second = issuer.mint(claims)
    assert jwt.get_unverified_header(second)["kid"] == new_kid
    jwt.decode(second, _public_key(issuer, second), algorithms=["RS256"], audience=AUD)
    # A known kid signs with its own key.
    assert jwt.get_unverified_header(issuer.mint(claims, kid=old_kid))["kid"] == old_kid
    jwt.decode(issuer.mint(claims, kid=old_kid), key, algorithms=["RS256"], audience=AUD)

    issuer.retire_key(old_kid)
    assert issuer.kids == [new_kid]


def test_mint_can_forge(issuer: OidcIssuer) -> None:
    claims = {"sub": "x"}
    no_kid = issuer.mint(claims, headers={"kid": None})
    assert "kid" not in jwt.get_unverified_header(no_kid)
    none_alg = issuer.mint(claims, algorithm="none")
    assert none_alg.endswith(".") and jwt.get_unverified_header(none_alg)["alg"] == "none"
    hs = issuer.mint(claims, algorithm="HS256")
    # The default HS secret is the public key PEM: the key-confusion attack.
    signing_input, sig = hs.rsplit(".", 1)
    expected = hmac.new(issuer.public_key_pem(), signing_input.encode(), hashlib.sha256).digest()
    assert jwt.utils.base64url_decode(sig) == expected
    with pytest.raises(ValueError):
        issuer.mint(claims, algorithm="XX999")


def test_issuer_fail_next_then_recovers(issuer: OidcIssuer) -> None:
    url = f"{issuer.issuer('acme')}/.well-known/openid-configuration"
    issuer.fail_next(2, status=503)
    assert httpx.get(url, timeout=5).status_code == 503
    assert httpx.get(url, timeout=5).status_code == 503
    assert httpx.get(url, timeout=5).status_code == 200
    assert issuer.discovery_requests == 3
    issuer.reset_counters()
    assert issuer.discovery_requests == 0


def test_issuer_stop_closes_port_and_keepalive() -> None:
    iss = OidcIssuer().start()
    url = f"{iss.issuer('a')}/.well-known/jwks"
    with httpx.Client(timeout=2) as client:
        assert client.get(url).status_code == 200  # leaves a keep-alive connection open
        iss.stop()
        assert not iss.running
        with pytest.raises(httpx.TransportError):
            client.get(url)


def test_issuer_concurrent_requests_are_counted(issuer: OidcIssuer) -> None:
    url = f"{issuer.issuer('acme')}/.well-known/jwks"

    async def go() -> list[int]:
        async with httpx.AsyncClient(timeout=5) as client:
            resps = await asyncio.gather(*(client.get(url) for _ in range(20)))
        return [r.status_code for r in resps]

    assert asyncio.run(go()) == [200] * 20
    assert issuer.jwks_requests == 20


# -- MachineIdentity / FlyApiSocket ------------------------------------------------------------


def test_machine_identity_default_is_plausible_and_deterministic() -> None:
    ident = MachineIdentity.default("acme", "vault")
    assert ident == MachineIdentity.default("acme", "vault")
    assert re.fullmatch(r"[0-9a-f]{14}", ident.machine_id)
    assert re.fullmatch(r"[a-z]+-[a-z]+-\d{3}", ident.machine_name)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", ident.image_digest)
    assert ident.image.startswith("registry.fly.io/vault:")
    assert (ident.org, ident.app, ident.region) == ("acme", "vault", "iad")
    assert MachineIdentity.default("acme", "vault", machine_id="m1").machine_id == "m1"
    assert MachineIdentity.default("acme", "other").machine_id != ident.machine_id


def test_token_endpoint_over_unix_socket(issuer: OidcIssuer, sock_dir: Path) -> None:
    ident = MachineIdentity.default("acme", "vault")
    path = sock_dir / "api.sock"
    with FlyApiSocket(path, issuer, ident) as api:
        assert path.is_socket() and (path.stat().st_mode & 0o777) == 0o600
        resp = _uds_post(path, json={"aud": AUD})
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/plain")
        assert resp.text.endswith("\n") and resp.text.count("\n") == 1
        token = resp.text.rstrip("\n")
        claims = jwt.decode(
            token,
            _public_key(issuer, token),
            algorithms=["RS256"],
            audience=AUD,
            issuer=issuer.issuer("acme"),
        )
        assert claims["exp"] == claims["iat"] + 600 and claims["nbf"] == claims["iat"]
        assert claims["sub"] == f"acme:vault:{ident.machine_name}"
        expected = {
            "app_name": "vault",
            "app_id": ident.app_id,
            "org_name": "acme",
            "org_id": ident.org_id,
            "machine_id": ident.machine_id,
            "machine_name": ident.machine_name,
            "image": ident.image,
            "image_digest": ident.image_digest,
            "region": ident.region,
        }
        assert {k: claims[k] for k in expected} == expected
        assert api.requests == 1 and api.audiences == [AUD]
    assert not path.exists()  # removed on stop


def test_token_endpoint_rejects_bad_requests(issuer: OidcIssuer, sock_dir: Path) -> None:
    path = sock_dir / "api.sock"
    with FlyApiSocket(path, issuer, MachineIdentity.default()) as api:
        bad_json = _uds_post(
            path, content=b"{not json", headers={"content-type": "application/json"}
        )
        assert bad_json.status_code == 400 and "invalid JSON" in bad_json.text
        for body in ({}, {"aud": ""}, {"aud": 5}, ["aud"]):
            resp = _uds_post(path, json=body)
            assert resp.status_code == 400 and '"aud"' in resp.text
        api.fail_next(1)
        assert _uds_post(path, json={"aud": AUD}).status_code == 500
        assert _uds_post(path, json={"aud": AUD}).status_code == 200
        assert api.requests == 7
        assert api.audiences == [AUD]


def test_token_endpoint_claims_follow_injected_clock(issuer: OidcIssuer, sock_dir: Path) -> None:
    path = sock_dir / "api.sock"
    ident = MachineIdentity.default()
    with FlyApiSocket(path, issuer, ident, now=lambda: 1_000_000.0, trailing_newline=False):
        token = _uds_post(path, json={"aud": AUD}).text
    claims = jwt.decode(token, options={"verify_signature": False})
    assert (claims["iat"], claims["exp"]) == (1_000_000, 1_000_600)
    assert claims == {
        **fly_claims(ident, issuer=issuer.issuer(ident.org), aud=AUD, now=1e6),
        "jti": claims["jti"],
    }


def test_socket_refuses_to_replace_a_regular_file(issuer: OidcIssuer, sock_dir: Path) -> None:
    path = sock_dir / "api.sock"
    path.write_text("precious")
    with pytest.raises(FileExistsError):
        FlyApiSocket(path, issuer, MachineIdentity.default()).start()
    assert path.read_text() == "precious"


def test_module_entry_point_runs_until_sigterm(sock_dir: Path) -> None:
    path = sock_dir / "api.sock"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flyvault.standins", "--socket", str(path), "--org", "acme",
         "--app", "vault", "--machine-id", "0123456789abcd"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["socket"] == str(path)
        assert info["issuer"] == info["issuer_base_url"] + "/acme"
        token = _uds_post(path, json={"aud": AUD}).text.strip()
        claims = jwt.decode(token, options={"verify_signature": False})
        assert (claims["iss"], claims["app_name"], claims["machine_id"]) == (
            info["issuer"],
            "vault",
            "0123456789abcd",
        )
        doc = httpx.get(f"{info['issuer']}/.well-known/openid-configuration", timeout=5).json()
        assert doc["issuer"] == info["issuer"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert not path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
