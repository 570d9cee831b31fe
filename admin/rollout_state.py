"""The state file that makes ``tenant update-image`` resumable.

One JSON file per (app, image, selection), written atomically (temp file + rename, mode 0600)
after every step that matters: a machine's update request sent, its new instance id, its
final status. A rerun of the same command finds the file and continues: machines already
``updated`` are skipped, a machine caught ``updating`` is inspected (if the update went
through, only the checks are redone), and the snapshot of the *previous* image is kept from
the first run, because after an interruption the API already shows the new image.

The rollback target of each machine (its image pinned by digest, the digest itself, and its
state before) is recorded here before the first mutating call of the run, and only ever
taken from this run's own snapshot: a new run (after a completed or failed one) snapshots
again, so a rollback never goes back two releases. The one exception is a previous run that
*failed* and left machines it could not roll back: those are rolled back first, to the
targets that run recorded, because its change is still in place.

The lease nonce is stored while a lease is held so a resumed run can release a lease left
behind by a killed process instead of waiting for its TTL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flyvault.errors import ConfigError

STATE_VERSION = 1

# Machine statuses, in the order a machine normally goes through them.
PENDING = "pending"
UPDATING = "updating"
UPDATED = "updated"
SKIPPED = "skipped"
FAILED = "failed"
ROLLED_BACK = "rolled_back"
ROLLBACK_FAILED = "rollback_failed"
GONE = "gone"


@dataclass
class MachineEntry:
    id: str
    tenant_id: str
    state_before: str
    previous_instance_id: str
    previous_image: str  # config.image before the rollout (the tag as written)
    rollback_image: str  # pinned by digest when the API told us the digest
    name: str | None = None
    region: str | None = None
    status: str = PENDING
    canary: bool = False
    # The update may have changed the machine: it was acknowledged, a read-back showed it,
    # or its outcome is unknown. These machines (only these) are rolled back.
    update_sent: bool = False
    new_instance_id: str | None = None
    lease_nonce: str | None = None
    error: str | None = None
    previous_digest: str | None = None  # image_ref.digest before the rollout
    cordoned: bool = False  # we cordoned it and have not seen the uncordon succeed
    lease_left: str | None = None  # a lease we could not release, with its expiry

    @property
    def was_running(self) -> bool:
        return self.state_before in ("started", "starting")


@dataclass
class RolloutState:
    app: str
    image: str
    selection: list[str] | None  # None: --all-tenants
    machines: list[MachineEntry] = field(default_factory=list)
    status: str = "running"  # running | completed | failed
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    version: int = STATE_VERSION
    path: Path | None = None

    def entry(self, machine_id: str) -> MachineEntry:
        for entry in self.machines:
            if entry.id == machine_id:
                return entry
        raise KeyError(machine_id)

    def count(self, *statuses: str) -> int:
        return sum(1 for e in self.machines if e.status in statuses)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("path")
        return data

    def save(self) -> None:
        if self.path is None:
            return
        self.updated_at = time.time()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(prefix=".rollout-", dir=self.path.parent)
        except OSError as exc:
            raise _write_error(self.path, exc) from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(self.as_json(), handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise _write_error(self.path, exc) from None
            raise


#: Where the state file comes from, for the hint of a read or write failure.
STATE_PATH_HINT = (
    "pass --state-file PATH in a writable directory, or set XDG_STATE_HOME to a writable "
    "directory (default ~/.local/state)"
)


def _write_error(path: Path, exc: OSError) -> ConfigError:
    return ConfigError(
        f"cannot write rollout state {path}: {exc.strerror or exc}", hint=STATE_PATH_HINT
    )


def state_dir() -> Path:
    """``$XDG_STATE_HOME/fly-vault/rollouts`` (``~/.local/state/...`` by default)."""
    from flyvault.paths import state_dir as fly_vault_state_dir

    return fly_vault_state_dir() / "rollouts"


def default_state_path(app: str, image: str, selection: list[str] | None) -> Path:
    key = json.dumps([app, image, selection], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    safe_app = "".join(c if c.isalnum() or c in "-_" else "_" for c in app)
    return state_dir() / f"{safe_app}-{digest}.json"


def load_state(path: Path) -> RolloutState | None:
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(
            f"cannot read rollout state {path}: {exc.strerror}", hint=STATE_PATH_HINT
        ) from exc
    try:
        data = json.loads(raw)
        if data.get("version") != STATE_VERSION:
            raise ValueError("unknown version")
        machines = [MachineEntry(**m) for m in data.pop("machines")]
        data.pop("version")
        state = RolloutState(machines=machines, **data)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConfigError(
            f"rollout state {path} is damaged ({exc.__class__.__name__})",
            hint="remove it (or pass --restart) to start the rollout from scratch",
        ) from exc
    state.path = path
    return state
