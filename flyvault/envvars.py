"""Environment variables and numeric flags, parsed so that a bad value names its source.

Every console script (``fly-vault``, ``fly-vault-init``, ``vault-proxy``, ``fly-vault-admin``,
``fly-vault-mcp``) reads its environment through these helpers. A malformed or out-of-range
value is a ``UsageError`` (exit 2) that names the variable and says what to set, never a
Python traceback. The argparse ``type=`` callables here do the same for flags: argparse names
the flag and prints the expectation.

A variable that is unset, empty or only blanks counts as unset: the default applies.

Stdlib only: ``fly-vault`` imports this before anything heavy (no QUIC, no crypto).
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import TypeVar

from flyvault.errors import UsageError, VaultError

#: Values a yes/no variable accepts (case-insensitive); unset or empty means no.
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
#: Log levels of the servers' --log-level (case-insensitive).
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

_INT_RE = re.compile(r"[+-]?[0-9]+")
Number = TypeVar("Number", int, float)


def env_text(name: str) -> str | None:
    """The variable's value without surrounding blanks; None when unset or blank."""
    value = os.environ.get(name, "").strip()
    return value or None


def requirement(
    kind: type[int] | type[float],
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    unit: str = "",
) -> str:
    """What a valid value is, in words: 'a whole number of bytes, at least 131072'."""
    text = "a whole number" if kind is int else "a finite number"
    if unit:
        text += f" of {unit}"
    if minimum is not None and maximum is not None:
        return f"{text}, from {_show(minimum)} to {_show(maximum)}"
    if above is not None:
        return f"{text}, greater than {_show(above)}"
    if minimum is not None:
        return f"{text}, at least {_show(minimum)}"
    if maximum is not None:
        return f"{text}, at most {_show(maximum)}"
    return text


def _show(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _parse(
    text: str,
    kind: type[Number],
    minimum: float | None,
    maximum: float | None,
    above: float | None,
) -> Number | None:
    """The value, or None when ``text`` is not one or is out of range."""
    text = text.strip()
    if kind is int:
        if not _INT_RE.fullmatch(text):
            return None
        value: float = int(text)
    else:
        try:
            value = float(text)
        except ValueError:
            return None
        if not math.isfinite(value):
            return None
    if minimum is not None and value < minimum:
        return None
    if maximum is not None and value > maximum:
        return None
    if above is not None and value <= above:
        return None
    return kind(value)


def _env_number(
    name: str,
    default: Number,
    kind: type[Number],
    minimum: float | None,
    maximum: float | None,
    above: float | None,
    unit: str,
) -> Number:
    text = env_text(name)
    if text is None:
        return default
    value = _parse(text, kind, minimum, maximum, above)
    if value is None:
        expected = requirement(kind, minimum=minimum, maximum=maximum, above=above, unit=unit)
        raise UsageError(
            f"{name}={text!r} is not valid: expected {expected}",
            hint=f"unset {name} for the default, or set e.g. {name}={_show(default)}",
        )
    return value


def env_int(
    name: str,
    default: int,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    unit: str = "",
) -> int:
    """The variable as a whole number within the bounds, else ``default`` when unset."""
    return _env_number(name, default, int, minimum, maximum, None, unit)


def env_float(
    name: str,
    default: float,
    *,
    minimum: float | None = None,
    above: float | None = None,
    unit: str = "",
) -> float:
    """The variable as a finite number within the bounds, else ``default`` when unset."""
    return _env_number(name, default, float, minimum, None, above, unit)


def env_flag(name: str) -> bool:
    """A yes/no variable: 1/true/yes/on or 0/false/no/off (any case); unset means no."""
    return env_switch(name, default=False)


def env_switch(name: str, *, default: bool, error: type[VaultError] = UsageError) -> bool:
    """A yes/no variable (any case), ``default`` when unset; another word raises ``error``
    (a ``UsageError``, or a ``ConfigError`` for the transport's settings)."""
    text = env_text(name)
    if text is None:
        return default
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    if default:
        hint = f"unset {name} (or set {name}=1) to turn it on, or set {name}=0 to turn it off"
    else:
        hint = f"set {name}=1 to turn it on, or unset it (or {name}=0) to turn it off"
    raise error(
        f"{name}={text!r} is not a yes/no value: expected one of {', '.join(TRUE_WORDS)} "
        f"or {', '.join(FALSE_WORDS)}",
        hint=hint,
    )


def env_choice(name: str, default: str, choices: Sequence[str]) -> str:
    """The variable, lower-cased, if it is one of ``choices``; else ``default`` when unset."""
    text = env_text(name)
    if text is None:
        return default
    if text.lower() in choices:
        return text.lower()
    raise UsageError(
        f"{name}={text!r} is not valid: expected one of {', '.join(choices)}",
        hint=f"unset {name} for the default, or set e.g. {name}={default}",
    )


def env_url(name: str, default: str) -> str:
    """An http(s) base URL from the variable (trailing slashes removed), else ``default``."""
    text = env_text(name)
    if text is None:
        return default
    if not re.fullmatch(r"https?://[^\s/?#]+(/\S*)?", text):
        raise UsageError(
            f"{name}={text!r} is not valid: expected an http(s) URL",
            hint=f"unset {name} for the default, or set e.g. {name}={default}",
        )
    return text.rstrip("/")


def number(
    kind: type[Number] = float,  # type: ignore[assignment]
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    unit: str = "",
) -> Callable[[str], Number]:
    """An argparse ``type=``: a finite number (or whole number) within the bounds.

    argparse reports a bad value as ``argument --FLAG: expected <requirement>, got 'VALUE'``
    (exit 2). Plain ``type=float`` would let ``nan`` and ``inf`` through.
    """
    expected = requirement(kind, minimum=minimum, maximum=maximum, above=above, unit=unit)

    def parse(text: str) -> Number:
        value = _parse(text, kind, minimum, maximum, above)
        if value is None:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


#: A finite float flag with no bounds (range checks follow the parse).
finite_float = number(float)


def log_level(text: str) -> str:
    """An argparse ``type=`` for --log-level: one of LOG_LEVELS, any case."""
    if text.strip().lower() in LOG_LEVELS:
        return text.strip().lower()
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(LOG_LEVELS)}, got {text!r}")
