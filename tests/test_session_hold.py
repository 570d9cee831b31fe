"""When the vault may drop a session's oldest output: the backpressure policy of ``Session``.

Policy under test, with an injected clock and a recorder in place of the process (its
pause/resume calls are all the policy touches; the end-to-end proof over real QUIC with
cut connections is tests/test_reliability.py, R4):

- attached: output pauses a whole buffer ahead of what the client has *acknowledged*;
- after a lost connection: the same hold for ``DETACH_HOLD`` seconds, then released;
- after a deliberate detach: no hold, the oldest bytes may go at once.
"""

from __future__ import annotations

from typing import Any

from flyvault.protocol.console import OpenSession
from flyvault.server.sessions import DETACH_HOLD, Session

CAPACITY = 256 * 1024


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class PauseRecorder:
    """Stands in for the process: records whether its output is paused."""

    def __init__(self) -> None:
        self.paused = False

    def pause_output(self) -> None:
        self.paused = True

    def resume_output(self) -> None:
        self.paused = False


def session_with(clock: Clock) -> tuple[Session, PauseRecorder]:
    session = Session(OpenSession("s", ("true",), keep=True), ["true"], CAPACITY, clock)
    recorder = PauseRecorder()
    session.process = recorder  # type: ignore[assignment]
    return session, recorder


def fill(session: Session, amount: int) -> None:
    for _ in range(amount // 4096):
        session.on_output(1, b"x" * 4096)


def test_unacknowledged_bytes_count_as_not_delivered() -> None:
    clock = Clock()
    session, recorder = session_with(clock)
    unacked = {"bytes": 0}
    attachment = session.attach(0, lambda: unacked["bytes"])
    fill(session, 128 * 1024)
    session.sent(attachment, 128 * 1024)
    unacked["bytes"] = 128 * 1024  # all of it sent, none acknowledged (a dead link)
    fill(session, CAPACITY - 128 * 1024 - 32 * 1024)
    assert recorder.paused, "paused before the unacknowledged bytes could be dropped"
    unacked["bytes"] = 0
    session.sent(attachment, 128 * 1024)
    assert not recorder.paused


def test_a_lost_connection_holds_output_for_a_while_then_releases_it() -> None:
    clock = Clock()
    session, recorder = session_with(clock)
    attachment: Any = session.attach(0)
    fill(session, 64 * 1024)
    session.sent(attachment, 64 * 1024)
    session.detach(attachment, lost_at=16 * 1024)
    fill(session, CAPACITY - 64 * 1024)
    assert recorder.paused
    assert session.log.start <= 16 * 1024  # what the client had not got is still there
    clock.now += DETACH_HOLD - 1
    session.release_hold(clock.now)
    assert recorder.paused
    clock.now += 1
    session.release_hold(clock.now)
    assert not recorder.paused


def test_reattaching_ends_the_hold() -> None:
    clock = Clock()
    session, recorder = session_with(clock)
    attachment: Any = session.attach(0)
    session.detach(attachment, lost_at=0)
    fill(session, CAPACITY)
    assert recorder.paused
    again = session.attach(0)
    session.sent(again, CAPACITY)
    assert not recorder.paused


def test_a_deliberate_detach_does_not_hold() -> None:
    clock = Clock()
    session, recorder = session_with(clock)
    attachment: Any = session.attach(0)
    session.detach(attachment)
    fill(session, 2 * CAPACITY)
    assert not recorder.paused
    assert session.log.start > 0  # the oldest bytes went, as documented
