"""read_file and a file being written while it is read: the vault's ``changed`` flag.

A real vault sets the flag only when a write lands between two fstats of one read, which
no test can time; so ``RemoteFiles.read`` is stood in for here (only the answers it gives),
and the rule (read again once, then say so) is checked on its own."""

from __future__ import annotations

from collections.abc import AsyncIterator

from conftest import run_async

from flyvault.client import ReadAnswer
from flyvault.mcp_server.models import FileRead
from flyvault.mcp_server.tools_files import SETTLE_READS, _mixed, _read_settled


class ChangingFile:
    """Each read returns the file's next version; the first ``writes`` reads overlap a
    write (the vault answers ``changed``)."""

    def __init__(self, writes: int) -> None:
        self.writes = writes
        self.reads = 0

    async def read(
        self,
        path: str,
        *,
        offset: int = 0,
        length: int | None = None,
        answers: list[ReadAnswer] | None = None,
    ) -> AsyncIterator[bytes]:
        self.reads += 1
        data = b"version %d\n" % self.reads
        yield data
        assert answers is not None
        answers.append(ReadAnswer(offset, len(data), None, self.reads <= self.writes))


def read(writes: int) -> tuple[bytes, bool, int]:
    file = ChangingFile(writes)
    data, changed = run_async(_read_settled(file, "/f", length=100), 10)  # type: ignore[arg-type]
    return data, changed, file.reads


def test_a_read_that_overlapped_a_write_is_read_again() -> None:
    assert read(0) == (b"version 1\n", False, 1)
    assert read(1) == (b"version 2\n", False, 2)


def test_a_file_written_through_every_read_is_returned_with_a_warning() -> None:
    data, changed, reads = read(100)
    assert changed is True and reads == SETTLE_READS
    result = FileRead(
        vault="dev",
        path="/f",
        size=len(data),
        sha256="0" * 64,
        binary=False,
        encoding="text",
        content=data.decode(),
        first_line=1,
        lines=1,
        total_lines=1,
        byte_offset=None,
        returned_bytes=len(data),
        truncated=False,
        next_offset=None,
        next_step=None,
    )
    assert _mixed(result, False) is result
    warned = _mixed(result, True).next_step
    assert warned is not None and "may mix old and new bytes" in warned
    more = _mixed(result.model_copy(update={"next_step": "more: read_file(offset=1)"}), True)
    assert more.next_step is not None and more.next_step.endswith("; more: read_file(offset=1)")


def test_a_big_files_tail_window_before_what_was_read_is_not_faked() -> None:
    """offset=-50, limit=10 of a big file whose last 128 KiB hold 30 lines showed the 30th
    to 21st last lines as if they were the 50th to 41st."""
    from flyvault.mcp_server.tools_files import MAX_BYTES, _tail

    lines = [b"line %d\n" % n for n in range(30)]
    result = _tail("dev", "/big", 10 * MAX_BYTES, "0" * 64, lines, None, None, 50, False, 10)
    assert result.content == "" and result.lines == 0 and result.truncated is True
    assert result.next_step is not None
    assert "exec tail -n 50 /big | head -n 10" in result.next_step
    last = lines[10:]  # what tail_lines picks for 20
    whole = _tail("dev", "/big", 10 * MAX_BYTES, "0" * 64, last, None, None, 20, False, 5)
    assert whole.content == "".join(f"line {n}\n" for n in range(10, 15))
    assert whole.next_offset == -15 and whole.next_step == "more: read_file(offset=-15)"
