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
    session_id: str = "job"


def _run(
    previous: Cursor | None, started: _Started, chunks: list[tuple[bool, bytes]]
) -> tuple[bytes, Cursor | None, list[str]]:
    shown, notices = bytearray(), []

    async def main() -> Cursor | None:
        seen = SeenFilter(previous, shown.extend, shown.extend, notices.append, "--from-start")
        seen.started(started)
        for is_stderr, chunk in chunks:
            await (seen.stderr if is_stderr else seen.stdout)(chunk)
        return seen.cursor

    cursor = asyncio.run(main())
    return bytes(shown), cursor, notices


@given(
    st.lists(st.tuples(st.booleans(), st.binary(min_size=1, max_size=50)), max_size=20),
    st.integers(min_value=0, max_value=400),
    st.integers(min_value=0, max_value=100),
)
def test_a_replay_of_the_same_run_shows_only_what_was_not_shown(
    chunks: list[tuple[bool, bytes]], shown_up_to: int, replay_from: int
) -> None:
    output = b"".join(chunk for _, chunk in chunks)
    passed, cursor, notices = _run(Cursor(shown_up_to, 42), _Started(replay_from, 42), chunks)
    assert passed == output[max(0, shown_up_to - replay_from) :]
    end = replay_from + len(output)
    assert cursor == Cursor(max(end, shown_up_to), 42) and notices == []


@given(
    st.lists(st.tuples(st.booleans(), st.binary(min_size=1, max_size=50)), max_size=20),
    st.integers(min_value=0, max_value=100),
)
def test_another_run_of_that_name_is_shown_whole_and_a_gap_is_said(
    chunks: list[tuple[bool, bytes]], replay_from: int
) -> None:
    output = b"".join(chunk for _, chunk in chunks)
    passed, cursor, notices = _run(Cursor(1000, 7), _Started(replay_from, 42), chunks)
    assert passed == output and cursor == Cursor(replay_from + len(output), 42)
    if replay_from:  # the vault replayed from the old run's cursor: the start is missing
        assert notices == [
            f"session job is another run than the one shown here before; its first "
            f"{replay_from} bytes were not shown (--from-start shows them)"
        ]
    else:
        assert notices == []


def test_never_shown_or_created_here_passes_everything() -> None:
    chunks = [(False, b"new run\n"), (True, b"err\n")]
    assert _run(None, _Started(0, 42), chunks)[0] == b"new run\nerr\n"
    created = _run(Cursor(100, 42), _Started(0, 42, created=True), chunks)
    assert created[0] == b"new run\nerr\n" and created[2] == []


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


def test_the_same_pid_after_a_vault_restart_is_another_run() -> None:
    shown, notices = bytearray(), []

    async def main() -> Cursor | None:
        previous = Cursor(100, 42, boot="boot-1")
        seen = SeenFilter(previous, shown.extend, shown.extend, notices.append, boot=lambda: "b2")
        seen.started(_Started(100, 42))  # the old cursor's offset, a new boot: not that run
        await seen.stdout(b"new\n")
        return seen.cursor

    assert asyncio.run(main()) == Cursor(104, 42, "b2")
    assert shown == b"new\n" and "its first 100 bytes were not shown" in notices[0]
    cursors.remember("v", "s", Cursor(104, 42, "b2"))
    assert cursors.shown("v", "s") == Cursor(104, 42, "b2")
