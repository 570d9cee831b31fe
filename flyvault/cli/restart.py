"""``fly-vault restart VAULT``: stop the vault's workload and start it again on the same
rootfs (``flyvault.client.restart``); waits until it is back."""

from __future__ import annotations

import argparse
import json
from typing import Any


def run(args: argparse.Namespace) -> int:
    import asyncio

    from flyvault.config import load_vault

    config = load_vault(args.vault)  # config errors: exit 3, before connecting
    return asyncio.run(_restart(args, config))


async def _restart(args: argparse.Namespace, config: Any) -> int:
    from flyvault.cli.console import with_vault
    from flyvault.client.restart import restart_and_wait

    done = await with_vault(
        config,
        lambda vault: restart_and_wait(vault, allow_running=args.yes, deadline=args.timeout),
    )
    if args.json:
        print(json.dumps(done.to_json(), indent=2))
    else:
        system = f", systemd {done.system_state}" if done.system_state else ""
        print(
            f"restarted {args.vault}: boot id {done.old_boot_id[:12]} -> "
            f"{done.new_boot_id[:12]} ({done.runtime.replace('_', ' ')}{system}) in "
            f"{done.seconds:g} s"
        )
    return 0
