"""System steps: ``packages`` (apt, apk, dnf or pacman, detected) and ``service``
(systemd), as POSIX scripts run as root in the vault. What the rootfs cannot do (no package
manager, no systemd) is a recorded skip with the reason, or a failure when the plan
requires it.

Only the packages that were missing are recorded for removal, and ``reverse`` keeps any
package another plan's record wants too (a refcount over the ledger's records: each
packages step records every package it wants, installed by it or not).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from flyvault.client.deploy.guest import ROOT, RunResult

MANAGERS = ("apt", "apk", "dnf", "pacman")
_BINARIES = {"apt": "apt-get", "apk": "apk", "dnf": "dnf", "pacman": "pacman"}
#: Prints the names of the packages given as arguments that are not installed.
_MISSING = {
    "apt": 'for p do dpkg-query -W -f=\'${Status}\\n\' "$p" 2>/dev/null | grep -q "ok installed" '
    '|| echo "$p"; done',
    "apk": 'for p do apk info -e "$p" >/dev/null 2>&1 || echo "$p"; done',
    "dnf": 'for p do rpm -q "$p" >/dev/null 2>&1 || echo "$p"; done',
    "pacman": 'for p do pacman -Q "$p" >/dev/null 2>&1 || echo "$p"; done',
}
#: apt updates its lists only when they are missing or over a day old.
_INSTALL = {
    "apt": "export DEBIAN_FRONTEND=noninteractive\n"
    'if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name "*_Packages*" -mtime -1 2>/dev/null)" ]; '
    "then apt-get update -q; fi\n"
    "apt-get install -y -q --no-install-recommends {packages}",
    "apk": "apk add --no-cache {packages}",
    "dnf": "dnf install -y {packages}",
    "pacman": "pacman -S --noconfirm --needed {packages}",
}
_REMOVE = {
    "apt": "DEBIAN_FRONTEND=noninteractive apt-get remove -y -q {packages}",
    "apk": "apk del {packages}",
    "dnf": "dnf remove -y {packages}",
    "pacman": "pacman -R --noconfirm {packages}",
}


@dataclass(frozen=True)
class Outcome:
    """What a system step did: ``skip`` (a reason) or ``result`` (a script's end)."""

    result: RunResult | None = None
    skip: str | None = None
    reason: str = ""
    reverse_ops: tuple[dict[str, Any], ...] = ()


async def _sh(
    guest: Any, script: str, *args: str, timeout: float = 1800.0, probe: bool = False
) -> RunResult:
    """``script`` as root with ``args`` as its "$@"; ``probe``: it changes nothing."""
    quoted = " ".join(shlex.quote(a) for a in args)
    return await guest.run(
        f"set -- {quoted}\n{script}", account=ROOT, as_user=False, timeout=timeout, probe=probe
    )


async def detect_manager(guest: Any, wanted: str) -> str | None:
    names = MANAGERS if wanted == "auto" else (wanted,)
    for name in names:
        found = await _sh(guest, 'command -v "$1" >/dev/null 2>&1', _BINARIES[name], probe=True)
        if found.ok:
            return name
    return None


async def packages(guest: Any, fields: dict[str, Any]) -> Outcome:
    wanted = sorted(set(fields["packages"]))
    manager = await detect_manager(guest, fields["manager"])
    if manager is None:
        where = "" if fields["manager"] == "auto" else f" ({fields['manager']})"
        reason = f"no package manager{where} in this rootfs"
        if fields["required"]:
            return Outcome(result=RunResult(127, b"", reason.encode()))
        return Outcome(skip=reason)
    probe = await _sh(guest, _MISSING[manager], *wanted, probe=True)
    if not probe.ok:
        return Outcome(result=probe)
    missing = [name for name in probe.stdout.decode().split() if name in wanted]
    if not missing:
        # Recorded all the same: what this plan wants is kept when another plan that
        # installed it is reversed (the refcount reads "wanted").
        keep = {"kind": "package-remove", "manager": manager, "packages": [], "wanted": wanted}
        return Outcome(reason=f"{manager}: all present ({', '.join(wanted)})", reverse_ops=(keep,))
    listed = " ".join(shlex.quote(name) for name in missing)
    installed = await _sh(guest, _INSTALL[manager].format(packages=listed))
    if not installed.ok:
        return Outcome(result=installed)
    op = {
        "kind": "package-remove",
        "manager": manager,
        "packages": missing,
        "wanted": wanted,
        "command": remove_command(manager, missing),
    }
    return Outcome(reason=f"{manager}: installed {', '.join(missing)}", reverse_ops=(op,))


def remove_command(manager: str, names: list[str]) -> str:
    """The removal rendered in full (recorded with the op, shown by a dry-run reverse)."""
    return _REMOVE[manager].format(packages=" ".join(shlex.quote(n) for n in names))


async def service(guest: Any, fields: dict[str, Any], unit_path: str | None) -> Outcome:
    """Enable (required) and start (per ``start``) a systemd unit; ``unit_path``: where the
    step wrote the unit file (then daemon-reload first)."""
    systemd = await _sh(guest, "test -d /run/systemd/system", probe=True)
    if not systemd.ok:
        reason = "no systemd running in this vault"
        if fields["required"]:
            return Outcome(result=RunResult(1, b"", reason.encode()))
        return Outcome(skip=reason)
    unit = fields["unit"]
    ops: list[dict[str, Any]] = []
    if unit_path is not None:
        reloaded = await _sh(guest, "systemctl daemon-reload")
        if not reloaded.ok:
            return Outcome(result=reloaded)
    enabled_before = (await _sh(guest, 'systemctl is-enabled --quiet "$1"', unit, probe=True)).ok
    if fields["enable"]:
        enabled = await _sh(guest, 'systemctl enable --quiet "$1"', unit)
        if not enabled.ok:
            return Outcome(result=enabled)
        if not enabled_before:
            ops.append({"kind": "service-disable", "unit": unit, "target": unit})
    notes = []
    if fields["start"] != "no":
        started = await _sh(guest, 'systemctl start "$1"', unit, timeout=300.0)
        if not started.ok:
            if fields["start"] == "required":
                return Outcome(result=started)
            notes.append(
                f"start failed (exit {started.code}), best effort: {started.tail().strip()}"
            )
        else:
            notes.append("started")
            ops.append({"kind": "service-stop", "unit": unit, "target": unit})
    reason = f"{unit}: " + ", ".join((["enabled"] if fields["enable"] else []) + notes)
    return Outcome(reason=reason, reverse_ops=tuple(ops))


async def undo(guest: Any, op: dict[str, Any], others: list[dict[str, Any]]) -> str | None:
    """A recorded system op; ``others``: the package ops of the other plans' records (a
    package one of them also added is kept). Returns a note, or raises on failure."""
    from flyvault.errors import VaultError

    kind = op["kind"]
    if kind == "package-remove":
        if not op["packages"]:
            return None  # it installed nothing
        shared = {name for other in others for name in other.get("wanted", other["packages"])}
        removable = [name for name in op["packages"] if name not in shared]
        if not removable:
            return "kept: other plans want them too"
        listed = " ".join(shlex.quote(name) for name in removable)
        result = await _sh(guest, _REMOVE[op["manager"]].format(packages=listed))
        if not result.ok:
            raise VaultError(f"removing {listed} exited {result.code}: {result.tail().strip()}")
        kept = sorted(set(op["packages"]) - set(removable))
        return f"kept {', '.join(kept)} (other plans want them too)" if kept else None
    script = {
        "service-disable": 'systemctl disable --quiet "$1"',
        "service-stop": 'systemctl stop "$1"',
        "service-reload": "systemctl daemon-reload",
    }[kind]
    systemd = await _sh(guest, "test -d /run/systemd/system", probe=True)
    if not systemd.ok:
        return "no systemd running now: nothing to undo"
    result = await _sh(guest, script, *([op["unit"]] if kind != "service-reload" else []))
    if not result.ok:
        raise VaultError(
            f"{script.split()[1]} {op['unit']} exited {result.code}: {result.tail().strip()}"
        )
    return None
