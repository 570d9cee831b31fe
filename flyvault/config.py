"""The user's config file: ``[vault.<name>]`` tables in ``~/.config/fly-vault/config.toml``.

Unlike the original (which silently ignored unknown keys, reference §8.2), every key is
checked: a typo such as ``adress`` would otherwise surface much later as a confusing
"missing address". Relational rootfs rules stay lazy as in the original (§8.3): a vault
that is already provisioned must keep working even while both rootfs keys are set.

Speed matters here: every CLI run reads this file, and importing pydantic costs about as
much as a QUIC handshake several times over. So ``VaultConfig`` is a plain object and the
pydantic model that validates it is built only when something must be validated: a file
whose exact bytes were validated before (its SHA-256 is remembered in the cache
directory, with the fly-vault version) is read with tomllib alone.

The file holds access tokens, so no error text built here ever contains one. Pydantic puts
input values into its messages; we never show them, format every problem ourselves, and
finally scrub any configured token string out of the text in case one was pasted into
another key.
"""

from __future__ import annotations

import difflib
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import tomli_w

from flyvault import paths, redact
from flyvault.config_values import (
    DEFAULT_ISSUER_BASE_URL,
    EXAMPLE_ENTRY,
    NAME_RE,
    TOML_TYPES,
    ForwardSpec,
    RootfsFile,
    RootfsUrl,
    check_http_url,
    check_issuer,
    parse_address,
    parse_forward_spec,
    show_value,
    table_ref,
)
from flyvault.errors import ConfigError

if TYPE_CHECKING:
    from pydantic import ValidationError

log = logging.getLogger("flyvault.config")


