"""Hints that match the cause of a Machines API failure.

Every ``MachinesApiError`` gets its hint here when the client makes it (``hint_for_status``,
``hint_for_transport``): an API, lease or network problem says what to retry and when. The
hints of a rollout (which also tell an image's failure from the API's) are in
``admin.hints``.
"""

from __future__ import annotations

import time

STATUS_PAGE = "https://status.flyio.net"


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
