"""``fly-vault deploy`` end to end, as root: a busybox rootfs in the workload's namespaces,
the real init over QUIC on 127.0.0.1, and the CLI as a user runs it.

One plan with every kind this version runs (shell with guards and a reverse, file from
inline content and from a source file, env, snippet), applied, re-applied (0 changed), one
source edited (1 changed), a failing step (partial, resumed), the lease, a dry run that
changes nothing, and a reverse that gives back the pre-existing files byte for byte."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import InitProcess, run_async, vault_entry
from test_provision_e2e import BUSYBOX, configure, fv

from flyvault.standins import OidcIssuer

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and pivot_root need root"),
    pytest.mark.skipif(not BUSYBOX.exists(), reason="needs /bin/busybox (busybox-static)"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare"),
]

APPLETS = (
    "sh",
    "ls",
    "cat",
    "echo",
    "id",
    "mkdir",
    "rm",
    "touch",
    "test",
    "[",
    "printf",
    "true",
    "sleep",
)
PASSWD = "root:x:0:0:root:/root:/bin/sh\ndev:x:1000:1000:Dev:/home/dev:/bin/sh\n"
PROFILE = b"export A=1"  # no final newline: the block must come out byte for byte
MOTD = b"the old motd\n"
LEDGER = "/root/.local/state/fly-vault/deploy"


def deploy_rootfs(path: Path) -> Path:
    tree = path.with_suffix(".tree")
    for sub in ("bin", "etc", "root", "home/dev", "tmp", "proc", "dev"):
        (tree / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, tree / "bin/busybox")
    for applet in APPLETS:
        (tree / "bin" / applet).symlink_to("busybox")
    (tree / "etc/passwd").write_text(PASSWD)
    (tree / "etc/group").write_text("root:x:0:\ndev:x:1000:\n")
    (tree / "etc/motd").write_bytes(MOTD)
    (tree / "home/dev/.profile").write_bytes(PROFILE)
    os.chown(tree / "home/dev", 1000, 1000)
    os.chown(tree / "home/dev/.profile", 1000, 1000)
    os.chmod(tree / "tmp", 0o1777)
    with tarfile.open(path, "w:gz") as archive:
        archive.add(tree, arcname=".")
    return path


PLAN = """\
schema = 1
name = "dev-box"
[target]
user = "dev"
[vars]
GREETING = "from fly-vault"

[[step]]
id = "data-dir"
kind = "shell"
run = "mkdir -p /opt/data && echo ok > /opt/data/marker"
creates = "/opt/data/marker"
reverse = "rm -rf /opt/data"

[[step]]
id = "motd"
kind = "file"
dest = "/etc/motd"
content = "hello ${GREETING}\\n"

[[step]]
id = "gitconfig"
kind = "file"
source = "files/gitconfig"
dest = "{{home}}/.gitconfig"
mode = "0600"

[[step]]
id = "env"
kind = "env"
vars = { EDITOR = "vim" }
path_prepend = ["{{home}}/.local/bin"]

[[step]]
id = "aliases"
kind = "snippet"
file = "{{home}}/.profile"
body = "alias ll='ls -l'"

[[step]]
id = "as-user"
kind = "shell"
as = "user"
run = "touch \\"$HOME/user-was-here\\""
creates = "{{home}}/user-was-here"
"""


def write_plan(
    directory: Path, text: str = PLAN, gitconfig: str = "[user]\n  name = Dev\n"
) -> Path:
    (directory / "files").mkdir(parents=True, exist_ok=True)
    (directory / "files/gitconfig").write_text(gitconfig)
    plan = directory / "plan.toml"
    plan.write_text(text)
    return plan


def on_vm(port: int, issuer: OidcIssuer, rootfs: Path, body: Any) -> Any:
    from flyvault.client import Vault

    async def run() -> Any:
        vault = Vault(vault_entry(port, issuer, name="vm", rootfs=str(rootfs)))
        try:
            return await body(vault)
        finally:
            await vault.close()

    return run_async(run())


def report(result: Any) -> dict[str, Any]:
    assert result.returncode in (0, 1), result.stderr.decode()
    return json.loads(result.stdout)


def configured_vm(tmp_path: Path, vm_init: InitProcess, issuer: OidcIssuer) -> Path:
    """The VM-mode vault "vm" configured with the deploy tests' rootfs (provisioned by the
    first call); the rootfs archive's path."""
    rootfs = deploy_rootfs(tmp_path / "rootfs.tar.gz")
    configure(vm_init.port, issuer, rootfs=str(rootfs))
    return rootfs


