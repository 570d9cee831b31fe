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
from dataclasses import asdict, dataclass

from flyvault.errors import VaultError


@dataclass
class StepReport:
    step: str
    ok: bool
    elapsed_ms: float
    detail: str
    hint: str | None = None


class _Recorder:
    def __init__(self, emit: bool) -> None:
        self.steps: list[StepReport] = []
        self._emit = emit

    def step_started(self, step: str, detail: str) -> None:
        pass

    def step_finished(self, step: str, elapsed: float, detail: str) -> None:
        self._add(StepReport(step, True, elapsed * 1000, detail))

    def step_failed(self, step: str, elapsed: float, error: VaultError) -> None:
        from flyvault.errors import ColdVault

        # A cold vault accepted the token; provisioning is simply what comes next.
        ok = isinstance(error, ColdVault)
        self._add(StepReport(step, ok, elapsed * 1000, error.message, None if ok else error.hint))

    def _add(self, report: StepReport) -> None:
        self.steps.append(report)
        if self._emit:
            print_step(report)


def print_step(report: StepReport) -> None:
    status = "ok  " if report.ok else "FAIL"
    print(f"  {status}  {report.step:<13} {report.detail}  ({report.elapsed_ms:.1f} ms)")
    if report.hint:
        print(f"        fix: {report.hint}")


def run(args: argparse.Namespace) -> int:
    from flyvault.config import load_vault
    from flyvault.paths import config_file

    recorder = _Recorder(emit=not args.json)
    if not args.json:
        print(f"fly-vault doctor {args.vault}")
    started = time.perf_counter()
    code = 0
    failure: VaultError | None = None
    transport: str | None = None  # "proxy" or "direct", once the config is read
    try:
        vault = load_vault(args.vault)
    except VaultError as exc:
        recorder.step_failed("config", time.perf_counter() - started, exc)
        failure, code = exc, exc.exit_code
    else:
        recorder.step_finished(
            "config",
            time.perf_counter() - started,
            f"{config_file()} [vault.{vault.name}] -> {vault.address}, org {vault.org}, "
            f"app {vault.app}"
            + (f", machine {vault.machine_id}" if vault.machine_id else ", machine not pinned")
            + (
                "; proxy mode (the address is a vault-proxy, datagrams carry the machine id)"
                if vault.proxy
                else "; direct"
            ),
        )
        transport = "proxy" if vault.proxy else "direct"
        from flyvault.client.connection import announce_issuer_override, open_vault
        from flyvault.errors import ColdVault

        announce_issuer_override(vault)

        async def check() -> None:
            connection = await open_vault(vault, observer=recorder, provision=False)
            connection.close()

        try:
            asyncio.run(check())
        except ColdVault:
            pass  # reported as a passing step by the recorder
        except VaultError as exc:
            failure, code = exc, exc.exit_code
    if args.json:
        print(
            json.dumps(
                {
                    "vault": args.vault,
                    "ok": failure is None,
                    "exit_code": code,
                    "transport": transport,
                    "steps": [asdict(step) for step in recorder.steps],
                },
                indent=2,
            )
        )
    elif failure is None:
        print(f"vault '{args.vault}' is reachable, attested and accepts the access token.")
    else:
        if not recorder.steps or recorder.steps[-1].ok:
            # A failure outside the observed steps (e.g. the token missing from the config).
            print_step(StepReport("config", False, 0.0, failure.message, failure.hint))
        print(f"vault '{args.vault}': FAILED (exit code {code})", file=sys.stderr)
    return code
