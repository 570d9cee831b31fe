"""``fly-vault restart`` and a deploy plan's ``restart`` step, as root on a busybox rootfs:
the workload stops (its sessions end with the reason) and starts again on the same rootfs,
and the client waits for the new boot id; refused while sessions run unless --yes; a plan
continues after its restart. A host-mode vault refuses in words."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import InitProcess, run_async
from test_deploy_e2e import deploy_rootfs, report
from test_provision_e2e import BUSYBOX, configure, fv

from flyvault.standins import OidcIssuer

root_only = [
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and pivot_root need root"),
    pytest.mark.skipif(not BUSYBOX.exists(), reason="needs /bin/busybox (busybox-static)"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare"),
]


def boot_id(name: str) -> str:
    """The boot id the vault reports on a fresh connection (its attestation)."""
    from flyvault.client import Vault
    from flyvault.config import load_vault

    async def ask() -> str:
        vault = Vault(load_vault(name))
        try:
            return str((await vault.connection()).boot_id)
        finally:
            await vault.close()

    return str(run_async(ask()))


def provision_vm(tmp_path: Path, vm_init: InitProcess, issuer: OidcIssuer) -> None:
    """The VM-mode vault "vm" with a small rootfs, provisioned (skipped without root)."""
    for mark in root_only:
        if mark.args[0]:
            pytest.skip(mark.kwargs["reason"])
    configure(vm_init.port, issuer, rootfs=str(deploy_rootfs(tmp_path / "r.tar.gz")))
    assert fv("exec", "vm", "--", "true").returncode == 0  # provisions it


def start_named_session(name: str) -> None:
    """A named session left running (its client is gone; the session is kept)."""
    import subprocess
    import sys
    import time

    client = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flyvault.cli.main",
            "exec",
            "vm",
            "--session",
            name,
            "--",
            "sleep",
            "1000",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # bounded: 30 s
            listed = json.loads(fv("list-exec", "vm", "--json").stdout or b"[]")
            if any(s["session_id"] == name and s["running"] for s in listed):
                return
            time.sleep(0.2)
        raise AssertionError(f"session {name} did not start")
    finally:
        client.kill()  # by its pid; the named session stays on the vault
        client.wait()


@pytest.mark.parametrize("_", [None], ids=["vm"])
def test_restart_refuses_while_sessions_run_then_restarts_and_waits(
    _: None, tmp_path: Path, vm_init: InitProcess, issuer: OidcIssuer
) -> None:
    provision_vm(tmp_path, vm_init, issuer)
    start_named_session("long")
    before = boot_id("vm")

    refused = fv("restart", "vm")
    assert refused.returncode == 2
    assert b"1 session(s) run on the vault (long): a restart ends them" in refused.stderr
    assert boot_id("vm") == before  # nothing happened

    done = fv("restart", "vm", "--yes", "--json")
    assert done.returncode == 0, done.stderr.decode()
    answer = json.loads(done.stdout)
    assert answer["old_boot_id"] == before and answer["new_boot_id"] != before
    assert answer["runtime"] == "fallback_init" and answer["system_state"] is None
    assert boot_id("vm") == answer["new_boot_id"]
    sessions = json.loads(fv("list-exec", "vm", "--json").stdout)
    long = [s for s in sessions if s["session_id"] == "long"]
    assert len(long) == 1 and not long[0]["running"], sessions  # kept, with the reason
    assert long[0]["end_reason"] == "the vault's workload is restarting (a client asked)"
    again = fv("exec", "vm", "--", "echo", "back")
    assert again.returncode == 0 and again.stdout == b"back\n"


def test_a_plan_restarts_only_after_a_change_and_continues(
    tmp_path: Path, vm_init: InitProcess, issuer: OidcIssuer
) -> None:
    provision_vm(tmp_path, vm_init, issuer)
    plan = tmp_path / "plan.toml"
    plan.write_text(
        'schema = 1\nname = "svc"\n'
        '[[step]]\nid = "conf"\nkind = "file"\ndest = "/root/app.conf"\ncontent = "v=1\\n"\n'
        '[[step]]\nid = "bounce"\nkind = "restart"\n'
        '[[step]]\nid = "after"\nkind = "shell"\nrun = "cat /root/app.conf > /root/seen"\n'
        'domain = "home"\n'
    )
    refused = fv("deploy", "apply", "vm", str(plan))
    assert refused.returncode == 2 and b"refusing without --yes" in refused.stderr
    before = boot_id("vm")
    first = report(fv("deploy", "apply", "vm", str(plan), "--yes", "--json"))
    steps = {s["step"]: s for s in first["steps"]}
    assert steps["bounce"]["action"] == "run", first
    assert steps["bounce"]["reason"].startswith(f"restarted: boot id {before[:12]} -> ")
    assert steps["after"]["action"] == "run" and first["status"] == "applied"
    after_boot = boot_id("vm")
    assert after_boot != before
    seen = fv("exec", "vm", "--", "cat", "/root/seen")
    assert seen.stdout == b"v=1\n"

    again = report(fv("deploy", "apply", "vm", str(plan), "--yes", "--json"))
    bounce = next(s for s in again["steps"] if s["step"] == "bounce")
    assert (bounce["action"], bounce["reason"]) == ("skip", "nothing ran before it in this apply")
    assert again["changed"] == 0 and boot_id("vm") == after_boot


def test_a_host_mode_vault_has_no_workload_to_restart(
    init_process: InitProcess, issuer: OidcIssuer
) -> None:
    configure(init_process.port, issuer)
    refused = fv("restart", "vm")
    assert refused.returncode == 10  # a refusal by the vault (RemoteError)
    assert b"a host-mode vault has no workload to restart" in refused.stderr
