"""Faithful local stand-ins for the parts of Fly.io that fly-vault talks to.

Fly is not reachable from test and dev machines, so these run the real protocols on
loopback: ``OidcIssuer`` (OIDC discovery + JWKS + token signing, like ``oidc.fly.io``),
``FlyApiSocket`` (the ``/.fly/api`` unix socket token endpoint inside a machine) and, in
``flyvault.standins.machines``, the Machines API (``MachinesStandin``, with real state
transitions, leases, waits and fault injection). Tests and the local dev vault use the same
code; ``python -m flyvault.standins`` starts the first two, ``python -m
flyvault.standins.machines`` the third. The Machines API stand-in is not imported here: the
local dev vault never needs it.
"""

from flyvault.standins.flyapi import FlyApiSocket, MachineIdentity, fly_claims
from flyvault.standins.oidc import OidcIssuer, SigningKey

__all__ = ["FlyApiSocket", "MachineIdentity", "OidcIssuer", "SigningKey", "fly_claims"]
