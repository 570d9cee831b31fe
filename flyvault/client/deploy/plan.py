"""Deploy plans: the TOML file, checked and resolved (no I/O beyond reading the plan's own
sources). See references/deploy-plans.md for the format.

A plan is checked in full before anything connects: unknown keys, duplicate step ids, bad
names, a variable that is not defined and a ``source`` that cannot be read are usage errors
(exit 2) naming the plan's line. ``{{home}}`` is the only value that needs the vault (the
target user's home from its ``/etc/passwd``), so steps are resolved in two passes: ``${VAR}``
at load time, ``{{home}}`` by ``resolve`` once the home is known.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flyvault.errors import UsageError

SCHEMA = 1
NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
STEP_ID_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
USER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
HOME = "{{home}}"
#: Where a path counts as surviving a reprovision (bind-mounted from the volume).
PERSIST_PREFIXES = ("/root", "/home")
MAX_CONTENT = 16 * 1024 * 1024


def _octal_mode(value: str) -> str:
    if not re.fullmatch(r"0?[0-7]{3,4}", value):
        raise ValueError('mode is an octal string such as "0644"')
    return value


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    description: str = ""

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not STEP_ID_RE.fullmatch(value):
            raise ValueError("a step id is 1-63 of a-z, 0-9, '.', '_', '-', starting alphanumeric")
        return value


class ShellStep(_Step):
    kind: Literal["shell"]
    run: str
    #: Who runs it: "root", or "user" (the plan's target user).
    as_: Literal["root", "user"] = Field("root", alias="as")
    creates: str | None = None
    unless: str | None = None
    reverse: str | None = None
    env: dict[str, str] = {}
    #: "rootfs" (the default: a root script may change anything) or "home" (its effects live
    #: under /root or /home and survive a reprovision).
    domain: Literal["rootfs", "home"] = "rootfs"
    timeout: float = Field(600.0, gt=0, le=86400)


class FileStep(_Step):
    kind: Literal["file"]
    dest: str
    source: str | None = None
    content: str | None = None
    mode: str = "0644"
    as_: Literal["root", "user"] | None = Field(None, alias="as")

    @field_validator("mode")
    @classmethod
    def _mode(cls, value: str) -> str:
        return _octal_mode(value)


class EnvStep(_Step):
    kind: Literal["env"]
    vars: dict[str, str] = {}
    path_prepend: list[str] = []

    @field_validator("vars")
    @classmethod
    def _names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name == "PATH":
                raise ValueError(f"{name!r} is not a variable an env step may set")
        return value


class SnippetStep(_Step):
    kind: Literal["snippet"]
    file: str
    body: str
    as_: Literal["root", "user"] | None = Field(None, alias="as")


class ArtifactStep(_Step):
    kind: Literal["artifact"]
    source: str
    sha256: str
    dest: str | None = None
    extract_to: str | None = None
    mode: str = "0755"
    as_: Literal["root", "user"] | None = Field(None, alias="as")

    @field_validator("sha256")
    @classmethod
    def _digest(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("sha256 is 64 lower-case hex digits (sha256sum prints it)")
        return value

    @field_validator("mode")
    @classmethod
    def _mode(cls, value: str) -> str:
        return _octal_mode(value)


class PackagesStep(_Step):
    kind: Literal["packages"]
    packages: list[str] = Field(min_length=1)
    manager: Literal["auto", "apt", "apk", "dnf", "pacman"] = "auto"
    #: Fail (instead of a recorded skip) when the rootfs has no such package manager.
    required: bool = False

    @field_validator("packages")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9+._:-]{0,127}", name):
                raise ValueError(f"{name!r} is not a package name")
        return value


class ServiceStep(_Step):
    kind: Literal["service"]
    unit: str
    #: A unit file on this machine (relative to the plan), written to /etc/systemd/system.
    unit_file: str | None = None
    enable: bool = True
    start: Literal["best-effort", "required", "no"] = "best-effort"
    #: Fail (instead of a recorded skip) without systemd; [target] requires_init =
    #: "systemd" sets it for every service step.
    required: bool = False

    @field_validator("unit")
    @classmethod
    def _unit(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9:_.@-]+\.(service|socket|timer|target|path|mount)", value):
            raise ValueError(f"{value!r} is not a systemd unit name (e.g. ssh.service)")
        return value


class ImageStep(_Step):
    """A container image from this machine's podman (or docker) into the vault's podman
    (``fly-vault cp-image``)."""

    kind: Literal["image"]
    image: str
    tag: str | None = None
    #: Into the target user's rootless storage instead of root's.
    rootless: bool = False
    engine: Literal["podman", "docker"] | None = None


class RestartStep(_Step):
    """Restart the workload, like a handler: only when an earlier step ran in this apply,
    or every time with ``always``."""

    kind: Literal["restart"]
    always: bool = False
    timeout: float = Field(300.0, gt=0, le=3600)


StepModel = Annotated[
    ShellStep
    | FileStep
    | EnvStep
    | SnippetStep
    | ArtifactStep
    | RestartStep
    | PackagesStep
    | ServiceStep
    | ImageStep,
    Field(discriminator="kind"),
]


class _Target(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    user: str = "root"
    requires_init: Literal["any", "systemd"] = "any"


class _PlanModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_: int = Field(alias="schema")
    name: str
    description: str = ""
    target: _Target = _Target()
    vars: dict[str, str] = {}
    step: list[StepModel] = []


@dataclass(frozen=True)
class Step:
    """One step, its ``${VAR}``s filled in (``{{home}}`` still literal)."""

    id: str
    kind: str
    fields: dict[str, Any]
    #: The line of its ``[[step]]`` header in the plan file.
    line: int
    #: The bytes a ``file`` step writes (its source read at load time), else None.
    data: bytes | None = None
    #: An ``artifact`` to extract: its members' normalized names, checked at load time.
    members: tuple[str, ...] = ()

    def runs_as(self, home: str) -> str:
        """Who acts for this step: "root" or "user"."""
        declared = self.fields.get("as")
        if declared is not None:
            return str(declared)
        if self.kind == "env" or (self.kind == "image" and self.fields.get("rootless")):
            return "user"
        path = str(
            self.fields.get("dest")
            or self.fields.get("file")
            or self.fields.get("extract_to")
            or ""
        )
        return "user" if path == HOME or path.startswith(HOME + "/") else "root"


@dataclass(frozen=True)
class Plan:
    name: str
    user: str
    requires_init: str
    steps: tuple[Step, ...]
    path: str
    description: str = ""
    vars: dict[str, str] = field(default_factory=dict)

    def digest(self) -> str:
        return hashlib.sha256(
            json.dumps([fingerprint_input(step) for step in self.steps], sort_keys=True).encode()
        ).hexdigest()


@dataclass(frozen=True)
class ResolvedStep:
    """A step with ``{{home}}`` resolved: what runs, and its fingerprint."""

    step: Step
    fields: dict[str, Any]
    as_user: bool
    domain: str  # "rootfs" or "home"
    fingerprint: str

    @property
    def id(self) -> str:
        return self.step.id

    @property
    def kind(self) -> str:
        return self.step.kind


def load_plan(path: str | Path) -> Plan:
    """The plan at ``path``, checked in full. Raises ``UsageError`` naming the line."""
    plan_path = Path(path)
    try:
        text = plan_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such plan file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the plan ({exc})") from None
    return parse_plan(text, source=str(path), base=plan_path.parent)


def parse_plan(text: str, *, source: str = "<plan>", base: Path | None = None) -> Plan:
    """The plan in ``text``; ``base`` is where relative ``source`` paths are found."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{source}: not valid TOML: {exc}") from None
    lines = _Lines(text)
    _check_header(raw, source, lines)
    _check_steps_before_model(raw, source, lines)
    try:
        model = _PlanModel.model_validate(raw)
    except ValidationError as exc:
        raise UsageError(_explain(exc, source, lines)) from None
    if not NAME_RE.fullmatch(model.name):
        raise UsageError(
            f"{source}:{lines.key(None, 'name')}: plan name {model.name!r} must be 1-63 of "
            "a-z, 0-9 and '-', starting alphanumeric (it names the vault's ledger record)"
        )
    if not USER_RE.fullmatch(model.target.user):
        raise UsageError(f"{source}: target user {model.target.user!r} is not a user name")
    steps = tuple(
        _build_step(index, step, model.vars, source, lines, base, model.target.requires_init)
        for index, step in enumerate(model.step)
    )
    return Plan(
        name=model.name,
        user=model.target.user,
        requires_init=model.target.requires_init,
        steps=steps,
        path=source,
        description=model.description,
        vars=dict(model.vars),
    )


