"""``fly-vault cp-image VAULT IMAGE``: a container image streamed from this machine's
podman (or docker) into the vault's podman (``flyvault.client.images``)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(commands: Any) -> None:
    command = commands.add_parser(
        "cp-image",
        help="stream a container image into the vault's podman (no intermediate file)",
        description="Pipes 'podman save IMAGE' (or docker save) here into 'podman load' on "
        "the vault, verifies what arrived by SHA-256 and the image id, and tags it. An "
        "image already there and verified is skipped; one there but never verified (a torn "
        "load) is removed and streamed again.",
    )
    command.add_argument("vault")
    command.add_argument("image", help="the image here, e.g. localhost/app:1")
    command.add_argument("--as", dest="tag", metavar="TAG", help="its name on the vault")
    command.add_argument(
        "--rootless", metavar="USER", help="into USER's rootless podman storage (default root's)"
    )
    command.add_argument("--engine", choices=("podman", "docker"), help="the engine here")
    command.add_argument("--json", action="store_true", help="print a JSON summary")
    command.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from flyvault.cli.cp import USER_RE
    from flyvault.client.images import check_ref, local_engine, local_image_id
    from flyvault.config import load_vault
    from flyvault.errors import UsageError

    check_ref(args.image)
    if args.tag is not None:
        check_ref(args.tag, "image tag")
    if args.rootless is not None and not USER_RE.fullmatch(args.rootless):
        raise UsageError(f"--rootless {args.rootless!r} is not a user name")
    args.engine = local_engine(args.engine)
    local_image_id(args.engine, args.image)  # a missing image: exit 2, before connecting
    config = load_vault(args.vault)  # config errors: exit 3, before connecting
    return asyncio.run(_copy(args, config))


async def _copy(args: argparse.Namespace, config: Any) -> int:
    from flyvault.cli.console import with_vault
    from flyvault.client.images import copy_image

    done = await with_vault(
        config,
        lambda vault: copy_image(
            vault, args.image, tag=args.tag, user=args.rootless, engine=args.engine
        ),
    )
    if args.json:
        print(json.dumps(done.to_json(), indent=2))
    elif done.action == "skipped":
        print(f"{done.tag}: already on {args.vault}, verified (id {done.image_id[:12]})")
    else:
        print(
            f"{done.tag}: {done.action} to {args.vault} ({done.bytes / 1e6:.1f} MB, id "
            f"{done.image_id[:12]}, verified) in {done.seconds:g} s"
        )
    return 0
