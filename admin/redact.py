"""Keeping secrets out of everything fly-vault-admin prints, logs or writes.

Two mechanisms, because neither alone is enough:

- *Known secrets* (the API token, the tenant access token, the usage-facts bearer token) are
  registered as soon as they are read and scrubbed from every string that leaves the process:
  error messages (which may quote an API body), plans, tables, JSON, state files.
- *Secret-shaped fields* of a machine config are redacted structurally, whatever their value:
  every ``config.env`` value and every ``config.files[].raw_value``. ``tenant list --json``
  reads configs written by someone else, so we cannot know those values in advance; the
  original printed them (reference §5).
"""

from __future__ import annotations

import copy
import threading
from typing import Any

REDACTED = "<redacted>"

# Shorter values would scrub innocent text (a 2-character token is not a secret anyway).
_MIN_SECRET_LEN = 4

_lock = threading.Lock()
_known: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember ``value`` so ``scrub`` removes it from any text from now on."""
    if value and len(value) >= _MIN_SECRET_LEN:
        with _lock:
            _known.add(value)
            stripped = value.strip()
            if len(stripped) >= _MIN_SECRET_LEN:
                _known.add(stripped)


def scrub(text: str) -> str:
    """Replace every known secret in ``text``; longest first so overlaps vanish whole."""
    with _lock:
        secrets = sorted(_known, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def scrub_value(value: Any) -> Any:
    """``scrub`` applied to every string inside a JSON-like value (keys included)."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {scrub(str(k)): scrub_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_value(v) for v in value]
    return value


def redact_config(config: Any) -> Any:
    """A copy of a machine config with env values and inline file contents hidden."""
    if not isinstance(config, dict):
        return scrub_value(config)
    redacted = copy.deepcopy(config)
    env = redacted.get("env")
    if isinstance(env, dict):
        redacted["env"] = dict.fromkeys(env, REDACTED)
    files = redacted.get("files")
    if isinstance(files, list):
        for entry in files:
            if isinstance(entry, dict) and "raw_value" in entry:
                entry["raw_value"] = REDACTED
    # Multi-container machines nest full configs under "containers".
    containers = redacted.get("containers")
    if isinstance(containers, list):
        redacted["containers"] = [redact_config(c) for c in containers]
    return scrub_value(redacted)
