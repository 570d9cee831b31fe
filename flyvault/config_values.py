"""Values inside a config entry: addresses, forward specs, rootfs sources, URLs.

Pure parsing, shared by the config file (``flyvault.config``) and the command line. Messages
never echo a URL in full (a presigned rootfs URL carries a credential) and raise
``ValueError`` for the config's validators or ``ConfigError`` where a caller needs one.
"""

from __future__ import annotations

import ipaddress
import re
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from flyvault.errors import ConfigError

DEFAULT_ISSUER_BASE_URL = "https://oidc.fly.io"
NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_HOST_RE = re.compile(r"[A-Za-z0-9_.-]+")  # DNS name or IPv4 literal; IPv6 goes in brackets
_ADDRESS_FORM = "HOST:PORT or [IPV6]:PORT, e.g. my-app.fly.dev:443"
_FORWARD_FORM = "LOCAL_PORT:HOST:REMOTE_PORT, e.g. 8080:localhost:80"
EXAMPLE_ENTRY = """[vault.NAME]
address = "my-app.fly.dev:443"
org = "my-org"
app = "my-app"
access_token = "..."\
"""
# TOML names of the types tomllib produces (float, datetime, date, time match already).
TOML_TYPES = {str: "string", bool: "boolean", int: "integer", list: "array", dict: "table"}


def show_value(text: str) -> str:
    # repr() escapes control characters (no terminal tricks from a config value) and quotes.
    return repr(text if len(text) <= 80 else text[:77] + "...")


def table_ref(name: str) -> str:
    # A dotted name must be quoted in TOML, so show the table header the user has to write.
    return f"[vault.{name}]" if "." not in name else f'[vault."{name}"]'


def _port(text: str, what: str, *, lowest: int = 1) -> int:
    if not text:
        raise ValueError(f"{what} is empty")
    # isdigit() alone accepts '²'; int() alone accepts '+1', ' 1' and '1_0'.
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{what} {show_value(text)} is not a number")
    digits = text.lstrip("0") or "0"
    # Check the length first: int() of a huge digit string raises past 4300 digits.
    if len(digits) > 5 or not lowest <= int(digits) <= 65535:
        raise ValueError(f"{what} {text} is out of range {lowest}-65535")
    return int(digits)


def _host(text: str) -> str:
    """Validate a host as written (IPv6 in brackets) and return it without brackets."""
    if text.startswith("["):
        inner = text[1:-1]
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError(f"{show_value(inner)} is not a valid IPv6 address") from None
        return inner
    if not text:
        raise ValueError("host is empty")
    if ":" in text:
        raise ValueError("an IPv6 host must be written in brackets, e.g. [::1]")
    if not _HOST_RE.fullmatch(text):
        raise ValueError(f"host {show_value(text)} has characters not allowed in a host name")
    return text


def _split_host_port(text: str) -> tuple[str, str]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("'[' without a closing ']'")
        if not text[end + 1 :].startswith(":"):
            raise ValueError("expected ':PORT' after ']'")
        return text[: end + 1], text[end + 2 :]
    if ":" not in text:
        raise ValueError("missing ':PORT'")
    host, _, port = text.rpartition(":")
    return host, port


def parse_address(text: str, *, allow_any_port: bool = False) -> tuple[str, int]:
    """Parse ``host:port`` or ``[v6]:port``; the host is returned without brackets.

    ``allow_any_port`` admits port 0 ("any free port"), which only makes sense for a
    listening address.
    """
    try:
        host, port = _split_host_port(text)
        return _host(host), _port(port, "port", lowest=0 if allow_any_port else 1)
    except ValueError as exc:
        raise ConfigError(
            f"invalid address {show_value(text)}: {exc}; expected {_ADDRESS_FORM}"
        ) from None


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True)
class ForwardSpec:
    """Listen on 127.0.0.1:``local_port`` and tunnel each connection to ``host:remote_port``."""

    local_port: int
    host: str
    remote_port: int

    def __post_init__(self) -> None:
        # Checked here too so a spec built in code holds the same invariants as a parsed one.
        for what, port in (("local port", self.local_port), ("remote port", self.remote_port)):
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise ConfigError(f"invalid forward spec: {what} {port!r} is out of range 1-65535")
        try:
            _host(_bracket(self.host) if isinstance(self.host, str) else "")
        except ValueError as exc:
            raise ConfigError(f"invalid forward spec: {exc}") from None

    @property
    def target(self) -> str:
        """``host:port`` as sent to the server (IPv6 bracketed)."""
        return f"{_bracket(self.host)}:{self.remote_port}"

    def __str__(self) -> str:
        return f"{self.local_port}:{self.target}"


def parse_forward_spec(text: str) -> ForwardSpec:
    """Parse ``L:host:R`` or ``L:[v6]:R``."""
    local, sep, rest = text.partition(":")
    if not sep or (":" not in rest):
        raise ConfigError(f"invalid forward spec {show_value(text)}: expected {_FORWARD_FORM}")
    try:
        host, remote = _split_host_port(rest)
        spec = (_port(local, "local port"), _host(host), _port(remote, "remote port"))
    except ValueError as exc:
        raise ConfigError(
            f"invalid forward spec {show_value(text)}: {exc}; expected {_FORWARD_FORM}"
        ) from None
    return ForwardSpec(*spec)


@dataclass(frozen=True)
class RootfsFile:
    path: Path


@dataclass(frozen=True)
class RootfsUrl:
    url: str


def check_http_url(url: str, key: str) -> str:
    """Return the host. Never echoes the URL: a presigned URL carries a credential."""
    # urlsplit silently drops tabs and newlines, but the raw string is what gets sent.
    if any(c.isspace() or not c.isprintable() for c in url):
        raise ValueError(f"{key} must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"{key} is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{key} must use http or https scheme, got {parts.scheme or 'none'}")
    if not parts.hostname or port == 0:
        raise ValueError(f"{key} has no host" if not parts.hostname else f"{key} has port 0")
    return parts.hostname


def check_issuer(url: str) -> None:
    # Development only: a stand-in issuer on this machine. Anything else would let a config
    # file silently redirect attestation to a server of someone else's choosing.
    host = check_http_url(url, "oidc_issuer_url")
    parts = urlsplit(url)
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("oidc_issuer_url must be a plain base URL (no credentials, ?query, #)")
    loopback = host == "localhost"
    with suppress(ValueError):
        loopback = loopback or ipaddress.ip_address(host).is_loopback
    if not loopback:
        raise ValueError(
            f"oidc_issuer_url is a development-only override and must point at a loopback "
            f"address (127.0.0.0/8, ::1 or localhost), got host {show_value(host)}"
        )
