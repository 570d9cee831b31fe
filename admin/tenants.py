"""Tenants as seen through machine metadata: listing, summaries and usage facts.

A tenant is the set of machines whose ``config.metadata`` has
``fly_vault.managed_by = fly-vault-admin`` and a ``fly_vault.tenant_id`` (reference §1.2).
Listings filter on the server *and* again here, so a server that ignores ``metadata.*``
query parameters still gives the right answer.

Usage facts differ from the original on purpose (reference §5 bugs 6 and 7): they ask the
API for deleted machines too (``include_deleted=true``), and each lifecycle timestamp is the
*latest* matching event by timestamp, whatever order the API lists events in (Fly lists the
newest first; the original took the last in array order, i.e. the oldest).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from flyvault.fly.machines import MachinesClient
from flyvault.redact import REDACTED, scrub_value

from .template import (
    DEFAULT_VOLUME_SIZE_GIB,
    MANAGED_BY_VALUE,
    META_MANAGED_BY,
    META_TENANT,
    register_config_secrets,
)

GONE_STATES = frozenset({"destroyed", "deleted"})


def metadata_of(machine: Mapping[str, Any]) -> dict[str, str]:
    """String metadata only: other values are not ours to interpret."""
    config = machine.get("config")
    metadata = config.get("metadata") if isinstance(config, dict) else None
    if not isinstance(metadata, dict):
        return {}
    return {str(k): v for k, v in metadata.items() if isinstance(v, str)}


def tenant_of(machine: Mapping[str, Any]) -> str | None:
    metadata = metadata_of(machine)
    if metadata.get(META_MANAGED_BY) != MANAGED_BY_VALUE:
        return None
    return metadata.get(META_TENANT)


def redact_config(config: Any) -> Any:
    """A copy of a machine config with env values and inline file contents hidden.

    Structural, whatever the values: ``tenant list --json`` reads configs written by someone
    else, so they cannot all be known in advance (the original printed them, reference §5).
    The values are registered with the scrubber as well, for any other text that quotes them.
    """
    if not isinstance(config, dict):
        return scrub_value(config)
    register_config_secrets(config)
    redacted = copy.deepcopy(config)
    env = redacted.get("env")
    if isinstance(env, dict):
        redacted["env"] = dict.fromkeys(env, REDACTED)
    files = redacted.get("files")
    if isinstance(files, list):
        for entry in files:
            if isinstance(entry, dict) and "raw_value" in entry:
                entry["raw_value"] = REDACTED
    # Multi-container machines nest full configs under "containers".
    containers = redacted.get("containers")
    if isinstance(containers, list):
        redacted["containers"] = [redact_config(c) for c in containers]
    return scrub_value(redacted)


def is_gone(machine: Mapping[str, Any]) -> bool:
    return str(machine.get("state", "")) in GONE_STATES


async def list_managed(
    api: MachinesClient,
    *,
    tenants: Iterable[str] | None = None,
    include_deleted: bool = False,
) -> list[dict[str, Any]]:
    """Managed machines, optionally of some tenants, API order kept."""
    wanted = set(tenants) if tenants is not None else None
    query = {META_MANAGED_BY: MANAGED_BY_VALUE}
    if wanted is not None and len(wanted) == 1:
        query[META_TENANT] = next(iter(wanted))
    machines = await api.list_machines(metadata=query, include_deleted=include_deleted)
    result = []
    for machine in machines:
        register_config_secrets(machine.get("config"))  # before anything can quote them
        tenant = tenant_of(machine)
        if tenant is None or (wanted is not None and tenant not in wanted):
            continue
        if is_gone(machine) and not include_deleted:
            continue
        result.append(machine)
    return result


def mounts_of(machine: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Mounts that name a volume."""
    config = machine.get("config")
    mounts = config.get("mounts") if isinstance(config, dict) else None
    if not isinstance(mounts, list):
        return []
    return [
        m
        for m in mounts
        if isinstance(m, dict) and isinstance(m.get("volume"), str) and m["volume"].strip()
    ]


def volume_ids(machine: Mapping[str, Any]) -> list[str]:
    return [m["volume"].strip() for m in mounts_of(machine)]


def machine_image(machine: Mapping[str, Any]) -> str | None:
    """The digest when known (what actually runs), else the configured reference."""
    ref = machine.get("image_ref")
    if isinstance(ref, dict) and isinstance(ref.get("digest"), str) and ref["digest"]:
        return str(ref["digest"])
    config = machine.get("config")
    image = config.get("image") if isinstance(config, dict) else None
    return image if isinstance(image, str) else None


def configured_image(machine: Mapping[str, Any]) -> str | None:
    config = machine.get("config")
    image = config.get("image") if isinstance(config, dict) else None
    return image if isinstance(image, str) else None


