"""Tree streams of the file stream: tar_get (a pax tar of trees) and tar_put (strict
extraction). Filled in by increment (d)."""

from __future__ import annotations

from typing import Any

from flyvault.errors import Unsupported


def tar_get(channel: Any, paths: list[str], follow: bool) -> None:
    raise Unsupported("tar_get is not implemented yet")


def tar_put(channel: Any, request: Any, path: str) -> None:
    raise Unsupported("tar_put is not implemented yet")