def _check_header(raw: dict[str, Any], source: str, lines: _Lines) -> None:
    schema = raw.get("schema")
    if schema is None:
        raise UsageError(f"{source}: the plan needs 'schema = {SCHEMA}' at the top")
    if schema != SCHEMA:
        raise UsageError(
            f"{source}:{lines.key(None, 'schema')}: schema {schema!r} is not one this "
            f"fly-vault reads (it reads schema {SCHEMA}); upgrade fly-vault"
        )
    if not isinstance(raw.get("step", []), list):
        raise UsageError(f"{source}: 'step' must be an array of tables: write [[step]]")


def _check_steps_before_model(raw: dict[str, Any], source: str, lines: _Lines) -> None:
    seen: dict[str, int] = {}
    for index, step in enumerate(raw.get("step", [])):
        where = f"{source}:{lines.key(index, 'kind')}"
        if not isinstance(step, dict):
            raise UsageError(f"{where}: a step must be a table")
        kind = step.get("kind")
        if kind not in KINDS:
            raise UsageError(f"{where}: unknown step kind {kind!r}: use one of {', '.join(KINDS)}")
        step_id = step.get("id")
        if isinstance(step_id, str):
            if step_id in seen:
                raise UsageError(
                    f"{source}:{lines.key(index, 'id')}: duplicate step id {step_id!r} (first at line {seen[step_id]}): "
                    "step ids key the ledger, so each must be unique"
                )
            seen[step_id] = lines.key(index, "id")