def test_apply_reapply_edit_fail_resume_and_reverse(
    tmp_path: Path, vm_init: InitProcess, issuer: OidcIssuer
) -> None:
    rootfs = configured_vm(tmp_path, vm_init, issuer)
    plan = write_plan(tmp_path / "plan")

    began = time.monotonic()
    first = fv("deploy", "apply", "vm", str(plan), "--json")
    applied_in = time.monotonic() - began
    assert first.returncode == 0, first.stderr.decode()
    data = report(first)
    assert data["changed"] == 6 and data["status"] == "applied"
    facts = data["preflight"]
    assert (facts["user"], facts["home"], facts["shell"]) == ("dev", "/home/dev", "/bin/sh")
    assert facts["runtime"] == "fallback_init" and facts["system"].startswith("unknown")
    assert facts["package_manager"] is None

    async def look(vault: Any) -> dict[str, Any]:
        files = vault.files()
        out: dict[str, Any] = {
            "motd": await files.read_bytes("/etc/motd"),
            "marker": await files.read_bytes("/opt/data/marker"),
            "gitconfig": await files.stat("/home/dev/.gitconfig"),
            "touched": await files.stat("/home/dev/user-was-here"),
            "profile": await files.read_bytes("/home/dev/.profile"),
        }
        return out

    seen = on_vm(vm_init.port, issuer, rootfs, look)
    assert seen["motd"] == b"hello from fly-vault\n"
    assert seen["marker"] == b"ok\n"
    assert (seen["gitconfig"].uid, seen["gitconfig"].mode & 0o777) == (1000, 0o600)
    assert seen["touched"].uid == 1000  # the user step ran as dev
    profile = seen["profile"].decode()
    assert profile.startswith("export A=1\n# >>> fly-vault env >>> +newline\n")
    assert "alias ll='ls -l'" in profile

    # The env block works in a login shell, and sourcing the profile twice keeps PATH short.
    login = fv(
        "exec",
        "vm",
        "--user",
        "dev",
        "--",
        "sh",
        "-c",
        '. ~/.profile; . ~/.profile; echo "$EDITOR|$PATH"',
    )
    assert login.returncode == 0, login.stderr.decode()
    editor, path = login.stdout.decode().strip().split("|")
    assert editor == "vim"
    assert path.split(":").count("/home/dev/.local/bin") == 1

    began = time.monotonic()
    again = report(fv("deploy", "apply", "vm", str(plan), "--json"))
    print(  # for the record (pytest -s): a CLI process each, connection included
        f"\n[deploy times] busybox plan of 6 steps: apply {applied_in:.2f} s, "
        f"re-apply {time.monotonic() - began:.2f} s"
    )
    assert again["changed"] == 0
    assert {step["action"] for step in again["steps"]} == {"skip"}
    text = fv("deploy", "apply", "vm", str(plan))
    assert b"0 changed, 6 unchanged" in text.stdout

    status = fv("deploy", "status", "vm", str(plan))
    assert status.returncode == 0, status.stdout.decode() + status.stderr.decode()

    # One edited source re-runs that step only.
    write_plan(tmp_path / "plan", gitconfig="[user]\n  name = Dev Two\n")
    edited = report(fv("deploy", "apply", "vm", str(plan), "--json"))
    assert [s["step"] for s in edited["steps"] if s["action"] == "run"] == ["gitconfig"]
    changed_first = report(fv("deploy", "apply", "vm", str(plan), "--json", "--dry-run"))
    assert changed_first["changed"] == 0

    # A failing step: exit code and stderr in the ledger, status partial, resumed later.
    failing = PLAN + '\n[[step]]\nid = "boom"\nkind = "shell"\nrun = "echo broken >&2; exit 3"\n'
    plan.write_text(failing)
    failed = fv("deploy", "apply", "vm", str(plan), "--json")
    assert failed.returncode == 1
    body = report(failed)
    assert body["status"] == "partial"
    boom = next(s for s in body["steps"] if s["step"] == "boom")
    assert boom["action"] == "failed" and boom["exit_code"] == 3 and "broken" in boom["detail"]
    partial = fv("deploy", "status", "vm", "dev-box", "--json")
    assert partial.returncode == 1
    listed = json.loads(partial.stdout)["plans"][0]
    assert listed["status"] == "partial"
    assert {s["id"]: s["state"] for s in listed["steps"]}["boom"] == "failed"
    plan.write_text(failing.replace("exit 3", "exit 0"))
    resumed = report(fv("deploy", "apply", "vm", str(plan), "--json"))
    assert [s["step"] for s in resumed["steps"] if s["action"] == "run"] == ["boom"]
    assert resumed["status"] == "applied"

    # Reverse: recorded ops in reverse order; pre-existing files come back byte for byte.
    dry_undo = fv("deploy", "reverse", "vm", "dev-box", "--dry-run", "--json")
    order = [s["step"] for s in json.loads(dry_undo.stdout)["steps"]]
    # Last applied, first undone (gitconfig re-ran after its edit, so it is the newest).
    assert order == ["gitconfig", "aliases", "env", "motd", "data-dir"], order
    undo = fv("deploy", "reverse", "vm", "dev-box")
    assert undo.returncode == 0, undo.stdout.decode() + undo.stderr.decode()

    async def after(vault: Any) -> dict[str, Any]:
        from flyvault.errors import NotFoundError

        files = vault.files()
        out: dict[str, Any] = {
            "motd": await files.read_bytes("/etc/motd"),
            "profile": await files.read_bytes("/home/dev/.profile"),
        }
        for path in (
            "/home/dev/.gitconfig",
            "/opt/data",
            f"{LEDGER}/plans/dev-box.json",
            "/home/dev/.config/fly-vault/env.d/dev-box.env.sh",
        ):
            try:
                await files.stat(path)
                out[path] = "present"
            except NotFoundError:
                out[path] = "gone"
        return out

    gone = on_vm(vm_init.port, issuer, rootfs, after)
    assert gone["motd"] == MOTD
    assert gone["profile"] == PROFILE, undo.stdout.decode()
    assert {k: v for k, v in gone.items() if k.startswith("/")} == dict.fromkeys(
        (
            "/home/dev/.gitconfig",
            "/opt/data",
            f"{LEDGER}/plans/dev-box.json",
            "/home/dev/.config/fly-vault/env.d/dev-box.env.sh",
        ),
        "gone",
    )
    nothing = fv("deploy", "status", "vm")
    assert nothing.returncode == 1 and b"no plan is recorded" in nothing.stdout


