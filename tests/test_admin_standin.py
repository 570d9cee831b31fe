"""The Machines API stand-in itself, over raw HTTP: states, refusals, leases, filters."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from admin_support import API_TOKEN, APP, IMAGE_V1

from flyvault.standins.machines import MachinesStandin
from flyvault.standins.machines_model import parse_image


@pytest.fixture
def api() -> Iterator[tuple[MachinesStandin, httpx.Client]]:
    with MachinesStandin(token=API_TOKEN, apps=(APP,), transition_delay=0.02) as standin:
        headers = {"Authorization": f"Bearer {API_TOKEN}"}
        with httpx.Client(
            base_url=f"{standin.base_url}/v1/apps/{APP}", headers=headers, timeout=10
        ) as http:
            yield standin, http


def _create(http: httpx.Client, **extra: Any) -> dict[str, Any]:
    body = {"region": "ord", "config": {"image": IMAGE_V1, "metadata": {"a": "1"}}, **extra}
    response = http.post("/machines", json=body)
    assert response.status_code == 200, response.text
    machine: dict[str, Any] = response.json()
    return machine


def _wait(http: httpx.Client, machine_id: str, state: str, **params: Any) -> int:
    query = {"state": state, "timeout": 5, **params}
    return http.get(f"/machines/{machine_id}/wait", params=query).status_code


def test_bearer_token_required(api: tuple[MachinesStandin, httpx.Client]) -> None:
    standin, _ = api
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": API_TOKEN}):
        response = httpx.get(f"{standin.base_url}/v1/apps/{APP}/machines", headers=headers)
        assert response.status_code == 401
        assert API_TOKEN not in response.text


def test_lifecycle_states_and_events(api: tuple[MachinesStandin, httpx.Client]) -> None:
    standin, http = api
    machine = _create(http)
    assert machine["state"] == "created"
    assert _wait(http, machine["id"], "started") == 200
    assert http.post(f"/machines/{machine['id']}/start").status_code == 412
    standin.model.transition_delay = 0.3
    assert http.post(f"/machines/{machine['id']}/stop", json={}).status_code == 200
    assert http.get(f"/machines/{machine['id']}").json()["state"] == "stopping"
    assert _wait(http, machine["id"], "stopped", instance_id=machine["instance_id"]) == 200
    assert http.post(f"/machines/{machine['id']}/stop", json={}).status_code == 412
    assert http.post(f"/machines/{machine['id']}/start").status_code == 200
    assert _wait(http, machine["id"], "started") == 200
    assert http.post(f"/machines/{machine['id']}/suspend").status_code == 200
    assert _wait(http, machine["id"], "suspended") == 200
    assert http.delete(f"/machines/{machine['id']}", params={"force": "true"}).status_code == 200
    assert _wait(http, machine["id"], "destroyed") == 200
    got = http.get(f"/machines/{machine['id']}").json()
    types = [e["type"] for e in got["events"]]
    assert types[0] == "destroy" and types[-1] == "launch"  # newest first
    assert http.get("/machines").json() == []
    assert len(http.get("/machines", params={"include_deleted": "true"}).json()) == 1
    assert http.delete(f"/machines/{machine['id']}").status_code == 404


def test_delete_started_needs_force(api: tuple[MachinesStandin, httpx.Client]) -> None:
    _, http = api
    machine = _create(http)
    _wait(http, machine["id"], "started")
    assert http.delete(f"/machines/{machine['id']}").status_code == 412
    assert http.delete("/machines/ffffffffffffff").status_code == 404


def test_wait_validation_and_timeout(api: tuple[MachinesStandin, httpx.Client]) -> None:
    _, http = api
    machine = _create(http, skip_launch=True)
    mid = machine["id"]
    assert http.get(f"/machines/{mid}/wait", params={"state": "bogus"}).status_code == 400
    assert http.get(f"/machines/{mid}/wait", params={"timeout": 61}).status_code == 400
    assert http.get(f"/machines/{mid}/wait", params={"timeout": 0}).status_code == 400
    started = time.monotonic()
    assert (
        http.get(f"/machines/{mid}/wait", params={"state": "started", "timeout": 1}).status_code
        == 408
    )
    # The whole second, and not much more (generous: a loaded machine is slow to answer).
    assert 0.9 < time.monotonic() - started < 20


def test_update_versions_and_instance_ids(api: tuple[MachinesStandin, httpx.Client]) -> None:
    _, http = api
    machine = _create(http)
    _wait(http, machine["id"], "started")
    body = {"config": {"image": "registry.fly.io/x:v2"}, "current_version": "stale"}
    assert http.post(f"/machines/{machine['id']}", json=body).status_code == 412
    body["current_version"] = machine["instance_id"]
    updated = http.post(f"/machines/{machine['id']}", json=body).json()
    assert updated["instance_id"] != machine["instance_id"]
    assert updated["state"] == "replacing"
    # The old instance is never reported as started again; the new one starts.
    assert _wait(http, machine["id"], "stopped", instance_id=machine["instance_id"]) == 200
    assert _wait(http, machine["id"], "started", instance_id=updated["instance_id"]) == 200
    assert updated["image_ref"]["tag"] == "v2"


def test_names_unique_and_volumes(api: tuple[MachinesStandin, httpx.Client]) -> None:
    _, http = api
    assert http.post("/volumes", json={"name": "bad-name", "region": "ord"}).status_code == 422
    assert http.post("/volumes", json={"name": "ok", "size_gb": 3}).status_code == 422
    volume = http.post("/volumes", json={"name": "data_1", "region": "ord"}).json()
    assert volume["size_gb"] == 3 and volume["id"].startswith("vol_")
    mounts = [{"volume": volume["id"], "path": "/data"}]
    machine = _create(http, name="n1", config={"image": IMAGE_V1, "mounts": mounts})
    assert (
        http.post("/machines", json={"name": "n1", "config": {"image": IMAGE_V1}}).status_code
        == 409
    )
    again = http.post("/machines", json={"config": {"image": IMAGE_V1, "mounts": mounts}})
    assert again.status_code == 422 and "already attached" in again.text
    assert http.delete(f"/volumes/{volume['id']}").status_code == 412
    http.delete(f"/machines/{machine['id']}", params={"force": "true"})
    _wait(http, machine["id"], "destroyed")
    assert http.delete(f"/volumes/{volume['id']}").status_code == 200
    assert http.delete(f"/volumes/{volume['id']}").status_code == 404
    assert http.get("/volumes").json() == []


def test_metadata_filters_are_an_and(api: tuple[MachinesStandin, httpx.Client]) -> None:
    _, http = api
    for a, b in (("1", "x"), ("1", "y"), ("2", "x")):
        http.post("/machines", json={"config": {"image": IMAGE_V1, "metadata": {"a": a, "b": b}}})
    found = http.get("/machines", params={"metadata.a": "1", "metadata.b": "x"}).json()
    assert len(found) == 1
    assert len(http.get("/machines", params={"metadata.a": "1"}).json()) == 2
    page = http.get("/machines", params={"limit": 2}).json()
    assert len(page["machines"]) == 2 and page["next_cursor"]
    rest = http.get("/machines", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert len(rest["machines"]) == 1 and rest["next_cursor"] is None


def test_leases_nonce_and_ttl(api: tuple[MachinesStandin, httpx.Client]) -> None:
    _, http = api
    machine = _create(http)
    mid = machine["id"]
    # A TTL long enough that the lease surely holds while we test its nonce.
    lease = http.post(f"/machines/{mid}/lease", json={"ttl": 30})
    assert lease.status_code == 201
    nonce = lease.json()["data"]["nonce"]
    assert http.post(f"/machines/{mid}/lease", json={"ttl": 5}).status_code == 409
    assert http.post(f"/machines/{mid}/cordon", json={}).status_code == 409
    headers = {"fly-machine-lease-nonce": nonce}
    assert http.post(f"/machines/{mid}/cordon", json={}, headers=headers).status_code == 200
    assert (
        http.delete(f"/machines/{mid}/lease", headers={"fly-machine-lease-nonce": "x"}).status_code
        == 409
    )
    assert http.delete(f"/machines/{mid}/lease", headers=headers).status_code == 200
    # A short lease runs out after its TTL: waited for (bounded), not a fixed sleep.
    began = time.monotonic()
    assert http.post(f"/machines/{mid}/lease", json={"ttl": 1}).status_code == 201
    while http.get(f"/machines/{mid}/lease").status_code != 404:
        assert time.monotonic() - began < 30, "the lease never ran out"
        time.sleep(0.05)
    assert time.monotonic() - began > 0.9  # not before its TTL
    assert http.post(f"/machines/{mid}/uncordon", json={}).status_code == 200
    created = _create(http, lease_ttl=30)
    assert created["nonce"]
    assert http.post(f"/machines/{created['id']}/stop", json={}).status_code == 409


def test_faults_and_metadata_endpoints(api: tuple[MachinesStandin, httpx.Client]) -> None:
    standin, http = api
    machine = _create(http)
    standin.fail("GET", r"/machines/", status=503, times=1, retry_after=2)
    failed = http.get(f"/machines/{machine['id']}")
    assert failed.status_code == 503 and failed.headers["retry-after"] == "2"
    assert http.get(f"/machines/{machine['id']}").status_code == 200
    assert (
        http.post(f"/machines/{machine['id']}/metadata/role", json={"value": "x"}).status_code
        == 204
    )
    assert http.get(f"/machines/{machine['id']}/metadata").json() == {"a": "1", "role": "x"}
    standin.model.unhealthy_images.add(IMAGE_V1)
    standin.model.crashing_images.add(IMAGE_V1)
    crashing = _create(http)
    assert _wait(http, crashing["id"], "started") == 200
    assert http.get(f"/machines/{crashing['id']}").json()["checks"][0]["status"] == "critical"
    assert _wait(http, crashing["id"], "stopped", instance_id=crashing["instance_id"]) == 200


def test_parse_image() -> None:
    assert parse_image("registry.fly.io/app/init:v1") == {
        "registry": "registry.fly.io",
        "repository": "app/init",
        "tag": "v1",
        "digest": None,
    }
    assert parse_image("ubuntu@sha256:ab")["digest"] == "sha256:ab"
    assert parse_image("localhost:5000/x")["registry"] == "localhost:5000"
