"""Defer importing ``service_identity`` until something really uses it.

aioquic imports it at start-up for one purpose: checking a server certificate's host name
when verification is on. fly-vault never turns that on (trust comes from the attestation
bound to the TLS exporter), yet the import, with ``attrs`` and ``idna``, costs about 60 ms of
every CLI run. A module stand-in (PEP 562 ``__getattr__``) takes its place in
``sys.modules``; the first attribute anyone reads loads the real package and is answered
from it, so behaviour is unchanged if it is ever needed.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_NAME = "service_identity"


class _Deferred(types.ModuleType):
    def __getattr__(self, attribute: str) -> Any:
        if sys.modules.get(_NAME) is self:
            del sys.modules[_NAME]
        real = importlib.import_module(_NAME)
        return getattr(real, attribute)


def install() -> None:
    if _NAME not in sys.modules:
        sys.modules[_NAME] = _Deferred(_NAME)