def test_dry_run_changes_nothing_and_the_lease_refuses_a_second_applier(
    tmp_path: Path, vm_init: InitProcess, issuer: OidcIssuer
) -> None:
    rootfs = configured_vm(tmp_path, vm_init, issuer)
    plan = write_plan(tmp_path / "plan")

    async def snapshot(vault: Any) -> dict[str, Any]:
        result = await listing(vault.files(), "/")
        return result

    before = on_vm(vm_init.port, issuer, rootfs, snapshot)
    dry = fv("deploy", "apply", "vm", str(plan), "--dry-run")
    assert dry.returncode == 0, dry.stderr.decode()
    assert b"6 to run" in dry.stdout and b"mkdir -p /opt/data" in dry.stdout
    assert on_vm(vm_init.port, issuer, rootfs, snapshot) == before

    # A live lease held by another applier refuses this one; an expired one needs
    # --break-lock.
    async def plant(vault: Any, expires: float) -> None:
        files = vault.files()
        await files.mkdir(LEDGER, parents=True, exist_ok=True)
        lease = {
            "owner": "other",
            "host": "elsewhere",
            "pid": 1,
            "plan": "x",
            "started": time.time(),
            "expires": expires,
        }
        await files.write(f"{LEDGER}/lease.json", json.dumps(lease).encode())

    on_vm(vm_init.port, issuer, rootfs, lambda v: plant(v, time.time() + 600))
    held = fv("deploy", "apply", "vm", str(plan))
    assert held.returncode != 0 and b"another deploy holds the vault's lease" in held.stderr
    assert b"elsewhere" in held.stderr
    on_vm(vm_init.port, issuer, rootfs, lambda v: plant(v, time.time() - 1))
    stale = fv("deploy", "apply", "vm", str(plan))
    assert stale.returncode != 0 and b"--break-lock" in stale.stderr
    broken = fv("deploy", "apply", "vm", str(plan), "--break-lock")
    assert broken.returncode == 0, broken.stderr.decode()

    from flyvault.client.deploy.guest import VaultGuest

    async def check(vault: Any) -> str | None:
        return await VaultGuest(vault).read_text(f"{LEDGER}/lease.json")

    assert on_vm(vm_init.port, issuer, rootfs, check) is None  # released at the end


