"""PID 1 of the workload: mount the workload's filesystems, pivot_root, exec its init.

Started by ``server.runtime`` as::

    python -I -S server/nsinit.py launch --status PATH --parent PID --join CGROUP.PROCS... -- \\
    unshare --pid --mount --cgroup --uts --ipc --fork --kill-child=KILL --propagation private -- \\
        python -I -S server/nsinit.py ROOTFS PERSIST_DIR [--init /sbin/init] [--status PATH] \\
            [--hostname NAME] [--cgroup2]

The ``launch`` step joins the workload's cgroups (so the cgroup namespace unshare makes is
rooted there), ties itself to init with ``PR_SET_PDEATHSIG`` and execs unshare. This
program then runs as PID 1 of new PID, mount, cgroup, UTS and IPC namespaces. It sets the
hostname and makes the workload's root (§6.6 of the original, with flaw 15 fixed: the
original mounted no ``/proc``, ``/dev`` or ``/tmp``, so anything but systemd got a barely
usable system):

* ``ROOTFS`` bind-mounted onto itself (pivot_root needs a mount point), ``PERSIST_DIR/root``
  and ``PERSIST_DIR/home`` bind-mounted onto ``ROOTFS/root`` and ``ROOTFS/home``;
* ``/proc``, a read-only ``/sys`` with the workload's own cgroup2 hierarchy on
  ``/sys/fs/cgroup`` (read-write, rooted at its cgroup by the namespace: systemd needs it),
  a ``/dev`` tmpfs with the usual nodes, a private ``/dev/pts`` instance and ``/dev/shm``,
  and tmpfs ``/run`` and ``/tmp``;
* the image's ``/etc/hostname`` (if it is a file) covered by one holding ``--hostname``, so
  an init that sets the hostname from it (systemd) keeps the vault's name;
* ``pivot_root`` into ROOTFS, the old root detached, then ``exec`` of ``--init``.

When the init cannot be executed (missing, not executable, bad format) this process stays
PID 1 as a minimal reaper, so that ``nsenter`` shells still have a namespace to enter, and
writes ``/.fly-vault-fallback-init`` into the root.

Progress goes to the runtime as lines on ``--status`` (a FIFO the runtime reads):
``hello``, ``ready``, then ``exec PATH`` (the FIFO then closes on a successful exec, since
it is close-on-exec), or ``fallback REASON``, or ``error MESSAGE`` before exiting 1.

Deliberately stdlib only and runnable as a plain file (``-I -S``): it must not depend on
the server's package or site-packages, and everything it needs is imported before
pivot_root, after which the host's files are gone.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import platform
import signal
import stat
import subprocess
import sys
from collections.abc import Sequence

#: The workload's whole environment. Built here rather than inherited, so nothing of the
#: server's environment (ACCESS_TOKEN above all, flaw 3) can ever reach the workload.
WORKLOAD_ENV: dict[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "TERM": "linux",
    "container": "fly-vault",
}

#: Written into the new root when the fallback reaper runs (the original's path, §6.1).
FALLBACK_MARKER = ".fly-vault-fallback-init"

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2
PR_SET_PDEATHSIG = 1
#: Inside the workload: the file that covers the image's /etc/hostname.
HOSTNAME_FILE = "run/fly-vault/hostname"

#: pivot_root has no libc wrapper; its syscall number differs per architecture. On any
#: other architecture the util-linux ``pivot_root`` binary is used instead.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "i686": 217, "s390x": 217}

#: Character devices of /dev: name -> (major, minor). The same set as Docker's defaults.
_DEVICES = {
    "null": (1, 3),
    "zero": (1, 5),
    "full": (1, 7),
    "random": (1, 8),
    "urandom": (1, 9),
    "tty": (5, 0),
}
_DEV_SYMLINKS = {
    "ptmx": "pts/ptmx",  # the ptmx of this namespace's own devpts instance
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
}

# The interpreter links libc, so its symbols are reachable without searching for it.
_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    """A mount step failed; the message names the step."""


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(code)}")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {fstype or 'bind'} {source} on {target}",
    )


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    number = _SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        result = subprocess.run(["pivot_root", new_root, put_old], check=False)
        if result.returncode != 0:
            raise SetupError(f"pivot_root {new_root}: exit status {result.returncode}")
        return
    _check(_libc.syscall(number, new_root.encode(), put_old.encode()), f"pivot_root {new_root}")


def _mountpoint(path: str, mode: int = 0o755) -> str:
    """Make sure ``path`` is a real directory to mount on, creating it when missing.

    A symlink is refused rather than followed: mount(2) would follow it, and a rootfs whose
    ``/proc`` points at ``/etc`` would otherwise mount over the host's /etc in this mount
    namespace before pivot_root.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        os.mkdir(path, mode)
        return path
    if not stat.S_ISDIR(info.st_mode):
        raise SetupError(f"{path} must be a directory (it is a symlink or a file)")
    return path


