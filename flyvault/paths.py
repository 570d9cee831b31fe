"""Where fly-vault keeps its files, per the XDG base directory spec (Linux) or macOS conventions.

The original put the config under ``~/Library/Application Support`` on macOS while its docs
said ``~/.config`` (flaw B11). We use ``$XDG_CONFIG_HOME`` or ``~/.config`` on every platform,
which is what the docs say and what users of CLI tools expect.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from flyvault.errors import ConfigError

APP_DIR = "fly-vault"


def _home() -> Path:
    home = os.environ.get("HOME")
    if home:
        return Path(home)
    try:
        return Path.home()
    except RuntimeError as exc:  # no HOME and no passwd entry
        raise ConfigError(
            "unable to determine the home directory",
            hint="set HOME (or XDG_CONFIG_HOME / XDG_CACHE_HOME / XDG_DATA_HOME)",
        ) from exc


def _xdg(var: str, default: str) -> Path:
    value = os.environ.get(var)
    # The spec says relative values are invalid and must be ignored.
    if value and os.path.isabs(value):
        return Path(value)
    return _home() / default


def config_dir() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / APP_DIR


def config_file() -> Path:
    override = os.environ.get("FLY_VAULT_CONFIG")
    if override:
        path = Path(override).expanduser()
        if path.is_dir():
            raise ConfigError(
                f"FLY_VAULT_CONFIG={override} is a directory, not a config file",
                hint=f"set FLY_VAULT_CONFIG to the file's path (e.g. {path / 'config.toml'}), "
                "or unset it for the default",
            )
        return path
    return config_dir() / "config.toml"


def config_source() -> str | None:
    """The variable the config file's path comes from (for hints), or None for the default."""
    if os.environ.get("FLY_VAULT_CONFIG"):
        return "FLY_VAULT_CONFIG"
    value = os.environ.get("XDG_CONFIG_HOME")
    return "XDG_CONFIG_HOME" if value and os.path.isabs(value) else None


def cache_dir() -> Path:
    if sys.platform == "darwin" and not os.environ.get("XDG_CACHE_HOME"):
        return _home() / "Library" / "Caches" / APP_DIR
    return _xdg("XDG_CACHE_HOME", ".cache") / APP_DIR


def data_dir() -> Path:
    return _xdg("XDG_DATA_HOME", ".local/share") / APP_DIR


def state_dir() -> Path:
    return _xdg("XDG_STATE_HOME", ".local/state") / APP_DIR


def load_state(name: str) -> dict[str, object]:
    """The JSON object kept in the state directory under ``name``; empty when missing or
    damaged (state only saves repeating something: it is never worth an error)."""
    import json

    try:
        data = json.loads((state_dir() / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_state(name: str, data: dict[str, object]) -> None:
    """Replace the state file ``name`` atomically (a temporary file of this process,
    renamed); raises ``OSError`` (callers decide whether that matters)."""
    import json

    path = state_dir() / name
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temp = path.with_name(f".{name}.{os.getpid()}")
    temp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(temp, path)