def _explain(exc: ValidationError, source: str, lines: _Lines) -> str:
    problems = []
    for error in exc.errors()[:5]:
        loc = list(error["loc"])
        if len(loc) > 2 and loc[0] == "step" and loc[2] in KINDS:
            del loc[2]  # the tagged union's branch, not a key of the file
        line, where = _locate(loc, lines)
        text = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            text = f"unknown key {where!r}: check its spelling in references/deploy-plans.md"
        elif error["type"] == "missing":
            text = f"missing key {where!r}"
        else:
            text = f"{where}: {text}"
        problems.append(f"{source}:{line}: {text}")
    return "; ".join(problems)


KINDS = (
    "shell",
    "file",
    "env",
    "snippet",
    "artifact",
    "restart",
    "packages",
    "service",
    "image",
)


def _locate(loc: list[Any], lines: _Lines) -> tuple[int, str]:
    """The line and dotted name of a pydantic error location."""
    names = [str(part) for part in loc]
    if len(loc) >= 2 and loc[0] == "step" and isinstance(loc[1], int):
        key = str(loc[2]) if len(loc) > 2 else None
        line = lines.key(loc[1], key) if key else lines.step(loc[1])
        return line, ".".join(names[2:]) or f"step {loc[1] + 1}"
    if len(names) == 2:
        return lines.table_key(names[0], names[1]), ".".join(names)
    return lines.key(None, names[-1] if names else ""), ".".join(names)


