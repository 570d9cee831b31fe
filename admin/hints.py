"""Hints that match the cause of a rollout's failure.

A hint says what to do about *this* failure: an image problem points at the image; an API,
lease or network problem says what to retry and when, and never blames the image. Every
``MachinesApiError`` gets its hint when the client makes it (``flyvault.fly.hints``); a
rollout picks the hint of the failure that stopped it (``rollout_hint``).
"""

from __future__ import annotations

from flyvault.fly.errors import MachinesApiError
from flyvault.fly.hints import STATUS_PAGE

#: A rollout failure's cause, as ``admin.rollout`` names it.
IMAGE = "image"
API = "api"
LEASE = "lease"
CHANGED = "changed"
REFUSED = "refused"


def cause_of(error: BaseException) -> str:
    """IMAGE for the image's own failures (``ImageFailed``), else the API's kind."""
    if getattr(error, "cause", None) == IMAGE:
        return IMAGE
    if isinstance(error, MachinesApiError):
        if error.status in (409, 412) and "lease" in error.message:
            return LEASE
        if error.status == 412:
            return CHANGED
        if error.refused:
            return REFUSED
    return getattr(error, "cause", None) or API


def rollout_hint(cause: str, error: BaseException) -> str:
    if cause == IMAGE:
        return (
            "the new image failed on the machine named above: check it (`fly logs -i "
            "MACHINE_ID`), fix the image and rerun update-image"
        )
    if cause == LEASE:
        return (
            "another operator holds a lease on the machine named above; rerun when it is "
            "free (the error says until when); the image is not at fault"
        )
    if cause == CHANGED:
        return (
            "someone else changed the machine named above during the rollout; check it with "
            "`fly-vault-admin tenant list --wide` and rerun; the image is not at fault"
        )
    if cause == REFUSED:
        return (
            "the Machines API refused a request of the rollout: its message above says why "
            "(for the update itself, often an image reference that does not exist)"
        )
    own = getattr(error, "hint", None)
    return own or (
        "the Machines API failed, not the image: rerun the same command later "
        f"(Fly status: {STATUS_PAGE})"
    )
