"""One machine of ``tenant update-image``: its update and its rollback, each with read-back.

Per machine, under a lease held for the whole time (``flyvault.fly.leases``):

1. read the machine; it must still be the instance the snapshot saw (or, on a resume, the
   instance our own update made);
2. cordon it (if it was running);
3. send the versioned update. If the call fails or goes unanswered, read the machine back:
   a new instance on the target image means the update went through (the machine joins the
   rollback set); the old instance means it did not, and a retry is safe (the body carries
   ``current_version``); a refusal (422) is final; a read-back that fails leaves the outcome
   unknown, and the machine joins the rollback set too;
4. wait for ``started`` of the new instance, health checks, soak (``admin.readback``);
5. uncordon. A failed step uncordons before it gives up, so nothing stays cordoned. A healthy
   machine whose uncordon keeps failing is *not* rolled back: ``CordonLeft`` stops the
   rollout so that a rerun uncordons it and carries on.

A rollback is the same sequence to the recorded target (no soak), tried twice, and always
ends with an uncordon, whether its own checks passed or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator, Callable
from typing import Any

from flyvault.errors import VaultError
from flyvault.fly import leases
from flyvault.fly.errors import ApiAuthError, ApiNotFound, MachinesApiError
from flyvault.fly.leases import HeldLease
from flyvault.fly.machines import MachinesClient

from .hints import IMAGE
from .output import note, warn
from .readback import (
    ReadBackFailed,
    describe,
    read_machine,
    set_cordon,
    wait_state,
)
from .rollout_state import (
    FAILED,
    GONE,
    ROLLED_BACK,
    MachineEntry,
    RolloutState,
)

PASSING = frozenset({"passing", "passed", "healthy", "ok"})
UPDATE_ATTEMPTS = 3
ROLLBACK_ATTEMPTS = 2


class ImageFailed(MachinesApiError):
    """The new image did not start, crashed or failed its checks on a machine."""

    cause = IMAGE


class CordonLeft(VaultError):
    """A machine runs the new image and is healthy, but could not be uncordoned."""

    cause = "cordon"


class LeaseFailed(MachinesApiError):
    """The machine's lease could not be acquired: nothing was changed."""


def checks_status(machine: dict[str, Any]) -> tuple[str, str]:
    """("passing"|"failing"|"unknown", detail) from every ``status`` string in ``checks``."""
    statuses: list[str] = []
    failing: list[str] = []

    def walk(value: Any, name: str) -> None:
        if isinstance(value, dict):
            label = str(value.get("name") or name)
            status = value.get("status")
            if isinstance(status, str):
                statuses.append(status)
                if status.strip().lower() not in PASSING:
                    failing.append(f"{label}={status}")
            for key, child in value.items():
                if key != "status":
                    walk(child, str(key))
        elif isinstance(value, list):
            for child in value:
                walk(child, name)

    walk(machine.get("checks"), "check")
    if not statuses:
        return "unknown", "no checks"
    if failing:
        return "failing", ", ".join(failing)
    return "passing", f"{len(statuses)} passing"


def image_of(machine: dict[str, Any]) -> str | None:
    config = machine.get("config")
    image = config.get("image") if isinstance(config, dict) else None
    return image if isinstance(image, str) else None


def digest_of(machine: dict[str, Any]) -> str | None:
    ref = machine.get("image_ref")
    digest = ref.get("digest") if isinstance(ref, dict) else None
    return digest if isinstance(digest, str) and digest else None


def _context(context: str, exc: MachinesApiError) -> MachinesApiError:
    """The same error class, its message prefixed with the step that failed."""
    error = copy.copy(exc)
    error.message = f"{context}: {exc.message}"
    error.__cause__ = exc
    return error


