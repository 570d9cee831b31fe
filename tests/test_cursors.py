"""What this machine has shown of a named session (``flyvault.client.cursors``), in memory
and in the user's state directory (isolated per test)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from flyvault.client import cursors
from flyvault.client.cursors import Cursor, SeenFilter


@dataclass
class _Started:
    offset: int
    pid: int
    created: bool = False


def _run(previous: Cursor | None, started: _Started, chunks: list[tuple[bool, bytes]]) -> bytes:
    shown = bytearray()

    async def main() -> None:
        seen = SeenFilter(previous, shown.extend, shown.extend)
        seen.started(started)
        for is_stderr, chunk in chunks:
            await (seen.stderr if is_stderr else seen.stdout)(chunk)
        cursor = seen.cursor
        assert cursor is not None and cursor.pid == started.pid
        produced = started.offset + sum(len(chunk) for _, chunk in chunks)
        assert cursor.offset == max(produced, previous.offset if _same(previous, started) else 0)

    asyncio.run(main())
    return bytes(shown)


def _same(previous: Cursor | None, started: _Started) -> bool:
    return previous is not None and previous.pid == started.pid and not started.created


@given(
    st.lists(st.tuples(st.booleans(), st.binary(min_size=1, max_size=50)), max_size=20),
    st.integers(min_value=0, max_value=400),
    st.integers(min_value=0, max_value=100),
    st.booleans(),
)
def test_only_what_was_not_shown_passes_whatever_the_chunks(
    chunks: list[tuple[bool, bytes]], shown_up_to: int, replay_from: int, same_process: bool
) -> None:
    output = b"".join(chunk for _, chunk in chunks)
    started = _Started(offset=replay_from, pid=42)
    previous = Cursor(shown_up_to, 42 if same_process else 7)
    passed = _run(previous, started, chunks)
    if same_process:
        assert passed == output[max(0, shown_up_to - replay_from) :]
    else:  # another run of that name: its offsets start again, nothing is skipped
        assert passed == output
    assert _run(None, started, chunks) == output  # --from-start, or never shown


def test_a_session_created_by_this_request_is_never_filtered() -> None:
    chunks = [(False, b"new run\n")]
    assert _run(Cursor(100, 42), _Started(0, 42, created=True), chunks) == b"new run\n"


def test_cursors_are_kept_per_vault_and_session_and_bounded() -> None:
    assert cursors.shown("v", "s") is None
    cursors.remember("v", "s", Cursor(10, 1), now=1.0)
    cursors.remember("w", "s", Cursor(20, 2), now=2.0)
    assert cursors.shown("v", "s") == Cursor(10, 1)
    assert cursors.shown("w", "s") == Cursor(20, 2)
    for index in range(cursors.MAX_ENTRIES + 5):
        cursors.remember("v", f"job-{index}", Cursor(index, 3), now=10.0 + index)
    entries = json.loads(cursors._path().read_text())
    assert len(entries) == cursors.MAX_ENTRIES
    assert cursors.shown("v", "s") is None  # the oldest went first
    assert cursors.shown("v", f"job-{cursors.MAX_ENTRIES + 4}") is not None


def test_a_damaged_cursor_file_only_means_a_full_replay() -> None:
    path = cursors._path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    assert cursors.shown("v", "s") is None
    cursors.remember("v", "s", Cursor(5, 9))
    assert cursors.shown("v", "s") == Cursor(5, 9)
    path.write_text(json.dumps({"v/s": {"offset": -1, "pid": 9}}))
    assert cursors.shown("v", "s") is None