def _build_step(
    index: int,
    model: Any,
    variables: dict[str, str],
    source: str,
    lines: _Lines,
    base: Path | None,
    requires_init: str = "any",
) -> Step:
    line = lines.step(index)
    raw = model.model_dump(by_alias=True, exclude={"description"})
    fields = {
        key: _fill(value, variables, f"{source}:{lines.key(index, key)}")
        for key, value in raw.items()
    }
    step_id, kind = fields.pop("id"), fields.pop("kind")
    data = None
    members: tuple[str, ...] = ()
    if kind == "file":
        data = _file_data(fields, base, f"{source}:{line}")
    if kind == "artifact":
        members = _artifact(fields, base, f"{source}:{line}")
    if kind == "image":
        fields["image_id"] = _local_image(fields, f"{source}:{line}")
    if kind == "service":
        fields["required"] = fields["required"] or requires_init == "systemd"
        if fields["unit_file"] is not None:
            fields["source"], fields["content"] = fields.pop("unit_file"), None
            data = _file_data(fields, base, f"{source}:{line}")
            fields["unit_file"] = fields.pop("source")
        else:
            fields.pop("unit_file")
    for key in ("dest", "file", "extract_to"):
        if fields.get(key) is not None:
            _check_absolute(fields[key], f"{source}:{lines.key(index, key)}")
    if kind == "shell" and fields.get("creates"):
        _check_absolute(fields["creates"], f"{source}:{lines.key(index, 'creates')}")
    if kind == "snippet" and any(
        mark in fields["body"] for mark in (">>> fly-vault", "<<< fly-vault")
    ):
        raise UsageError(f"{source}:{line}: a snippet's body may not contain fly-vault markers")
    return Step(id=step_id, kind=kind, fields=fields, line=line, data=data, members=members)