async def listing(files: Any, top: str) -> dict[str, Any]:
    """Every path under ``top`` (but /proc and /dev) with its kind, mode, owner and size."""
    out: dict[str, Any] = {}
    pending = [top]
    while pending:  # bounded by the tree's size
        directory = pending.pop()
        for entry in await files.list_dir(directory):
            path = entry.path
            if path in ("/proc", "/dev", "/sys"):
                continue
            out[path] = (entry.kind, entry.mode, entry.uid, entry.size, entry.mtime_ns)
            if entry.kind == "dir":
                pending.append(path)
    return out


def test_after_a_reprovision_only_the_rootfs_steps_are_lost_and_run_again(
    tmp_path: Path, vm_init: InitProcess, issuer: OidcIssuer
) -> None:
    rootfs = configured_vm(tmp_path, vm_init, issuer)
    plan = write_plan(tmp_path / "plan")
    assert fv("deploy", "apply", "vm", str(plan)).returncode == 0

    again = fv("reprovision", "vm", "--yes")
    assert again.returncode == 0, again.stderr.decode()
    status = fv("deploy", "status", "vm", "dev-box", "--json")
    assert status.returncode == 1  # not converged: the rootfs went
    states = {s["id"]: s["state"] for s in json.loads(status.stdout)["plans"][0]["steps"]}
    assert states == {
        "data-dir": "lost",  # /opt: the rootfs
        "motd": "lost",  # /etc: the rootfs
        "gitconfig": "applied",  # /home survives
        "env": "applied",
        "aliases": "applied",
        "as-user": "lost",  # a shell step is in the rootfs domain unless it says home
    }
    rerun = report(fv("deploy", "apply", "vm", str(plan), "--json"))
    decided = {s["step"]: (s["action"], s["reason"]) for s in rerun["steps"]}
    assert decided["data-dir"] == ("run", "rootfs replaced")
    assert decided["motd"] == ("run", "rootfs replaced")
    assert decided["as-user"][0] == "skip" and "guard" in decided["as-user"][1]  # in /home
    assert {decided[k][0] for k in ("gitconfig", "env", "aliases")} == {"skip"}
    assert fv("deploy", "status", "vm", str(plan)).returncode == 0

    # The motd step backed up the new rootfs's own file, not the old one's.
    assert fv("deploy", "reverse", "vm", "dev-box").returncode == 0

    async def motd(vault: Any) -> bytes:
        return bytes(await vault.files().read_bytes("/etc/motd"))

    assert on_vm(vm_init.port, issuer, rootfs, motd) == MOTD


