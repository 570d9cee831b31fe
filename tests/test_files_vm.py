"""The file stream in VM mode, as root: paths resolve inside the workload's mount namespace
(what the stream writes, exec sees; host paths are out of reach), and a named ``user`` acts
with that account's rights (owner of what it writes, EACCES in words where it may not)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import InitProcess, run_async, start_init, vault_entry
from test_provision_e2e import BUSYBOX, configure, fv, make_rootfs

from flyvault.errors import FileOpError, NotFoundError, UsageError
from flyvault.standins import OidcIssuer

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and pivot_root need root"),
    pytest.mark.skipif(not BUSYBOX.exists(), reason="needs /bin/busybox (busybox-static)"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare"),
]


@pytest.fixture
def vm_init(tmp_path: Path, fly_api: Any) -> Iterator[InitProcess]:
    init = start_init(tmp_path, fly_api.path, host_mode=False)
    yield init
    init.stop()


PASSWD = b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:U:/home/user:/bin/sh\n"
GROUP = b"root:x:0:\nuser:x:1000:\nstaff:x:50:user\n"


def test_paths_resolve_inside_the_workload_as_root_and_as_a_user(
    tmp_path: Path, vm_init: InitProcess, issuer: OidcIssuer
) -> None:
    from flyvault.client import Vault

    rootfs = make_rootfs(
        tmp_path / "a.tar.gz", "A", extra={"etc/passwd": PASSWD, "etc/group": GROUP}
    )
    configure(vm_init.port, issuer, rootfs=str(rootfs))
    marker = Path("/tmp") / f"fly-vault-files-host-{os.getpid()}"
    marker.write_text("host only")

    async def body() -> dict[str, Any]:
        vault = Vault(vault_entry(vm_init.port, issuer, name="vm", rootfs=str(rootfs)))
        out: dict[str, Any] = {}
        try:
            files = vault.files()
            out["version"] = await files.read_bytes("/etc/version")
            out["written"] = await files.write("/tmp/from-stream.txt", b"via the stream\n")
            try:
                await files.stat(str(marker))
            except NotFoundError as exc:
                out["host"] = exc
            out["relative"] = await files.stat(".profile")  # root's home, /root
            user = vault.files(user="user")
            await user.write("/home/user/mine.txt", b"owned")
            out["mine"] = await user.stat("/home/user/mine.txt")
            out["user_relative"] = await user.read_bytes("mine.txt")
            try:
                await user.write("/etc/nope", b"x")
            except FileOpError as exc:
                out["denied"] = exc
            try:
                await vault.files(user="ghost").stat("/")
            except UsageError as exc:
                out["ghost"] = exc
        finally:
            await vault.close()
        return out

    try:
        out = run_async(body(), timeout=120)
    finally:
        marker.unlink()
    assert out["version"] == b"A\n"
    seen = fv("exec", "vm", "--", "cat", "/tmp/from-stream.txt")
    assert seen.returncode == 0, seen.stderr
    assert seen.stdout == b"via the stream\n"
    assert str(out["host"]) == f"{marker}: no such file or directory (ENOENT)"
    assert out["relative"].path == "/root/.profile"
    mine = out["mine"]
    assert (mine.uid, mine.gid, mine.owner, mine.group) == (1000, 1000, "user", "user")
    assert out["user_relative"] == b"owned"
    assert str(out["denied"]) == "/etc/nope: permission denied (EACCES)"
    assert "no user 'ghost'" in str(out["ghost"])
    owner = fv("exec", "vm", "--", "stat", "-c", "%u:%g", "/home/user/mine.txt")
    assert owner.stdout.strip() == b"1000:1000"
