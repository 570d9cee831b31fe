"""Tenant templates: TOML (``version = 1``) rendered into Machines API create requests.

Format and rules are in references/admin.md. Differences from the original (reference §1.4,
§5 bug 10), each for a reason:

- Rendering is a *single pass* over each string: a value that itself contains ``{{x}}`` (an
  access token, a ``--var``) is inserted verbatim, never expanded again. So the result no
  longer depends on dict order, and any value may contain braces.
- Placeholders are checked *before* anything is rendered, and every problem is reported with
  its location (dotted key path and line): unknown names, ``{{access_token}}`` without
  ``--access-token``, malformed or stray braces.
- Unknown keys at the top level and in ``[machine]`` are refused: a typo such as
  ``machine_cont`` used to be ignored silently. ``[machine.config]`` stays free-form because
  it belongs to Fly.
- ``--var`` may not redefine a built-in variable (it used to be overwritten silently).
- ``fly_vault.*`` metadata keys are reserved for tenant identification.
- Volume names are checked against Fly's rules before any API call, so a tenant id such as
  ``acme-co`` in ``tvol_{{tenant_id}}`` fails up front instead of half-way through a create.
"""

from __future__ import annotations

import copy
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flyvault.errors import UsageError
from flyvault.redact import register_all

from .errors import TemplateError

TEMPLATE_VERSION = 1
DEFAULT_VOLUME_SIZE_GIB = 30
BUILTIN_VARIABLES = ("tenant_id", "index", "access_token")

META_TENANT = "fly_vault.tenant_id"
META_MANAGED_BY = "fly_vault.managed_by"
META_TEMPLATE = "fly_vault.template"
MANAGED_BY_VALUE = "fly-vault-admin"

_TOP_KEYS = {"version", "app", "machine_count", "machine", "metadata"}
_MACHINE_KEYS = {
    "name": str,
    "region": str,
    "lease_ttl": int,
    "skip_launch": bool,
    "skip_service_registration": bool,
    "lsvd": bool,
    "config": dict,
}
_PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TENANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
_VOLUME_NAME = re.compile(r"[a-z0-9_]{1,30}\Z")


@dataclass(frozen=True)
class Placeholder:
    name: str
    location: str  # dotted key path, e.g. machine.config.env.ACCESS_TOKEN
    line: int | None
    text: str  # as written, e.g. "{{ tenant_id }}"

    def where(self) -> str:
        return f"{self.location} (line {self.line})" if self.line else self.location


@dataclass
class Template:
    path: Path
    version: int
    app: str
    machine_count: int
    machine: dict[str, Any]
    metadata: dict[str, str]
    placeholders: list[Placeholder] = field(default_factory=list)

    @property
    def basename(self) -> str:
        return self.path.name


@dataclass
class VolumePlan:
    name: str
    region: str
    size_gb: int
    machine_index: int  # 1-based, like {{index}}
    mount_index: int


@dataclass
class MachinePlan:
    index: int  # 1-based
    request: dict[str, Any]  # POST /machines body; mounts without volume are filled later
    volumes: list[VolumePlan]


def _fail(path: Path, message: str, hint: str | None = None) -> TemplateError:
    return TemplateError(f"template {path}: {message}", hint=hint)


