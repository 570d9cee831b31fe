"""Printing errors and logs for the CLI. Messages name the problem and the fix."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from flyvault.errors import VaultError


def report_error(error: VaultError) -> None:
    print(f"fly-vault: error: {error.message}", file=sys.stderr)
    if error.hint:
        print(f"fly-vault: hint: {error.hint}", file=sys.stderr)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        return json.dumps(entry)


def configure_logging(log_file: str | None, verbose: bool) -> None:
    """Warnings always reach stderr (the original was silent without --log-file, B12)."""
    root = logging.getLogger("flyvault")
    root.setLevel(logging.DEBUG if log_file else (logging.INFO if verbose else logging.WARNING))
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    console.setFormatter(logging.Formatter("fly-vault: %(levelname)s: %(message)s"))
    root.addHandler(console)
    if log_file:
        path = Path(log_file).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, mode="w")
        handler.setLevel(logging.DEBUG)
        handler.setFormatter(_JsonFormatter())
        root.addHandler(handler)
