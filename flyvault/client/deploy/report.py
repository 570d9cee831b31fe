"""What apply and reverse report: one decision per step (or undo operation), and the words
for them (why a step runs, what it would do, what an undo operation is)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flyvault.client.deploy.ledger import PlanRecord
from flyvault.client.deploy.plan import ResolvedStep


@dataclass
class Decision:
    step: str
    kind: str
    action: str  # run | skip | failed
    reason: str
    detail: str = ""
    exit_code: int | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ApplyReport:
    plan: str
    dry_run: bool
    decisions: list[Decision] = field(default_factory=list)
    status: str = "applied"
    #: What apply found before deciding: the system, the runtime, the user, the rootfs id.
    preflight: dict[str, Any] = field(default_factory=dict)

    @property
    def changed(self) -> int:
        return sum(1 for d in self.decisions if d.action in ("run", "pruned"))

    @property
    def failed(self) -> bool:
        return any(d.action == "failed" for d in self.decisions)

    def to_json(self) -> dict[str, Any]:
        return {
            "plan": self.plan,
            "dry_run": self.dry_run,
            "status": self.status,
            "changed": self.changed,
            "unchanged": sum(1 for d in self.decisions if d.action == "skip"),
            "steps": [d.to_json() for d in self.decisions],
            "preflight": self.preflight,
        }


def why_run(resolved: ResolvedStep, record: PlanRecord | None) -> str:
    if resolved.kind == "restart":
        return "always" if resolved.fields.get("always") else "an earlier step ran"
    held = record.steps.get(resolved.id) if record else None
    if held is None:
        return "new"
    if held.state == "failed":
        return "failed before"
    if held.fingerprint != resolved.fingerprint:
        return "changed"
    return "rootfs replaced" if held.domain == "rootfs" else "forced"


def show_step(resolved: ResolvedStep) -> str:
    fields = resolved.fields
    if resolved.kind == "shell":
        return str(fields["run"])
    if resolved.kind == "file":
        return f"write {fields['dest']} ({fields['mode']}, sha256 {fields['sha256'][:12]})"
    if resolved.kind == "env":
        return "env.d file: " + ", ".join(sorted(fields["vars"]) + fields["path_prepend"])
    if resolved.kind == "packages":
        return f"{fields['manager']}: install what is missing of {', '.join(fields['packages'])}"
    if resolved.kind == "service":
        return f"systemd: {fields['unit']} enable={fields['enable']}, start={fields['start']}"
    if resolved.kind == "image":
        return f"{fields['engine']} save {fields['image']} | podman load (id {fields['image_id'][:12]})"
    if resolved.kind == "restart":
        return "restart the workload and wait for it" + (" (always)" if fields["always"] else "")
    if resolved.kind == "artifact":
        where = fields["dest"] or f"extract into {fields['extract_to']}"
        return f"{fields['source']} (sha256 {fields['sha256'][:12]}) -> {where}"
    return f"block in {fields['file']}"


def describe_op(op: dict[str, Any]) -> str:
    if op["kind"] == "shell":
        return str(op["command"])
    return f"{op['kind']} {op.get('target', '')}".strip()
