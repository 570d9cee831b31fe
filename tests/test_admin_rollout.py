"""``tenant update-image`` against the stand-in: canary, batches, rollback by digest, resume."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import admin_support
import pytest
from admin_support import IMAGE_V1, IMAGE_V2, Cli, create_tenants

from flyvault.admin.rollout import checks_status, rollback_ref
from flyvault.admin.rollout_state import default_state_path
from flyvault.standins.machines import MachinesStandin

standin = admin_support.standin
cli = admin_support.cli

FAST = (
    "--poll-interval", "0.05", "--soak-secs", "0.2", "--health-timeout-secs", "0.6",
    "--start-timeout-secs", "5",
)  # fmt: skip


def _by_id(standin: MachinesStandin) -> dict[str, dict]:
    return {m["id"]: m for m in standin.model.machines() if m["state"] != "destroyed"}


def _tenant(machine: dict) -> str:
    return str(machine["config"]["metadata"]["fly_vault.tenant_id"])


def _update(cli: Cli, *args: str) -> admin_support.Result:
    return cli("tenant", "update-image", *FAST, *args)


def test_rollout_canary_then_batches_one_machine_per_tenant(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    create_tenants(cli, tmp_path, "acme", "bob", "carol")
    before = _by_id(standin)
    # A non-string metadata value must survive the update (the original dropped it).
    first = next(iter(before))
    standin.model.machine(first).config["metadata"]["weight"] = 3
    result = _update(cli, "--image", IMAGE_V2, "--all-tenants", "--concurrency", "2")
    assert result.code == 0, result.err
    assert "starting canary stage (1 of 6 machines)" in result.out
    assert "canary stage passed" in result.out
    assert "image update completed for 6 machine(s)" in result.out
    batches = re.findall(r"batch \d+/\d+: (.*)", result.out)
    assert batches, result.out
    for batch in batches:
        tenants = re.findall(r"\(tenant (\w+)\)", batch)
        assert len(tenants) == len(set(tenants)) <= 2
    after = _by_id(standin)
    for machine_id, machine in after.items():
        assert machine["config"]["image"] == IMAGE_V2
        assert machine["instance_id"] != before[machine_id]["instance_id"]
        assert machine["state"] == "started"
        model = standin.model.machine(machine_id)
        assert not model.cordoned and model.lease is None
    assert standin.model.machine(first).config["metadata"]["weight"] == 3
    # Every update carried the expected version and the lease nonce.
    updates = standin.calls("POST", r"/machines/[0-9a-f]+$")
    assert len(updates) == 6
    assert all(u.nonce and u.body["current_version"] for u in updates)
    # Every wait after an update named the new instance (no started-wait race).
    waits = [w for w in standin.calls("GET", r"/wait$") if w.query.get("state") == "started"]
    assert all(w.query.get("instance_id") for w in waits[-6:])
    assert "summary:" in result.out and "updated: 6" in result.out


def test_canary_health_failure_rolls_back_by_digest(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    # A moving tag: machines run :latest (digest D1), then :latest is pushed to a broken D2.
    latest = "registry.fly.io/vault-tenants/init:latest"
    template = admin_support.SIMPLE_TEMPLATE.replace(IMAGE_V1, latest)
    d1 = standin.model.push_image(latest)
    create_tenants(cli, tmp_path, "acme", "bob", template=template)
    before = _by_id(standin)
    d2 = standin.model.push_image(latest)
    standin.model.unhealthy_images.add(d2)

    result = _update(cli, "--image", latest, "--all-tenants")
    assert result.code == 0 and "skipping 4 machine(s) already on" in result.out
    result = _update(cli, "--image", latest, "--all-tenants", "--force")
    assert result.code == 11
    assert "canary stage failed" in result.err
    assert "checks failed to pass before timeout" in result.err
    assert "vault=critical" in result.err
    assert "rollout failed, starting rollback for 1 machine(s)" in result.out
    after = _by_id(standin)
    changed = [mid for mid in after if after[mid]["instance_id"] != before[mid]["instance_id"]]
    assert len(changed) == 1  # only the canary was touched
    canary = after[changed[0]]
    # Back on the bytes that ran before, not on the tag (which now points at D2).
    assert canary["image_ref"]["digest"] == d1
    assert canary["config"]["image"] == f"registry.fly.io/vault-tenants/init@{d1}"
    assert canary["state"] == "started"
    assert checks_status(canary)[0] == "passing"
    assert not standin.model.machine(canary["id"]).cordoned
    assert re.search(rf"{canary['id']}\s+rolled_back", result.out)
    assert "3 machine(s) were not touched" in result.err


def test_batch_failure_rolls_back_every_updated_machine(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    create_tenants(cli, tmp_path, "acme", "bob")
    machines = sorted(_by_id(standin).values(), key=lambda m: (_tenant(m), m["id"]))
    # Canary = first acme machine; batch 1 = second acme + first bob. Bob's first machine
    # fails its checks on the new image (only that machine).
    victim = next(m for m in machines if _tenant(m) == "bob")["id"]
    standin.model.unhealthy_on[victim] = IMAGE_V2
    result = _update(cli, "--image", IMAGE_V2, "--all-tenants")
    assert result.code == 11
    assert "rolling stage failed" in result.err and victim in result.err
    assert "hint: the new image failed on the machine named above" in result.err
    after = _by_id(standin)
    rolled = re.findall(r"rolled back (\w+) to", result.out)
    assert victim in rolled and len(rolled) == 3  # canary + batch sibling + the victim
    for machine_id in rolled:
        assert after[machine_id]["config"]["image"].split("@")[0] == IMAGE_V1.split(":")[0]
        assert after[machine_id]["image_ref"]["digest"] == machines[0]["image_ref"]["digest"]
        assert after[machine_id]["state"] == "started"
        assert not standin.model.machine(machine_id).cordoned
    untouched = [m["id"] for m in machines if m["id"] not in rolled]
    assert len(untouched) == 1 and after[untouched[0]]["config"]["image"] == IMAGE_V1


def test_failed_rollback_is_named(cli: Cli, standin: MachinesStandin, tmp_path: Path) -> None:
    create_tenants(cli, tmp_path, "acme")
    canary = min(_by_id(standin))
    standin.model.crashing_images.add(IMAGE_V2)
    # After the canary's update, its lease is never granted again: the rollback cannot start.
    standin.inject(
        "POST", r"/lease$", "409", times=None, nonce=False,
        after=("POST", rf"/machines/{canary}$", 1),
    )  # fmt: skip
    result = _update(cli, "--image", IMAGE_V2, "--all-tenants")
    assert result.code == 11
    assert f"rollback FAILED for {canary}: lease machine {canary}" in result.err
    assert f"(now: machine {canary} is stopped" in result.err  # named with its state
    assert re.search(rf"{canary}\s+rollback_failed", result.out)
    assert "inspect the machines named above" in result.err
    # The failed forward step uncordoned it: nothing of ours stays on the machine.
    assert not standin.model.machine(canary).cordoned
    assert standin.model.machine(canary).lease is None


def test_stopped_machines_are_updated_but_stay_stopped(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    create_tenants(cli, tmp_path, "acme")
    stopped = next(iter(_by_id(standin)))
    standin.model.set_state(stopped, "stopped")
    result = _update(cli, "--image", IMAGE_V2, "--tenant", "acme")
    assert result.code == 0, result.err
    machine = _by_id(standin)[stopped]
    assert machine["state"] == "stopped" and machine["config"]["image"] == IMAGE_V2
    assert "stays stopped" in result.err


def test_selection_errors(cli: Cli, tmp_path: Path, standin: MachinesStandin) -> None:
    both = cli("tenant", "update-image", "--image", IMAGE_V2, "--tenant", "a", "--all-tenants")
    assert both.code == 2 and "not both" in both.err
    neither = cli("tenant", "update-image", "--image", IMAGE_V2)
    assert neither.code == 2 and "select tenants" in neither.err
    assert cli("tenant", "update-image", "--image", IMAGE_V2, "--all-tenants").code == 9
    create_tenants(cli, tmp_path, "acme")
    unknown = cli(
        "tenant", "update-image", "--image", IMAGE_V2, "--tenant", "acme", "--tenant", "zed"
    )
    assert unknown.code == 9 and "zed" in unknown.err
    bad = cli("tenant", "update-image", "--image", IMAGE_V2, "--all-tenants", "--concurrency", "0")
    assert bad.code == 2 and "--concurrency must be >= 1" in bad.err
    assert standin.calls("POST", r"/machines/[0-9a-f]+$") == []


def test_lease_held_elsewhere_fails_canary_without_change(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    create_tenants(cli, tmp_path, "acme")
    before = _by_id(standin)
    standin.fail("POST", r"/lease$", status=409, times=None, message="lease held by ops")
    result = _update(cli, "--image", IMAGE_V2, "--all-tenants")
    assert result.code == 11
    assert "lease machine" in result.err and "lease held by ops" in result.err
    assert "starting rollback for 0 machine(s)" in result.out
    assert {m["instance_id"] for m in _by_id(standin).values()} == {
        m["instance_id"] for m in before.values()
    }


def test_update_5xx_once_is_read_back_and_retried(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    create_tenants(cli, tmp_path, "acme")
    standin.fail("POST", r"/machines/[0-9a-f]+$", status=503, times=1)
    result = _update(cli, "--image", IMAGE_V2, "--all-tenants")
    assert result.code == 0, result.err
    assert {m["config"]["image"] for m in _by_id(standin).values()} == {IMAGE_V2}


def test_update_5xx_that_persists_is_named_and_nothing_rolled_back(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    create_tenants(cli, tmp_path, "acme")
    standin.fail("POST", r"/machines/[0-9a-f]+$", status=503, times=None)
    result = _update(cli, "--image", IMAGE_V2, "--all-tenants")
    assert result.code == 11 and "update image for machine" in result.err and "503" in result.err
    assert "hint: the Machines API failed on its side (503)" in result.err
    assert "fix the image" not in result.err
    assert "starting rollback for 0 machine(s)" in result.out
    assert {m["config"]["image"] for m in _by_id(standin).values()} == {IMAGE_V1}
    assert all(not standin.model.machine(mid).cordoned for mid in _by_id(standin))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_rollout_resumes(
    standin: MachinesStandin, cli: Cli, tmp_path: Path, signum: int
) -> None:
    create_tenants(cli, tmp_path, "acme", "bob")
    state_file = tmp_path / "rollout.json"
    args = [
        "tenant", "update-image", "--image", IMAGE_V2, "--all-tenants", "--concurrency", "1",
        "--state-file", str(state_file), "--poll-interval", "0.05", "--soak-secs", "30",
    ]  # fmt: skip
    proc = admin_support.admin_process(args, admin_support.subprocess_env(standin))
    deadline = time.monotonic() + 30
    canary = None
    while time.monotonic() < deadline:
        if state_file.exists():
            entries = json.loads(state_file.read_text())["machines"]
            sent = [e for e in entries if e["update_sent"]]
            if sent:
                canary = sent[0]["id"]
                break
        time.sleep(0.05)
    assert canary is not None, proc.stderr.read() if proc.stderr else ""
    # Inside the soak window: the rollout says when the canary's checks pass and its 30 s
    # soak begins (a fixed sleep could land before that on a loaded machine).
    assert proc.stderr is not None
    seen: list[str] = []
    while not any("health checks passing" in line for line in seen):
        line = proc.stderr.readline()
        assert line, "the rollout ended before its soak: " + "".join(seen)
        seen.append(line)
    proc.send_signal(signum)  # Ctrl-C, or a cancelled CI job
    out, err = proc.communicate(timeout=30)
    err = "".join(seen) + err
    admin_support.assert_no_secrets(out, err)
    assert proc.returncode == 130, err
    assert "Run the same command again to resume" in err
    state = json.loads(state_file.read_text())
    assert state["status"] == "running"
    assert standin.model.machine(canary).lease is None  # released on the way out
    assert sum(1 for e in state["machines"] if e["status"] == "updating") == 1

    resumed = cli(*args[:-2], "--soak-secs", "0.1", *FAST[:2])
    assert resumed.code == 0, resumed.err
    assert "resuming the rollout" in resumed.err
    assert f"canary {canary} (tenant acme): update already applied" in resumed.err
    # The interrupted machine was not updated a second time.
    assert len(standin.calls("POST", rf"/machines/{canary}$")) == 1
    assert {m["config"]["image"] for m in _by_id(standin).values()} == {IMAGE_V2}
    assert not standin.model.machine(canary).cordoned
    assert json.loads(state_file.read_text())["status"] == "completed"


def test_default_state_file_is_under_xdg_state(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    create_tenants(cli, tmp_path, "acme")
    assert _update(cli, "--image", IMAGE_V2, "--tenant", "acme").code == 0
    path = default_state_path(admin_support.APP, IMAGE_V2, ["acme"])
    assert path.exists() and (path.stat().st_mode & 0o777) == 0o600
    admin_support.assert_no_secrets(path.read_text())
    # A second run of a completed rollout has nothing to do.
    again = _update(cli, "--image", IMAGE_V2, "--tenant", "acme")
    assert again.code == 0 and "skipping 2 machine(s)" in again.out


@pytest.mark.parametrize(
    ("checks", "expected"),
    [
        (None, "unknown"),
        ([], "unknown"),
        ([{"name": "a", "status": "passing"}, {"name": "b", "status": "OK"}], "passing"),
        ([{"name": "a", "status": "passing"}, {"name": "b", "status": "warning"}], "failing"),
        ({"x": {"status": "critical"}}, "failing"),
    ],
)
def test_checks_status(checks: object, expected: str) -> None:
    assert checks_status({"checks": checks})[0] == expected


def test_rollback_ref_pins_digest() -> None:
    machine = {
        "config": {"image": "registry.fly.io/app/init:latest"},
        "image_ref": {
            "registry": "registry.fly.io",
            "repository": "app/init",
            "digest": "sha256:ab",
        },
    }
    assert rollback_ref(machine) == "registry.fly.io/app/init@sha256:ab"
    assert rollback_ref({"config": {"image": "x:1"}, "image_ref": {}}) == "x:1"
