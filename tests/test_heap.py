"""The allocator keeps freed bulk buffers: the same 256 KiB buffer allocated again costs no
page faults once ``reuse_freed_buffers`` ran (glibc mmaps and unmaps it every time
otherwise). Each case runs in its own interpreter, which starts with glibc's defaults."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

FAULTS = """
import resource, sys
from flyvault.heap import reuse_freed_buffers
took = reuse_freed_buffers() if sys.argv[1] == "reuse" else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for index in range(200):
    # As a tar piece and its frame: two live buffers of a size that varies a little.
    piece = b"x" * (250 * 1024 + index * 4099 % (12 * 1024))  # written: its pages touched
    framed = b"h" + piece
    del piece, framed
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


def _glibc() -> bool:
    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
    except AttributeError:
        return False
    return True


@pytest.mark.skipif(not _glibc(), reason="the thresholds are glibc's (elsewhere: a no-op)")
def test_freed_buffers_are_reused_without_page_faults() -> None:
    took, reused = _faults("reuse")
    _, default = _faults("default")
    assert took == "True"
    assert default > 200 * 32  # buffers mapped afresh: 62 pages each on average or more
    assert reused < 400  # the heap's pages, faulted once


def test_it_never_fails_where_there_is_no_mallopt() -> None:
    from flyvault.heap import reuse_freed_buffers

    assert reuse_freed_buffers() in (True, False)
