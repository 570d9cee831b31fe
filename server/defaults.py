"""Init's defaults that its command line, its options and its session registry share."""

from __future__ import annotations

from typing import Final

#: Output kept per exec session for replay (bytes); ``--session-buffer``.
DEFAULT_SESSION_BUFFER: Final = 1024 * 1024
MIN_SESSION_BUFFER: Final = 128 * 1024
#: A named session's output on disk: the head kept whole, the newest tail rotating (bytes);
#: ``--session-log-head``, ``--session-log-tail``.
DEFAULT_SESSION_LOG_HEAD: Final = 1024 * 1024
DEFAULT_SESSION_LOG_TAIL: Final = 64 * 1024 * 1024
#: All named sessions' logs together (bytes); ``--session-log-total``.
DEFAULT_SESSION_LOG_TOTAL: Final = 1024 * 1024 * 1024
#: How long a finished named session stays listed (seconds); ``--session-ttl``.
DEFAULT_SESSION_TTL: Final = 3600.0
#: Sessions one vault holds at most; ``--max-sessions``.
DEFAULT_MAX_SESSIONS: Final = 256
#: A rootfs_url download that sends nothing for this long is abandoned; ``--url-timeout``.
URL_READ_TIMEOUT: Final = 60.0
#: A (re)provisioned workload that dies within this long of its start is rolled back.
SETTLE_SECONDS: Final = 2.0
#: rootfs_url downloads larger than this are refused; ``--url-max-bytes``.
URL_MAX_BYTES: Final = 32 * 1024**3