class Secret:
    """A string that never shows itself in repr, str or formatting (the access token)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        redact.register(value)  # from now on it is scrubbed from every output

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __str__(self) -> str:
        return "**********"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


_DEFAULTS: dict[str, Any] = {
    "access_token": None,
    "machine_id": None,
    "proxy": False,
    "forward": (),
    "rootfs": None,
    "rootfs_url": None,
    "rootfs_allow_devices": False,
    "rootfs_max_expansion_ratio": None,
    "oidc_issuer_url": None,
    "mux": True,
    "mux_idle": 600,
}
#: mux_idle: seconds, up to a week.
MAX_MUX_IDLE = 7 * 24 * 3600
#: rootfs_max_expansion_ratio travels as a u32 in the setup request.
MAX_EXPANSION_RATIO = 0xFFFFFFFF
_FIELDS = ("name", "address", "org", "app", *_DEFAULTS)


class VaultConfig:
    """One ``[vault.<name>]`` table, validated. Construction raises ConfigError."""

    __slots__ = _FIELDS
    name: str
    address: str
    org: str
    app: str
    access_token: Secret | None
    machine_id: str | None
    #: ``address`` is a vault-proxy; every datagram carries ``machine_id`` (the route).
    proxy: bool
    forward: tuple[str, ...]
    rootfs: str | None
    rootfs_url: str | None
    oidc_issuer_url: str | None
    #: How the vault may unpack the rootfs (sent with it): device nodes under /dev, and
    #: the expansion-ratio ceiling (None: the vault's default, 0: none).
    rootfs_allow_devices: bool
    rootfs_max_expansion_ratio: int | None
    #: Reuse a connection keeper (``flyvault.cli.mux``); it exits after ``mux_idle`` idle s.
    mux: bool
    mux_idle: int

    def __init__(self, **data: Any) -> None:
        token = data.get("access_token")
        if isinstance(token, Secret):
            data = {**data, "access_token": token.get_secret_value()}
        problems = _token_problems(data, _tokens_in(data))
        if problems:
            raise ConfigError(_scrub("\n".join(problems), _tokens_in(data)))
        model = _schema()(**data)
        values = {key: getattr(model, key) for key in _FIELDS}
        secret = values["access_token"]
        values["access_token"] = Secret(secret.get_secret_value()) if secret is not None else None
        self._assign(values)

    @classmethod
    def _trusted(cls, table: Mapping[str, Any]) -> VaultConfig:
        """Build from a table whose exact file content was validated before."""
        entry = object.__new__(cls)
        values = {**_DEFAULTS, **table}
        token = values["access_token"]
        values["access_token"] = Secret(token) if isinstance(token, str) else token
        values["forward"] = tuple(values["forward"])
        entry._assign(values)
        return entry

    def _assign(self, values: Mapping[str, Any]) -> None:
        for key in _FIELDS:
            object.__setattr__(self, key, values[key])

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"VaultConfig is frozen; cannot set {key}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VaultConfig):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in _FIELDS)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, k) for k in _FIELDS))

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={getattr(self, k)!r}" for k in _FIELDS)
        return f"VaultConfig({shown})"

    def to_fields(self, *, exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
        """The values as keyword arguments for ``VaultConfig(...)`` (token as a Secret)."""
        return {k: getattr(self, k) for k in _FIELDS if k not in exclude}

    def host_port(self) -> tuple[str, int]:
        return parse_address(self.address)

    def forwards(self) -> list[ForwardSpec]:
        return [parse_forward_spec(spec) for spec in self.forward]

    def require_access_token(self) -> str:
        token = self.access_token.get_secret_value() if self.access_token else ""
        if not token:
            hint = f'set {table_ref(self.name)} access_token = "..." in the config file'
            raise ConfigError("access_token is required", hint=hint)
        return token

    def rootfs_source(self, purpose: Literal["cold boot", "reprovision"]) -> RootfsFile | RootfsUrl:
        """The rootfs to send; only asked for when one is needed (cold boot or reprovision)."""
        ref = table_ref(self.name)
        if self.rootfs is not None and self.rootfs_url is not None:
            raise ConfigError(
                "both rootfs and rootfs_url are set; configure exactly one",
                hint=f"remove one of them from {ref}",
            )
        if self.rootfs_url is not None:
            try:
                check_http_url(self.rootfs_url, "rootfs_url")
            except ValueError as exc:
                raise ConfigError(str(exc), hint=f"fix rootfs_url in {ref}") from None
            return RootfsUrl(self.rootfs_url)
        if self.rootfs is None:
            raise ConfigError(
                f"either rootfs path or rootfs_url is required for {purpose}",
                hint=f'set rootfs = "~/rootfs.tar.gz" or rootfs_url = "https://..." in {ref}',
            )
        return RootfsFile(_readable_file(self.rootfs, ref))

    @property
    def is_issuer_overridden(self) -> bool:
        return self.oidc_issuer_url is not None

    def issuer_base_url(self) -> str:
        """Base of the issuer URL; the issuer itself is ``<base>/<org>``."""
        return (self.oidc_issuer_url or DEFAULT_ISSUER_BASE_URL).rstrip("/")

    def to_toml(self) -> dict[str, Any]:
        """The table as written to the file: token in plain text, defaults left out."""
        table: dict[str, Any] = {}
        for key in VAULT_KEYS:
            value = getattr(self, key)
            if isinstance(value, Secret):
                value = value.get_secret_value()
            if key in _DEFAULTS and value == _DEFAULTS[key]:
                continue
            if value is not None and value != ():
                table[key] = list(value) if isinstance(value, tuple) else value
        return table


# The keys a [vault.<name>] table may hold, in the order they are written back.
VAULT_KEYS = tuple(key for key in _FIELDS if key != "name")

_SCHEMA: Any = None


def _schema() -> Any:
    """The pydantic model that validates a table; imported and built on first use."""
    global _SCHEMA
    if _SCHEMA is not None:
        return _SCHEMA
    from pydantic import (
        BaseModel,
        ConfigDict,
        SecretStr,
        StrictBool,
        StrictInt,
        ValidationError,
        ValidationInfo,
        field_validator,
        model_validator,
    )

    class _VaultModel(BaseModel):
        model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

        name: str
        address: str
        org: str
        app: str
        access_token: SecretStr | None = None
        machine_id: str | None = None
        proxy: StrictBool = False
        forward: tuple[str, ...] = ()
        rootfs: str | None = None
        rootfs_url: str | None = None
        oidc_issuer_url: str | None = None
        rootfs_allow_devices: StrictBool = False
        rootfs_max_expansion_ratio: StrictInt | None = None
        mux: StrictBool = True
        mux_idle: StrictInt = 600

        def __init__(self, **data: Any) -> None:
            try:
                super().__init__(**data)
            except ValidationError as exc:
                name = data.get("name")
                shown = name if isinstance(name, str) else "?"
                problems = _describe(shown, exc)
                # "from None": the ValidationError holds the raw input, token included.
                raise ConfigError(_scrub("\n".join(problems), _tokens_in(data))) from None

        @field_validator("name")
        @classmethod
        def _valid_name(cls, value: str) -> str:
            if not NAME_RE.fullmatch(value):
                raise ValueError(
                    f"invalid vault name {show_value(value)}: use only letters, digits, '_', '.' and '-'"
                )
            return value

        @field_validator("org", "app", "machine_id", "rootfs")
        @classmethod
        def _not_blank(cls, value: str | None, info: ValidationInfo) -> str | None:
            if value is not None and not value.strip():
                raise ValueError(f"{info.field_name} must not be empty")
            # org goes into the issuer URL path, app and machine_id are compared verbatim.
            if (
                info.field_name != "rootfs"
                and value
                and any(c.isspace() or c in "/?#%" for c in value)
            ):
                raise ValueError(f"{info.field_name} must not contain spaces or any of / ? # %")
            return value

        @field_validator("address", "forward")
        @classmethod
        def _parses(cls, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
            # pydantic turns only ValueError into a validation error; ConfigError would escape.
            try:
                if isinstance(value, str):
                    parse_address(value)
                else:
                    for spec in value:
                        parse_forward_spec(spec)
            except ConfigError as exc:
                raise ValueError(exc.message) from None
            return value

        @field_validator("rootfs_url", "oidc_issuer_url")
        @classmethod
        def _valid_url(cls, value: str | None, info: ValidationInfo) -> str | None:
            if value is not None and info.field_name == "rootfs_url":
                check_http_url(value, "rootfs_url")
            elif value is not None:
                check_issuer(value)
            return value

        @field_validator("rootfs_max_expansion_ratio")
        @classmethod
        def _valid_ratio(cls, value: int | None) -> int | None:
            if value is not None and not 0 <= value <= MAX_EXPANSION_RATIO:
                raise ValueError(
                    "rootfs_max_expansion_ratio must be a whole number from 0 (no limit) to "
                    f"{MAX_EXPANSION_RATIO}"
                )
            return value

        @field_validator("mux_idle")
        @classmethod
        def _valid_idle(cls, value: int) -> int:
            if not 1 <= value <= MAX_MUX_IDLE:
                raise ValueError(
                    f"mux_idle must be a whole number of seconds from 1 to {MAX_MUX_IDLE}"
                )
            return value

        @model_validator(mode="after")
        def _proxy_needs_machine(self) -> _VaultModel:
            if self.proxy and self.machine_id is None:
                raise ValueError(
                    "proxy = true needs machine_id: the proxy routes every datagram by it"
                )
            return self

    _SCHEMA = _VaultModel
    return _SCHEMA


def _readable_file(raw: str, ref: str) -> Path:
    # Only a leading "~/" is expanded, as in the original; "~user" and $VARS are literal.
    path = paths._home() / raw[2:] if raw == "~" or raw.startswith("~/") else Path(raw)
    hint = f"set rootfs in {ref} to an existing .tar.gz file, or use rootfs_url instead"
    try:
        # stat before open: opening a FIFO for reading would block.
        if not stat.S_ISREG(path.stat().st_mode):
            raise ConfigError(f"rootfs file {path} is not a regular file", hint=hint)
        with path.open("rb"):
            pass
    except FileNotFoundError:
        raise ConfigError(f"rootfs file {path} not found", hint=hint) from None
    except OSError as exc:
        raise ConfigError(
            f"rootfs file {path} is not readable: {exc.strerror}", hint=hint
        ) from None
    return path


def _type_name(value: object) -> str:
    return TOML_TYPES.get(type(value), type(value).__name__)


def _unknown_key(key: str, where: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    suggestion = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key {show_value(key)} in {where}{suggestion}"


def _describe(name: str, exc: ValidationError) -> list[str]:
    """One line per problem, built from loc and type only: never from the input value."""
    ref, out = table_ref(name), []
    for err in exc.errors(include_url=False):
        loc = [str(part) for part in err["loc"]]
        key = loc[0] if loc else "?"
        if len(loc) > 1:
            key = f"{key}[{loc[1]}]"
        kind = err["type"]
        if kind == "missing":
            out.append(f"{ref} is missing required key {key!r}")
        elif kind == "extra_forbidden":
            out.append(_unknown_key(key, ref, VAULT_KEYS))
        elif kind == "value_error":
            out.append(f"{ref} {err['ctx']['error']}")
        elif kind == "bool_type":
            out.append(f"{ref} {key} must be true or false, got {_type_name(err.get('input'))}")
        elif kind == "int_type":
            out.append(f"{ref} {key} must be an integer, got {_type_name(err.get('input'))}")
        elif kind in ("string_type", "tuple_type", "list_type"):
            want = "a string" if kind == "string_type" else "an array of strings"
            out.append(f"{ref} {key} must be {want}, got {_type_name(err.get('input'))}")
        else:  # pydantic's own msg names the rule, not the input
            out.append(f"{ref} {key}: {err['msg']}")
    return out


def _tokens_in(table: Mapping[str, Any]) -> list[str]:
    token = table.get("access_token")
    if isinstance(token, Secret) or hasattr(token, "get_secret_value"):
        token = token.get_secret_value()  # type: ignore[union-attr]
    return [token] if isinstance(token, str) and token else []


def _scrub(text: str, secrets: list[str]) -> str:
    # Last line of defence: a token pasted into the wrong key would be echoed as that value.
    redact.register_all(secrets)
    return redact.scrub(text)


#: Keys whose values are shown (doctor, errors, list_vaults) or sent (the OIDC discovery
#: URL holds org and oidc_issuer_url): none of them may hold a token.
_SHOWN_KEYS = ("address", "org", "app", "machine_id", "rootfs", "rootfs_url", "oidc_issuer_url")


def _token_problems(table: Mapping[str, Any], tokens: list[str]) -> list[str]:
    """One line per key of ``table`` that holds one of ``tokens``; never the value."""
    tokens = [t for t in tokens if isinstance(t, str) and t.strip()]
    if not tokens:
        return []

    def holds(value: object) -> bool:
        return isinstance(value, str) and any(redact.occurs(t, value) for t in tokens)

    name = table.get("name")
    if holds(name):
        return [
            "a [vault.<name>] table name contains an access token; the token belongs only "
            "in access_token (rename the table)"
        ]
    ref = table_ref(name) if isinstance(name, str) else "[vault.?]"
    keys = [key for key in _SHOWN_KEYS if holds(table.get(key))]
    forward = table.get("forward")
    if isinstance(forward, list | tuple):
        keys += [f"forward[{i}]" for i, spec in enumerate(forward) if holds(spec)]
    return [
        f"{ref} {key} contains an access token; the token belongs only in access_token "
        "(it would be shown in messages or sent to the issuer)"
        for key in keys
    ]


@dataclass(frozen=True)
class Config:
    path: Path
    vaults: dict[str, VaultConfig] = field(default_factory=dict)

    def get(self, name: str) -> VaultConfig:
        if name in self.vaults:
            return self.vaults[name]
        if self.vaults:
            hint = "configured vaults: " + ", ".join(sorted(self.vaults))
        else:
            hint = f"no vaults are configured; add a table such as\n{EXAMPLE_ENTRY}"
        raise ConfigError(f"vault {name} not found in {self.path}", hint=hint)


def _resolve(path: Path | None) -> Path:
    return Path(path) if path is not None else paths.config_file()


def _read_document(path: Path) -> dict[str, Any] | None:
    """The parsed TOML document, or None when the file does not exist."""
    raw = _read_raw(path)
    return None if raw is None else _parse_toml(raw, path)


def _read_raw(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        source = paths.config_source()
        hint = "fix the permissions of the file and of its directories"
        if source:
            hint = f"the path comes from {source}: correct {source}, or unset it for the default"
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}", hint=hint) from None


def _parse_toml(raw: bytes, path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not valid UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib (3.11) puts the position in the text; pull it out to lead with it.
        # Its messages quote keys and single characters, never values.
        text = str(exc)
        m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", text)
        where = f"line {m[1]}, column {m[2]}: " if m else ""
        reason = text[: m.start()] if m else text
        raise ConfigError(
            f"config file {path} is not valid TOML: {where}{reason}",
            hint="fix the syntax (see https://toml.io); strings need double quotes",
        ) from None


def _parse_document(doc: dict[str, Any], path: Path) -> dict[str, VaultConfig]:
    vaults = doc.get("vault", {})
    tables = vaults if isinstance(vaults, dict) else {}
    secrets = [t for v in tables.values() if isinstance(v, dict) for t in _tokens_in(v)]
    redact.register_all(secrets)
    problems = [_unknown_key(k, "the top level", ("vault",)) for k in doc if k != "vault"]
    if not isinstance(vaults, dict):
        problems.append(f"'vault' must hold [vault.<name>] tables, got {_type_name(vaults)}")
    result: dict[str, VaultConfig] = {}
    for name, table in tables.items():
        if isinstance(table, dict):
            # Any entry's token, in any entry's shown key (another entry's token included).
            tokens = _token_problems({**table, "name": name}, secrets)
            if tokens:
                problems += tokens
                continue
        if not NAME_RE.fullmatch(name):
            problems.append(
                f"invalid vault name {show_value(name)}: use only letters, digits, '_', '.' and '-'"
            )
            continue
        if not isinstance(table, dict):
            problems.append(f"{table_ref(name)} must be a table, got {_type_name(table)}")
            continue
        # Checked here rather than by pydantic so "name" (filled from the header) is refused too.
        problems += [
            _unknown_key(k, table_ref(name), VAULT_KEYS) for k in table if k not in VAULT_KEYS
        ]
        known = {k: v for k, v in table.items() if k in VAULT_KEYS}
        try:
            entry = VaultConfig(**known, name=name)
        except ConfigError as exc:
            problems += exc.message.splitlines()
            continue
        result[name] = entry
    if problems:
        hint = f"edit {path}"
        if any(p.startswith("unknown key") for p in problems):
            hint += "; keys of a [vault.<name>] table: " + ", ".join(VAULT_KEYS)
        raise ConfigError(_scrub("\n".join(problems), secrets), hint=hint)
    return result


def load_config(path: Path | None = None, *, missing_ok: bool = False) -> Config:
    """Read and validate the whole file; any broken entry is an error for every command."""
    path = _resolve(path)
    raw = _read_raw(path)
    if raw is None:
        if missing_ok:
            return Config(path)
        raise ConfigError(
            f"config file {path} not found", hint=f"create it with at least:\n{EXAMPLE_ENTRY}"
        )
    started = time.perf_counter()
    doc = _parse_toml(raw, path)
    key = _validation_key(raw)
    if _was_validated(key):
        tables = doc.get("vault", {})
        config = Config(
            path, {name: VaultConfig._trusted({**t, "name": name}) for name, t in tables.items()}
        )
        how = "validated before"
    else:
        config = Config(path, _parse_document(doc, path))
        _remember_validated(key)
        how = "validated"
    log.debug(
        "config file %s read: %d vault(s), %s (%.1f ms)",
        path,
        len(config.vaults),
        how,
        (time.perf_counter() - started) * 1000,
    )
    return config


# The validated-file cache: one SHA-256 over (fly-vault version, schema version, file bytes).
# Same bytes, same code: the same verdict, so pydantic need not be imported again.
_SCHEMA_VERSION = "2"  # 2: a token in a shown key is refused


def _validation_key(raw: bytes) -> str:
    from flyvault import __version__

    digest = hashlib.sha256(f"{__version__}\0{_SCHEMA_VERSION}\0".encode())
    digest.update(raw)
    return digest.hexdigest()


def _validated_cache() -> Path:
    return paths.cache_dir() / "config-validated-v1.json"


def _was_validated(key: str) -> bool:
    try:
        return json.loads(_validated_cache().read_text()).get("key") == key
    except (OSError, ValueError, AttributeError, ConfigError):
        return False


def _remember_validated(key: str) -> None:
    """Best effort: a cache that cannot be written only costs the next run some time."""
    with suppress(OSError, ConfigError):
        target = _validated_cache()
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".config-validated.")
        with os.fdopen(fd, "w") as out:
            json.dump({"key": key}, out)
        os.replace(tmp, target)


def load_vault(name: str, path: Path | None = None) -> VaultConfig:
    config = load_config(path)
    entry = config.get(name)
    log.info(
        "config %s: [vault.%s] address %s, org %s, app %s, %s%s",
        config.path,
        entry.name,
        entry.address,
        entry.org,
        entry.app,
        f"machine {entry.machine_id}" if entry.machine_id else "machine not pinned",
        ", via vault-proxy" if entry.proxy else "",
    )
    return entry


@contextmanager
def _locked(target: Path) -> Iterator[None]:
    # flock, unlike the original's O_EXCL lock file (B6), is released if we crash.
    # The lock file is never deleted: unlinking it would let two writers lock different inodes.
    lock = target.with_name(target.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_atomic(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)  # the file holds tokens, whatever the umask says
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable; some filesystems refuse fsync on a directory.
    with suppress(OSError):
        dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _update(path: Path | None, change: Callable[[dict[str, Any]], bool]) -> bool:
    """Run ``change(doc) -> bool`` under the lock; write the document back if it said so."""
    # Write through a symlink (dotfile managers) rather than replacing it with a plain file.
    target = Path(os.path.realpath(_resolve(path)))
    try:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with _locked(target):
            try:  # a file we cannot parse is never overwritten
                doc = _read_document(target) or {}
            except ConfigError as exc:
                hint = "fix the file by hand; it was left untouched"
                raise ConfigError(f"{exc.message}; not modifying it", hint=hint) from None
            if not isinstance(doc.get("vault", {}), dict):
                raise ConfigError(f"'vault' in {target} is not a table; not modifying it")
            if not change(doc):
                return False
            _write_atomic(target, tomli_w.dumps(doc).encode("utf-8"))
            return True
    except OSError as exc:
        raise ConfigError(f"cannot write config file {target}: {exc.strerror}") from None


def save_vault(entry: VaultConfig, path: Path | None = None) -> None:
    """Add or replace ``[vault.<entry.name>]``, keeping everything else in the file.

    Values are kept; comments and formatting are not (tomllib -> tomli-w round trip).
    """

    # Re-validate: model_construct() or model_copy(update=) skip validation, and what we write
    # must load again.
    table = VaultConfig(**entry.to_toml(), name=entry.name).to_toml()

    def change(doc: dict[str, Any]) -> bool:
        doc.setdefault("vault", {})[entry.name] = table
        return True

    _update(path, change)


def remove_vault(name: str, path: Path | None = None) -> bool:
    """Remove ``[vault.<name>]``; False (file untouched) if there was no such entry."""
    if not NAME_RE.fullmatch(name):
        raise ConfigError(f"invalid vault name {show_value(name)}")
    if not _resolve(path).exists():
        return False

    def change(doc: dict[str, Any]) -> bool:
        vaults = doc.get("vault", {})
        if name not in vaults:
            return False
        del vaults[name]
        if not vaults:  # no empty [vault] header left behind
            del doc["vault"]
        return True

    return _update(path, change)
