"""Printing errors and logs for the CLI. Messages name the problem and the fix."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from flyvault.errors import UsageError, VaultError
from flyvault.redact import install_log_filter, scrub


def report_error(error: VaultError) -> None:
    # Scrubbed here as well as by the wrapped stderr: this is also called outside ``main``.
    print(f"fly-vault: error: {scrub(error.message)}", file=sys.stderr)
    if error.hint:
        print(f"fly-vault: hint: {scrub(error.hint)}", file=sys.stderr)


#: Names of the handlers ``configure_logging`` installs (replaced, not stacked, on a rerun).
_HANDLERS = ("fly-vault-console", "fly-vault-file")


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: local time with milliseconds, level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        zone = time.strftime("%z", time.localtime(record.created))
        entry = {
            "ts": f"{stamp}.{int(record.msecs):03d}{zone}",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info or record.exc_text:
            entry["exc"] = record.exc_text or self.formatException(record.exc_info)  # type: ignore[arg-type]
        return json.dumps(entry, ensure_ascii=False)


def _open_log_file(raw: str) -> TextIO:
    """The log file, truncated, mode 600; a usage error naming the file when it cannot be."""
    path = Path(raw).expanduser()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) and not path.parent.is_dir():
            fix = f"create the directory {path.parent} first, or pass another --log-file"
        else:
            fix = "pass a writable path to --log-file"
        raise UsageError(
            f"cannot write log file {path}: {exc.strerror or exc}",
            hint=f"{fix} (it may come from FLY_VAULT_LOG_FILE)",
        ) from None
    return open(fd, "w", encoding="utf-8", buffering=1)


def is_verbose() -> bool:
    """``-v`` was given: the console handler shows INFO lines (a log file alone does not
    count: it takes DEBUG lines without changing what stderr shows)."""
    root = logging.getLogger("flyvault")
    return any(h.get_name() == _HANDLERS[0] and h.level <= logging.INFO for h in root.handlers)


def configure_logging(log_file: str | None, verbose: bool) -> None:
    """Warnings always reach stderr (the original was silent without --log-file, B12).

    ``-v`` adds the INFO step lines (config, handshake, attestation, authentication,
    reconnects, provisioning phases) to stderr; ``--log-file`` gets those plus DEBUG (stream
    opens and closes, cache hits, upload progress) as JSON lines. Every handler scrubs
    secrets. Raises ``UsageError`` when the log file cannot be opened.
    """
    stream = _open_log_file(log_file) if log_file else None
    root = logging.getLogger("flyvault")
    for handler in [h for h in root.handlers if h.get_name() in _HANDLERS]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.DEBUG if log_file else (logging.INFO if verbose else logging.WARNING))
    console = logging.StreamHandler(sys.stderr)
    console.set_name(_HANDLERS[0])
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose:
        console.setFormatter(
            logging.Formatter(
                "fly-vault: %(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
                datefmt="%H:%M:%S",
            )
        )
    else:
        console.setFormatter(logging.Formatter("fly-vault: %(levelname)s: %(message)s"))
    root.addHandler(console)
    if stream is not None:
        handler = logging.StreamHandler(stream)
        handler.set_name(_HANDLERS[1])
        handler.setLevel(logging.DEBUG)
        handler.setFormatter(_JsonFormatter())
        root.addHandler(handler)
    install_log_filter(root)


def print_event(event: Any) -> None:
    """An event of the client (``flyvault.client.events``), as a note on stderr."""
    print(f"fly-vault: {scrub(event.message)}", file=sys.stderr)
