"""``fly-vault doctor VAULT``: every step of a connection, its outcome and timing.

The report never contains the access token. On failure it names the likely cause and the
fix, and the exit code is the failed step's error class (3 config, 4 unreachable,
5 attestation, 6 token, 7 protocol).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict
from typing import Any

from flyvault.errors import VaultError


def print_step(report: Any) -> None:
    """One line per step (a ``flyvault.client.DiagnosisStep``), with the fix under it."""
    status = "ok  " if report.ok else "FAIL"
    print(f"  {status}  {report.step:<13} {report.detail}  ({report.elapsed_ms:.1f} ms)")
    if report.hint:
        print(f"        fix: {report.hint}")


def run(args: argparse.Namespace) -> int:
    from flyvault.config import load_vault
    from flyvault.paths import config_file

    steps: list[dict[str, Any]] = []  # the JSON report's steps

    def record(step: Any) -> None:
        steps.append(asdict(step))
        if not args.json:
            print_step(step)

    if not args.json:
        print(f"fly-vault doctor {args.vault}")
    started = time.perf_counter()
    code = 0
    failure: VaultError | None = None
    unobserved: Any = None
    transport: str | None = None  # "proxy" or "direct", once the config is read
    try:
        vault = load_vault(args.vault)
    except VaultError as exc:
        elapsed = (time.perf_counter() - started) * 1000  # before the import below
        from flyvault.client import DiagnosisStep

        record(DiagnosisStep("config", False, elapsed, exc.message, exc.hint))
        failure, code = exc, exc.exit_code
    else:
        elapsed = (time.perf_counter() - started) * 1000  # the client's import is not config
        from flyvault.client import DiagnosisStep

        record(
            DiagnosisStep(
                "config",
                True,
                elapsed,
                f"{config_file()} [vault.{vault.name}] -> {vault.address}, org {vault.org}, "
                f"app {vault.app}"
                + (f", machine {vault.machine_id}" if vault.machine_id else ", machine not pinned")
                + (
                    "; proxy mode (the address is a vault-proxy, datagrams carry the machine id)"
                    if vault.proxy
                    else "; direct"
                ),
            )
        )
        transport = "proxy" if vault.proxy else "direct"
        diagnosis = asyncio.run(_diagnose(vault, record))
        failure = diagnosis.error
        code = failure.exit_code if failure is not None else 0
        unobserved = diagnosis.unobserved_failure()
    if args.json:
        print(
            json.dumps(
                {
                    "vault": args.vault,
                    "ok": failure is None,
                    "exit_code": code,
                    "transport": transport,
                    "steps": steps,
                },
                indent=2,
            )
        )
    elif failure is None:
        print(f"vault '{args.vault}' is reachable, attested and accepts the access token.")
    else:
        if unobserved is not None:
            # A failure outside the observed steps (e.g. the token missing from the config).
            print_step(unobserved)
        print(f"vault '{args.vault}': FAILED (exit code {code})", file=sys.stderr)
    return code


async def _diagnose(vault_config: Any, on_step: Any) -> Any:
    """A fresh connection that never provisions, closed afterwards."""
    from flyvault.cli.output import print_event
    from flyvault.client import Vault

    vault = Vault(vault_config, on_event=print_event)
    try:
        return await vault.diagnose(fresh=True, on_step=on_step)
    finally:
        await vault.close()
