"""Everything fly-vault-admin writes to a terminal goes through here, scrubbed of secrets.

Results go to stdout (tables, JSON, final summaries) so they can be piped; progress, warnings
and errors go to stderr. Errors use the CLI convention of the project:
``fly-vault-admin: error: MESSAGE`` then ``fly-vault-admin: hint: FIX``.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from typing import Any

from flyvault.errors import VaultError
from flyvault.redact import scrub, scrub_value

PROG = "fly-vault-admin"


def out(text: str = "") -> None:
    print(scrub(text), flush=True)


def note(text: str) -> None:
    print(scrub(text), file=sys.stderr, flush=True)


def warn(text: str) -> None:
    note(f"{PROG}: warning: {text}")


def print_json(value: Any) -> None:
    print(json.dumps(scrub_value(value), indent=2, ensure_ascii=False), flush=True)


def report_error(error: VaultError) -> None:
    print(f"{PROG}: error: {scrub(error.message)}", file=sys.stderr, flush=True)
    if error.hint:
        print(f"{PROG}: hint: {scrub(error.hint)}", file=sys.stderr, flush=True)


def truncate(value: str, width: int) -> str:
    """Cut to ``width`` characters, the last one an ellipsis (as the original did)."""
    if width <= 0:
        return ""
    if len(value) <= width:
        return value
    return value[: width - 1] + "\u2026"


def terminal_width() -> int | None:
    """The terminal's width, or None when stdout is not a terminal (then nothing shrinks)."""
    if not sys.stdout.isatty():
        return None
    return shutil.get_terminal_size((100, 24)).columns


def render_table(
    headers: Sequence[str],
    widths: Sequence[int],
    rows: Sequence[Sequence[str]],
    *,
    truncated: Sequence[int] = (),
    shrinkable: int | None = None,
    min_shrink: int = 12,
    width: int | None = None,
) -> list[str]:
    """Left-aligned columns padded to a minimum width and separated by one space.

    Columns whose index is in ``truncated`` are cut to their width. When ``width`` (the
    terminal) is given and the table is wider, the ``shrinkable`` column gives up space
    first (never below ``min_shrink``) so rows do not wrap.
    """
    widths = list(widths)
    if width is not None and shrinkable is not None:
        natural = [
            max([widths[i], *(len(r[i]) for r in rows if i not in truncated)])
            for i in range(len(widths))
        ]
        total = sum(natural) + len(widths) - 1
        if total > width:
            widths[shrinkable] = max(min_shrink, widths[shrinkable] - (total - width))
    lines = []
    for row in [list(headers), *[list(r) for r in rows]]:
        cells = []
        for i, cell in enumerate(row):
            text = truncate(cell, widths[i]) if i in truncated else cell
            cells.append(text.ljust(widths[i]))
        lines.append(" ".join(cells).rstrip())
    return lines
