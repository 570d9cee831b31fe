"""The ``tenant list`` tables: image labels that show the tag, and columns that fit.

An image is shown as ``repository:tag@<12 hex of the digest>``. A machine pinned by digest
(``repo@sha256:...``, as a rollback leaves it) has no tag in its reference; it gets the tag
that another listed machine running the same digest carries, so a rolled-back machine reads
like its neighbours. Drift is decided by digest, not by the text of ``config.image``:
``repo:tag`` and ``repo@sha256:D`` running the same digest D are one image.

On a terminal the IMAGE column takes the width the other columns leave; a label that does
not fit loses its registry and path first, then its digest, and is cut from the left, so
the tag stays visible. Off a terminal nothing is cut.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from flyvault.fly.images import parse_image

from .output import render_table, truncate
from .tenants import configured_image

SHORT_DIGEST = 12
MIN_IMAGE_WIDTH = 12


def _ref(machine: dict[str, Any]) -> dict[str, Any]:
    """repository, tag and digest: from ``image_ref``, else parsed from ``config.image``."""
    ref = machine.get("image_ref")
    parsed: dict[str, Any] = parse_image(configured_image(machine) or "")
    if isinstance(ref, dict):
        for key in ("registry", "repository", "tag", "digest"):
            if isinstance(ref.get(key), str) and ref[key]:
                parsed[key] = ref[key]
    return parsed


def known_tags(machines: Iterable[dict[str, Any]]) -> dict[str, str]:
    """digest -> a tag some machine runs it under."""
    tags: dict[str, str] = {}
    for machine in machines:
        ref = _ref(machine)
        if ref.get("digest") and ref.get("tag"):
            tags.setdefault(str(ref["digest"]), str(ref["tag"]))
    return tags


def image_key(machine: dict[str, Any]) -> str | None:
    """What a machine runs: its digest when known, else its configured reference."""
    return _ref(machine).get("digest") or configured_image(machine)


def label_candidates(machine: dict[str, Any], tags: dict[str, str]) -> list[str]:
    """Labels from the most to the least complete."""
    ref = _ref(machine)
    repository = str(ref.get("repository") or configured_image(machine) or "unknown")
    digest = str(ref.get("digest") or "")
    tag = ref.get("tag") or tags.get(digest)
    short = digest.split(":", 1)[-1][:SHORT_DIGEST] if digest else ""
    last = repository.rsplit("/", 1)[-1]
    names = [repository] if last == repository else [repository, last]
    tagged = [f"{name}:{tag}" if tag else name for name in names]
    labels = [f"{name}@{short}" for name in tagged] if short else []
    labels += tagged
    if tag:
        labels.append(f":{tag}")
    return list(dict.fromkeys(labels))


def fit(candidates: Sequence[str], width: int | None) -> str:
    if width is None:
        return candidates[0]
    for label in candidates:
        if len(label) <= width:
            return label
    last = candidates[-1]
    return "\u2026" + last[-(width - 1) :] if width > 1 else last[:width]


def tenant_image(members: Sequence[dict[str, Any]], tags: dict[str, str], width: int | None) -> str:
    keys = {image_key(m) for m in members} - {None}
    if not keys:
        return "unknown"
    if len(keys) > 1:
        return f"drift({len(keys)})"
    return fit(label_candidates(members[0], tags), width)


def _natural(widths: Sequence[int], rows: Sequence[Sequence[str]], column: int) -> int:
    return max([widths[column], *(len(r[column]) for r in rows)])


def _image_width(
    width: int | None, widths: Sequence[int], rows: Sequence[Sequence[str]], image: int
) -> int | None:
    """What the terminal leaves for the IMAGE column (None: not a terminal, no limit)."""
    if width is None:
        return None
    others = sum(_natural(widths, rows, i) for i in range(len(widths)) if i != image)
    return max(MIN_IMAGE_WIDTH, width - others - (len(widths) - 1))


def summary_rows(
    tenants: list[dict[str, Any]], machines: list[dict[str, Any]], width: int | None
) -> list[str]:
    headers = ["TENANT", "MACHINES", "REGIONS", "IMAGE", "LAST UPDATED"]
    widths = [24, 12, 16, 20, 26]
    tags = known_tags(machines)
    by_id = {str(m.get("id")): m for m in machines}
    rows = []
    for tenant in tenants:
        rows.append(
            [
                tenant["tenant_id"],
                f"{tenant['total']}/{tenant['started']}/{tenant['stopped']}",
                ",".join(tenant["regions"]) or "-",
                "",
                tenant["last_updated_at"] or "-",
            ]
        )
    room = _image_width(width, widths, rows, 3)
    for row, tenant in zip(rows, tenants, strict=True):
        members = [by_id[str(e["id"])] for e in tenant["machines"] if str(e["id"]) in by_id]
        row[3] = tenant_image(members, tags, room)
    widths[3] = room or widths[3]
    lines = render_table(headers, widths, rows)
    total = sum(t["total"] for t in tenants)
    started = sum(t["started"] for t in tenants)
    stopped = sum(t["stopped"] for t in tenants)
    return [*lines, f"machines: {total}/{started}/{stopped}"]


def wide_rows(
    tenants: list[dict[str, Any]], machines: list[dict[str, Any]], width: int | None
) -> list[str]:
    headers = ["TENANT", "MACHINE", "STATE", "REGION", "IMAGE", "VOLUMES"]
    widths = [24, 18, 10, 8, 22, 18]
    tags = known_tags(machines)
    by_id = {str(m.get("id")): m for m in machines}
    rows, labels = [], []
    for tenant in tenants:
        for entry in tenant["machines"]:
            machine = by_id.get(str(entry["id"]), {})
            labels.append(label_candidates(machine, tags))
            rows.append(
                [
                    tenant["tenant_id"],
                    str(entry["id"]),
                    str(entry["state"]),
                    entry["region"] or "-",
                    "",
                    truncate(",".join(entry["volumes"]) or "-", widths[5] if width else 10**6),
                ]
            )
    room = _image_width(width, widths, rows, 4)
    for row, candidates in zip(rows, labels, strict=True):
        row[4] = fit(candidates, room)
    widths[4] = room or widths[4]
    return render_table(headers, widths, rows)