def _make_dev(dev: str) -> None:
    mount("tmpfs", _mountpoint(dev), "tmpfs", MS_NOSUID, "mode=755,size=65536k")
    for name, (major, minor) in _DEVICES.items():
        path = os.path.join(dev, name)
        try:
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(major, minor))
            os.chmod(path, 0o666)  # mknod's mode is filtered by the umask
        except OSError:
            # No CAP_MKNOD (a restricted container): bind the host's node instead.
            with open(path, "w"):
                pass
            mount(f"/dev/{name}", path, None, MS_BIND)
    for name, target in _DEV_SYMLINKS.items():
        os.symlink(target, os.path.join(dev, name))
    # newinstance: the workload's ptys are its own, numbered from 0, and /dev/ptmx (a
    # symlink to pts/ptmx) must be usable by non-root users, hence ptmxmode.
    mount(
        "devpts",
        _mountpoint(os.path.join(dev, "pts")),
        "devpts",
        MS_NOSUID | MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620,gid=5",
    )
    mount("shm", _mountpoint(os.path.join(dev, "shm")), "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")


def _make_sys(sys_dir: str) -> None:
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    try:
        mount("sysfs", _mountpoint(sys_dir), "sysfs", flags)
    except SetupError as exc:
        # sysfs refuses a fresh mount in some sandboxes; the workload can live without it.
        _say_stderr(f"warning: {exc}; /sys is left empty")


def _make_cgroup(rootfs: str) -> None:
    """The workload's own cgroup2 hierarchy on /sys/fs/cgroup (the namespace roots it at
    the workload's cgroup). Read-write: systemd creates its cgroups there."""
    target = os.path.join(rootfs, "sys", "fs", "cgroup")
    if not os.path.isdir(target) or os.path.islink(target):
        _say_stderr("warning: the rootfs has no /sys/fs/cgroup to mount cgroup2 on")
        return
    mount("cgroup2", target, "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _cover_hostname(rootfs: str, hostname: str) -> None:
    """Bind a file holding ``hostname`` over the image's /etc/hostname, when it has one."""
    target = os.path.join(rootfs, "etc", "hostname")
    try:
        info = os.lstat(target)
    except OSError:
        return  # none: the init keeps the hostname it was given
    if not stat.S_ISREG(info.st_mode) or os.path.islink(os.path.join(rootfs, "etc")):
        return  # a symlink is never followed out of the rootfs
    source = os.path.join(rootfs, HOSTNAME_FILE)
    os.makedirs(os.path.dirname(source), mode=0o755, exist_ok=True)
    fd = os.open(source, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, (hostname + "\n").encode())
    finally:
        os.close(fd)
    mount(source, target, None, MS_BIND)


def set_hostname(hostname: str) -> None:
    data = hostname.encode()
    _check(_libc.sethostname(data, ctypes.c_size_t(len(data))), f"sethostname {hostname}")


def setup_root(
    rootfs: str, persist: str, *, hostname: str | None = None, cgroup2: bool = False
) -> None:
    """Everything before pivot_root. Paths are absolute host paths."""
    # unshare already made propagation private; again here so that nothing we mount can
    # leak into the host's mount table whoever started us.
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    mount(rootfs, rootfs, None, MS_BIND | MS_REC)
    os.makedirs(persist, mode=0o755, exist_ok=True)
    for name, mode in (("root", 0o700), ("home", 0o755)):
        source = os.path.join(persist, name)
        os.makedirs(source, mode=mode, exist_ok=True)
        if not os.path.isdir(source) or os.path.islink(source):
            raise SetupError(f"persistent {source} must be a directory")
        mount(source, _mountpoint(os.path.join(rootfs, name), mode), None, MS_BIND | MS_REC)
    mount(
        "proc", _mountpoint(os.path.join(rootfs, "proc")), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC
    )
    _make_sys(os.path.join(rootfs, "sys"))
    if cgroup2:
        _make_cgroup(rootfs)
    _make_dev(os.path.join(rootfs, "dev"))
    for name, options in (("run", "mode=755"), ("tmp", "mode=1777")):
        target = _mountpoint(os.path.join(rootfs, name))
        mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, options)
    if hostname:
        _cover_hostname(rootfs, hostname)


def enter_root(rootfs: str) -> None:
    # pivot_root(".", ".") stacks the old root on top of the new one at "/"; detaching it
    # leaves the new root. This needs no put_old directory inside the user's rootfs, so
    # nothing can be left behind there by a crash.
    os.chdir(rootfs)
    pivot_root(".", ".")
    umount2(".", MNT_DETACH)
    os.chdir("/")