def load_template(path: Path) -> Template:
    """Read, parse and validate a template; placeholders are collected, not yet checked."""
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(
            f"cannot read template file {path}: {exc.__class__.__name__}: {exc}",
            hint="pass --template with the path of a tenant template (TOML)",
        ) from exc
    try:
        data = tomllib.loads(source)
    except tomllib.TOMLDecodeError as exc:
        raise _fail(path, f"invalid TOML: {exc}") from exc

    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise _fail(
            path,
            f"unknown top-level key(s): {', '.join(unknown)}",
            hint=f"allowed: {', '.join(sorted(_TOP_KEYS))}",
        )
    for key in ("version", "app", "machine_count", "machine"):
        if key not in data:
            raise _fail(path, f"missing required key '{key}'")
    version = data["version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise _fail(path, "'version' must be an integer")
    if version != TEMPLATE_VERSION:
        raise _fail(
            path,
            f"unsupported template version {version} (expected {TEMPLATE_VERSION})",
            hint="this fly-vault-admin understands version = 1 templates",
        )
    app = data["app"]
    if not isinstance(app, str) or not app:
        raise _fail(path, "'app' must be a non-empty string")
    count = data["machine_count"]
    if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
        raise _fail(path, "machine_count must be an integer greater than zero")
    machine = data["machine"]
    if not isinstance(machine, dict):
        raise _fail(path, "'machine' must be a table ([machine])")
    for key, value in machine.items():
        expected = _MACHINE_KEYS.get(key)
        if expected is None:
            raise _fail(
                path,
                f"unknown key 'machine.{key}'",
                hint=f"allowed: {', '.join(sorted(_MACHINE_KEYS))}",
            )
        if expected is int and isinstance(value, bool):
            raise _fail(path, f"'machine.{key}' must be an integer")
        if not isinstance(value, expected):
            kind = "a table" if expected is dict else f"a {expected.__name__}"
            raise _fail(path, f"'machine.{key}' must be {kind}")
    if "config" not in machine:
        raise _fail(path, "missing required table [machine.config]")
    if not isinstance(machine["config"].get("image"), str):
        raise _fail(path, "machine.config.image must be a string")
    metadata = data.get("metadata", {})
    if not isinstance(metadata, dict):
        raise _fail(path, "'metadata' must be a table of strings")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise _fail(path, f"metadata.{key} must be a string")
        if key.startswith("fly_vault."):
            raise _fail(path, f"metadata key '{key}' is reserved for tenant identification")
    config_metadata = machine["config"].get("metadata", {})
    if isinstance(config_metadata, dict):
        for key in config_metadata:
            if str(key).startswith("fly_vault."):
                raise _fail(path, f"metadata key '{key}' is reserved for tenant identification")

    template = Template(path, version, app, count, machine, dict(metadata))
    lines = source.splitlines()
    for location, text in _rendered_strings(machine, metadata):
        template.placeholders.extend(_scan(path, location, text, lines))
    return template


def _rendered_strings(
    machine: Mapping[str, Any], metadata: Mapping[str, str]
) -> list[tuple[str, str]]:
    """(location, value) of every string that gets rendered, in document-ish order."""
    found: list[tuple[str, str]] = []
    for key in ("name", "region"):
        if isinstance(machine.get(key), str):
            found.append((f"machine.{key}", machine[key]))

    def walk(value: Any, location: str) -> None:
        if isinstance(value, str):
            found.append((location, value))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{location}.{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{location}[{i}]")

    walk(machine["config"], "machine.config")
    for key, value in metadata.items():
        found.append((f"metadata.{key}", value))
    return found


def _line_of(lines: Sequence[str], text: str, location: str) -> int | None:
    """Best-effort line number: a line holding the text and the key, else just the text."""
    last_key = re.split(r"[.\[\]]", location.rstrip("]"))[-1]
    candidates = [n for n, line in enumerate(lines, 1) if text in line]
    for n in candidates:
        if last_key and last_key in lines[n - 1]:
            return n
    return candidates[0] if candidates else None


def _scan(path: Path, location: str, value: str, lines: Sequence[str]) -> list[Placeholder]:
    found: list[Placeholder] = []
    remainder = value
    for match in _PLACEHOLDER.finditer(value):
        name = match.group(1)
        line = _line_of(lines, match.group(0), location)
        where = f"{location} (line {line})" if line else location
        if not _IDENTIFIER.match(name):
            raise _fail(
                path,
                f"malformed placeholder {match.group(0)!r} at {where}",
                hint="a placeholder is {{name}} with a letter, digit or '_' name",
            )
        found.append(Placeholder(name, location, line, match.group(0)))
        remainder = remainder.replace(match.group(0), "", 1)
    if "{{" in remainder or "}}" in remainder:
        line = _line_of(lines, "{{" if "{{" in remainder else "}}", location)
        where = f"{location} (line {line})" if line else location
        raise _fail(
            path,
            f"unbalanced '{{{{' or '}}}}' at {where}: {value!r}",
            hint="for literal braces, pass them in a variable: --var lb='{{' and use {{lb}}",
        )
    return found


def parse_vars(items: Sequence[str]) -> dict[str, str]:
    """``--var key=value`` pairs: split at the first '=', key trimmed, value verbatim."""
    result: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"invalid --var '{item}', expected key=value")
        raw_key, value = item.split("=", 1)
        key = raw_key.strip()
        if not key:
            raise UsageError(f"invalid --var '{item}': empty key")
        if not _IDENTIFIER.match(key):
            raise UsageError(
                f"invalid --var key '{key}': use letters, digits and '_' (not starting with "
                "a digit)"
            )
        if key in BUILTIN_VARIABLES:
            raise UsageError(
                f"--var '{key}' is a built-in variable and cannot be set with --var",
                hint="use the tenant id argument or --access-token instead",
            )
        if key in result:
            raise UsageError(f"duplicate --var key '{raw_key}': provided multiple times")
        result[key] = value
    return result


def validate_tenant_id(tenant_id: str) -> None:
    if not _TENANT_ID.match(tenant_id):
        raise UsageError(
            f"invalid tenant id {tenant_id!r}",
            hint="1-63 characters: letters, digits, '_', '.', '-', starting with a letter or digit",
        )


def check_variables(
    template: Template, variables: Mapping[str, str], *, access_token_given: bool
) -> list[str]:
    """Refuse unknown placeholders (all of them, with locations); return unused --var keys."""
    problems: list[str] = []
    for ph in template.placeholders:
        if ph.name == "access_token" and not access_token_given:
            problems.append(f"{{{{access_token}}}} at {ph.where()} needs --access-token")
        elif ph.name not in BUILTIN_VARIABLES and ph.name not in variables:
            problems.append(f"unknown placeholder {ph.text} at {ph.where()}")
    if problems:
        known = sorted({*BUILTIN_VARIABLES, *variables})
        raise TemplateError(
            f"template {template.path}: unresolved placeholders:\n  " + "\n  ".join(problems),
            hint=f"known variables: {', '.join(known)}; define others with --var key=value",
        )
    used = {ph.name for ph in template.placeholders}
    return sorted(set(variables) - used)


def check_app(template: Template, app: str) -> None:
    if template.app != app:
        raise TemplateError(
            f"template app '{template.app}' does not match configured app '{app}'",
            hint="fix 'app' in the template or pass the matching --app / FLY_APP",
        )


def _render(value: str, variables: Mapping[str, str]) -> str:
    # Single pass: substituted text is never scanned again.
    return _PLACEHOLDER.sub(lambda m: variables[m.group(1)], value)


def _render_tree(value: Any, variables: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return _render(value, variables)
    if isinstance(value, dict):
        return {k: _render_tree(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_render_tree(v, variables) for v in value]
    return value


#: Env keys whose values are secrets (``ACCESS_TOKEN``, ``DB_PASSWORD``, ``API_KEY``...).
_SECRET_KEY = re.compile(
    r"TOKEN|SECRET|PASSW|PASSPHRASE|PWD|KEY|CREDENTIAL|AUTH|PRIVATE|CERT|COOKIE|SESSION|"
    r"SIGNATURE|SALT|DSN",
    re.IGNORECASE,
)
#: A URL with a password in it (``postgres://user:pass@host/db``), whatever its key.
_URL_CREDENTIALS = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@\s]*:[^/@\s]+@")
#: Shorter env values are not registered: "1" or "on" under a key named ``*_KEY`` is no
#: secret, and scrubbing it would garble unrelated text.
_MIN_ENV_SECRET = 4


def config_secrets(config: Any) -> list[str]:
    """The secret values of a machine config: inline files (``files[].raw_value``) and the
    ``env`` values whose key names a secret or that hold a URL with a password, in nested
    ``containers`` too.

    Not every env value: most are tenant ids, regions, ports or flags, and registering those
    would scrub them from every line of output (``tenant 'acme' created`` would lose its
    tenant). All env values are still hidden structurally in printed configs
    (``admin.tenants.redact_config``).
    """
    found: list[str] = []
    if not isinstance(config, dict):
        return found
    env = config.get("env")
    if isinstance(env, dict):
        for key, value in env.items():
            if not isinstance(value, str) or len(value.strip()) < _MIN_ENV_SECRET:
                continue
            if _SECRET_KEY.search(str(key)) or _URL_CREDENTIALS.match(value.strip()):
                found.append(value)
    files = config.get("files")
    for entry in files if isinstance(files, list) else []:
        raw = entry.get("raw_value") if isinstance(entry, dict) else None
        if isinstance(raw, str) and len(raw.strip()) >= _MIN_ENV_SECRET:
            found.append(raw)
    containers = config.get("containers")
    for container in containers if isinstance(containers, list) else []:
        found += config_secrets(container)
    return found


_NOT_SECRET = re.compile(r"[+-]?\d+(\.\d+)?|true|false|yes|no|on|off|null|none", re.IGNORECASE)


def env_values(config: Any, public: Iterable[str] = ()) -> list[str]:
    """Every ``env`` value of a config we send (nested ``containers`` too), to be registered
    as a secret: the values of a template's ``config.env`` and of a machine's config that an
    update sends back. Left out, because scrubbing them would garble every line of output
    and they are not secrets: values under 4 characters, numbers, booleans, and ``public``
    values (the tenant id, machine names, regions, metadata, plain ``--var`` values)."""
    known = {p.strip() for p in public if isinstance(p, str)}
    found: list[str] = []
    if not isinstance(config, dict):
        return found
    env = config.get("env")
    for value in env.values() if isinstance(env, dict) else []:
        text = value.strip() if isinstance(value, str) else ""
        if len(text) >= _MIN_ENV_SECRET and not _NOT_SECRET.fullmatch(text) and text not in known:
            found.append(value)
    containers = config.get("containers")
    for container in containers if isinstance(containers, list) else []:
        found += env_values(container, known)
    return found


def register_env_values(config: Any, public: Iterable[str] = ()) -> None:
    """Register ``env_values`` and ``config_secrets`` of a config with the scrubber."""
    register_all([*env_values(config, public), *config_secrets(config)])


def register_config_secrets(config: Any) -> None:
    """Register a machine config's secret values (``config_secrets``) with the scrubber."""
    register_all(config_secrets(config))


def tenant_metadata(tenant_id: str, template_name: str) -> dict[str, str]:
    return {
        META_TENANT: tenant_id,
        META_MANAGED_BY: MANAGED_BY_VALUE,
        META_TEMPLATE: template_name,
    }


def render_plan(
    template: Template,
    tenant_id: str,
    *,
    access_token: str | None,
    variables: Mapping[str, str],
) -> list[MachinePlan]:
    """One create request per machine, with the volumes each one needs created first."""
    check_variables(template, variables, access_token_given=access_token is not None)
    plans: list[MachinePlan] = []
    for index in range(1, template.machine_count + 1):
        values = dict(variables, tenant_id=tenant_id, index=str(index))
        if access_token is not None:
            values["access_token"] = access_token
        machine = template.machine
        config = _render_tree(copy.deepcopy(machine["config"]), values)
        register_config_secrets(config)  # rendered secret env values and inline files
        name = _render(machine["name"], values) if "name" in machine else None
        region = _render(machine["region"], values) if "region" in machine else None
        metadata: dict[str, str] = {}
        if isinstance(config.get("metadata"), dict):
            metadata.update({str(k): str(v) for k, v in config["metadata"].items()})
        metadata.update({k: _render(v, values) for k, v in template.metadata.items()})
        metadata.update(tenant_metadata(tenant_id, template.basename))
        config["metadata"] = metadata

        request: dict[str, Any] = {}
        if name is not None:
            request["name"] = name
        if region is not None:
            request["region"] = region
        request["config"] = config
        for key in ("lease_ttl", "skip_launch", "skip_service_registration", "lsvd"):
            if key in machine:
                request[key] = machine[key]
        volumes = _plan_volumes(template.path, config, region, index)
        plans.append(MachinePlan(index, request, volumes))
    return plans


def _plan_volumes(
    path: Path, config: dict[str, Any], region: str | None, index: int
) -> list[VolumePlan]:
    mounts = config.get("mounts")
    if mounts is None:
        return []
    if not isinstance(mounts, list):
        raise _fail(path, "machine.config.mounts must be an array of tables")
    volumes: list[VolumePlan] = []
    for i, mount in enumerate(mounts):
        if not isinstance(mount, dict):
            raise _fail(path, f"machine.config.mounts[{i}] must be a table")
        volume = mount.get("volume")
        if isinstance(volume, str) and volume.strip():
            continue  # an existing volume, used as is
        name = mount.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _fail(
                path, f"machine.config.mounts[{i}] must include a non-empty 'volume' or 'name'"
            )
        if not region:
            raise _fail(
                path,
                f"machine.region is required when machine.config.mounts[{i}] uses name "
                f"'{name}' without volume",
            )
        if not _VOLUME_NAME.match(name):
            raise _fail(
                path,
                f"machine {index}: volume name {name!r} (machine.config.mounts[{i}].name) is "
                "not a valid Fly volume name",
                hint="Fly volume names use only lowercase letters, digits and '_' (at most "
                "30); pick a tenant id that fits, or change the template",
            )
        size = mount.get("size_gb")
        size_gb = (
            size
            if isinstance(size, int) and not isinstance(size, bool) and size > 0
            else (DEFAULT_VOLUME_SIZE_GIB)
        )
        volumes.append(VolumePlan(name, region, size_gb, index, i))
    return volumes


def auto_volume_placeholder(volume: VolumePlan) -> str:
    return f"<auto:{volume.name}@{volume.region}>"
