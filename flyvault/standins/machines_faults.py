"""Faults the Machines API stand-in can inject, and the command line's spelling of them.

``--fault METHOD:PATH_REGEX:KIND[:TIMES[:SKIP]]``: METHOD is an HTTP method or ``*``;
PATH_REGEX is searched in the request path (``/v1/apps/<app>/...``) and may contain ``:``;
TIMES is how many matching requests get the fault (default 1, ``*`` for every one); SKIP
lets that many matching requests through first (default 0). KIND is one of ``KINDS``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

#: kind -> (status, retry_after, behaviour)
KINDS: dict[str, tuple[int | None, float | None, str | None]] = {
    "500": (500, None, None),
    "429": (429, 1.0, None),
    "409": (409, None, None),
    "412": (412, None, None),
    "422-echo": (422, None, "echo"),
    "hang": (None, None, "hang"),
    "hang-before": (None, None, "hang-before"),
    "reset-before": (None, None, "reset-before"),
    "reset-after": (None, None, "reset-after"),
}


@dataclass
class Fault:
    """An injected misbehaviour for requests matching ``method`` and ``path`` (a regex)."""

    method: str | None
    path: re.Pattern[str]
    status: int | None = None
    delay: float = 0.0
    after: bool = False  # delay the answer *after* acting (the client sees a timeout)
    times: int | None = 1  # None: forever
    message: str | None = None
    retry_after: float | None = None
    skip: int = 0  # let this many matching requests through first
    query: dict[str, str] | None = None  # these query parameters must match too
    hits: int = 0
    kind: str | None = None  # echo | hang | hang-before | reset-before | reset-after
    nonce: bool | None = None  # only requests with (True) / without (False) a lease nonce
    armed_after: tuple[str, str, int] | None = None  # (method, path regex, count) seen first

    def matches(
        self, method: str, path: str, query: dict[str, str], nonce: str | None = None
    ) -> bool:
        if self.method is not None and self.method != method:
            return False
        if self.query and any(query.get(k) != v for k, v in self.query.items()):
            return False
        if self.nonce is not None and self.nonce != bool(nonce):
            return False
        return bool(self.path.search(path))


def build_fault(
    method: str | None, path: str, kind: str, *, times: int | None = 1, skip: int = 0
) -> Fault:
    if kind not in KINDS:
        raise ValueError(f"unknown fault kind {kind!r}: one of {', '.join(KINDS)}")
    try:
        pattern = re.compile(path)
    except re.error as exc:
        raise ValueError(f"bad PATH_REGEX {path!r}: {exc}") from None
    status, retry_after, behaviour = KINDS[kind]
    message = f"injected {kind} fault" if status not in (None, 422) else None
    return Fault(
        None if method in (None, "*") else method.upper(),
        pattern,
        status,
        times=times,
        message=message,
        retry_after=retry_after,
        skip=skip,
        kind=behaviour,
    )


def _count(text: str, what: str) -> int | None:
    if text == "*":
        return None
    if not text.isdigit():
        raise ValueError(f"{what} must be a whole number or '*', not {text!r}")
    return int(text)


def parse_fault(spec: str) -> Fault:
    """``METHOD:PATH_REGEX:KIND[:TIMES[:SKIP]]`` (the stand-in's ``--fault``)."""
    parts = spec.split(":")
    for i in range(len(parts) - 1, 1, -1):
        tail = parts[i + 1 :]
        if parts[i] in KINDS and len(tail) <= 2 and all(t == "*" or t.isdigit() for t in tail):
            break
    else:
        raise ValueError(
            f"bad --fault {spec!r}: expected METHOD:PATH_REGEX:KIND[:TIMES[:SKIP]] with KIND "
            f"one of {', '.join(KINDS)}"
        )
    times = _count(tail[0], "TIMES") if tail else 1
    skip = _count(tail[1], "SKIP") or 0 if len(tail) > 1 else 0
    return build_fault(parts[0], ":".join(parts[1:i]), parts[i], times=times, skip=skip)


def echo_message(method: str, target: str, headers: dict[str, str], body: Any) -> str:
    """The request, echoed as an API might in a 422: headers (token included) and body."""
    request = {"method": method, "target": target, "headers": headers, "body": body}
    return "unprocessable request: " + json.dumps(request, sort_keys=True)