def _fill(value: Any, variables: dict[str, str], where: str) -> Any:
    if isinstance(value, str):

        def one(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in variables:
                raise UsageError(f"{where}: ${{{name}}} is not defined in [vars]")
            return variables[name]

        return VAR_RE.sub(one, value)
    if isinstance(value, list):
        return [_fill(item, variables, where) for item in value]
    if isinstance(value, dict):
        return {key: _fill(item, variables, where) for key, item in value.items()}
    return value


def _file_data(fields: dict[str, Any], base: Path | None, where: str) -> bytes:
    source, content = fields.pop("source"), fields.pop("content")
    if (source is None) == (content is None):
        raise UsageError(f"{where}: a file step needs exactly one of 'source' and 'content'")
    if content is not None:
        data = str(content).encode()
    else:
        path = Path(source)
        if not path.is_absolute():
            path = (base or Path(".")) / path
        try:
            if path.stat().st_size > MAX_CONTENT:
                raise UsageError(f"{where}: {path} is over 16 MiB: copy it with fly-vault cp")
            data = path.read_bytes()
        except OSError as exc:
            raise UsageError(
                f"{where}: cannot read source {str(path)!r} ({exc.strerror})"
            ) from None
        fields["source"] = str(source)
    fields["sha256"] = hashlib.sha256(data).hexdigest()
    return data


def _artifact(fields: dict[str, Any], base: Path | None, where: str) -> tuple[str, ...]:
    """Check an artifact before anything connects: one target, the source's digest as
    declared, and (to extract) every member safe to unpack under ``extract_to``."""
    from flyvault.client.deploy.archive import check_members, file_sha256

    if (fields["dest"] is None) == (fields["extract_to"] is None):
        raise UsageError(f"{where}: an artifact step needs exactly one of 'dest' and 'extract_to'")
    path = Path(fields["source"])
    if not path.is_absolute():
        path = (base or Path(".")) / path
    try:
        found = file_sha256(path)
    except OSError as exc:
        raise UsageError(f"{where}: cannot read source {str(path)!r} ({exc.strerror})") from None
    if found != fields["sha256"]:
        raise UsageError(
            f"{where}: {path} has SHA-256 {found}, the plan says {fields['sha256']}: "
            "not the file the plan was written for"
        )
    fields["path"] = str(path.resolve())
    return check_members(path, where) if fields["extract_to"] is not None else ()


def _local_image(fields: dict[str, Any], where: str) -> str:
    """The image's id here: in the fingerprint, so a rebuilt image is copied again."""
    from flyvault.client.images import check_ref, local_engine, local_image_id

    try:
        check_ref(fields["image"])
        if fields["tag"] is not None:
            check_ref(fields["tag"], "image tag")
        fields["engine"] = local_engine(fields["engine"])
        return local_image_id(fields["engine"], fields["image"])
    except UsageError as exc:
        raise UsageError(f"{where}: {exc.message}", hint=exc.hint) from None


def _check_absolute(path: str, where: str) -> None:
    if not (path.startswith("/") or path == HOME or path.startswith(HOME + "/")):
        raise UsageError(f"{where}: {path!r} must be absolute or start with {HOME}")
    if "/../" in path + "/" or "\0" in path:
        raise UsageError(f"{where}: {path!r} may not contain '..'")


# -- resolution ------------------------------------------------------------------------------


def resolve(step: Step, home: str) -> ResolvedStep:
    """``{{home}}`` filled in, who acts, the persistence domain and the fingerprint."""
    fields = _home(step.fields, home)
    as_user = step.runs_as(home) == "user"
    return ResolvedStep(
        step=step,
        fields=fields,
        as_user=as_user,
        domain=_domain(step.kind, fields),
        fingerprint=_fingerprint(step, fields, as_user),
    )


def _home(value: Any, home: str) -> Any:
    if isinstance(value, str):
        return value.replace(HOME, home)
    if isinstance(value, list):
        return [_home(item, home) for item in value]
    if isinstance(value, dict):
        return {key: _home(item, home) for key, item in value.items()}
    return value


def _domain(kind: str, fields: dict[str, Any]) -> str:
    if kind in ("env", "restart"):
        return "home"  # nothing of it lives in the rootfs
    if kind == "image":
        return "home" if fields["rootless"] else "rootfs"  # root's storage: /var/lib
    if kind == "shell":
        return str(fields["domain"])
    path = str(fields.get("dest") or fields.get("file") or fields.get("extract_to"))
    persistent = any(path == p or path.startswith(p + "/") for p in PERSIST_PREFIXES)
    return "home" if persistent else "rootfs"


def fingerprint_input(step: Step) -> dict[str, Any]:
    return {"id": step.id, "kind": step.kind, "fields": step.fields}


def _fingerprint(step: Step, fields: dict[str, Any], as_user: bool) -> str:
    canonical = json.dumps(
        {"kind": step.kind, "fields": fields, "as_user": as_user}, sort_keys=True
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


# -- line numbers ----------------------------------------------------------------------------


class _Lines:
    """Where things are in the plan's text (tomllib keeps no positions): the ``[[step]]``
    headers in order, and the first ``key =`` line inside a table."""

    _STEP = re.compile(r"^\s*\[\[\s*step\s*\]\]")
    _TABLE = re.compile(r"^\s*\[")

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.steps = [n + 1 for n, line in enumerate(self.lines) if self._STEP.match(line)]

    def step(self, index: int) -> int:
        return self.steps[index] if index < len(self.steps) else 1

    def table_key(self, table: str, key: str) -> int:
        """The line of ``key`` in the top-level table ``[table]`` (its header if not found)."""
        header = re.compile(rf"^\s*\[\s*{re.escape(table)}\s*\]")
        pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
        start = None
        for number, line in enumerate(self.lines):
            if start is None:
                if header.match(line):
                    start = number + 1
            elif self._TABLE.match(line):
                break
            elif pattern.match(line):
                return number + 1
        return start or self.key(None, table)

    def key(self, index: int | None, key: str) -> int:
        """The line of ``key`` in step ``index`` (or at the top level for None)."""
        start = self.step(index) if index is not None else 0
        pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
        for number in range(start, len(self.lines)):
            line = self.lines[number]
            if number >= start + 1 and self._TABLE.match(line) and index is not None:
                break
            if index is None and self._TABLE.match(line):
                break
            if pattern.match(line):
                return number + 1
        return start or 1
