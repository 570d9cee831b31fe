"""``python -m flyvault.standins``: run the OIDC issuer and the ``/.fly/api`` socket.

For running an init server by hand: start this process, read the one JSON line it prints
(``issuer_base_url``, ``socket`` and the identity), point ``fly-vault-init --fly-api-socket``
at the socket and the client's ``oidc_issuer_url`` at the issuer, and send SIGTERM when done.
The local dev vault runs the same two stand-ins inside its supervisor
(``flyvault.localvault``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

from flyvault.standins.flyapi import FlyApiSocket, MachineIdentity
from flyvault.standins.oidc import OidcIssuer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flyvault.standins",
        description="Run local stand-ins of Fly's OIDC issuer and /.fly/api token socket.",
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help="unix socket path for the /.fly/api stand-in (default: a new temporary directory)",
    )
    parser.add_argument("--org", default="personal", help="org slug (default: personal)")
    parser.add_argument("--app", default="vault-dev", help="app name (default: vault-dev)")
    parser.add_argument("--machine-id", help="machine id (default: derived from org and app)")
    parser.add_argument("--region", default="iad", help="region claim (default: iad)")
    parser.add_argument(
        "--issuer-port", type=int, default=0, help="loopback port of the issuer (default: any)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.machine_id is not None and not args.machine_id:
        print("error: --machine-id must not be empty", file=sys.stderr)
        return 2
    socket_path = (
        Path(args.socket)
        if args.socket
        else Path(tempfile.mkdtemp(prefix="flyvault-api-")) / "api.sock"
    )
    identity = MachineIdentity.default(
        args.org, args.app, machine_id=args.machine_id, region=args.region
    )

    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Handlers go in before anything starts, so an early SIGTERM still shuts down cleanly.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    try:
        with (
            OidcIssuer(args.issuer_port) as issuer,
            FlyApiSocket(socket_path, issuer, identity) as api,
        ):
            info = {
                "issuer_base_url": issuer.base_url,
                "issuer": issuer.issuer(identity.org),
                "socket": str(api.path),
                "org": identity.org,
                "app": identity.app,
                "machine_id": identity.machine_id,
                "machine_name": identity.machine_name,
                "pid": os.getpid(),
            }
            print(json.dumps(info), flush=True)
            while not stop.wait(1.0):
                pass
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
