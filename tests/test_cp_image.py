"""``fly-vault cp-image`` with real podman on both sides (root; a host-mode vault whose
init uses another podman storage than the client, so "here" and "the vault" are two
stores on one machine). Streamed with no intermediate file, verified, tagged; a second
copy is skipped; an image that is on the vault but was never verified (a torn load) is
removed and streamed again. Skipped with the reason when podman is missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from conftest import start_init, vault_entry
from test_provision_e2e import BUSYBOX, fv

from flyvault.standins import OidcIssuer

pytestmark = [
    pytest.mark.skipif(shutil.which("podman") is None, reason="needs podman (apt install podman)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="podman's vfs storage as root"),
    pytest.mark.skipif(not BUSYBOX.exists(), reason="needs /bin/busybox for the image"),
]

IMAGE = "localhost/fvtest:1"


def storage(root: Path) -> Path:
    conf = root / "storage.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(
        f'[storage]\ndriver = "vfs"\nrunroot = "{root}/run"\ngraphroot = "{root}/graph"\n'
    )
    return conf


def podman(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf)}
    return subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def stores(tmp_path: Path, fly_api: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    here, there = storage(tmp_path / "here"), storage(tmp_path / "there")
    monkeypatch.setenv("CONTAINERS_STORAGE_CONF", str(there))
    init = start_init(tmp_path, fly_api.path, host_mode=True)  # the vault: "there"
    monkeypatch.setenv("CONTAINERS_STORAGE_CONF", str(here))  # this client: "here"
    yield init, here, there
    init.stop()
    for conf in (here, there):  # vfs layers are plain files, but podman may hold mounts
        podman(conf, "system", "reset", "--force")


def make_image(conf: Path, work: Path) -> str:
    tree = work / "tree"
    (tree / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, tree / "bin/busybox")
    (tree / "hello").write_text("from the image\n")
    archive = work / "tree.tar"
    with tarfile.open(archive, "w") as out:
        out.add(tree, arcname=".")
    made = podman(conf, "import", str(archive), IMAGE)
    assert made.returncode == 0, made.stderr
    return podman(conf, "image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip()


def test_cp_image_streams_verifies_skips_and_replaces_a_torn_one(
    tmp_path: Path, stores: Any, issuer: OidcIssuer
) -> None:
    from flyvault.config import save_vault

    init, here, there = stores
    save_vault(vault_entry(init.port, issuer, name="box"))
    image_id = make_image(here, tmp_path)

    first = fv("cp-image", "box", IMAGE, "--as", "localhost/app:latest", "--json")
    assert first.returncode == 0, first.stderr.decode()
    copied = json.loads(first.stdout)
    assert copied["action"] == "copied" and copied["image_id"] == image_id.removeprefix("sha256:")
    assert copied["bytes"] > 1_000_000  # busybox is in it
    there_id = podman(there, "image", "inspect", "--format", "{{.Id}}", "localhost/app:latest")
    assert there_id.stdout.strip() == image_id

    again = json.loads(
        fv("cp-image", "box", IMAGE, "--as", "localhost/app:latest", "--json").stdout
    )
    assert again["action"] == "skipped" and again["bytes"] == 0

    # On the vault but never verified (as a load cut short leaves it): streamed again.
    marker = Path("/var/lib/fly-vault/images") / image_id.removeprefix("sha256:")
    marker.unlink()
    redone = json.loads(
        fv("cp-image", "box", IMAGE, "--as", "localhost/app:latest", "--json").stdout
    )
    assert redone["action"] == "recopied" and redone["bytes"] > 1_000_000
    assert marker.exists()
    marker.unlink()  # the host's /var/lib: leave nothing behind


def test_cp_image_usage_errors_before_connecting(tmp_path: Path) -> None:
    bad = fv("cp-image", "nowhere", "not a ref")
    assert bad.returncode == 2 and b"is not an image reference" in bad.stderr
    missing = fv("cp-image", "nowhere", "localhost/none:0", "--engine", "podman")
    assert missing.returncode == 2
    assert b"no image 'localhost/none:0' in this machine's podman storage" in missing.stderr


def test_a_plan_image_step_copies_once_and_reverse_removes_it(
    tmp_path: Path, stores: Any, issuer: OidcIssuer
) -> None:
    from flyvault.config import save_vault

    init, here, there = stores
    save_vault(vault_entry(init.port, issuer, name="box"))
    image_id = make_image(here, tmp_path)
    plan = tmp_path / "plan.toml"
    plan.write_text(
        'schema = 1\nname = "fv-image-test"\n'
        f'[[step]]\nid = "app"\nkind = "image"\nimage = "{IMAGE}"\ntag = "localhost/app:2"\n'
    )
    # A host-mode vault is this machine: its ledger and rootfs id land here; put them back.
    ledger = Path("/root/.local/state/fly-vault/deploy")
    sentinel = Path("/var/lib/fly-vault/rootfs-id")
    had = ledger.exists(), sentinel.exists()
    try:
        first = fv("deploy", "apply", "box", str(plan), "--json")
        assert first.returncode == 0, first.stdout.decode() + first.stderr.decode()
        step = json.loads(first.stdout)["steps"][0]
        assert step["action"] == "run" and step["reason"].startswith("localhost/app:2: copied")
        there_id = podman(there, "image", "inspect", "--format", "{{.Id}}", "localhost/app:2")
        assert there_id.stdout.strip() == image_id
        again = json.loads(fv("deploy", "apply", "box", str(plan), "--json").stdout)
        assert again["changed"] == 0
        undo = fv("deploy", "reverse", "box", "fv-image-test")
        assert undo.returncode == 0, undo.stdout.decode() + undo.stderr.decode()
        assert podman(there, "image", "exists", "localhost/app:2").returncode == 1
    finally:
        if not had[0]:
            shutil.rmtree(ledger, ignore_errors=True)
        if not had[1]:
            sentinel.unlink(missing_ok=True)
        marker = Path("/var/lib/fly-vault/images") / image_id.removeprefix("sha256:")
        marker.unlink(missing_ok=True)


@pytest.mark.skipif(shutil.which("useradd") is None, reason="needs useradd for a rootless user")
def test_cp_image_into_a_users_rootless_storage(
    tmp_path: Path, fly_api: Any, issuer: OidcIssuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flyvault.config import save_vault

    user = f"fvimg{os.getpid() % 100000}"
    made = subprocess.run(["useradd", "-m", "-s", "/bin/sh", user], capture_output=True)
    assert made.returncode == 0, made.stderr
    here = storage(tmp_path / "here")
    monkeypatch.delenv("CONTAINERS_STORAGE_CONF", raising=False)
    init = start_init(tmp_path, fly_api.path, host_mode=True)  # the user's own storage
    monkeypatch.setenv("CONTAINERS_STORAGE_CONF", str(here))

    def as_user(*args: str) -> subprocess.CompletedProcess[str]:
        line = " ".join(["podman", *args])
        return subprocess.run(["su", "-", user, "-c", line], capture_output=True, text=True)

    try:
        save_vault(vault_entry(init.port, issuer, name="box"))
        image_id = make_image(here, tmp_path)
        copied = fv("cp-image", "box", IMAGE, "--rootless", user, "--json")
        assert copied.returncode == 0, copied.stderr.decode()
        assert json.loads(copied.stdout)["action"] == "copied"
        seen = as_user("image", "inspect", "--format", "'{{.Id}}'", IMAGE)
        assert seen.stdout.strip() == image_id, seen.stderr
        marker = Path(f"/home/{user}/.local/share/fly-vault/images") / image_id.removeprefix(
            "sha256:"
        )
        assert marker.exists()  # in the user's home, not root's
        again = json.loads(fv("cp-image", "box", IMAGE, "--rootless", user, "--json").stdout)
        assert again["action"] == "skipped"
    finally:
        init.stop()
        as_user("system", "reset", "--force")
        podman(here, "system", "reset", "--force")
        subprocess.run(["userdel", "-r", user], capture_output=True)
