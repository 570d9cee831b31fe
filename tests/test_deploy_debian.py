"""Deploy plans on Debian with systemd (root only; the cached debootstrap image of
``tests/debian_rootfs.py``, skipped with the reason when it cannot be had).

An offline ``file:`` apt repository with two tiny packages, built here with dpkg-deb and a
hand-written index, reaches the vault through the plan itself (an artifact unpacked to
/srv/repo and a sources.list that names only it: nothing leaves this machine). Then:
``packages`` installs only what is missing and records it, a systemd ``service`` from a
unit file is enabled and started, a ``restart`` changes the boot id and waits for systemd
before the plan goes on (the service is back), a re-apply changes nothing, and reversing
two plans that both want a package keeps it until the last one goes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
from conftest import InitProcess, vault_entry

from flyvault.standins import OidcIssuer

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces, cgroups and debootstrap need root"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare"),
    pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb to build packages"),
]

VAULT = "debdeploy"


def fv(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "flyvault.cli.main", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
    )


def apply(plan: Path, *extra: str) -> dict[str, Any]:
    result = fv("deploy", "apply", VAULT, str(plan), "--yes", "--json", *extra)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    return dict(json.loads(result.stdout))


def build_deb(work: Path, name: str) -> Path:
    root = work / name
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        f"Package: {name}\nVersion: 1.0\nArchitecture: all\nMaintainer: fly-vault tests "
        f"<tests@example.invalid>\nDescription: a test package\n"
    )
    tool = root / "usr/bin" / name
    tool.write_text(f"#!/bin/sh\necho {name}\n")
    tool.chmod(0o755)
    deb = work / f"{name}_1.0_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)],
        check=True,
        capture_output=True,
    )
    return deb


def repo_tarball(work: Path) -> Path:
    """A flat apt repository (``deb [trusted=yes] file:/srv/repo ./``) as a tarball."""
    index = []
    debs = [build_deb(work, "fvhello"), build_deb(work, "fvextra")]
    for deb in debs:
        control = subprocess.run(
            ["dpkg-deb", "--field", str(deb)], check=True, capture_output=True, text=True
        ).stdout.strip()
        data = deb.read_bytes()
        index.append(
            f"{control}\nFilename: ./{deb.name}\nSize: {len(data)}\n"
            f"SHA256: {hashlib.sha256(data).hexdigest()}\n"
        )
    packages = "\n".join(index).encode()
    archive = work / "repo.tar.gz"
    with tarfile.open(archive, "w:gz") as out:
        for deb in debs:
            out.add(deb, arcname=deb.name)
        for name, body in (("Packages", packages), ("Packages.gz", gzip.compress(packages))):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            out.addfile(info, io.BytesIO(body))
    return archive


UNIT = """[Unit]
Description=fly-vault deploy test service
[Service]
ExecStart=/bin/sleep infinity
[Install]
WantedBy=multi-user.target
"""


def test_packages_service_restart_on_debian(
    tmp_path: Path, vm_init: InitProcess, issuer: OidcIssuer, debian_image: Path
) -> None:
    from flyvault.config import save_vault

    save_vault(vault_entry(vm_init.port, issuer, name=VAULT, rootfs=str(debian_image)))
    work = tmp_path / "plan"
    work.mkdir()
    repo = repo_tarball(work)
    (work / "fvtest.service").write_text(UNIT)
    sha = hashlib.sha256(repo.read_bytes()).hexdigest()
    plan_a = work / "a.toml"
    plan_a.write_text(
        f"""schema = 1
name = "base"
[target]
requires_init = "systemd"

[[step]]
id = "repo"
kind = "artifact"
source = "repo.tar.gz"
sha256 = "{sha}"
extract_to = "/srv/repo"

[[step]]
id = "offline-sources"
kind = "shell"
run = "rm -f /etc/apt/sources.list.d/*; rm -rf /var/lib/apt/lists/*"
domain = "rootfs"

[[step]]
id = "sources"
kind = "file"
dest = "/etc/apt/sources.list"
content = "deb [trusted=yes] file:/srv/repo ./\\n"

[[step]]
id = "hello"
kind = "packages"
packages = ["fvhello"]

[[step]]
id = "svc"
kind = "service"
unit = "fvtest.service"
unit_file = "fvtest.service"
start = "required"

[[step]]
id = "bounce"
kind = "restart"

[[step]]
id = "after"
kind = "shell"
run = "systemctl is-active fvtest.service > /root/after-restart; fvhello >> /root/after-restart"
"""
    )
    import time

    began = time.monotonic()
    first = apply(plan_a)
    applied_in = time.monotonic() - began
    assert first["preflight"]["system"].startswith("Debian GNU/Linux")
    assert first["preflight"]["runtime"] == "system_init"
    assert first["preflight"]["package_manager"] == "apt"
    steps = {s["step"]: s for s in first["steps"]}
    assert first["status"] == "applied", first
    assert steps["hello"]["reason"] == "apt: installed fvhello", steps["hello"]
    assert steps["svc"]["reason"] == "fvtest.service: enabled, started"
    assert steps["bounce"]["reason"].startswith("restarted: boot id ")
    assert steps["bounce"]["reason"].endswith(("systemd running", "systemd degraded"))
    after = fv("exec", VAULT, "--", "cat", "/root/after-restart")
    assert after.stdout == b"active\nfvhello\n", after.stderr.decode()

    began = time.monotonic()
    again = apply(plan_a)
    print(  # for the record (pytest -s)
        f"\n[deploy times] Debian plan of 7 steps (apt install, a unit, a restart under "
        f"systemd): apply {applied_in:.2f} s, re-apply {time.monotonic() - began:.2f} s"
    )
    assert again["changed"] == 0, again  # the restart runs only after a change

    # A second plan wants fvhello too (present: recorded, not installed) and adds fvextra.
    plan_b = work / "b.toml"
    plan_b.write_text(
        'schema = 1\nname = "extra"\n'
        '[[step]]\nid = "pkgs"\nkind = "packages"\npackages = ["fvhello", "fvextra"]\n'
    )
    extra = apply(plan_b)
    assert extra["steps"][0]["reason"] == "apt: installed fvextra"

    def installed(name: str) -> bool:
        return fv("exec", VAULT, "--", "dpkg-query", "-W", name).returncode == 0

    # Reversing the first plan keeps fvhello (the second wants it), stops the service.
    undo_a = fv("deploy", "reverse", VAULT, "base", "--json")
    assert undo_a.returncode == 0, undo_a.stdout.decode() + undo_a.stderr.decode()
    notes = [
        s["detail"] for s in json.loads(undo_a.stdout)["steps"] if s["reason"] == "package-remove"
    ]
    assert notes == ["kept: other plans want them too"]
    assert installed("fvhello")
    unit = fv("exec", VAULT, "--", "systemctl", "is-enabled", "fvtest.service")
    assert unit.returncode != 0  # disabled, and its unit file removed
    assert (
        fv("exec", VAULT, "--", "test", "-e", "/etc/systemd/system/fvtest.service").returncode == 1
    )
    # The last plan that wants them goes: both go (fvhello was handed over to it).
    undo_b = fv("deploy", "reverse", VAULT, "extra")
    assert undo_b.returncode == 0, undo_b.stdout.decode() + undo_b.stderr.decode()
    assert not installed("fvextra") and not installed("fvhello")