def _rfc3339_ms(ms: int) -> str:
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    if ms % 1000:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _lifecycle(machine: Mapping[str, Any]) -> dict[str, str]:
    latest: dict[str, int] = {}
    events = machine.get("events")
    for event in events if isinstance(events, list) else []:
        if not isinstance(event, dict):
            continue
        ts = event.get("timestamp")
        if not isinstance(ts, int) or isinstance(ts, bool):
            continue
        kind = str(event.get("type") or "").strip().lower()
        status = str(event.get("status") or "").strip().lower()
        keys = []
        if kind == "start" or status == "started":
            keys.append("started_at")
        if kind in ("stop", "suspend") or status in ("stopped", "suspended"):
            keys.append("stopped_at")
        if kind in ("destroy", "delete") or status in ("destroyed", "deleted"):
            keys.append("deleted_at")
        for key in keys:
            if ts >= latest.get(key, -1):
                latest[key] = ts
    result = {key: _rfc3339_ms(ts) for key, ts in latest.items()}
    fallback = machine.get("updated_at") or machine.get("created_at")
    state_key = {
        "started": "started_at",
        "stopped": "stopped_at",
        "destroyed": "deleted_at",
        "deleted": "deleted_at",
    }.get(str(machine.get("state")))
    if state_key and state_key not in result and isinstance(fallback, str):
        result[state_key] = fallback
    return result


def usage_fact(machine: Mapping[str, Any], sizes: Mapping[str, int]) -> dict[str, Any]:
    """One machine's usage fact; keys with null values and empty collections left out."""
    fact: dict[str, Any] = {"machine_id": machine.get("id"), "state": machine.get("state")}
    for key in ("region", "instance_id"):
        if isinstance(machine.get(key), str):
            fact[key] = machine[key]
    lifecycle = _lifecycle(machine)
    for key in ("started_at", "stopped_at", "deleted_at"):
        if key in lifecycle:
            fact[key] = lifecycle[key]
    for key in ("created_at", "updated_at"):
        if isinstance(machine.get(key), str):
            fact[key] = machine[key]
    metadata = metadata_of(machine)
    if metadata:
        fact["metadata"] = metadata
    volumes = []
    for mount in mounts_of(machine):
        volume_id = mount["volume"].strip()
        entry: dict[str, Any] = {"volume_id": volume_id}
        if isinstance(mount.get("name"), str) and mount["name"].strip():
            entry["name"] = mount["name"].strip()
        if isinstance(mount.get("path"), str) and mount["path"].strip():
            entry["mount_path"] = mount["path"].strip()
        size = sizes.get(volume_id)
        if size is None:
            raw = mount.get("size_gb")
            size = raw if isinstance(raw, int) and not isinstance(raw, bool) else None
        entry["size_gib"] = size if size is not None else DEFAULT_VOLUME_SIZE_GIB
        volumes.append(entry)
    if volumes:
        fact["volumes"] = volumes
    scrubbed: dict[str, Any] = scrub_value(fact)
    return scrubbed


def volume_sizes(volumes: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    return {
        str(v["id"]): int(v["size_gb"])
        for v in volumes
        if isinstance(v.get("id"), str) and isinstance(v.get("size_gb"), int)
    }


async def collect_usage_facts(
    api: MachinesClient, tenant: str | None = None
) -> list[dict[str, Any]]:
    machines = await list_managed(api, tenants=[tenant] if tenant else None, include_deleted=True)
    sizes = volume_sizes(await api.list_volumes())
    facts = [usage_fact(m, sizes) for m in machines]
    return sorted(facts, key=lambda f: str(f.get("machine_id")))


def _machine_entry(machine: Mapping[str, Any], sizes: Mapping[str, int]) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": machine.get("id")}
    if machine.get("name") is not None:
        entry["name"] = machine["name"]
    entry["state"] = machine.get("state")
    entry["region"] = machine.get("region")
    entry["instance_id"] = machine.get("instance_id")
    for key in ("private_ip", "created_at"):
        if machine.get(key) is not None:
            entry[key] = machine[key]
    entry["updated_at"] = machine.get("updated_at")
    entry["image"] = machine_image(machine)
    ref = machine.get("image_ref")
    if isinstance(ref, dict):
        entry["image_ref"] = {k: ref.get(k) for k in ("repository", "tag", "digest")}
    entry["volumes"] = volume_ids(machine)
    entry["usage_fact"] = usage_fact(machine, sizes)
    # Secrets never leave: env values and inline files are redacted (reference §5).
    entry["config"] = redact_config(machine.get("config") or {})
    if machine.get("checks") is not None:
        entry["checks"] = machine["checks"]
    scrubbed: dict[str, Any] = scrub_value(entry)
    return scrubbed


def summarise(
    machines: Iterable[Mapping[str, Any]], sizes: Mapping[str, int]
) -> list[dict[str, Any]]:
    """Tenant objects for ``tenant list --json`` (shape in references/admin.md)."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for machine in machines:
        tenant = tenant_of(machine)
        if tenant is not None:
            groups.setdefault(tenant, []).append(machine)
    result = []
    for tenant in sorted(groups, key=lambda t: t.encode()):
        members = sorted(groups[tenant], key=lambda m: str(m.get("id")))
        states = [str(m.get("state")) for m in members]
        images = {machine_image(m) for m in members} - {None}
        if not images:
            image = "unknown"
        elif len(images) == 1:
            image = str(next(iter(images)))
        else:
            image = f"drift({len(images)})"
        updated = [str(m["updated_at"]) for m in members if isinstance(m.get("updated_at"), str)]
        result.append(
            {
                "tenant_id": tenant,
                "total": len(members),
                "started": states.count("started"),
                "stopped": states.count("stopped"),
                "other": len(members) - states.count("started") - states.count("stopped"),
                "regions": sorted({str(m["region"]) for m in members if m.get("region")}),
                "image": image,
                "last_updated_at": max(updated) if updated else None,
                "machines": [_machine_entry(m, sizes) for m in members],
            }
        )
    return result
