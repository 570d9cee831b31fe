"""Regression tests for the seven defects of issue 12 (rollouts and creates under API faults),
one section each, plus the rules that fix them: read back after doubt, rollback targets from
this run only, leases and cordons never left behind, time bounds, hints and secrets."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import admin_support
import pytest
from admin_support import (
    ACCESS_TOKEN,
    IMAGE_V1,
    IMAGE_V2,
    SIMPLE_TEMPLATE,
    Cli,
    Result,
    seed_tenant,
    write_template,
)

from flyvault import redact
from flyvault.standins.machines import MachinesStandin

standin = admin_support.standin
cli = admin_support.cli
IMAGE_V3 = "registry.fly.io/vault-tenants/init:2026-05-01"
LATEST = "registry.fly.io/vault-tenants/init:latest"
FAST = (
    "--poll-interval", "0.03", "--soak-secs", "0.15", "--health-timeout-secs", "0.6",
    "--start-timeout-secs", "5", "--lease-ttl-secs", "10",
)  # fmt: skip
#: The slack of every time bound: one request of the test client (connect + read).
REQUEST = admin_support.FAST_TIMEOUTS.connect + admin_support.FAST_TIMEOUTS.read


def _update(cli: Cli, tmp_path: Path, image: str, *extra: str) -> Result:
    state = str(tmp_path / f"state-{image.rsplit(':', 1)[-1]}.json")
    return cli(
        "tenant", "update-image", "--image", image, "--tenant", "acme", "--state-file", state,
        *FAST, *extra,
    )  # fmt: skip


def _live(standin: MachinesStandin) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in standin.model.machines() if m["state"] != "destroyed"}


def _clean(standin: MachinesStandin) -> None:
    """Nothing of ours is left on any machine: no cordon, no lease."""
    for machine_id, machine in _live(standin).items():
        assert not standin.model.machine(machine_id).cordoned, machine_id
        assert "nonce" not in machine, machine_id


def _hint(result: Result) -> str:
    return "\n".join(x for x in result.err.splitlines() if x.startswith("fly-vault-admin: hint"))


# -- 1. a change whose answer was lost is a change ---------------------------------------------


@pytest.mark.parametrize("kind", ["hang", "reset-after"])
def test_1_update_whose_answer_was_lost_is_rolled_back(
    cli: Cli, standin: MachinesStandin, tmp_path: Path, kind: str
) -> None:
    ids = seed_tenant(standin, "acme")
    canary = min(ids)
    v1 = standin.model.resolve(IMAGE_V1)["digest"]
    standin.model.crashing_images.add(IMAGE_V2)
    standin.inject("POST", rf"/machines/{canary}$", kind)
    result = _update(cli, tmp_path, IMAGE_V2)
    assert result.code == 11, result.err
    assert "the update went through although its answer was lost" in result.err
    assert f"rolled back {canary} to" in result.out
    assert "hint: the new image failed on the machine named above" in _hint(result)
    machines = _live(standin)
    assert {m["image_ref"]["digest"] for m in machines.values()} == {v1}
    assert {m["state"] for m in machines.values()} == {"started"}  # the canary runs again
    _clean(standin)


def test_1_a_crashed_canary_is_not_left_down_by_the_next_rollout(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    seed_tenant(standin, "acme")
    standin.model.crashing_images.add(IMAGE_V2)
    assert _update(cli, tmp_path, IMAGE_V2).code == 11
    fixed = _update(cli, tmp_path, IMAGE_V3)
    assert fixed.code == 0, fixed.err
    machines = _live(standin)
    assert {m["config"]["image"] for m in machines.values()} == {IMAGE_V3}
    assert {m["state"] for m in machines.values()} == {"started"}


# -- 2. the rollback target is what ran before *this* run ---------------------------------------


def test_2_forced_rerun_of_a_moved_tag_rolls_back_one_release_only(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    standin.model.push_image(LATEST)  # D1
    seed_tenant(standin, "acme", image=LATEST)
    d2 = standin.model.push_image(LATEST)
    first = _update(cli, tmp_path, LATEST, "--force")
    assert first.code == 0, first.err
    assert {m["image_ref"]["digest"] for m in _live(standin).values()} == {d2}
    d3 = standin.model.push_image(LATEST)
    standin.model.crashing_images.add(d3)
    second = _update(cli, tmp_path, LATEST, "--force")  # same state file: the completed run
    assert second.code == 11
    # Back to D2, the last good image; never to D1 from the older run's state.
    assert {m["image_ref"]["digest"] for m in _live(standin).values()} == {d2}
    state = json.loads((tmp_path / "state-latest.json").read_text())
    assert {e["previous_digest"] for e in state["machines"]} == {d2}


def test_2_rollback_target_is_recorded_before_the_first_change(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    ids = seed_tenant(standin, "acme")
    v1 = standin.model.resolve(IMAGE_V1)["digest"]
    standin.model.crashing_images.add(IMAGE_V2)
    _update(cli, tmp_path, IMAGE_V2)
    first_mutation = next(
        i for i, r in enumerate(standin.requests) if r.method in ("POST", "DELETE")
    )
    assert first_mutation > 0  # the listing (the snapshot) came first
    state = json.loads((tmp_path / "state-2026-04-01.json").read_text())
    for entry in state["machines"]:
        assert entry["previous_digest"] == v1
        assert entry["rollback_image"] == f"registry.fly.io/vault-tenants/init@{v1}"
        assert entry["state_before"] == "started" and entry["id"] in ids


def test_2_a_rerun_first_finishes_the_rollback_a_failed_run_left(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    ids = seed_tenant(standin, "acme")
    canary = min(ids)
    standin.model.crashing_images.add(IMAGE_V2)
    standin.inject(
        "POST", r"/lease$", "409", times=None, nonce=False,
        after=("POST", rf"/machines/{canary}$", 1),
    )  # fmt: skip
    failed = _update(cli, tmp_path, IMAGE_V2)
    assert failed.code == 11 and f"rollback FAILED for {canary}" in failed.err
    standin.clear_faults()
    standin.model.crashing_images.clear()  # the image is fixed under the same tag
    again = _update(cli, tmp_path, IMAGE_V2)
    assert again.code == 0, again.err
    assert "left 1 machine(s) it could not roll back; rolling them back first" in again.err
    assert f"rolled back {canary} to registry.fly.io/vault-tenants/init@sha256:" in again.out
    machines = _live(standin)
    assert {m["config"]["image"] for m in machines.values()} == {IMAGE_V2}
    assert {m["state"] for m in machines.values()} == {"started"}
    _clean(standin)


# -- 3. secrets: env values, tokens ------------------------------------------------------------


def test_3_update_image_never_prints_env_values_echoed_by_the_api(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    seed = "vault-seed-material-9f3c"  # no secret-looking key name: still never printed
    ids = seed_tenant(standin, "acme", env={"VAULT_SEED": seed})
    redact.forget_all()  # as in a fresh process: nothing registered by a create
    standin.inject("POST", rf"/machines/{min(ids)}$", "422-echo")
    result = _update(cli, tmp_path, IMAGE_V2)
    assert result.code == 11 and "422" in result.err and "unprocessable request" in result.err
    for secret in (ACCESS_TOKEN, seed, admin_support.API_TOKEN):
        assert secret not in result.out + result.err
    assert "<redacted>" in result.err


def test_3_list_verbose_retry_logs_never_print_the_access_token(
    cli: Cli, standin: MachinesStandin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLY_VAULT_ACCESS_TOKEN", ACCESS_TOKEN)
    standin.fail(
        "GET", r"/machines$", status=503, times=1, message=f"echo: ACCESS_TOKEN={ACCESS_TOKEN}"
    )
    result = cli("-v", "tenant", "list")
    assert result.code == 0
    assert "retrying" in result.err and "ACCESS_TOKEN=<redacted>" in result.err


def test_3_create_registers_every_template_env_value(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    text = SIMPLE_TEMPLATE.replace(
        'ACCESS_TOKEN = "{{access_token}}"',
        'ACCESS_TOKEN = "{{access_token}}"\nSEED = "literal-seed-0c1d2e"\nPORT = "8080"',
    )
    path = write_template(tmp_path, text)
    standin.inject("POST", r"/machines$", "422-echo")
    result = cli(
        "tenant", "create", "acme", "--template", str(path), "--access-token", ACCESS_TOKEN
    )
    assert result.code == 10
    assert "literal-seed-0c1d2e" not in result.err and "<redacted>" in result.err
    assert '"PORT": "8080"' in result.err  # numbers are not secrets: not scrubbed


# -- 4. time bounds are bounds ----------------------------------------------------------------


def test_4_create_wait_timeout_holds_when_the_api_hangs(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    standin.model.stuck_images.add(IMAGE_V1)
    standin.inject("GET", r"/wait$", "hang-before", times=None, query={"state": "started"})
    path = write_template(tmp_path, SIMPLE_TEMPLATE)
    began = cli.clock.now()
    result = cli(
        "tenant", "create", "acme", "--template", str(path), "--access-token", ACCESS_TOKEN,
        "--wait-timeout-secs", "5",
    )  # fmt: skip
    elapsed = cli.clock.now() - began
    assert result.code == 4, result.err
    wait_request = 5 + admin_support.FAST_TIMEOUTS.wait_grace  # a wait's own read timeout
    # The starts and the cleanup each get 5 s (+10 %) plus one request (was: 233 s).
    assert elapsed <= 2 * (5 * 1.1 + wait_request + REQUEST)
    assert len(standin.calls("GET", r"/wait$")) <= 4  # not 5 retries of every wait
    assert _live(standin) == {} and standin.model.volumes() == []


def test_4_delete_wait_timeout_holds_when_the_api_hangs(cli: Cli, standin: MachinesStandin) -> None:
    seed_tenant(standin, "acme")
    standin.inject("GET", r"/wait$", "hang-before", times=None, query={"state": "stopped"})
    began = cli.clock.now()
    result = cli("tenant", "delete", "acme", "--yes", "--wait-timeout-secs", "5")
    elapsed = cli.clock.now() - began
    assert result.code == 0, result.err  # the force delete does not need the stop
    # One wait per machine, never retried past its deadline (the read-back decides).
    assert len(standin.calls("GET", r"/wait$")) <= 2 + 2  # + the two 'destroyed' waits
    wait_request = 5 + admin_support.FAST_TIMEOUTS.wait_grace
    per_wait = 5 * 1.1 + wait_request + REQUEST
    assert elapsed <= 2 * per_wait + per_wait  # two stop waits, then the rest of the delete
    assert _live(standin) == {} and standin.model.volumes() == []


def test_4_cleanup_does_not_wait_for_a_volume_whose_machine_stays(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    standin.fail("POST", r"/machines$", status=422, message="bad guest", skip=1)
    standin.fail("DELETE", r"/machines/", status=500, times=None, message="flyd down")
    path = write_template(tmp_path, SIMPLE_TEMPLATE)
    began = cli.clock.now()
    result = cli("tenant", "create", "acme", "--template", str(path), "--access-token", "abcdef")
    assert result.code == 12
    assert cli.clock.now() - began < 30  # not the 180 s of --wait-timeout-secs (was 372 s)
    machine = next(iter(_live(standin)))
    assert f"still attached to machine {machine}, which could not be removed" in result.err
    assert f"machine {machine}: machines api" in result.err and "flyd down" in result.err
    assert "bad guest" in result.err  # the root cause first


def test_4_start_and_health_timeouts_hold(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    seed_tenant(standin, "acme")
    standin.model.stuck_images.add(IMAGE_V2)
    began = cli.clock.now()
    result = _update(cli, tmp_path, IMAGE_V2, "--start-timeout-secs", "2")
    assert result.code == 11
    assert re.search(r"is starting \(instance \w+\) after 2s; wanted 'started'", result.err)
    # The canary's start (2 s) and its rollback's, each +10 % and one request.
    assert cli.clock.now() - began <= 2 * (2 * 1.1 + REQUEST) + 1
    standin.model.stuck_images.clear()
    standin.model.unhealthy_images.add(IMAGE_V3)
    began = cli.clock.now()
    result = _update(cli, tmp_path, IMAGE_V3, "--health-timeout-secs", "0.5")
    assert result.code == 11 and "checks failed to pass before timeout (0.5s)" in result.err
    assert cli.clock.now() - began <= 0.5 * 1.1 + REQUEST + 2  # + the update and rollback


def test_4_retry_after_counts_against_the_deadline(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    ids = seed_tenant(standin, "acme")
    standin.fail("GET", rf"/machines/{min(ids)}/wait$", status=429, retry_after=30, times=None)
    result = _update(cli, tmp_path, IMAGE_V2, "--start-timeout-secs", "5")
    # Never parked for 30 s past a 5 s deadline: the wait gives up, the read-back decides.
    assert result.code == 0, result.err
    assert max(cli.clock.slept, default=0) < 5


# -- 5. leases and cordons are never left behind ---------------------------------------------


def test_5_a_lease_that_cannot_be_released_is_a_nonzero_exit_with_its_expiry(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    ids = seed_tenant(standin, "acme")
    canary = min(ids)
    standin.fail("DELETE", rf"/machines/{canary}/lease$", status=409, times=None)
    result = _update(cli, tmp_path, IMAGE_V2)
    assert result.code == 12, result.err
    assert f"could not release the lease on machine {canary}" in result.err
    assert re.search(r"it expires at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(in \d+ s\)", result.err)
    # One warning format, whether it comes from warn() or from a logger.
    assert "fly-vault-admin: warning: could not release the lease" in result.err
    assert "WARNING" not in result.err


def test_5_a_rollback_whose_checks_fail_is_not_left_cordoned(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    ids = seed_tenant(standin, "acme")
    canary = min(ids)
    standin.model.crashing_images.add(IMAGE_V2)
    standin.model.unhealthy_on[canary] = standin.model.resolve(IMAGE_V1)["digest"]
    result = _update(cli, tmp_path, IMAGE_V2)
    assert result.code == 11
    assert f"rollback FAILED for {canary}" in result.err and "(now: machine" in result.err
    _clean(standin)


def test_5_a_failed_uncordon_does_not_roll_back_a_healthy_canary(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    ids = seed_tenant(standin, "acme")
    canary = min(ids)
    standin.fail("POST", rf"/machines/{canary}/uncordon$", status=500, times=None)
    result = _update(cli, tmp_path, IMAGE_V2)
    assert result.code == 11
    assert "could not be uncordoned" in result.err and "nothing was rolled back" in result.err
    assert "rollback" not in result.out
    assert _live(standin)[canary]["config"]["image"] == IMAGE_V2
    standin.clear_faults()
    again = _update(cli, tmp_path, IMAGE_V2)  # resumes: checks the canary, uncordons it
    assert again.code == 0, again.err
    assert "update already applied" in again.err
    assert {m["config"]["image"] for m in _live(standin).values()} == {IMAGE_V2}
    _clean(standin)


# -- 6. hints that match the cause ------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "needle"),
    [
        ("POST", r"/lease$", 409, "another operator holds a lease"),
        ("POST", r"/cordon$", 503, "the Machines API failed on its side (503)"),
        ("POST", r"/cordon$", 0, "dropped the connection"),
    ],
)
def test_6_api_failures_do_not_blame_the_image(
    cli: Cli,
    standin: MachinesStandin,
    tmp_path: Path,
    method: str,
    path: str,
    status: int,
    needle: str,
) -> None:
    seed_tenant(standin, "acme")
    if status == 409:
        _hold_lease_elsewhere(standin)  # the API refuses with 409; the read-back names it
    elif status:
        standin.fail(method, path, status=status, times=None)
    else:
        standin.inject(method, path, "reset-before", times=None)
    result = _update(cli, tmp_path, IMAGE_V2)
    assert result.code == 11
    assert needle in _hint(result) and "fix the image" not in result.err
    assert {m["config"]["image"] for m in _live(standin).values()} == {IMAGE_V1}
    if status != 409:
        _clean(standin)


def _hold_lease_elsewhere(standin: MachinesStandin) -> None:
    model = standin.model
    for machine_id in _live(standin):
        model.machine(machine_id).lease = model._new_lease(600, "ops maintenance", time.time())


def test_6_nothing_left_is_not_reported_as_left(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    # The cleanup's waits for 'destroyed' fail, but the machines are gone: no exit 12.
    standin.fail("POST", r"/machines$", status=422, message="bad guest", skip=1)
    standin.fail("GET", r"/wait$", status=500, times=None, query={"state": "destroyed"})
    path = write_template(tmp_path, SIMPLE_TEMPLATE)
    result = cli("tenant", "create", "acme", "--template", str(path), "--access-token", "abcdef")
    assert result.code == 10, result.err
    assert "being destroyed but not gone" not in result.err and "left behind" not in result.err
    assert "create rolled back: removed 1 machine(s) and 2 volume(s)" in result.err


# -- 7. display -------------------------------------------------------------------------------


def test_7_list_shows_a_pinned_image_with_its_tag_and_no_false_drift(
    cli: Cli, standin: MachinesStandin, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = seed_tenant(standin, "acme")
    digest = standin.model.resolve(IMAGE_V1)["digest"]
    pinned = standin.model.machine(ids[0])
    pinned.config["image"] = f"registry.fly.io/vault-tenants/init@{digest}"  # after a rollback
    standin.model._apply_image(pinned)
    result = cli("tenant", "list")
    assert "drift" not in result.out
    assert f"vault-tenants/init:2026-03-02@{digest[7:19]}" in result.out
    wide = cli("tenant", "list", "--wide")
    assert wide.out.count(f"init:2026-03-02@{digest[7:19]}") == 2
    import flyvault.admin.commands as admin_commands

    monkeypatch.setattr(admin_commands, "terminal_width", lambda: 100)
    narrow = cli("tenant", "list")
    assert all(len(line) <= 100 for line in narrow.out.splitlines()), narrow.out
    assert "init:2026-03-02" in narrow.out  # the tag survives the narrow terminal


def test_7_real_drift_is_still_drift(cli: Cli, standin: MachinesStandin) -> None:
    seed_tenant(standin, "acme", count=1)
    seed_tenant(standin, "acme", count=1, image=IMAGE_V2, start=2)
    assert "drift(2)" in cli("tenant", "list").out