class Status:
    """The write end of the runtime's status FIFO (or nothing when run by hand)."""

    def __init__(self, path: str | None) -> None:
        # Opened before pivot_root (the FIFO lives on the host) and close-on-exec, so a
        # successful exec of the init is seen by the runtime as end of file.
        self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC) if path else None

    def say(self, word: str, detail: str = "") -> None:
        if self.fd is None:
            return
        line = f"{word} {detail}".strip().replace("\n", " ") + "\n"
        # An error means the runtime gave up on us; it notices our exit or kills us.
        with contextlib.suppress(OSError):
            os.write(self.fd, line.encode(errors="replace"))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _say_stderr(message: str) -> None:
    try:
        sys.stderr.write(f"fly-vault nsinit: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def exec_init(init: str) -> OSError:
    """Replace this process by the init; returns only on failure, with the reason."""
    # Python ignores SIGPIPE and SIGXFSZ; ignored dispositions survive exec, and an init
    # (and everything it starts) must get the default ones.
    for signo in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(signo, signal.SIG_DFL)
    os.umask(0o022)
    try:
        os.execve(init, [init], WORKLOAD_ENV)
    except OSError as exc:
        return exc
    raise AssertionError("unreachable")  # pragma: no cover


def write_fallback_marker() -> None:
    try:
        with open("/" + FALLBACK_MARKER, "w") as marker:
            marker.write("1\n")
    except OSError as exc:  # a read-only rootfs: the runtime knows from the status line
        _say_stderr(f"cannot write the fallback marker: {exc}")


def reap_forever() -> int:
    """The fallback init: reap every child; on SIGTERM/SIGINT stop them all, then exit.

    Signals are blocked and taken with sigwaitinfo rather than handled: PID 1 of a
    namespace drops signals it has no handler for, but never drops blocked ones, and there
    is no window between "no child left" and "wait for a signal" to lose one in. waitpid(-1)
    is right here (we are the namespace's reaper), unlike in the server (§1.8).
    """
    watched = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    stopping = False
    while True:
        while True:  # reap everything that has exited
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                if stopping:
                    return 0
                break
            if pid == 0:
                break
        info = signal.sigwaitinfo(watched)
        if info.si_signo in (signal.SIGTERM, signal.SIGINT) and not stopping:
            stopping = True
            try:
                os.kill(-1, signal.SIGTERM)  # every process of the namespace but us
                # A stopped process only acts on SIGTERM once continued (as systemd does).
                os.kill(-1, signal.SIGCONT)
            except ProcessLookupError:
                return 0  # nothing else runs in the namespace


def launch(argv: Sequence[str]) -> int:
    """``launch --status PATH --parent PID [--join FILE]... -- COMMAND...``: the step before
    unshare. Joins the workload's cgroups (writing to each ``cgroup.procs``), gets SIGKILL
    when its parent (init) dies, and gives the workload the default OOM score (init lowers
    its own), then execs COMMAND."""
    parser = argparse.ArgumentParser(prog="nsinit launch")
    parser.add_argument("--status", help="FIFO to report a failure to (the runtime's)")
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--join", action="append", default=[])
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    status = Status(args.status)  # close-on-exec: gone once COMMAND runs
    # The workload must never run on unsupervised (unshare's --kill-child then takes the
    # namespace's init along, and with it every process in the namespace).
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != args.parent:
        return 1  # init died before the line above
    step = "/proc/self/oom_score_adj"
    try:
        with open(step, "w") as score:
            score.write("0")
        for step in args.join:
            fd = os.open(step, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        os.execvp(command[0], command)
    except OSError as exc:
        status.say("error", f"{step}: {exc.strerror or exc}")
        _say_stderr(f"{step}: {exc.strerror or exc}")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments[:1] == ["launch"]:
        return launch(arguments[1:])
    parser = argparse.ArgumentParser(prog="nsinit", description="PID 1 of the fly-vault workload")
    parser.add_argument("rootfs")
    parser.add_argument("persist_dir")
    parser.add_argument("--init", default="/sbin/init", help="path inside the rootfs")
    parser.add_argument("--status", help="FIFO to report progress to (the runtime's)")
    parser.add_argument("--hostname", help="the workload's hostname (its own UTS namespace)")
    parser.add_argument("--cgroup2", action="store_true", help="mount cgroup2 on /sys/fs/cgroup")
    args = parser.parse_args(arguments)
    status = Status(args.status)
    status.say("hello")
    if os.getpid() != 1:
        status.say("error", "nsinit must run as PID 1 of a new PID namespace")
        return 1
    os.umask(0)  # modes given to mkdir/mknod here are meant literally
    try:
        if args.hostname:
            set_hostname(args.hostname)
        setup_root(
            os.path.realpath(args.rootfs),
            os.path.realpath(args.persist_dir),
            hostname=args.hostname,
            cgroup2=args.cgroup2,
        )
        enter_root(os.path.realpath(args.rootfs))
        with contextlib.suppress(OSError):
            os.unlink("/" + FALLBACK_MARKER)  # a stale one from a previous boot
    except (SetupError, OSError) as exc:
        status.say("error", str(exc))
        _say_stderr(str(exc))
        return 1
    status.say("ready")
    status.say("exec", args.init)
    failure = exec_init(args.init)
    reason = f"{args.init}: {failure.strerror or failure}"
    os.umask(0o022)
    write_fallback_marker()
    _say_stderr(f"cannot run {reason}; fallback init active")
    status.say("fallback", reason)
    status.close()
    return reap_forever()


if __name__ == "__main__":
    sys.exit(main())