def test_verify_finds_drift_prune_undoes_dropped_steps_and_wait_takes_a_freed_lease(
    tmp_path: Path, vm_init: InitProcess, issuer: OidcIssuer
) -> None:
    import subprocess
    import sys

    rootfs = configured_vm(tmp_path, vm_init, issuer)
    plan = write_plan(tmp_path / "plan")

    # Through the engine, with the guest recording what it ran: a re-apply runs nothing.
    from flyvault.client.deploy import load_plan
    from flyvault.client.deploy.engine import Engine

    async def twice(vault: Any) -> tuple[list[str], list[str], int]:
        first = Engine(vault)
        await first.apply(load_plan(plan))
        second = Engine(vault)
        report = await second.apply(load_plan(plan))
        return first.guest.probes, second.guest.probes, report.changed

    ran_first, ran_again, changed = on_vm(vm_init.port, issuer, rootfs, twice)
    assert any(p.startswith("run: mkdir -p /opt/data") for p in ran_first)
    # Only read-only probes (the preflight's) ran the second time: no step's script.
    assert ran_again and all(p.startswith("probe: ") for p in ran_again), ran_again
    assert changed == 0

    assert fv("deploy", "status", "vm", "--verify").returncode == 0

    async def tamper(vault: Any) -> None:
        files = vault.files()
        await files.write("/etc/motd", b"edited by hand\n")
        profile = (await files.read_bytes("/home/dev/.profile")).decode()
        await files.write("/home/dev/.profile", profile.replace("alias ll=", "alias LL=").encode())

    on_vm(vm_init.port, issuer, rootfs, tamper)
    drift = fv("deploy", "status", "vm", "--verify", "--json")
    assert drift.returncode == 1
    steps = {s["id"]: s for s in json.loads(drift.stdout)["plans"][0]["steps"]}
    assert (
        steps["motd"]["state"] == "drifted" and "/etc/motd was changed" in steps["motd"]["reason"]
    )
    assert steps["aliases"]["state"] == "drifted" and "was edited" in steps["aliases"]["reason"]
    assert steps["gitconfig"]["state"] == "applied"

    # A step dropped from the plan is reported and kept; --prune undoes it.
    dropped = (
        PLAN[: PLAN.index('[[step]]\nid = "aliases"')]
        + PLAN[PLAN.index('[[step]]\nid = "as-user"') :]
    )
    plan.write_text(dropped)
    kept = report(fv("deploy", "apply", "vm", str(plan), "--json"))
    assert [(s["step"], s["action"]) for s in kept["steps"] if s["action"] == "orphaned"] == [
        ("aliases", "orphaned")
    ]
    pruned = report(fv("deploy", "apply", "vm", str(plan), "--json", "--prune"))
    assert [(s["step"], s["action"]) for s in pruned["steps"] if s["step"] == "aliases"] == [
        ("aliases", "pruned")
    ]

    async def profile(vault: Any) -> bytes:
        return bytes(await vault.files().read_bytes("/home/dev/.profile"))

    assert b"alias" not in on_vm(vm_init.port, issuer, rootfs, profile)
    listed = json.loads(fv("deploy", "status", "vm", "dev-box", "--json").stdout)
    assert "aliases" not in {s["id"] for s in listed["plans"][0]["steps"]}

    # --wait: a live lease is waited for, and taken once its holder removes it.
    async def plant(vault: Any) -> None:
        files = vault.files()
        lease = {
            "owner": "other",
            "host": "elsewhere",
            "pid": 1,
            "plan": "x",
            "started": time.time(),
            "expires": time.time() + 600,
        }
        await files.write(f"{LEDGER}/lease.json", json.dumps(lease).encode())

    async def release(vault: Any) -> None:
        await vault.files().remove(f"{LEDGER}/lease.json")

    on_vm(vm_init.port, issuer, rootfs, plant)
    waiting = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flyvault.cli.main",
            "deploy",
            "apply",
            "vm",
            str(plan),
            "--wait",
            "60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert waiting.stderr is not None
        said = b""
        for _ in range(10):  # notes first (the development issuer's), then the wait
            line = waiting.stderr.readline()  # blocks until a line, or b"" at the end
            said += line
            if not line or b"waiting up to" in line:
                break
        assert b"waiting up to 60 s: another deploy holds the vault's lease" in said, said
        on_vm(vm_init.port, issuer, rootfs, release)
        out, err = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert waiting.returncode == 0, err.decode()
    assert b"0 changed" in out


