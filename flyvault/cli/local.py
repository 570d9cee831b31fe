"""``fly-vault local up | down | status``."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

from flyvault import localvault


def run(args: argparse.Namespace) -> int:
    if args.local_command == "up":
        from flyvault.cli.remote import rootfs_option_values

        options = rootfs_option_values(args)
        state, started = localvault.up(
            name=args.name,
            port=args.port,
            rootfs=args.rootfs,
            allow_devices=options.get("rootfs_allow_devices", False),
            max_expansion_ratio=options.get("rootfs_max_expansion_ratio"),
            memory_max=args.memory_max,
            cpu_max=args.cpu_max,
        )
        verb = "started" if started else "already running"
        print(
            f"local vault {verb}: {state.host}:{state.port} (pid {state.pid}, {_mode(state.mode)})"
        )
        if started:
            print(f"config entry [vault.{args.name}] updated; try: fly-vault doctor {args.name}")
        return 0
    if args.local_command == "down":
        stopped = localvault.down()
        print(
            f"local vault stopped (pid {stopped.pid})" if stopped else "local vault is not running"
        )
        return 0
    state = localvault.running_state()
    if args.json:
        print(json.dumps({"running": state is not None, **(asdict(state) if state else {})}))
        return 0 if state else 1
    if state is None:
        print("local vault: not running (start it with: fly-vault local up)")
        return 1
    uptime = time.time() - state.started_at
    print(f"local vault: running, pid {state.pid}, up {uptime:.0f} s")
    print(f"  address   {state.host}:{state.port}")
    print(f"  mode      {_mode(state.mode)}")
    if state.init_pid is not None:
        print(f"  init      fly-vault-init, pid {state.init_pid}")
    print(f"  issuer    {state.issuer_base_url} (development stand-in, not Fly)")
    print(f"  data      {state.data_dir}")
    print(f"  log       {state.log_file}")
    return 0


def _mode(mode: str) -> str:
    if mode == "vm":
        return "vm mode: the rootfs runs in its own namespaces, provisioned by the first connect"
    return "host mode: commands run as the current user on this machine, no rootfs"
