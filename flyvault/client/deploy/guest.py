"""The vault seen by the deploy engine: scripts through exec, files through the file stream.

Exit codes are data (``RunResult``); a lost connection or a refusal is an exception from the
shared error tree, never an exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass
from typing import Any

from flyvault.client.exec_request import ExecRequest, new_session_id
from flyvault.errors import NotFoundError, UsageError, VaultError

#: Kept of a failing step's output for the ledger and the report.
TAIL = 4096
#: The exit code of a script killed at its timeout (as timeout(1) reports it).
TIMED_OUT = 124
#: What every step script starts with: the exec environment is init's own (no HOME, no
#: TERM), so the script sets what shell tools expect.
PREAMBLE = "umask 022\nexport HOME={home} USER={user} LOGNAME={user}\nexport PATH={path}\n"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class RunResult:
    code: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.code == 0

    def tail(self) -> str:
        return self.stderr[-TAIL:].decode("utf-8", "replace")


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: str
    shell: str


class VaultGuest:
    """One vault, for one apply, status or reverse."""

    def __init__(self, vault: Any) -> None:
        self.vault = vault
        self.probes: list[str] = []  # what ran, for the report and the tests of purity

    def files(self, user: str | None = None) -> Any:
        return self.vault.files(user=user)

    async def run(
        self,
        script: str,
        *,
        account: Account,
        as_user: bool,
        env: dict[str, str] | None = None,
        timeout: float = 600.0,
        probe: bool = False,
    ) -> RunResult:
        """``script`` under ``/bin/sh -c``, as root or as ``account``."""
        from flyvault.client.session import ExecHooks, ExecSession

        runner = account if as_user else ROOT
        preamble = PREAMBLE.format(
            home=_quote(runner.home), user=_quote(runner.name), path=SYSTEM_PATH
        )
        request = ExecRequest(
            session_id=new_session_id(),
            argv=("/bin/sh", "-c", preamble + script, "fly-vault-deploy"),
            env=tuple(sorted((env or {}).items())),
            user=account.name if as_user and account.name != "root" else None,
            cwd=runner.home,
        )
        stdout, stderr = bytearray(), bytearray()
        session = ExecSession(self.vault, request, ExecHooks(stdout.extend, stderr.extend))
        session.close_stdin()  # a script reading stdin sees its end, not a wait
        self.probes.append(("probe: " if probe else "run: ") + script)
        try:
            async with asyncio.timeout(timeout):
                exited = await session.run()
        except TimeoutError:
            # Killed, not left running beside the next apply; a failure like any other.
            with contextlib.suppress(VaultError):
                await self.vault.kill(request.session_id, signal.SIGKILL)
            note = f"\nfly-vault: killed after its {timeout:g} s timeout\n".encode()
            return RunResult(TIMED_OUT, bytes(stdout), bytes(stderr) + note)
        return RunResult(exited.exit_status, bytes(stdout), bytes(stderr))

    async def account(self, name: str) -> Account:
        """``name``'s entry in the vault's /etc/passwd (busybox has no getent)."""
        try:
            text = (await self.files().read_bytes("/etc/passwd")).decode("utf-8", "replace")
        except NotFoundError:
            raise UsageError("the vault's rootfs has no /etc/passwd") from None
        for line in text.splitlines():
            parts = line.split(":")
            if len(parts) >= 7 and parts[0] == name:
                try:
                    uid, gid = int(parts[2]), int(parts[3])
                except ValueError:
                    break
                return Account(name, uid, gid, parts[5] or "/", parts[6] or "/bin/sh")
        raise UsageError(
            f"user {name!r} is not in the vault's /etc/passwd",
            hint="create it first (a shell step of another plan), or set [target] user",
        )

    async def read_text(self, path: str, user: str | None = None) -> str | None:
        """The file's text, or None when it does not exist."""
        try:
            # surrogateescape: any bytes survive a read-modify-write unchanged.
            return (await self.files(user).read_bytes(path)).decode("utf-8", "surrogateescape")
        except NotFoundError:
            return None

    async def exists(self, path: str) -> bool:
        try:
            await self.files().stat(path)
        except NotFoundError:
            return False
        return True


ROOT = Account("root", 0, 0, "/root", "/bin/sh")


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)
