"""The allocator keeps freed bulk buffers: buffers of about the same size allocated again
and again cost no page faults once ``reuse_freed_buffers`` ran (with glibc's defaults the
heap's top is grown and trimmed each time). Each case runs in its own interpreter, which
starts with glibc's defaults and no allocator settings from the environment."""

from __future__ import annotations

import ctypes
import os
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
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("MALLOC_") and name != "GLIBC_TUNABLES"
    }
    out = subprocess.run(
        [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    return out[0], int(out[1])


def _glibc_64() -> bool:
    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
    except AttributeError:
        return False
    return sys.maxsize > 2**32  # 32-bit glibc refuses a 4 MiB threshold


@pytest.mark.skipif(not _glibc_64(), reason="the thresholds are 64-bit glibc's (else a no-op)")
def test_freed_buffers_are_reused_without_page_faults() -> None:
    took, reused = _faults("reuse")
    _, default = _faults("default")
    assert took == "True"
    assert default > 200 * 32  # the heap's top grown and trimmed: ~95 faults a round
    assert reused < 400  # the heap's pages, faulted once


def test_without_mallopt_it_changes_nothing_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """macOS and musl have no ``mallopt``: the call is a no-op that returns False."""
    from flyvault import heap

    class NoMallopt:
        def __init__(self, name: object) -> None:
            pass

    monkeypatch.setattr(heap.ctypes, "CDLL", NoMallopt)
    assert heap.reuse_freed_buffers() is False
