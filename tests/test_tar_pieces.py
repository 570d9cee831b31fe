"""PieceBatcher, in memory: the bytes come out whole and in order, no piece over the limit,
and each digest after the piece that holds the end of its file's data."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from flyvault.protocol.tar_stream import PieceBatcher

LIMIT = 64

# A stream: parts of bytes, some followed by a digest (a file whose data ended there).
STREAMS = st.lists(st.tuples(st.binary(min_size=0, max_size=LIMIT), st.booleans()), max_size=60)


@settings(max_examples=300, deadline=None)
@given(STREAMS)
def test_pieces_keep_the_bytes_the_limit_and_the_digest_order(
    stream: list[tuple[bytes, bool]],
) -> None:
    batcher: PieceBatcher[tuple[str, int]] = PieceBatcher(LIMIT)
    out: list[bytes | tuple[str, int]] = []
    ends: list[int] = []  # where each digest's file ended, in stream offsets
    sent = 0
    for data, ends_a_file in stream:
        out += batcher.add(data)
        sent += len(data)
        if ends_a_file:
            batcher.digest(("digest", len(ends)))
            ends.append(sent)
    out += batcher.rest()
    pieces = [piece for piece in out if isinstance(piece, bytes)]
    assert b"".join(pieces) == b"".join(data for data, _ in stream)
    assert all(0 < len(piece) <= LIMIT for piece in pieces)
    emitted, order = 0, []
    for piece in out:
        if isinstance(piece, bytes):
            emitted += len(piece)
        else:
            order.append(piece[1])
            assert ends[piece[1]] <= emitted  # never before its data's end
            assert emitted - ends[piece[1]] <= LIMIT  # held at most a piece
    assert order == list(range(len(ends)))
    assert batcher.rest() == []
