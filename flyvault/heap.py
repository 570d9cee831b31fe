"""The C allocator's settings for our short-lived bulk processes: freed buffers are reused.

Why: our bulk paths allocate buffers of about the same size over and over: a 256 KiB frame
(``MAX_DATA``), a tar piece, a 1 MiB socket read. glibc maps the first such buffer on its
own (it is above the 128 KiB mmap threshold); freeing it raises the threshold to its size,
and later ones come from the heap. But glibc gives the heap's free top back to the system
once it exceeds the trim threshold, which it keeps at only twice the mmap threshold. So the
heap's top is grown and trimmed again and again, and every buffer's pages are faulted in
afresh. Measured on cp's side of a 10,000-file tree: 123,000 minor faults, and 0.36-0.45
CPU-s for its tar pieces against 0.25-0.26 with the buffers reused. Both settings are
needed: a higher mmap threshold alone leaves the trim threshold at 128 KiB.

``reuse_freed_buffers`` sets the mmap threshold to ``MMAP_THRESHOLD`` and the trim threshold
to ``TRIM_THRESHOLD``. Freed memory is then kept: up to the trim threshold at the heap's
top, and whatever lies below a live allocation until that is freed. So only processes
that end after one job take it: ``fly-vault cp`` and the vault's file workers (forked from
init for one operation each). Init, the keeper and the MCP server keep glibc's defaults; the
keeper, which relays a tree download's bytes, faulted 1,700 times in one (warm), so little
is lost there.
Where the C library has no ``mallopt`` (macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes

#: glibc's ``mallopt`` parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Allocations below this come from the heap (a 1 MiB read is the largest we make often).
#: 32-bit glibc refuses more than 512 KiB; it then keeps its defaults.
MMAP_THRESHOLD = 4 * 1024 * 1024
#: Free memory at the heap's top up to this is kept for the next buffers, not given back.
TRIM_THRESHOLD = 16 * 1024 * 1024


def reuse_freed_buffers() -> bool:
    """Sets both thresholds; True when the C library took them."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # TypeError: no CDLL(None) on Windows
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
