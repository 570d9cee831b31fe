"""The one secret scrubber of fly-vault: every package registers secrets here and every
output boundary scrubs with it.

A secret is registered as soon as it is read (the config's ``access_token``, the init's
``ACCESS_TOKEN``, ``FLY_API_TOKEN`` and other API/bearer tokens, lease nonces, the env
values of machine configs and admin templates, the MCP HTTP bearer token). From then on
``scrub`` replaces it with ``<redacted>`` in any text: error messages and hints, CLI and
admin output, MCP results, and every log record (``ScrubFilter`` on each log handler).

The registry is process-wide and only grows; registering is idempotent and cheap.

Matching rule (the short-secret decision):

- Every non-empty secret is registered; nothing is silently ignored.
- A secret of ``WHOLE_WORD_BELOW`` (8) characters or more is replaced wherever it occurs,
  even inside a longer word (a token glued to other text is still a token).
- A shorter secret is replaced only where it stands as a whole word: not preceded or
  followed by a letter, digit, ``_`` or ``-``. Replacing a 3-character value everywhere
  would turn unrelated text into garbage ("fly secrets set" with the token ``ecr``);
  replacing it as a word still hides it where it is printed as a value (``'abc'``,
  ``token=abc``, ``abc.``). Such a secret is weak anyway; the fix is a longer one.
- Besides the value itself its stripped, JSON-escaped and percent-encoded forms are
  registered too, so it is also caught inside JSON text and URLs.

Longer secrets are matched first, so overlapping secrets vanish whole. The scrubber is
stdlib only and imports nothing heavy: the CLI loads it on every run.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import urllib.parse
from collections.abc import Iterable
from typing import Any, TextIO

from flyvault.errors import printable

REDACTED = "<redacted>"
#: Secrets shorter than this are matched as whole words only (see the module docstring).
WHOLE_WORD_BELOW = 8

_WORD = r"[A-Za-z0-9_\-]"
_lock = threading.Lock()
_known: set[str] = set()
_pattern: re.Pattern[str] | None = None


def _variants(secret: str) -> set[str]:
    forms = {secret, secret.strip()}
    for form in list(forms):
        forms.add(json.dumps(form, ensure_ascii=False)[1:-1])
        forms.add(json.dumps(form)[1:-1])
        forms.add(urllib.parse.quote(form, safe=""))
    return {form for form in forms if form}


def register(secret: str | None) -> None:
    """Remember ``secret`` so ``scrub`` removes it from any text from now on."""
    global _pattern
    if not isinstance(secret, str) or not secret.strip():
        return
    forms = _variants(secret)
    with _lock:
        if forms <= _known:
            return
        _known.update(forms)
        _pattern = None


def forget_all() -> None:
    """Empty the registry. Only for test isolation: a process that read a secret keeps it
    registered for its whole life."""
    global _pattern
    with _lock:
        _known.clear()
        _pattern = None


def register_all(secrets: Iterable[str | None]) -> None:
    for secret in secrets:
        register(secret)


def _piece(secret: str) -> str:
    body = re.escape(secret)
    if len(secret) >= WHOLE_WORD_BELOW:
        return body
    return rf"(?<!{_WORD}){body}(?!{_WORD})"


def _compiled() -> re.Pattern[str] | None:
    global _pattern
    with _lock:
        if _pattern is None and _known:
            ordered = sorted(_known, key=lambda s: (-len(s), s))
            _pattern = re.compile("|".join(_piece(s) for s in ordered))
        return _pattern


def scrub(text: str) -> str:
    """``text`` with every registered secret replaced by ``<redacted>``."""
    if not isinstance(text, str):
        text = str(text)
    pattern = _compiled()
    if pattern is None or not text:
        return text
    return pattern.sub(REDACTED, text)


def scrub_value(value: Any) -> Any:
    """``scrub`` applied to every string inside a JSON-like value (dict keys included)."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {scrub_value(k): scrub_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_value(v) for v in value]
    if isinstance(value, tuple):
        return tuple(scrub_value(v) for v in value)
    return value


def outgoing(value: Any) -> Any:
    """``scrub`` and ``printable`` applied to every string inside a JSON-like value."""
    if isinstance(value, str):
        return printable(scrub(value))
    if isinstance(value, dict):
        return {outgoing(k): outgoing(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(outgoing(v) for v in value)
    return value


def occurs(secret: str, text: str) -> bool:
    """Whether ``secret`` is in ``text`` by the matching rule above (no registry involved)."""
    secret = secret.strip()
    if not secret or not isinstance(text, str):
        return False
    return re.search(_piece(secret), text) is not None


def contains_secret(text: str) -> bool:
    """Whether any registered secret is in ``text`` (what ``scrub`` would change)."""
    pattern = _compiled()
    return pattern is not None and isinstance(text, str) and pattern.search(text) is not None


# -- logging -----------------------------------------------------------------------------------

#: Attributes every LogRecord has; anything else came in through ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class ScrubFilter(logging.Filter):
    """Scrubs a record before its handler formats it: message (with its args), exception
    text, stack, and string ``extra`` fields. Attach it to handlers, not loggers: a logger's
    filters do not see records propagated from its children."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: the handler reports it as usual
            return True
        record.msg, record.args = scrub(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        for key, value in list(vars(record).items()):
            if key not in _STANDARD and isinstance(value, str | dict | list | tuple):
                setattr(record, key, scrub_value(value))
        return True


def install_log_filter(*loggers: logging.Logger) -> None:
    """Put a ``ScrubFilter`` on every handler of ``loggers`` (the root logger by default)."""
    for logger in loggers or (logging.getLogger(),):
        for handler in logger.handlers:
            if not any(isinstance(f, ScrubFilter) for f in handler.filters):
                handler.addFilter(ScrubFilter())


# -- text streams ------------------------------------------------------------------------------


class ScrubbingStream:
    """A text stream that scrubs what is written through it (the CLI wraps stdout/stderr).

    Each ``write`` is scrubbed on its own; ``print`` writes a whole string per call, so a
    secret is never split across writes by it."""

    def __init__(self, stream: TextIO) -> None:
        self.wrapped = stream

    def write(self, text: str) -> int:
        self.wrapped.write(scrub(text))
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


__all__ = [
    "REDACTED",
    "ScrubFilter",
    "ScrubbingStream",
    "contains_secret",
    "install_log_filter",
    "occurs",
    "printable",
    "register",
    "register_all",
    "scrub",
    "scrub_value",
]