def test_artifacts_placed_and_extracted_then_only_what_they_created_is_removed(
    tmp_path: Path, vm_init: InitProcess, issuer: OidcIssuer
) -> None:
    import hashlib
    import io

    rootfs = configured_vm(tmp_path, vm_init, issuer)
    directory = tmp_path / "plan"
    directory.mkdir()
    tool = directory / "tool.bin"
    tool.write_bytes(os.urandom(3 * 1024 * 1024 + 7))  # more than one chunk
    bundle = directory / "bundle.tar.gz"
    with tarfile.open(bundle, "w:gz") as archive:
        for name, data in (("bin/run", b"#!/bin/sh\necho run\n"), ("share/doc", b"doc\n")):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("bin/alias")
        link.type, link.linkname = tarfile.SYMTYPE, "run"
        archive.addfile(link)

    def sha(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    plan = directory / "plan.toml"
    plan.write_text(
        'schema = 1\nname = "tools"\n[target]\nuser = "dev"\n'
        '[[step]]\nid = "tool"\nkind = "artifact"\nsource = "tool.bin"\n'
        f'sha256 = "{sha(tool)}"\ndest = "/usr/local/bin/tool"\n'
        '[[step]]\nid = "bundle"\nkind = "artifact"\nsource = "bundle.tar.gz"\n'
        f'sha256 = "{sha(bundle)}"\nextract_to = "{{{{home}}}}/.local"\n'
    )

    async def seed(vault: Any) -> None:  # what the user had before: must survive the reverse
        dev = vault.files(user="dev")
        await dev.write("/home/dev/.local/bin/mine", b"mine\n", make_parents=True)

    on_vm(vm_init.port, issuer, rootfs, seed)
    applied = report(fv("deploy", "apply", "vm", str(plan), "--json"))
    assert applied["changed"] == 2, applied
    ran = fv("exec", "vm", "--user", "dev", "--", "/home/dev/.local/bin/alias")
    assert ran.returncode == 0 and ran.stdout == b"run\n", ran.stderr.decode()

    async def look(vault: Any) -> dict[str, Any]:
        files = vault.files()
        placed = await files.stat("/usr/local/bin/tool")
        return {
            "sha": await files.sha256("/usr/local/bin/tool"),
            "mode": placed.mode & 0o777,
            "owner": (await files.stat("/home/dev/.local/share/doc")).uid,
        }

    seen = on_vm(vm_init.port, issuer, rootfs, look)
    assert seen == {"sha": sha(tool), "mode": 0o755, "owner": 1000}
    assert report(fv("deploy", "apply", "vm", str(plan), "--json"))["changed"] == 0
    assert fv("deploy", "status", "vm", "--verify").returncode == 0

    assert fv("deploy", "reverse", "vm", "tools").returncode == 0

    async def after(vault: Any) -> dict[str, bool]:
        vault.files()
        out = {}
        for path in (
            "/usr/local/bin/tool",
            "/home/dev/.local/bin/run",
            "/home/dev/.local/bin/alias",
            "/home/dev/.local/share",
            "/home/dev/.local/bin/mine",
            "/home/dev/.local/bin",
        ):
            out[path] = await VaultGuest(vault).exists(path)
        return out

    from flyvault.client.deploy.guest import VaultGuest

    assert on_vm(vm_init.port, issuer, rootfs, after) == {
        "/usr/local/bin/tool": False,
        "/home/dev/.local/bin/run": False,
        "/home/dev/.local/bin/alias": False,
        "/home/dev/.local/share": False,  # created by the extraction
        "/home/dev/.local/bin/mine": True,  # the user's own
        "/home/dev/.local/bin": True,  # existed before (it holds the user's file)
    }


def test_packages_and_services_are_recorded_skips_on_busybox(
    tmp_path: Path, vm_init: InitProcess, issuer: OidcIssuer
) -> None:
    configured_vm(tmp_path, vm_init, issuer)
    plan = tmp_path / "plan.toml"
    plan.write_text(
        'schema = 1\nname = "sys"\n'
        '[[step]]\nid = "pkgs"\nkind = "packages"\npackages = ["git", "curl"]\n'
        '[[step]]\nid = "svc"\nkind = "service"\nunit = "ssh.service"\n'
    )
    gated = fv("deploy", "apply", "vm", str(plan))
    assert gated.returncode == 2 and b"installs packages in the rootfs" in gated.stderr
    first = report(fv("deploy", "apply", "vm", str(plan), "--yes", "--json"))
    decided = {s["step"]: (s["action"], s["reason"]) for s in first["steps"]}
    assert decided == {
        "pkgs": ("skip", "no package manager in this rootfs"),
        "svc": ("skip", "no systemd running in this vault"),
    }
    assert first["status"] == "applied"
    status = json.loads(fv("deploy", "status", "vm", "sys", "--json").stdout)
    assert {s["id"]: s["state"] for s in status["plans"][0]["steps"]} == {
        "pkgs": "skipped",
        "svc": "skipped",
    }
    again = report(fv("deploy", "apply", "vm", str(plan), "--yes", "--json"))
    assert again["changed"] == 0

    # Required: the same conditions are failures.
    plan.write_text(
        'schema = 1\nname = "sys2"\n[target]\nrequires_init = "systemd"\n'
        '[[step]]\nid = "svc"\nkind = "service"\nunit = "ssh.service"\n'
    )
    failed = fv("deploy", "apply", "vm", str(plan), "--yes", "--json")
    assert failed.returncode == 1
    step = report(failed)["steps"][0]
    assert step["action"] == "failed" and "no systemd running" in step["detail"]


def test_a_connection_cut_mid_upload_leaves_the_destination_and_the_ledger_as_they_were(
    tmp_path: Path, vm_init: InitProcess, issuer: OidcIssuer
) -> None:
    import hashlib
    import signal
    import subprocess
    import sys

    rootfs = configured_vm(tmp_path, vm_init, issuer)
    assert fv("exec", "vm", "--", "true").returncode == 0  # provisioned
    big = tmp_path / "big.bin"
    sha = hashlib.sha256()
    with big.open("wb") as out:
        for _ in range(128):  # 128 MiB: the upload lasts long enough to be cut
            block = os.urandom(1024 * 1024)
            sha.update(block)
            out.write(block)
    digest = sha.hexdigest()
    plan = tmp_path / "plan.toml"
    plan.write_text(
        'schema = 1\nname = "cut"\n[[step]]\nid = "blob"\nkind = "artifact"\n'
        f'source = "big.bin"\nsha256 = "{digest}"\ndest = "/etc/motd"\nmode = "0644"\n'
    )
    etc = vm_init.data_dir / "rootfs" / "etc"
    applier = subprocess.Popen(
        [sys.executable, "-m", "flyvault.cli.main", "deploy", "apply", "vm", str(plan)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # bounded: until the upload's temp file appears
            partial = [p for p in etc.glob(".flyvault-tmp-*") if p.stat().st_size > 0]
            if partial or applier.poll() is not None:
                break
            time.sleep(0.01)
        assert partial, "the upload never started"
        applier.send_signal(signal.SIGKILL)  # by its pid: the connection is cut mid-upload
    finally:
        if applier.poll() is None:
            applier.kill()
        applier.wait()

    async def after(vault: Any) -> dict[str, Any]:
        from flyvault.client.deploy.ledger import Ledger

        guest = VaultGuest(vault)
        record = await Ledger(guest).load("cut")
        return {
            "motd": bytes(await vault.files().read_bytes("/etc/motd")),
            "blob": record.steps.get("blob") if record else None,
        }

    from flyvault.client.deploy.guest import VaultGuest

    seen = on_vm(vm_init.port, issuer, rootfs, after)
    assert seen["motd"] == MOTD  # the old file, whole
    assert seen["blob"] is None  # not recorded as applied
    # The lease the killed apply held blocks the next one until it expires; clear it as
    # an operator would once that apply is known to be gone, then apply again: done.

    async def drop_lease(vault: Any) -> None:
        await vault.files().remove(f"{LEDGER}/lease.json")

    on_vm(vm_init.port, issuer, rootfs, drop_lease)
    done = report(fv("deploy", "apply", "vm", str(plan), "--json"))
    assert done["status"] == "applied" and done["changed"] == 1


def test_a_failed_reverse_keeps_only_what_is_left_and_a_script_gets_eof_and_a_timeout(
    tmp_path: Path, vm_init: InitProcess, issuer: OidcIssuer
) -> None:
    configured_vm(tmp_path, vm_init, issuer)
    plan = tmp_path / "plan.toml"
    plan.write_text(
        'schema = 1\nname = "undo"\n'
        '[[step]]\nid = "motd"\nkind = "file"\ndest = "/etc/motd"\ncontent = "new\\n"\n'
        '[[step]]\nid = "stdin"\nkind = "shell"\nrun = "cat > /root/read-stdin"\n'
        'reverse = "test -f /root/allow-undo && rm /root/read-stdin"\ndomain = "home"\n'
    )
    applied = report(fv("deploy", "apply", "vm", str(plan), "--json"))
    assert applied["status"] == "applied"  # `cat` saw the end of its input at once

    first = fv("deploy", "reverse", "vm", "undo", "--json")
    assert first.returncode == 1
    steps = {s["step"]: s["action"] for s in json.loads(first.stdout)["steps"]}
    assert steps == {"stdin": "failed", "motd": "run"}
    assert fv("exec", "vm", "--", "cat", "/etc/motd").stdout == MOTD  # restored already
    assert fv("exec", "vm", "--", "touch", "/root/allow-undo").returncode == 0
    again = fv("deploy", "reverse", "vm", "undo", "--json")
    assert again.returncode == 0, again.stdout.decode() + again.stderr.decode()
    assert [s["step"] for s in json.loads(again.stdout)["steps"]] == ["stdin"]  # only the rest
    assert fv("exec", "vm", "--", "cat", "/etc/motd").stdout == MOTD

    # A script over its timeout is killed and recorded as failed (124), not left running.
    plan.write_text(
        'schema = 1\nname = "slow"\n'
        '[[step]]\nid = "nap"\nkind = "shell"\nrun = "sleep 30"\ntimeout = 1\n'
    )
    slow = fv("deploy", "apply", "vm", str(plan), "--json")
    assert slow.returncode == 1
    nap = report(slow)["steps"][0]
    assert nap["action"] == "failed" and nap["exit_code"] == 124
    assert "killed after its 1 s timeout" in nap["detail"]
    sessions = json.loads(fv("list-exec", "vm", "--json").stdout)
    assert not [s for s in sessions if s["running"]], sessions
