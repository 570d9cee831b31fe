"""``fly-vault doctor VAULT``: every step of a connection, its outcome and timing.

The report never contains the access token. On failure it names the likely cause and the
fix, and the exit code is the failed step's error class (3 config, 4 unreachable,
5 attestation, 6 token, 7 protocol).

The steps test the path a new connection takes, always with a fresh connection. After them
comes the ``keeper`` step: the vault's connection keeper (``flyvault.cli.mux``), when one
listens, is asked over its socket for its status and one PING over its live connection.
Doctor never starts a keeper, and the keeper step never changes the exit code: a stale or
hung keeper is reported (WARN) with the way out, the fresh path is what the code says.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict
from typing import Any

from flyvault.errors import VaultError

#: The step that reports the connection keeper.
STEP_KEEPER = "keeper"
#: How long doctor waits for a keeper to accept its request, and then for each part of the
#: answer: a live keeper accepts at once and bounds its PING by its own 1.5 s.
KEEPER_TIMEOUT = 3.0
#: A keeper younger than this may still be starting (it takes its socket before it imports
#: QUIC and reads the config, which a loaded machine makes slow): it gets this long.
KEEPER_START_TIMEOUT = 15.0
_NOT_COUNTED = "not counted in the exit code"


def print_step(report: Any) -> None:
    """One line per step (a ``flyvault.client.DiagnosisStep``), with the fix under it. A
    keeper step that is not ok is a warning: it never fails the doctor."""
    warn = report.step == STEP_KEEPER
    status = "ok  " if report.ok else ("WARN" if warn else "FAIL")
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
    keeper: dict[str, Any] | None = None  # what the keeper step found
    keeper_ok = True
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
        if unobserved is not None and not args.json:
            # A failure outside the observed steps (e.g. the token missing from the config).
            print_step(unobserved)
        step, keeper = check_keeper(args, vault)
        keeper_ok = step.ok
        record(step)
    if args.json:
        print(
            json.dumps(
                {
                    "vault": args.vault,
                    "ok": failure is None,
                    "exit_code": code,
                    "transport": transport,
                    "steps": steps,
                    "keeper": keeper,
                },
                indent=2,
            )
        )
    elif failure is None:
        print(f"vault '{args.vault}' is reachable, attested and accepts the access token.")
        if not keeper_ok:
            print(f"its connection keeper needs a look (above; {_NOT_COUNTED}).")
    else:
        print(f"vault '{args.vault}': FAILED (exit code {code})", file=sys.stderr)
    return code


def check_keeper(args: argparse.Namespace, vault: Any) -> tuple[Any, dict[str, Any]]:
    """The keeper step and what it found, for the JSON report (``state``: ``off``,
    ``none``, ``unusable``, ``stale``, ``not answering`` or ``running``, and the keeper's
    own figures when it answered). Asks a keeper that listens; never starts one."""
    from flyvault.client import DiagnosisStep

    started = time.perf_counter()
    ok, detail, hint, found = _keeper_report(args, vault)
    elapsed = (time.perf_counter() - started) * 1000
    return DiagnosisStep(STEP_KEEPER, ok, elapsed, detail, hint), found


def _young(pid_file: Any) -> bool:
    """Whether the keeper's pid file says it started less than KEEPER_START_TIMEOUT ago."""
    try:
        started = float(json.loads(pid_file.read_text()).get("started_at") or 0)
    except (OSError, ValueError, AttributeError):
        return False
    return time.time() - started < KEEPER_START_TIMEOUT