class MachineWork:
    """Updates and rolls back single machines of one rollout."""

    def __init__(
        self,
        api: MachinesClient,
        state: RolloutState,
        *,
        image: str,
        timeouts: tuple[float, float, float],  # start, health, poll interval
        lease_ttl: int,
        tag: str,
        on_change: Callable[[MachineEntry], None],
    ) -> None:
        self.api = api
        self.state = state
        self.image = image
        self.start_timeout, self.health_timeout, self.poll = timeouts
        self.lease_ttl = lease_ttl
        self.tag = tag
        self.on_change = on_change

    # -- forward ---------------------------------------------------------------------------

    async def update(self, entry: MachineEntry, *, soak: float, resumed: bool) -> None:
        """Update one machine; on return it runs the image, healthy and uncordoned."""
        say = self.say(entry)
        async with self._lease(entry, "update-image") as held:
            machine = await self._read(entry)
            if machine is None:
                raise ApiNotFound(f"machine {entry.id} no longer exists")
            if self._already_applied(entry, machine, resumed):
                instance = str(machine["instance_id"])
                entry.new_instance_id = instance
                say(f"update already applied (instance {instance}); checking it")
                await self._checked(entry, held, soak=soak, instance=instance)
                return
            self._check_unchanged(entry, machine)
            await self._change(entry, machine, held, self.image, soak=soak, forward=True)

    def _already_applied(self, entry: MachineEntry, machine: dict[str, Any], resumed: bool) -> bool:
        return (
            (entry.update_sent or resumed)
            and image_of(machine) == self.image
            and machine.get("instance_id") != entry.previous_instance_id
        )

    def _check_unchanged(self, entry: MachineEntry, machine: dict[str, Any]) -> None:
        if machine.get("instance_id") != entry.previous_instance_id and not entry.update_sent:
            raise MachinesApiError(
                f"machine {entry.id} changed since the rollout started (instance "
                f"{machine.get('instance_id')}, expected {entry.previous_instance_id}); "
                "left as it is",
                status=412,
            )

    async def _change(
        self,
        entry: MachineEntry,
        machine: dict[str, Any],
        held: HeldLease,
        image: str,
        *,
        soak: float,
        forward: bool,
    ) -> None:
        """Cordon, update to ``image``, verify; uncordon in every case."""
        await self._cordon(entry, held)
        try:
            instance = await self._apply(entry, machine, held, image, forward=forward)
            await self._verify(entry, instance, held, soak=soak)
        except BaseException:
            await self._uncordon_quietly(entry, held)
            raise
        await self._uncordon(entry, held)

    async def _checked(
        self, entry: MachineEntry, held: HeldLease, *, soak: float, instance: str
    ) -> None:
        try:
            await self._verify(entry, instance, held, soak=soak)
        except BaseException:
            await self._uncordon_quietly(entry, held)
            raise
        await self._uncordon(entry, held)

    # -- the update call, with read-back ---------------------------------------------------

    def _body(self, entry: MachineEntry, machine: dict[str, Any], image: str) -> dict[str, Any]:
        # The whole config, untouched but for the image: metadata of any type survives (bug 9).
        config = copy.deepcopy(machine["config"])
        config["image"] = image
        body: dict[str, Any] = {"config": config, "current_version": machine["instance_id"]}
        for key in ("name", "region"):
            if machine.get(key):
                body[key] = machine[key]
        if not entry.was_running:
            body["skip_launch"] = True  # a stopped tenant stays stopped (bug 12)
        return body

    async def _apply(
        self,
        entry: MachineEntry,
        machine: dict[str, Any],
        held: HeldLease,
        image: str,
        *,
        forward: bool,
    ) -> str:
        """Send the versioned update; return the new instance id (read back after doubt)."""
        body = self._body(entry, machine, image)
        version = str(machine["instance_id"])
        context = f"update image for machine {entry.id}"
        last: MachinesApiError | None = None
        for _ in range(UPDATE_ATTEMPTS):
            held.check()
            try:
                answer = await self.api.update_machine(entry.id, body, nonce=held.nonce)
            except ApiAuthError:
                raise
            except MachinesApiError as exc:
                last = _context(context, exc)
            else:
                instance = str(answer.get("instance_id") or "") or await self._instance(entry)
                return self._applied(entry, instance, image, forward)
            fresh = await self._read_after_doubt(entry, forward, last)
            if fresh.get("instance_id") != version:
                if image_of(fresh) != image:
                    raise MachinesApiError(
                        f"machine {entry.id} was changed by someone else during the update "
                        f"(instance {fresh.get('instance_id')}, image {image_of(fresh)})",
                        status=412,
                    )
                self.say(entry)(f"the update went through although its answer was lost ({last})")
                return self._applied(entry, str(fresh["instance_id"]), image, forward)
            if last.refused:
                raise last
        assert last is not None
        raise last

    def _applied(self, entry: MachineEntry, instance: str, image: str, forward: bool) -> str:
        if forward:
            entry.update_sent = True
            entry.new_instance_id = instance
            self.on_change(entry)
        self.say(entry)(f"updated to {image} (instance {instance})")
        return instance

    async def _read_after_doubt(
        self, entry: MachineEntry, forward: bool, cause: MachinesApiError
    ) -> dict[str, Any]:
        try:
            fresh = await read_machine(self.api, entry.id)
        except ReadBackFailed as exc:
            if forward:
                entry.update_sent = True  # the outcome is unknown: it may have changed
                self.on_change(entry)
            raise _context(f"{cause.message}; and then", exc) from exc
        if fresh is None:
            raise ApiNotFound(f"machine {entry.id} no longer exists")
        return fresh

    async def _instance(self, entry: MachineEntry) -> str:
        machine = await self._read(entry)
        return str((machine or {}).get("instance_id") or "")

    async def _read(self, entry: MachineEntry) -> dict[str, Any] | None:
        return await read_machine(self.api, entry.id)

    # -- verification ----------------------------------------------------------------------

    async def _verify(
        self, entry: MachineEntry, instance: str, held: HeldLease, *, soak: float
    ) -> None:
        say = self.say(entry)
        if not entry.was_running:
            machine = await self._read(entry)
            say(f"stays {(machine or {}).get('state')} (it was {entry.state_before})")
            return
        try:
            await wait_state(
                self.api, entry.id, "started", timeout=self.start_timeout, instance=instance
            )
        except MachinesApiError as exc:
            if getattr(exc, "cause", None) == IMAGE:
                raise ImageFailed(exc.message, operation="wait") from exc
            raise _context(f"wait started for machine {entry.id}", exc) from exc
        say("started")
        await self._health(entry.id, instance, held)
        say("health checks passing")
        if soak > 0:
            await self._soak(entry.id, instance, held, soak)
            say(f"soaked {soak:g}s")

    async def _poll(
        self, machine_id: str, instance: str, during: str, deadline: float
    ) -> tuple[dict[str, Any] | None, MachinesApiError | None]:
        """One look at the machine; API errors are returned, not raised (a poll repeats)."""
        try:
            machine = await self.api.get_machine(machine_id, deadline=deadline)
        except ApiAuthError:
            raise
        except MachinesApiError as exc:
            return None, exc
        if instance and machine.get("instance_id") != instance:
            raise MachinesApiError(
                f"machine {machine_id} was replaced during the {during} "
                f"(instance {machine.get('instance_id')}, expected {instance})",
                status=412,
            )
        return machine, None

    async def _health(self, machine_id: str, instance: str, held: HeldLease) -> None:
        """Poll until the checks pass. API errors are polled through; when the deadline
        passes on an API error, one more poll decides (the slack: one request)."""
        clock = self.api.clock
        deadline = clock.now() + self.health_timeout
        detail, grace = "", True
        while True:
            held.check()
            machine, error = await self._poll(machine_id, instance, "health check", deadline)
            if machine is not None:
                if machine.get("state") != "started":
                    raise ImageFailed(
                        f"health checks for machine {machine_id}: machine left started state "
                        f"during health check: {machine.get('state')}"
                    )
                result, detail = checks_status(machine)
                if result != "failing":
                    return
            if clock.now() >= deadline:
                if error is None:
                    raise ImageFailed(
                        f"health checks for machine {machine_id}: checks failed to pass before "
                        f"timeout ({self.health_timeout:g}s): {detail}"
                    )
                if not grace:
                    raise _context(f"health checks for machine {machine_id}", error)
                grace = False
                continue
            await asyncio.sleep(min(self.poll, clock.remaining(deadline)))

    async def _soak(self, machine_id: str, instance: str, held: HeldLease, soak: float) -> None:
        """State and checks must hold for ``soak`` seconds; the last look must succeed."""
        clock = self.api.clock
        end = clock.now() + soak
        grace = True
        while True:
            await asyncio.sleep(min(self.poll, clock.remaining(end)))
            held.check()
            machine, error = await self._poll(machine_id, instance, "soak window", end)
            if machine is not None:
                self._still_healthy(machine_id, machine)
            if clock.now() < end:
                continue
            if machine is not None:
                return
            if not grace:
                assert error is not None
                raise _context(f"soak window for machine {machine_id}", error)
            grace = False

    @staticmethod
    def _still_healthy(machine_id: str, machine: dict[str, Any]) -> None:
        if machine.get("state") != "started":
            raise ImageFailed(
                f"soak window for machine {machine_id}: machine crashed during soak "
                f"window (state={machine.get('state')})"
            )
        result, detail = checks_status(machine)
        if result == "failing":
            raise ImageFailed(
                f"soak window for machine {machine_id}: failed checks during soak window: {detail}"
            )

    # -- cordon ----------------------------------------------------------------------------

    async def _cordon(self, entry: MachineEntry, held: HeldLease) -> None:
        if not entry.was_running:
            return
        held.check()
        entry.cordoned = True  # a failed cordon may still have acted
        self.state.save()
        try:
            await set_cordon(self.api, entry.id, on=True, nonce=held.nonce)
        except MachinesApiError as exc:
            await self._uncordon_quietly(entry, held)
            raise _context(f"cordon machine {entry.id}", exc) from exc

    async def _uncordon(self, entry: MachineEntry, held: HeldLease) -> None:
        if not entry.cordoned:
            return
        try:
            await set_cordon(self.api, entry.id, on=False, nonce=held.nonce)
        except MachinesApiError as exc:
            raise CordonLeft(
                f"machine {entry.id} runs {self.image} and is healthy, but could not be "
                f"uncordoned: {exc.message}",
                hint="rerun the same command when the API answers again: it resumes, "
                f"uncordons {entry.id} and carries on (or `fly machine uncordon {entry.id}`)",
            ) from exc
        entry.cordoned = False
        self.state.save()

    async def _uncordon_quietly(self, entry: MachineEntry, held: HeldLease) -> None:
        if not entry.cordoned:
            return
        try:
            await set_cordon(self.api, entry.id, on=False, nonce=held.nonce)
        except (MachinesApiError, asyncio.CancelledError) as exc:
            detail = exc.message if isinstance(exc, VaultError) else "interrupted"
            warn(f"machine {entry.id} may still be cordoned: uncordon failed: {detail}")
            return
        entry.cordoned = False
        self.state.save()

    # -- rollback --------------------------------------------------------------------------

    async def rollback(self, entry: MachineEntry) -> str:
        """Put the machine back on its recorded target; return ROLLED_BACK, FAILED
        (it never changed) or GONE. Tried twice: an API fault gets a second chance."""
        for attempt in range(ROLLBACK_ATTEMPTS):
            try:
                return await self._rollback_once(entry)
            except ImageFailed:
                raise
            except ApiNotFound:
                return GONE
            except VaultError as exc:
                if attempt == ROLLBACK_ATTEMPTS - 1:
                    raise
                warn(f"rollback of {entry.id} failed ({exc.message}); trying once more")
        raise AssertionError("unreachable")  # pragma: no cover

    async def _rollback_once(self, entry: MachineEntry) -> str:
        async with self._lease(entry, "rollback") as held:
            machine = await self._read(entry)
            if machine is None:
                return GONE
            if machine.get("instance_id") == entry.previous_instance_id:
                await self._uncordon_quietly(entry, held)
                self.say(entry)("the update never applied; nothing to roll back")
                return FAILED
            if self._on_previous(entry, machine):
                self.say(entry)("already on the previous image")
                await self._checked(entry, held, soak=0, instance=str(machine["instance_id"]))
                return ROLLED_BACK
            await self._change(entry, machine, held, entry.rollback_image, soak=0, forward=False)
            return ROLLED_BACK

    @staticmethod
    def _on_previous(entry: MachineEntry, machine: dict[str, Any]) -> bool:
        digest = digest_of(machine)
        if entry.previous_digest and digest:
            return digest == entry.previous_digest
        return image_of(machine) in (entry.rollback_image, entry.previous_image)

    async def describe_now(self, entry: MachineEntry) -> str:
        """The machine's state as the API says now, for a failure report."""
        try:
            machine = await read_machine(self.api, entry.id)
        except MachinesApiError as exc:
            return f"machine {entry.id}: state unknown ({exc.message})"
        text = describe(machine, entry.id)
        if machine is not None:
            text += f" on {image_of(machine)}"
        return text

    # -- leases ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lease(self, entry: MachineEntry, purpose: str) -> AsyncIterator[HeldLease]:
        description = f"fly-vault-admin {purpose} {self.tag}"
        holder: list[HeldLease] = []
        try:
            async with self._acquired(entry, description) as held:
                holder.append(held)
                entry.lease_nonce = held.nonce
                self.state.save()
                yield held
        finally:
            self._after_lease(entry, holder)

    @contextlib.asynccontextmanager
    async def _acquired(self, entry: MachineEntry, description: str) -> AsyncIterator[HeldLease]:
        acquired = False
        try:
            async with leases.hold(
                self.api, entry.id, ttl=self.lease_ttl, description=description
            ) as held:
                acquired = True
                yield held
        except ApiNotFound:
            raise
        except MachinesApiError as exc:
            if acquired:
                raise
            error = LeaseFailed(
                f"lease machine {entry.id}: {exc.message}",
                status=exc.status,
                api_message=exc.api_message,
                hint=exc.hint,
            )
            raise error from exc

    def _after_lease(self, entry: MachineEntry, holder: list[HeldLease]) -> None:
        held = holder[0] if holder else None
        if held is not None and held.release_error:
            entry.lease_left = held.release_error  # the nonce stays: a rerun releases it
        else:
            entry.lease_nonce = None
        self.state.save()

    def say(self, entry: MachineEntry) -> Callable[[str], None]:
        label = "canary" if entry.canary else "machine"

        def say(text: str) -> None:
            note(f"    {label} {entry.id} (tenant {entry.tenant_id}): {text}")

        return say
