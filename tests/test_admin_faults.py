"""The fault matrix: every mutating and waiting API call of create, delete and update-image
(its rollback included), each with every fault kind of the stand-in, one fault per run.

Each cell asserts the invariant: afterwards the tenant is either as before or in the state
the command promised (created, deleted, updated), with no orphan machine or volume and no
lease or cordon of ours left; the exit code is the expected one; a failure's hint names its
cause; and no secret reached stdout or stderr (``Cli`` checks that on every run, with a 422
whose body echoes the request, Authorization header and env values included).

The faults are the stand-in's own (``MachinesStandin.inject``, the command line's
``--fault``), so any cell can be replayed by hand (references/admin.md). ``hang`` runs with
the stand-in's fast hang and ``HangTransport``: the client sees its read timeout at once and
the injected clock moves on by that timeout, so no cell waits in real time.

Left out, on purpose: the lease refresh of a rollback (the same code as the forward refresh,
which is in the matrix; its timing cannot be aimed at); the listings (reads, retried as
any GET) and create's cleanup calls (reached only after a first fault).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import admin_support
import pytest
from admin_support import (
    API_TOKEN,
    APP,
    IMAGE_V1,
    IMAGE_V2,
    SIMPLE_TEMPLATE,
    Cli,
    Result,
    seed_tenant,
    write_template,
)

from flyvault.standins.machines import MachinesStandin
from flyvault.standins.machines_faults import KINDS as STANDIN_KINDS

cli = admin_support.cli
#: The fault kinds of the matrix (the stand-in also has ``hang-before``, used elsewhere).
KINDS = ("500", "429", "409", "412", "422-echo", "hang", "reset-before", "reset-after")
TENANT = "acme"
MACHINE = r"[0-9a-f]+"


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[MachinesStandin]:
    import flyvault.fly.leases

    monkeypatch.setattr(flyvault.fly.leases, "REFRESH_EVERY", 0.02)  # refreshes happen in a cell
    with MachinesStandin(
        token=API_TOKEN, apps=(APP,), transition_delay=0.005, crash_delay=0.03
    ) as api:
        yield api


@dataclass(frozen=True)
class Call:
    command: str  # create | delete | update | rollback
    name: str
    method: str
    path: str  # {m}: the target machine, {v}: its volume
    query: tuple[tuple[str, str], ...] = ()
    nonce: bool | None = None
    after: int = 0  # armed once this many updates of the target machine were sent

    @property
    def id(self) -> str:
        return f"{self.command}:{self.name}"


CALLS = [
    Call("create", "create volume", "POST", r"/volumes$"),
    Call("create", "create machine", "POST", r"/machines$"),
    Call("create", "wait started", "GET", rf"/machines/{MACHINE}/wait$", (("state", "started"),)),
    Call("create", "release create lease", "DELETE", rf"/machines/{MACHINE}/lease$"),
    Call("delete", "cordon", "POST", r"/machines/{m}/cordon$"),
    Call("delete", "stop", "POST", r"/machines/{m}/stop$"),
    Call("delete", "wait stopped", "GET", r"/machines/{m}/wait$", (("state", "stopped"),)),
    Call("delete", "destroy", "DELETE", r"/machines/{m}$"),
    Call("delete", "wait destroyed", "GET", r"/machines/{m}/wait$", (("state", "destroyed"),)),
    Call("delete", "delete volume", "DELETE", r"/volumes/{v}$"),
    Call("update", "acquire lease", "POST", r"/machines/{m}/lease$", nonce=False),
    Call("update", "refresh lease", "POST", r"/machines/{m}/lease$", nonce=True),
    Call("update", "cordon", "POST", r"/machines/{m}/cordon$"),
    Call("update", "update", "POST", r"/machines/{m}$"),
    Call("update", "wait started", "GET", r"/machines/{m}/wait$", (("state", "started"),)),
    Call("update", "health check", "GET", r"/machines/{m}$", after=1),
    Call("update", "uncordon", "POST", r"/machines/{m}/uncordon$"),
    Call("update", "release lease", "DELETE", r"/machines/{m}/lease$"),
    Call("rollback", "acquire lease", "POST", r"/machines/{m}/lease$", nonce=False, after=1),
    Call("rollback", "cordon", "POST", r"/machines/{m}/cordon$", after=1),
    Call("rollback", "update", "POST", r"/machines/{m}$", after=1),
    Call(
        "rollback", "wait started", "GET", r"/machines/{m}/wait$", (("state", "started"),), after=2
    ),
    Call("rollback", "health check", "GET", r"/machines/{m}$", after=2),
    Call("rollback", "uncordon", "POST", r"/machines/{m}/uncordon$", after=2),
    Call("rollback", "release lease", "DELETE", r"/machines/{m}/lease$", after=2),
]
CELLS = [pytest.param(call, kind, id=f"{call.id}:{kind}") for call in CALLS for kind in KINDS]
#: Cells whose single fault is a refusal the tool must not retry: it fails, nothing changed.
REFUSALS = {"create:create volume", "create:create machine", "update:acquire lease",
            "update:update"}  # fmt: skip

MATRIX_TEMPLATE = SIMPLE_TEMPLATE.replace('region = "ord"', 'region = "ord"\nlease_ttl = 30')
UPDATE_FLAGS = (
    "--poll-interval", "0.02", "--soak-secs", "0.15", "--health-timeout-secs", "2",
    "--start-timeout-secs", "5", "--lease-ttl-secs", "10",
)  # fmt: skip


def _live(standin: MachinesStandin) -> list[dict[str, Any]]:
    return [m for m in standin.model.machines() if m["state"] != "destroyed"]


def _inject(standin: MachinesStandin, call: Call, kind: str, target: str, volume: str) -> Any:
    path = call.path.format(m=target, v=volume)
    after = ("POST", rf"/machines/{target}$", call.after) if call.after else None
    return standin.inject(
        call.method, path, kind, query=dict(call.query) or None, nonce=call.nonce, after=after
    )


def _run(cli: Cli, standin: MachinesStandin, tmp_path: Path, call: Call, kind: str) -> Result:
    if call.command == "create":
        fault = _inject(standin, call, kind, "", "")
        template = write_template(tmp_path, MATRIX_TEMPLATE)
        result = cli(
            "tenant", "create", TENANT, "--template", str(template),
            "--access-token", admin_support.ACCESS_TOKEN, "--wait-timeout-secs", "5",
        )  # fmt: skip
    else:
        ids = seed_tenant(standin, TENANT)
        target = ids[0] if call.command == "delete" else min(ids)
        volume = standin.model.machine(target).config["mounts"][0]["volume"]
        if call.command == "rollback":
            standin.model.crashing_images.add(IMAGE_V2)
        fault = _inject(standin, call, kind, target, volume)
        if call.command == "delete":
            result = cli("tenant", "delete", TENANT, "--yes", "--wait-timeout-secs", "5")
        else:
            result = cli(
                "tenant", "update-image", "--image", IMAGE_V2, "--tenant", TENANT,
                "--state-file", str(tmp_path / "state.json"), *UPDATE_FLAGS,
            )  # fmt: skip
    assert fault.hits == 1, f"the fault never met its call: {result.err}"
    return result


def _assert_nothing_of_ours_held(standin: MachinesStandin) -> None:
    for machine in _live(standin):
        model = standin.model.machine(machine["id"])
        assert not model.cordoned, f"{machine['id']} left cordoned"
        assert "nonce" not in machine, f"{machine['id']} left leased"


def _assert_created(standin: MachinesStandin) -> None:
    machines = _live(standin)
    assert len(machines) == 2 and {m["state"] for m in machines} == {"started"}
    volumes = standin.model.volumes()
    assert len(volumes) == 2
    assert {v["attached_machine_id"] for v in volumes} == {m["id"] for m in machines}


def _assert_absent(standin: MachinesStandin) -> None:
    assert _live(standin) == [] and standin.model.volumes() == []


def _assert_images(standin: MachinesStandin, image: str, digest: str | None) -> None:
    machines = _live(standin)
    assert len(machines) == 2 and {m["state"] for m in machines} == {"started"}
    if digest is None:
        assert {m["config"]["image"] for m in machines} == {image}
    else:
        assert {m["image_ref"]["digest"] for m in machines} == {digest}


def _expected_code(call: Call, kind: str) -> int:
    if call.command == "rollback":
        return 11  # the image failed; the rollback itself recovers from the fault
    if kind == "422-echo" and call.id in REFUSALS:
        return 10 if call.command == "create" else 11
    return 0


def _hint(err: str) -> str:
    return "\n".join(line for line in err.splitlines() if line.startswith("fly-vault-admin: hint"))


@pytest.mark.parametrize(("call", "kind"), CELLS)
def test_fault_matrix(
    cli: Cli, standin: MachinesStandin, tmp_path: Path, call: Call, kind: str
) -> None:
    v1_digest = standin.model.resolve(IMAGE_V1)["digest"]
    result = _run(cli, standin, tmp_path, call, kind)
    code = _expected_code(call, kind)
    assert result.code == code, result.err
    standin.clear_faults()
    _assert_nothing_of_ours_held(standin)
    if call.command == "create":
        _assert_created(standin) if code == 0 else _assert_absent(standin)
    elif call.command == "delete":
        _assert_absent(standin)
    elif code == 0:
        _assert_images(standin, IMAGE_V2, None)
    else:
        _assert_images(standin, IMAGE_V1, v1_digest)  # as before, by digest
    if code and call.command == "rollback":
        assert "hint: the new image failed on the machine named above" in _hint(result.err)
        assert "rolled back to the previous image" in result.err
    elif code:
        assert "422" in result.err and "refused" in _hint(result.err), result.err


def test_the_matrix_covers_every_kind_and_call() -> None:
    assert set(KINDS) <= set(STANDIN_KINDS)
    assert len(CELLS) == len(CALLS) * len(KINDS) == 200