def _keeper_report(
    args: argparse.Namespace, vault: Any
) -> tuple[bool, str, str | None, dict[str, Any]]:
    from flyvault.cli.mux import keeper_off_reason
    from flyvault.client.keeper_start import locate
    from flyvault.client.mux import KeeperLink, KeeperUnavailable
    from flyvault.errors import ConfigError

    try:
        reason = keeper_off_reason(args)
    except VaultError as exc:  # a bad FLY_VAULT_MUX: every call through a keeper fails
        return False, f"{exc.message} ({_NOT_COUNTED})", exc.hint, {"state": "unusable"}
    if reason is None and not vault.mux:
        reason = f"mux = false in [vault.{vault.name}]"
    if reason is not None:
        detail = f"keepers off ({reason}): such calls connect directly"
        return True, detail, None, {"state": "off", "reason": reason}
    none_running = "none running; the next exec (or list-exec, kill, cp, forward) starts one"
    try:
        paths = locate(vault.name, create=False)
    except FileNotFoundError:  # not even the directory: no keeper ever ran here
        return True, none_running, None, {"state": "none"}
    except (OSError, ConfigError) as exc:
        detail = f"connection keepers cannot be used here: {exc}; calls connect directly"
        hint = "fix the directory's owner and mode (0700), or set XDG_RUNTIME_DIR"
        return False, f"{detail} ({_NOT_COUNTED})", hint, {"state": "unusable"}
    found: dict[str, Any] = {"socket": str(paths.socket)}
    if not os.path.lexists(paths.socket):
        return True, none_running, None, {**found, "state": "none"}
    stop = f"fly-vault mux stop {vault.name}"
    try:
        timeout = KEEPER_START_TIMEOUT if _young(paths.pid) else KEEPER_TIMEOUT
        link = KeeperLink.open(paths.socket, "ping", answer_timeout=timeout)
    except KeeperUnavailable as exc:
        detail = (
            f"a keeper socket is there but no keeper answers ({exc}); {_NOT_COUNTED}: "
            "the next call replaces it with a new keeper"
        )
        return False, detail, f"{stop} removes it now", {**found, "state": "stale"}
    except VaultError as exc:  # silent (a hung or stopped keeper), or it refused us
        detail = f"{exc.message}; {_NOT_COUNTED}, but calls through it wait for it and fail"
        return (
            False,
            detail,
            f"{stop} (it is ended by its PID)",
            {
                **found,
                "state": "not answering",
            },
        )
    try:
        value = link.result()
    except (VaultError, OSError) as exc:
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        detail = f"the connection keeper accepted but did not answer: {message} ({_NOT_COUNTED})"
        return (
            False,
            detail,
            f"{stop} (it is ended by its PID)",
            {
                **found,
                "state": "not answering",
            },
        )
    finally:
        link.close()
    return _running(value, found, stop)


def _running(
    value: dict[str, Any], found: dict[str, Any], stop: str
) -> tuple[bool, str, str | None, dict[str, Any]]:
    age = max(0.0, time.time() - float(value.get("started_at") or time.time()))
    requests, connects = int(value.get("requests") or 0), int(value.get("connects") or 0)
    head = (
        f"pid {value.get('pid')}, up {_duration(age)}, {_plural(requests, 'request')}, "
        f"{_plural(connects, 'connect')}"
    )
    found = {
        **found,
        "state": "running",
        **{
            key: value.get(key)
            for key in ("pid", "started_at", "requests", "active", "connected", "connects")
        },
        "age_seconds": round(age, 3),
        "answered": value.get("answered"),
        "rtt_ms": value.get("rtt_ms"),
    }
    answered = value.get("answered")
    if answered is None:  # no live connection: the next call through it connects
        return True, f"{head}, not connected (the next call connects it)", None, found
    if answered:
        return True, f"{head}, connection answered in {float(value['rtt_ms']):.1f} ms", None, found
    timeout = float(value.get("probe_timeout") or 0)
    detail = (
        f"{head}; its connection to the vault did not answer a PING within {timeout:g} s "
        f"({_NOT_COUNTED}: the next call through it checks the connection and reconnects)"
    )
    return False, detail, f"{stop} to start over with a fresh keeper", found


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


async def _diagnose(vault_config: Any, on_step: Any) -> Any:
    """A fresh connection that never provisions, closed afterwards."""
    from flyvault.cli.output import print_event
    from flyvault.client import Vault

    vault = Vault(vault_config, on_event=print_event)
    try:
        return await vault.diagnose(fresh=True, on_step=on_step)
    finally:
        await vault.close()
