"""Hints that match the cause of a failure.

A hint says what to do about *this* failure: an image problem points at the image; an API,
lease or network problem says what to retry and when, and never blames the image. Every
``MachinesApiError`` gets its hint here when it is made (``hint_for_status``,
``hint_for_transport``); a rollout picks the hint of the failure that stopped it
(``rollout_hint``).
"""

from __future__ import annotations

import time

from admin.errors import MachinesApiError

STATUS_PAGE = "https://status.flyio.net"

#: A rollout failure's cause, as ``admin.rollout`` names it.
IMAGE = "image"
API = "api"
LEASE = "lease"
CHANGED = "changed"
REFUSED = "refused"


def when(epoch: float | None) -> str:
    """An absolute UTC time with the seconds from now: ``12:04:05Z (in 73 s)``."""
    if epoch is None:
        return "when its TTL runs out"
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    return f"{stamp} (in {max(0, round(epoch - time.time()))} s)"


def hint_for_status(status: int, app: str, retry_after: float | None) -> str | None:
    if status in (401, 403):
        return (
            f"check --api-token / FLY_API_TOKEN: it must be valid for app '{app}' "
            f"(e.g. `fly tokens create deploy -a {app}`)"
        )
    if status == 429:
        after = f"{retry_after:g} s" if retry_after is not None else "a minute"
        return f"the Machines API is rate limiting this token; retry after {after}"
    if status in (409, 412):
        return (
            "another client holds the machine's lease or changed the machine; run "
            "`fly-vault-admin tenant list --wide` and retry when it is free"
        )
    if status >= 500:
        return (
            f"the Machines API failed on its side ({status}); the request itself is fine: "
            f"retry in a minute (Fly status: {STATUS_PAGE})"
        )
    if status == 404:
        return None
    if status >= 400:
        return "the Machines API refused the request; its message above says what to change"
    return None


def hint_for_transport(timed_out: bool) -> str:
    what = "did not answer in time" if timed_out else "dropped the connection"
    return (
        f"the Machines API {what}; check the network and {STATUS_PAGE}, then run the same "
        "command again (it reads the machines back before changing anything)"
    )


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
