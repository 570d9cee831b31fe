"""Who a command runs as: accounts from ``/etc/passwd`` and ``/etc/group``, as a login has.

In VM mode the files are the workload's own (read inside its root by ``WorkloadRuntime``);
in host mode they are the host's (``pwd``/``grp``). Root is the default: an image without a
passwd entry for root still gets root with the usual home and shell, as before. Any other
name must be in the file: an unknown user is refused (``SpawnError``), never mapped to root.

``Credentials`` is what the child applies before exec: supplementary groups first, then the
group, then the user (the other order would leave root's groups, or fail for lack of the
privilege once the uid is gone).
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass

from flyvault.errors import SpawnError

from .nsinit import WORKLOAD_ENV

#: PATH of a login, as sshd sets it (root gets the sbin directories).
ROOT_PATH = WORKLOAD_ENV["PATH"]
USER_PATH = "/usr/local/bin:/usr/bin:/bin"
#: How much of /etc/passwd or /etc/group is read at most.
MAX_ACCOUNT_FILE = 4 * 1024 * 1024
#: Supplementary groups beyond this many are left out (the kernel's NGROUPS_MAX is 65536;
#: a login rarely has more than a few dozen).
MAX_GROUPS = 1024


@dataclass(frozen=True)
class Account:
    """An account commands run as, from ``/etc/passwd`` (and its groups from ``/etc/group``)."""

    name: str = "root"
    uid: int = 0
    gid: int = 0
    home: str = "/root"
    shell: str = "/bin/sh"
    #: Supplementary groups (the primary one included), as ``initgroups`` would set them.
    groups: tuple[int, ...] = ()

    def environment(self) -> dict[str, str]:
        """What sshd sets for a login: HOME, USER, LOGNAME, SHELL and PATH."""
        return {
            "HOME": self.home,
            "USER": self.name,
            "LOGNAME": self.name,
            "SHELL": self.shell,
            "PATH": ROOT_PATH if self.uid == 0 else USER_PATH,
        }

    def with_groups(self, groups: tuple[int, ...]) -> Account:
        return Account(self.name, self.uid, self.gid, self.home, self.shell, groups)


def parse_passwd(text: str, user: str = "root") -> Account | None:
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) < 7 or fields[0] != user:
            continue
        try:
            uid, gid = int(fields[2]), int(fields[3])
        except ValueError:
            continue
        if not (0 <= uid < 2**32 - 1 and 0 <= gid < 2**32 - 1):
            continue
        home = fields[5] if fields[5].startswith("/") else "/"
        shell = fields[6] if fields[6].startswith("/") else "/bin/sh"
        return Account(user, uid, gid, home, shell)
    return None


def parse_groups(text: str, user: str, gid: int) -> tuple[int, ...]:
    """The primary ``gid`` and every group of ``/etc/group`` that lists ``user`` as a member."""
    groups = [gid]
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) < 4 or user not in fields[3].split(","):
            continue
        try:
            number = int(fields[2])
        except ValueError:
            continue
        if 0 <= number < 2**32 - 1 and number not in groups:
            groups.append(number)
    return tuple(groups[:MAX_GROUPS])


def unknown_user(user: str, where: str) -> SpawnError:
    return SpawnError(
        f"cannot run as user {user!r}: no such user in {where}; name an account of that "
        "file, or leave the user out to run as root"
    )


def host_account(user: str) -> Account:
    """``user`` on this host (host mode). Raises ``SpawnError``: unknown user, or a server
    that is not root asked for someone else (it could not switch)."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise unknown_user(user, "this host's /etc/passwd (the vault runs in host mode)") from None
    uid = os.geteuid()
    if uid != 0 and entry.pw_uid != uid:
        raise SpawnError(
            f"cannot run as user {user!r}: this vault runs in host mode as uid {uid}, not "
            "root, and can only run commands as itself; leave the user out, or run "
            "fly-vault-init as root"
        )
    home = entry.pw_dir if entry.pw_dir.startswith("/") else "/"
    shell = entry.pw_shell if entry.pw_shell.startswith("/") else "/bin/sh"
    try:
        groups = tuple(os.getgrouplist(user, entry.pw_gid))[:MAX_GROUPS]
    except OSError:
        groups = (entry.pw_gid,)
    return Account(user, entry.pw_uid, entry.pw_gid, home, shell, groups)


def switch_to(account: Account) -> None:  # pragma: no cover - runs in the child
    """In the child, before exec: become ``account`` (groups, then gid, then uid)."""
    os.setgroups(list(account.groups or (account.gid,)))
    os.setgid(account.gid)
    os.setuid(account.uid)


__all__ = [
    "Account",
    "host_account",
    "parse_groups",
    "parse_passwd",
    "switch_to",
    "unknown_user",
]
