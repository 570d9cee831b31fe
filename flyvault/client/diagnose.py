"""``Vault.diagnose()``: every step of a connection, its outcome and timing, as data.

``fly-vault doctor`` prints the steps as they come and the MCP ``vault_status`` tool returns
them; both read the same record. Diagnosing never provisions: a cold vault is reported as a
passing step (the server checked the token before it said "cold"), not a failure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flyvault.errors import ColdVault, Timeout, VaultError

if TYPE_CHECKING:
    from flyvault.client.vault import Vault

#: Step name of a reused connection (no handshake happened, so no other step did).
STEP_CONNECTION = "connection"
#: Step name for a failure outside the observed steps (e.g. no token in the entry).
STEP_CONFIG = "config"


@dataclass(frozen=True, slots=True)
class DiagnosisStep:
    step: str
    ok: bool
    elapsed_ms: float
    detail: str
    hint: str | None = None


OnStep = Callable[[DiagnosisStep], None]


@dataclass(frozen=True)
class Diagnosis:
    """What a check of one vault found. ``connection`` is the live connection, now the
    ``Vault``'s current one, when the vault answered and is not cold."""

    vault: str
    steps: tuple[DiagnosisStep, ...]
    error: VaultError | None = None
    #: Why the vault counts as cold (the server's words), when it is.
    cold: str | None = None
    connection: Any = None
    reused: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def state(self) -> str:
        """``unavailable``, ``cold``, or the vault's own state (``ready``...)."""
        if self.error is not None or (self.connection is None and self.cold is None):
            return "unavailable"
        if self.cold is not None:
            return "cold"
        return str(self.connection.vm_state.name.lower())

    @property
    def runtime(self) -> str | None:
        if self.connection is None:
            return None
        return str(self.connection.runtime_status.name.lower().replace("_", " "))

    def unobserved_failure(self) -> DiagnosisStep | None:
        """The failure as a step of its own when no observed step failed (the token
        missing from the entry, say): a report must end with the step that failed."""
        if self.error is None or (self.steps and not self.steps[-1].ok):
            return None
        return DiagnosisStep(STEP_CONFIG, False, 0.0, self.error.message, self.error.hint)


class StepRecorder:
    """A ``ConnectObserver`` that keeps each finished step and passes it on."""

    def __init__(self, on_step: OnStep | None = None) -> None:
        self.steps: list[DiagnosisStep] = []
        self._on_step = on_step

    def step_started(self, step: str, detail: str) -> None:
        pass

    def step_finished(self, step: str, elapsed: float, detail: str) -> None:
        self.add(DiagnosisStep(step, True, elapsed * 1000, detail))

    def step_failed(self, step: str, elapsed: float, error: VaultError) -> None:
        # A cold vault accepted the token; provisioning is simply what comes next.
        ok = isinstance(error, ColdVault)
        self.add(DiagnosisStep(step, ok, elapsed * 1000, error.message, None if ok else error.hint))

    def add(self, step: DiagnosisStep) -> None:
        self.steps.append(step)
        if self._on_step is not None:
            self._on_step(step)


async def diagnose(
    vault: Vault,
    *,
    fresh: bool = False,
    timeout: float | None = None,
    on_step: OnStep | None = None,
) -> Diagnosis:
    """Reuse the live connection unless ``fresh``, or the keeper's when the vault shares
    one; else connect without provisioning and make the new connection the vault's current
    one (unless it shares a keeper: then that connection is closed after the check)."""
    from flyvault.client.connection import open_vault

    name = vault.config.name
    live = None if fresh else vault.current
    detail = (
        f"reusing the pooled connection (attested, authenticated; {vault.connects} connect(s) "
        "so far)"
    )
    if live is None and not fresh and vault.keeper is not None:
        live = await vault.through_keeper()
        detail = "through the connection keeper, whose connection is attested and authenticated"
    if live is not None:
        recorder = StepRecorder(on_step)
        recorder.add(DiagnosisStep(STEP_CONNECTION, True, 0.0, detail))
        return Diagnosis(name, tuple(recorder.steps), connection=live, reused=True)
    recorder = StepRecorder(on_step)
    try:
        import asyncio  # here, not at the top: the package must import without asyncio

        connection = await asyncio.wait_for(
            open_vault(vault.config, observer=recorder, settings=vault.settings, provision=False),
            timeout,
        )
    except ColdVault as exc:
        return Diagnosis(name, tuple(recorder.steps), cold=exc.message)
    except TimeoutError:
        if timeout is None:
            raise
        error = Timeout(f"connecting to vault '{name}' took more than {timeout:g} s")
        return Diagnosis(name, tuple(recorder.steps), error=error)
    except VaultError as exc:
        return Diagnosis(name, tuple(recorder.steps), error=exc)
    if vault.keeper is not None:
        # Checked on a connection of its own (fresh): the vault keeps sharing the keeper's.
        connection.close()
    else:
        vault.adopt(connection)
    return Diagnosis(name, tuple(recorder.steps), connection=connection)


__all__ = ["Diagnosis", "DiagnosisStep", "OnStep", "StepRecorder", "diagnose"]
