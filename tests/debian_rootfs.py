"""A real distribution for the runtime tests: Debian minbase with systemd, from debootstrap.

``debian_systemd_archive()`` returns a ``.tar.gz`` rootfs built with debootstrap from the
machine's configured apt sources (the suite and mirror of its Debian entry), cached under
``~/.cache/fly-vault-tests`` (``FLY_VAULT_TEST_CACHE``) and reused by later runs: the first
build takes about a minute, later runs none. debootstrap is installed with apt-get when it
is missing (root only). Every reason it cannot be had raises ``Unavailable``, which the
tests turn into a skip naming it.

Run as a script (``python tests/debian_rootfs.py``) it builds the archive and prints its
path, e.g. to warm the cache on a CI machine.
"""

from __future__ import annotations

import fcntl
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

#: Bump when the recipe changes: a new name, so an old cached archive is never reused.
RECIPE = "v2"
PACKAGES = ("systemd", "systemd-sysv")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
BUILD_TIMEOUT = 900


class Unavailable(Exception):
    """The archive cannot be built here; the message says why."""


def cache_dir() -> Path:
    configured = os.environ.get("FLY_VAULT_TEST_CACHE", "").strip()
    return Path(configured) if configured else Path.home() / ".cache" / "fly-vault-tests"


def _arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def apt_source() -> tuple[str, str]:
    """(suite, mirror) of the machine's Debian apt source; os-release's codename and
    deb.debian.org when none is configured."""
    entries: list[tuple[str, str]] = []
    sources = Path("/etc/apt/sources.list.d")
    for path in sorted(sources.glob("*.sources")) if sources.is_dir() else []:
        for stanza in path.read_text(errors="replace").split("\n\n"):
            fields = dict(
                (key.strip().lower(), value.strip())
                for key, _, value in (
                    line.partition(":") for line in stanza.splitlines() if not line.startswith("#")
                )
                if value
            )
            if "deb" not in fields.get("types", "").split():
                continue
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    entries.append((suite, uri))
    lists = [Path("/etc/apt/sources.list"), *sorted(sources.glob("*.list"))]
    for path in lists:
        if not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            words = re.sub(r"\[[^]]*\]", "", line).split()
            if len(words) >= 3 and words[0] == "deb":
                entries.append((words[2], words[1]))
    for suite, uri in entries:
        if uri.rstrip("/").endswith("/debian") and re.fullmatch(r"[a-z]+", suite):
            return suite, uri
    codename = ""
    with_os = Path("/etc/os-release")
    if with_os.is_file():
        match = re.search(r"^VERSION_CODENAME=(\w+)", with_os.read_text(), re.M)
        codename = match.group(1) if match else ""
    if not codename:
        raise Unavailable("no Debian apt source and no VERSION_CODENAME to build a rootfs from")
    return codename, DEFAULT_MIRROR


def _ensure_debootstrap() -> str:
    found = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin:/sbin")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Unavailable("debootstrap is not installed (apt-get install debootstrap)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "debootstrap"],
    ):
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["?"]
            raise Unavailable(f"installing debootstrap failed: {' '.join(command)}: {tail[0]}")
    found = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin:/sbin")
    if not found:
        raise Unavailable("debootstrap is still missing after apt-get install")
    return found


def debian_systemd_archive() -> Path:
    """The cached archive, built first if needed (under a lock: one build at a time)."""
    if os.geteuid() != 0:
        raise Unavailable("debootstrap needs root")
    suite, mirror = apt_source()
    cache = cache_dir()
    archive = cache / f"debian-{suite}-minbase-systemd-{_arch()}-{RECIPE}.tar.gz"
    if archive.is_file():
        return archive
    try:
        cache.mkdir(parents=True, exist_ok=True)
        lock = open(cache / ".build.lock", "w")  # noqa: SIM115
    except OSError as exc:
        raise Unavailable(f"cannot use the cache directory {cache}: {exc.strerror}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if archive.is_file():  # another process built it meanwhile
            return archive
        _build(archive, suite, mirror)
    return archive


def _build(archive: Path, suite: str, mirror: str) -> None:
    debootstrap = _ensure_debootstrap()
    tree = archive.with_name(archive.name.removesuffix(".tar.gz") + ".tree")
    shutil.rmtree(tree, ignore_errors=True)
    log = archive.with_suffix(".log")
    began = time.monotonic()
    command = [
        debootstrap,
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        f"--arch={_arch()}",
        suite,
        str(tree),
        mirror,
    ]
    try:
        with open(log, "wb") as out:
            result = subprocess.run(
                command, stdout=out, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT
            )
        if result.returncode != 0:
            last = log.read_text(errors="replace").strip().splitlines()[-1:] or ["?"]
            raise Unavailable(
                f"debootstrap {suite} from {mirror} failed (status {result.returncode}): "
                f"{last[0]} (log: {log})"
            )
        # What apt downloaded is not part of the image.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (tree / junk).glob("*"):
                if entry.is_file():
                    entry.unlink()
        partial = archive.with_suffix(".partial")
        # No device nodes: the vault refuses them by default and mounts its own /dev.
        pack = ["tar", "--numeric-owner", "--xattrs", "--exclude=./dev/*", "-C", str(tree)]
        subprocess.run(
            [*pack, "-czf", str(partial), "."],
            check=True,
            timeout=BUILD_TIMEOUT,
        )
        os.replace(partial, archive)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"building the Debian rootfs took over {BUILD_TIMEOUT} s") from None
    except subprocess.CalledProcessError as exc:
        raise Unavailable(f"packing the Debian rootfs failed: {exc}") from None
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    print(
        f"built {archive} ({archive.stat().st_size / 1e6:.0f} MB) in "
        f"{time.monotonic() - began:.0f} s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    try:
        print(debian_systemd_archive())
    except Unavailable as exc:
        print(f"unavailable: {exc}", file=sys.stderr)
        sys.exit(1)
