"""fly-vault-admin end to end against the stand-in: create, list, delete, and bad input.

Every run goes through ``Cli``, which fails the test if the API token or the tenant access
token shows up in stdout or stderr.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import admin_support
import pytest
from admin_support import (
    ACCESS_TOKEN,
    API_TOKEN,
    APP,
    EXAMPLE_TEMPLATE,
    IMAGE_V1,
    REPO,
    SIMPLE_TEMPLATE,
    Cli,
    assert_no_secrets,
    client,
    create_tenants,
    write_template,
)

from flyvault.admin.commands import delete_tenant
from flyvault.standins.machines import MachinesStandin

standin = admin_support.standin
cli = admin_support.cli


def _live(standin: MachinesStandin) -> list[dict]:
    return [m for m in standin.model.machines() if m["state"] != "destroyed"]


def _create(cli: Cli, tmp_path: Path, tenant: str = "acme", *extra: str) -> admin_support.Result:
    path = write_template(tmp_path, SIMPLE_TEMPLATE)
    return cli(
        "tenant", "create", tenant, "--template", str(path), "--access-token", ACCESS_TOKEN, *extra
    )


# -- global options ----------------------------------------------------------------------------


def test_help_does_not_import_httpx() -> None:
    code = (
        "import sys\n"
        "from flyvault.admin.main import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "try:\n    main(['tenant', '--help'])\nexcept SystemExit:\n    pass\n"
        "try:\n    main(['tenant', 'create', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'httpx' not in sys.modules, 'httpx imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert "update-image" in done.stdout and "exit codes" in done.stdout


@pytest.mark.parametrize(
    ("unset", "needle"),
    [
        ("FLY_API_TOKEN", "missing api token (set --api-token or FLY_API_TOKEN)"),
        ("FLY_APP", "missing app (set --app or FLY_APP)"),
    ],
)
def test_token_and_app_are_required(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, unset: str, needle: str
) -> None:
    monkeypatch.delenv(unset)
    result = cli("tenant", "list")
    assert result.code == 2
    assert f"fly-vault-admin: error: {needle}" in result.err
    assert "fly-vault-admin: hint:" in result.err


def test_flags_win_over_environment_and_may_follow_the_subcommand(
    cli: Cli, standin: MachinesStandin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLY_APP", "ghost")
    monkeypatch.setenv("FLY_API_TOKEN", "not-the-token")
    assert cli("--app", APP, "--api-token", API_TOKEN, "tenant", "list").code == 0
    assert cli("tenant", "list", "--app", APP, "--api-token", API_TOKEN).code == 0
    result = cli("--api-token", API_TOKEN, "tenant", "list")
    assert result.code == 9 and "app ghost not found" in result.err


def test_wrong_api_token_exit_6(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLY_API_TOKEN", "WRONG-" + API_TOKEN)
    result = cli("tenant", "list")
    assert result.code == 6
    assert "401" in result.err and "FLY_API_TOKEN" in result.err
    assert "WRONG-" not in result.err


def test_bad_api_base(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLY_API_BASE", "ftp://x")
    assert cli("tenant", "list").code == 2


# -- create --------------------------------------------------------------------------------------


def test_dry_run_makes_no_api_call_and_redacts(cli: Cli, standin: MachinesStandin) -> None:
    result = cli(
        "tenant",
        "create",
        "acme",
        "--template",
        str(EXAMPLE_TEMPLATE),
        "--access-token",
        ACCESS_TOKEN,
        "--dry-run",
    )
    assert result.code == 0, result.err
    assert standin.requests == []
    plan = json.loads(result.out)
    assert plan[0]["config"]["env"] == {"ACCESS_TOKEN": "<redacted>"}
    assert plan[0]["config"]["mounts"][0]["volume"] == "<auto:tvol_acme_1@ord>"
    assert plan[0]["config"]["metadata"]["fly_vault.tenant_id"] == "acme"


def test_create_list_and_json(cli: Cli, standin: MachinesStandin, tmp_path: Path) -> None:
    result = _create(cli, tmp_path)
    assert result.code == 0, result.err
    assert "tenant 'acme' created with 2 machines" in result.out
    machines = _live(standin)
    assert len(machines) == 2 and all(m["state"] == "started" for m in machines)
    assert {m["config"]["env"]["ACCESS_TOKEN"] for m in machines} == {ACCESS_TOKEN}
    assert len(standin.model.volumes()) == 2
    assert all(m["config"]["mounts"][0]["volume"].startswith("vol_") for m in machines)

    table = cli("tenant", "list")
    assert table.code == 0
    lines = table.out.splitlines()
    assert lines[0].split() == ["TENANT", "MACHINES", "REGIONS", "IMAGE", "LAST", "UPDATED"]
    assert lines[1].startswith("acme ") and "2/2/0" in lines[1] and "ord" in lines[1]
    assert lines[-1] == "machines: 2/2/0"

    wide = cli("tenant", "list", "--wide")
    assert len(wide.out.splitlines()) == 3 and "started" in wide.out

    data = json.loads(cli("tenant", "list", "--json").out)
    assert [t["tenant_id"] for t in data] == ["acme"]
    tenant = data[0]
    assert (tenant["total"], tenant["started"], tenant["stopped"], tenant["other"]) == (2, 2, 0, 0)
    assert tenant["image"].startswith("sha256:")
    entry = tenant["machines"][0]
    assert entry["config"]["env"] == {"ACCESS_TOKEN": "<redacted>"}
    assert entry["image_ref"]["tag"] == "2026-03-02"
    assert entry["usage_fact"]["volumes"][0]["size_gib"] == 5
    assert set(entry) >= {"id", "state", "region", "instance_id", "volumes", "config", "checks"}


def test_list_filters_and_empty(cli: Cli, tmp_path: Path) -> None:
    assert cli("tenant", "list").out.strip() == "no managed tenants found"
    assert json.loads(cli("tenant", "list", "--json").out) == []
    create_tenants(cli, tmp_path, "acme", "bob")
    data = json.loads(cli("tenant", "list", "--tenant", "bob", "--json").out)
    assert [t["tenant_id"] for t in data] == ["bob"]


def test_create_existing_tenant_is_refused(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    assert _create(cli, tmp_path).code == 0
    result = _create(cli, tmp_path)
    assert result.code == 13
    assert "tenant 'acme' already exists" in result.err
    assert len(_live(standin)) == 2


def test_app_mismatch_refused_before_any_call(cli: Cli, standin: MachinesStandin) -> None:
    result = cli(
        "--app", "other-app", "tenant", "create", "acme", "--template", str(EXAMPLE_TEMPLATE)
    )
    assert result.code == 3
    assert "template app 'vault-tenants' does not match configured app 'other-app'" in result.err
    assert standin.requests == []


def test_bad_template_and_placeholders(cli: Cli, standin: MachinesStandin, tmp_path: Path) -> None:
    bad = write_template(tmp_path, "version = 1\napp = [", "bad.toml")
    result = cli("tenant", "create", "acme", "--template", str(bad))
    assert result.code == 3 and "invalid TOML" in result.err
    unknown = write_template(tmp_path, SIMPLE_TEMPLATE.replace("tenant-vm", "{{role}}"), "u.toml")
    result = cli("tenant", "create", "acme", "--template", str(unknown), "--access-token", "abcdef")
    assert result.code == 3
    assert "unknown placeholder {{role}} at metadata.role (line 21)" in result.err
    assert standin.requests == []


def test_invalid_var_and_unused_var(cli: Cli, tmp_path: Path) -> None:
    result = _create(cli, tmp_path, "acme", "--var", "oops")
    assert result.code == 2 and "invalid --var 'oops', expected key=value" in result.err
    result = _create(cli, tmp_path, "acme", "--var", "extra=1", "--dry-run")
    assert result.code == 0 and "--var 'extra' is not used" in result.err


def _assert_nothing_left(standin: MachinesStandin) -> None:
    assert _live(standin) == []
    assert standin.model.volumes() == []


def test_machine_create_422_rolls_everything_back(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    # The first machine is created, the second refused: both volumes and machine 1 go away.
    standin.fail("POST", r"/machines$", status=422, message="invalid guest size", skip=1)
    result = _create(cli, tmp_path)
    assert result.code == 10
    assert "422" in result.err and "invalid guest size" in result.err
    assert "create rolled back: removed 1 machine(s) and 2 volume(s)" in result.err
    _assert_nothing_left(standin)


def test_machine_create_5xx_is_read_back_then_retried(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    # Not retried blindly (a POST may have acted): the tenant is read back first, shows no
    # new machine, and only then is the create sent again.
    standin.fail("POST", r"/machines$", status=503, times=1)
    result = _create(cli, tmp_path)
    assert result.code == 0, result.err
    assert [r.status for r in standin.calls("POST", r"/machines$")] == [503, 200, 200]
    assert len(_live(standin)) == 2


def test_machine_create_5xx_that_persists_is_bounded_and_rolled_back(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    standin.fail("POST", r"/machines$", status=503, times=None)
    result = _create(cli, tmp_path)
    assert result.code == 10 and "503" in result.err
    assert "fly-vault-admin: hint: the Machines API failed on its side (503)" in result.err
    assert len(standin.calls("POST", r"/machines$")) == 3
    _assert_nothing_left(standin)


def test_volume_create_429_is_retried(cli: Cli, standin: MachinesStandin, tmp_path: Path) -> None:
    standin.fail("POST", r"/volumes$", status=429, times=2)
    assert _create(cli, tmp_path).code == 0
    assert len(standin.model.volumes()) == 2


def test_lost_answer_of_machine_create_is_read_back_and_adopted(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    # The API creates the second machine but never answers: the client times out, reads the
    # tenant back, finds the machine and goes on with it (no second machine is made).
    standin.inject("POST", r"/machines$", "hang", skip=1)
    result = _create(cli, tmp_path)
    assert result.code == 0, result.err
    assert "was created although the answer was lost" in result.err
    assert len(standin.calls("POST", r"/machines$")) == 2
    assert len(_live(standin)) == 2 and all(m["state"] == "started" for m in _live(standin))


def test_machine_the_api_made_is_removed_when_create_fails_later(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    standin.inject("POST", r"/machines$", "reset-after")  # made, answer lost, adopted
    # Faults are taken in order: the 422 meets the second machine's create.
    standin.fail("POST", r"/machines$", status=422, message="invalid guest")
    result = _create(cli, tmp_path)
    assert result.code == 10 and "invalid guest" in result.err
    assert "removed 1 machine(s) and 2 volume(s)" in result.err
    _assert_nothing_left(standin)


def test_lost_answer_of_volume_create_is_adopted(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    standin.inject("POST", r"/volumes$", "reset-after")
    result = _create(cli, tmp_path)
    assert result.code == 0, result.err
    assert "was created although the answer was lost" in result.err
    assert len(standin.model.volumes()) == 2 and len(_live(standin)) == 2


def test_machine_that_never_starts_times_out_named_and_is_removed(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    standin.model.stuck_images.add(IMAGE_V1)
    result = _create(cli, tmp_path, "acme", "--wait-timeout-secs", "1")
    assert result.code == 4
    assert "is starting (instance" in result.err and "wanted 'started'" in result.err
    assert "hint: machine " in result.err and "is stuck in state 'starting'" in result.err
    _assert_nothing_left(standin)


def test_incomplete_cleanup_names_what_is_left(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    standin.fail("POST", r"/machines$", status=422, times=1, message="bad config")
    standin.fail("DELETE", r"/volumes/", status=500, times=None, message="storage down")
    result = _create(cli, tmp_path)
    assert result.code == 12
    assert "bad config" in result.err  # the root cause survives
    assert "left behind" in result.err and "storage down" in result.err
    assert result.err.count("volume vol_") == 2
    assert "tenant delete acme --yes" in result.err


def test_skip_launch_creates_without_waiting(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    text = SIMPLE_TEMPLATE.replace('region = "ord"', 'region = "ord"\nskip_launch = true')
    path = write_template(tmp_path, text, "skip.toml")
    result = cli("tenant", "create", "acme", "--template", str(path), "--access-token", "abcdef")
    assert result.code == 0, result.err
    assert {m["state"] for m in _live(standin)} == {"created"}


def test_create_lease_is_released(cli: Cli, standin: MachinesStandin) -> None:
    result = cli(
        "tenant", "create", "acme", "--template", str(EXAMPLE_TEMPLATE), "--access-token", "abcdef"
    )
    assert result.code == 0, result.err
    (machine,) = _live(standin)
    assert "nonce" not in machine  # lease_ttl = 120 in the example: released, not left to expire


# -- delete --------------------------------------------------------------------------------------


def test_delete_needs_yes_off_a_terminal(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    create_tenants(cli, tmp_path, "acme")
    result = cli("tenant", "delete", "acme")
    assert result.code == 2 and "refusing delete without --yes" in result.err
    assert "deletion plan for tenant 'acme':" in result.out
    assert result.out.count("- machine ") == 2 and result.out.count("- volume ") == 2
    assert len(_live(standin)) == 2


def test_delete_removes_machines_and_volumes_and_is_idempotent(
    cli: Cli, standin: MachinesStandin, tmp_path: Path
) -> None:
    create_tenants(cli, tmp_path, "acme", "bob")
    result = cli("tenant", "delete", "acme", "--yes")
    assert result.code == 0, result.err
    assert "tenant 'acme' deleted (2 machine(s), 2 volume(s))" in result.out
    left = _live(standin)
    assert {m["config"]["metadata"]["fly_vault.tenant_id"] for m in left} == {"bob"}
    assert len(standin.model.volumes()) == 2
    # Stopped before destroyed: a clean shutdown when possible.
    assert len(standin.calls("POST", r"/stop$")) == 2
    again = cli("tenant", "delete", "acme", "--yes")
    assert again.code == 0 and "has no managed machines" in again.out


def test_delete_half_done_then_finished(cli: Cli, standin: MachinesStandin, tmp_path: Path) -> None:
    create_tenants(cli, tmp_path, "acme")
    standin.fail("DELETE", r"/volumes/", status=503, times=None)
    result = cli("tenant", "delete", "acme", "--yes")
    assert result.code == 12
    assert "tenant delete completed with errors" in result.err
    assert result.err.count("volume vol_") == 2
    assert _live(standin) == []
    standin.clear_faults()
    # Machines are gone; the volumes are still found through the destroyed machines.
    result = cli("tenant", "delete", "acme", "--yes")
    assert result.code == 0, result.err
    assert result.out.count("- volume ") == 2
    assert standin.model.volumes() == []


def test_delete_asks_on_a_terminal(cli: Cli, standin: MachinesStandin, tmp_path: Path) -> None:
    create_tenants(cli, tmp_path, "acme")
    asked: list[str] = []

    async def go(answer: str) -> None:
        async with client(standin) as api:
            await delete_tenant(
                api,
                "acme",
                yes=False,
                confirm=lambda prompt: asked.append(prompt) or answer,
                wait_timeout=10,
            )

    from flyvault.errors import UsageError

    with pytest.raises(UsageError, match="cancelled"):
        asyncio.run(go("nope"))
    assert len(_live(standin)) == 2
    asyncio.run(go("acme"))
    assert "acme" in asked[0] and _live(standin) == []


def test_list_api_failure_is_reported(cli: Cli, standin: MachinesStandin) -> None:
    standin.fail("GET", r"/machines$", status=500, times=None, message="db down")
    result = cli("tenant", "list")
    assert result.code == 10 and "500" in result.err and "db down" in result.err


def test_secrets_never_in_outputs_subprocess(standin: MachinesStandin, tmp_path: Path) -> None:
    """The same check as ``Cli`` but for a real process and its verbose logs."""
    path = write_template(tmp_path, SIMPLE_TEMPLATE)
    env = admin_support.subprocess_env(standin)
    for args in (
        ["-v", "tenant", "create", "acme", "--template", str(path), "--access-token", ACCESS_TOKEN],
        ["-v", "tenant", "create", "acme", "--template", str(path), "--access-token", ACCESS_TOKEN],
        ["-v", "tenant", "list", "--json"],
        [
            "-v",
            "tenant",
            "create",
            "x",
            "--template",
            str(path),
            "--access-token",
            ACCESS_TOKEN,
            "--dry-run",
        ],
        ["-v", "tenant", "usage-facts"],
        ["-v", "--api-token", API_TOKEN + "x", "tenant", "list"],
        ["-v", "tenant", "delete", "acme", "--yes"],
    ):
        proc = admin_support.admin_process(args, env)
        out, err = proc.communicate(timeout=60)
        assert_no_secrets(out, err)
