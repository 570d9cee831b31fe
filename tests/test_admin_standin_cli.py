"""The stand-in's fault injection, over raw HTTP and from its command line, and the rehearsal
documented in references/admin.md run exactly as written there."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from admin_support import ACCESS_TOKEN, API_TOKEN, APP, IMAGE_V1, REPO, assert_no_secrets

from flyvault.standins.machines import MachinesStandin
from flyvault.standins.machines_faults import parse_fault

ADMIN_MD = REPO / "references" / "admin.md"


@pytest.fixture
def api() -> Iterator[tuple[MachinesStandin, httpx.Client]]:
    with MachinesStandin(token=API_TOKEN, apps=(APP,), transition_delay=0.01) as standin:
        headers = {"Authorization": f"Bearer {API_TOKEN}"}
        with httpx.Client(
            base_url=f"{standin.base_url}/v1/apps/{APP}", headers=headers, timeout=10
        ) as http:
            yield standin, http


def _create(http: httpx.Client) -> httpx.Response:
    return http.post("/machines", json={"region": "ord", "config": {"image": IMAGE_V1}})


@pytest.mark.parametrize(
    ("spec", "method", "path", "kind", "times", "skip"),
    [
        ("POST:/machines$:500", "POST", "/machines$", None, 1, 0),
        ("*:/machines/[0-9a-f]+$:reset-after:3", None, "/machines/[0-9a-f]+$", "reset-after", 3, 0),
        ("GET:/wait$:hang:*:2", "GET", "/wait$", "hang", None, 2),
        ("DELETE:/x:y$:422-echo", "DELETE", "/x:y$", "echo", 1, 0),  # a ':' in the regex
    ],
)
def test_fault_specs(
    spec: str, method: str | None, path: str, kind: str | None, times: int | None, skip: int
) -> None:
    fault = parse_fault(spec)
    assert (fault.method, fault.path.pattern, fault.kind, fault.times, fault.skip) == (
        method, path, kind, times, skip,
    )  # fmt: skip


@pytest.mark.parametrize(
    "spec", ["POST:/machines", "POST:/machines:teapot", "POST:(:500", "POST:/x:500:two"]
)
def test_bad_fault_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_fault(spec)


def test_reset_before_and_after(api: tuple[MachinesStandin, httpx.Client]) -> None:
    standin, http = api
    standin.inject("POST", r"/machines$", "reset-before")
    with pytest.raises(httpx.TransportError):
        _create(http)
    assert standin.model.machines() == []  # it did not act
    standin.inject("POST", r"/machines$", "reset-after")
    with pytest.raises(httpx.TransportError):
        _create(http)
    assert len(standin.model.machines()) == 1  # it acted, the answer was lost


def test_hang_holds_until_the_client_gives_up(api: tuple[MachinesStandin, httpx.Client]) -> None:
    standin, http = api
    standin.inject("POST", r"/machines$", "hang")
    began = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        http.post("/machines", json={"config": {"image": IMAGE_V1}}, timeout=0.3)
    assert time.monotonic() - began < 5
    assert len(standin.model.machines()) == 1  # acted before hanging
    standin.inject("POST", r"/machines$", "hang-before")
    with pytest.raises(httpx.ReadTimeout):
        http.post("/machines", json={"config": {"image": IMAGE_V1}}, timeout=0.3)
    assert len(standin.model.machines()) == 1  # never acted
    assert _create(http).status_code == 200  # the stand-in still answers


def test_422_echo_and_429(api: tuple[MachinesStandin, httpx.Client]) -> None:
    standin, http = api
    standin.inject("POST", r"/machines$", "422-echo")
    echoed = _create(http)
    assert echoed.status_code == 422
    message = echoed.json()["error"]
    assert f"Bearer {API_TOKEN}" in message and IMAGE_V1 in message  # the request, verbatim
    standin.inject("GET", r"/machines$", "429")
    limited = http.get("/machines")
    assert limited.status_code == 429 and limited.headers["retry-after"] == "1"


def test_faults_armed_after_other_requests(api: tuple[MachinesStandin, httpx.Client]) -> None:
    standin, http = api
    machine = _create(http).json()
    fault = standin.inject(
        "GET", rf"/machines/{machine['id']}$", "500", after=("POST", r"/stop$", 1)
    )
    assert http.get(f"/machines/{machine['id']}").status_code == 200
    http.post(f"/machines/{machine['id']}/stop", json={})
    assert http.get(f"/machines/{machine['id']}").status_code == 500
    assert fault.hits == 1


def _documented_rehearsal() -> tuple[list[str], list[list[str]]]:
    """The stand-in command and the fly-vault-admin commands of the rehearsal section."""
    text = ADMIN_MD.read_text(encoding="utf-8")
    section = text[text.index("### Rehearse a rollout") :]
    block = section[section.index("```") + 3 :]
    block = block[block.index("\n") + 1 : block.index("```")]
    lines = block.replace("\\\n", " ").splitlines()
    standin_cmd = next(
        shlex.split(x) for x in lines if x.startswith("python -m flyvault.standins.machines")
    )
    admin_cmds = [shlex.split(x) for x in lines if x.startswith("fly-vault-admin ")]
    return standin_cmd, admin_cmds


def _start(argv: list[str]) -> tuple[subprocess.Popen[str], str, list[str]]:
    argv = [sys.executable, *argv[1:]]
    argv[argv.index("--port") + 1] = "0"
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    while True:
        line = proc.stdout.readline()
        assert line, f"the stand-in ended: {lines}"
        lines.append(line)
        found = re.search(r"stand-in on (http://127\.0\.0\.1:\d+)", line)
        if found:
            return proc, found.group(1), lines


def test_the_documented_rehearsal_runs_as_written(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from flyvault.admin.main import main

    standin_cmd, admin_cmds = _documented_rehearsal()
    assert "--fault" in standin_cmd and "--crashing-image" in standin_cmd
    proc, base, lines = _start(standin_cmd)
    try:
        token = standin_cmd[standin_cmd.index("--token") + 1]
        monkeypatch.setenv("FLY_API_TOKEN", token)
        monkeypatch.setenv("FLY_APP", "vault-tenants")
        monkeypatch.setenv("FLY_API_BASE", base)
        codes = []
        for argv in admin_cmds:
            argv = argv[1:]
            if "update-image" in argv:
                argv += ["--soak-secs", "0.3", "--poll-interval", "0.05", "--health-timeout-secs",
                         "2", "--state-file", str(tmp_path / "rollout.json")]  # fmt: skip
            capsys.readouterr()
            codes.append(main(argv))
            captured = capsys.readouterr()
            assert_no_secrets(captured.out, captured.err)
        assert codes == [0, 11], captured.err
        assert "the update went through although its answer was lost" in captured.err
        assert "rolled back to the previous image" in captured.err
        pushed = [x for x in lines if x.startswith("pushed ")]
        assert len(pushed) == 2 and pushed[0].split()[-1] != pushed[1].split()[-1]
        machines = _get(base, token, "/machines")
        assert {m["state"] for m in machines} == {"started"}
        assert {m["image_ref"]["digest"] for m in machines} == {pushed[-1].split()[-1]}
        digest = _post(base, token, "/_standin/push-image", {"ref": "x.io/a:b"})["digest"]
        assert digest.startswith("sha256:")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _get(base: str, token: str, path: str) -> Any:
    response = httpx.get(
        f"{base}/v1/apps/vault-tenants{path}", headers={"Authorization": f"Bearer {token}"}
    )
    return response.json()


def _post(base: str, token: str, path: str, body: Any) -> Any:
    response = httpx.post(f"{base}{path}", json=body, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    return json.loads(response.text)


def test_the_access_token_of_the_rehearsal_is_not_a_test_secret() -> None:
    # The documented commands use placeholders, never the tests' recognisable secrets.
    assert ACCESS_TOKEN not in ADMIN_MD.read_text(encoding="utf-8")
