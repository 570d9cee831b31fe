"""Server side of attestation: ask Fly for an OIDC token bound to this connection.

Fly machines reach their platform API over the unix socket ``/.fly/api``; ``POST
/v1/tokens/oidc`` with ``{"aud": ...}`` returns a JWT signed by ``https://oidc.fly.io/<org>``
that carries the machine's identity. The ``aud`` is the hex TLS exporter of the client's
connection, so the token proves "this machine terminates *this* TLS session".
"""

from __future__ import annotations

import httpx

from flyvault.errors import AttestationError

DEFAULT_FLY_API_SOCKET = "/.fly/api"
MAX_TOKEN_BYTES = 16 * 1024


class FlyOidcAttestor:
    def __init__(self, socket_path: str = DEFAULT_FLY_API_SOCKET, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=socket_path),
            base_url="http://localhost",
            timeout=timeout,
        )

    async def token(self, audience: str) -> str:
        try:
            response = await self._client.post("/v1/tokens/oidc", json={"aud": audience})
        except httpx.HTTPError as exc:
            raise AttestationError(
                f"cannot reach the Fly API socket {self.socket_path}: {type(exc).__name__}",
                hint="init must run on a Fly Machine (or beside the local stand-in socket)",
            ) from None
        if response.status_code // 100 != 2:
            raise AttestationError(
                f"Fly OIDC token request failed with HTTP {response.status_code}"
            )
        token = response.text.rstrip("\n")
        if not token or len(token) > MAX_TOKEN_BYTES:
            raise AttestationError("Fly OIDC token response is empty or oversized")
        return token

    async def aclose(self) -> None:
        await self._client.aclose()
