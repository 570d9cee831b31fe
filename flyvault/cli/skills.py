"""``fly-vault skills install``: put the bundled agent skills where coding agents find them.

Where the skills come from. In a source checkout (also an editable install) they are
``skills/`` next to ``flyvault/``, and the references they link are ``references/``. An
installed wheel carries both as data files under ``<prefix>/share/fly-vault/`` (see the
``[tool.setuptools.data-files]`` table of pyproject.toml), found through the distribution's
file list, so any install prefix works.

What is installed. Each skill is made self-contained: its own files, plus every file its
Markdown links reach (followed transitively through linked Markdown), copied into the
skill's ``references/`` folder. The links are rewritten to point at the copies, so
``../../references/cli.md`` in the repository becomes ``references/cli.md`` in the
installed skill and still resolves.

How. Per skill: write everything into a hidden temporary directory beside the destination,
then rename it into place (an atomic exchange with the old copy on Linux, otherwise two
renames with a restore on failure). A manifest (``.fly-vault-skill.json``) records the
SHA-256 of every installed file, so a later install can tell a pristine copy (replaced or
left alone when identical) from one the user changed (refused without ``--force``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import dataclasses
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from flyvault.errors import UsageError, VaultError

MANIFEST_NAME = ".fly-vault-skill.json"
DATA_SUBDIR = PurePosixPath("share/fly-vault")
#: Where ``--target claude|codex|agents`` install (user scope of each agent).
TARGET_NAMES = ("claude", "codex", "agents")
_STALE_SECONDS = 600.0
_SKIP_NAMES = {"__pycache__", ".DS_Store", MANIFEST_NAME}

Status = Literal["installed", "updated", "unchanged", "replaced", "refused"]


# -- where the bundle is ----------------------------------------------------------------------


@dataclass(frozen=True)
class Bundle:
    """A directory holding ``skills/<name>/SKILL.md`` and the files those skills link."""

    root: Path

    @property
    def skills_dir(self) -> Path:
        return self.root / "skills"

    def skill_names(self) -> list[str]:
        if not self.skills_dir.is_dir():
            return []
        return sorted(
            entry.name
            for entry in self.skills_dir.iterdir()
            if entry.is_dir() and (entry / "SKILL.md").is_file()
        )


def find_bundle() -> Bundle:
    """The skills of this fly-vault: the source checkout's, else the installed data files."""
    searched: list[str] = []
    for candidate in _bundle_candidates():
        searched.append(str(candidate))
        bundle = Bundle(candidate)
        if bundle.skill_names():
            return bundle
    raise VaultError(
        "cannot find the bundled agent skills (looked in " + ", ".join(searched) + ")",
        hint="reinstall fly-vault from a wheel that includes its skills, or run fly-vault "
        "from a source checkout",
    )


def _bundle_candidates() -> Iterator[Path]:
    import flyvault

    checkout = Path(flyvault.__file__).resolve().parent.parent
    yield checkout
    installed = _installed_data_root()
    if installed is not None:
        yield installed
    for prefix in (sysconfig.get_path("data"), sys.prefix):
        yield Path(prefix) / DATA_SUBDIR


def _installed_data_root() -> Path | None:
    """``<prefix>/share/fly-vault`` as recorded in the installed distribution's file list."""
    from importlib import metadata

    try:
        distribution = metadata.distribution("fly-vault")
    except metadata.PackageNotFoundError:
        return None
    for item in distribution.files or ():
        parts = PurePosixPath(str(item)).parts
        for index in range(len(parts) - 2):
            if parts[index : index + 3] == ("share", "fly-vault", "skills"):
                located = Path(str(distribution.locate_file(item)))
                # .../share/fly-vault/skills/<skill>/...: go back up to share/fly-vault.
                return located.parents[len(parts) - index - 3]
    return None


# -- targets ----------------------------------------------------------------------------------


def resolve_target(value: str | None) -> Path:
    """``claude`` / ``codex`` / ``agents`` (default) or a directory."""
    home = Path.home()
    if value is None or value == "agents":
        return home / ".agents" / "skills"
    if value == "claude":
        return home / ".claude" / "skills"
    if value == "codex":
        codex_home = os.environ.get("CODEX_HOME")
        base = Path(codex_home).expanduser() if codex_home else home / ".codex"
        return base / "skills"
    return Path(os.path.abspath(Path(value).expanduser()))


# -- links ------------------------------------------------------------------------------------

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_INLINE_LINK = re.compile(r"(!?\[[^\]\n]*\])\(\s*(<[^>\n]*>|[^)\s]+)((?:\s+\"[^\"\n]*\")?\s*)\)")
_REFERENCE_DEF = re.compile(r"^( {0,3}\[[^\]\n]+\]:[ \t]*)(<[^>\n]*>|\S+)", re.MULTILINE)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass(frozen=True)
class Link:
    """One Markdown link: ``start``/``end`` delimit ``target`` in the text."""

    start: int
    end: int
    target: str
    line: int

    @property
    def is_local(self) -> bool:
        return not (self.target.startswith("#") or _SCHEME.match(self.target) or not self.target)

    def split(self) -> tuple[str, str]:
        """The path and the ``#fragment`` (with its ``#``, or empty)."""
        path, hash_sign, fragment = self.target.partition("#")
        return path, hash_sign + fragment


def _masked(text: str) -> str:
    """``text`` with fenced code blocks and code spans blanked out (offsets kept)."""
    out: list[str] = []
    fence: str | None = None
    for line in text.splitlines(keepends=True):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)[0] * len(match.group(1))
            out.append(_blank(line))
        elif fence is not None:
            if match and match.group(1).startswith(fence) and not line.strip(" \n`~"):
                fence = None
            out.append(_blank(line))
        else:
            out.append(line)
    masked = "".join(out)
    return _CODE_SPAN.sub(lambda m: _blank(m.group(0)), masked)


def _blank(text: str) -> str:
    return "".join(c if c == "\n" else " " for c in text)


def find_links(text: str) -> list[Link]:
    """Inline links and reference definitions outside code, in order."""
    masked = _masked(text)
    links: list[Link] = []
    for match in _INLINE_LINK.finditer(masked):
        start, end = match.span(2)
        links.append(_link(text, start, end))
    for match in _REFERENCE_DEF.finditer(masked):
        start, end = match.span(2)
        links.append(_link(text, start, end))
    return sorted(links, key=lambda link: link.start)


def _link(text: str, start: int, end: int) -> Link:
    target = text[start:end]
    if target.startswith("<") and target.endswith(">"):
        start, end, target = start + 1, end - 1, target[1:-1]
    return Link(start, end, target, text.count("\n", 0, start) + 1)


# -- planning a skill -------------------------------------------------------------------------


@dataclass
class SkillPlan:
    """What a skill's installed directory must contain: relative path -> bytes."""

    name: str
    files: dict[str, bytes] = field(default_factory=dict)
    #: Links that do not resolve in the bundle: (file, line, target); left as they are.
    broken: list[tuple[str, int, str]] = field(default_factory=list)
    #: Other skills this one links to; those links point at the sibling's installed copy.
    siblings: set[str] = field(default_factory=set)

    def digests(self) -> dict[str, str]:
        return {path: _sha256(data) for path, data in sorted(self.files.items())}


def plan_skill(bundle: Bundle, name: str) -> SkillPlan:
    """The skill's files plus every file its Markdown links reach, links rewritten."""
    root = bundle.root.resolve()
    skill_dir = (bundle.skills_dir / name).resolve()
    if not (skill_dir / "SKILL.md").is_file():
        raise UsageError(
            f"unknown skill {name!r}",
            hint="bundled skills: " + ", ".join(bundle.skill_names()),
        )
    destinations: dict[Path, str] = {}
    siblings: dict[Path, str] = {}
    pending: list[Path] = []
    for path in sorted(skill_dir.rglob("*")):
        if path.is_file() and not _skipped(path.relative_to(skill_dir)):
            destinations[path] = path.relative_to(skill_dir).as_posix()
            pending.append(path)
    plan = SkillPlan(name)
    # Follow links breadth-first: every linked file gets a destination before rewriting.
    seen: set[Path] = set()
    while pending:
        source = pending.pop(0)
        if source in seen or source.suffix.lower() != ".md":
            continue
        seen.add(source)
        text = source.read_text(encoding="utf-8")
        for link in find_links(text):
            if not link.is_local:
                continue
            target = _resolve(source, link)
            if target is None or not target.is_file():
                plan.broken.append((_shown(source, root), link.line, link.target))
                continue
            if target in destinations or target in siblings:
                continue
            sibling = _sibling_skill(target, bundle.skills_dir.resolve(), skill_dir)
            if sibling is not None:
                # Another skill: link to its installed copy beside this one; never nest a
                # second SKILL.md inside this skill, where an agent could find it twice.
                siblings[target] = sibling
                plan.siblings.add(PurePosixPath(sibling).parts[1])
                continue
            destinations[target] = _destination_for(target, root, skill_dir)
            pending.append(target)
    used: dict[str, Path] = {}
    for source, destination in destinations.items():
        other = used.setdefault(destination, source)
        if other != source:
            raise VaultError(
                f"skill {name}: {_shown(source, root)} and {_shown(other, root)} would both be "
                f"installed as {destination}",
                hint="rename one of them in the fly-vault source",
            )
    for source, destination in destinations.items():
        data = source.read_bytes()
        if source.suffix.lower() == ".md":
            data = _rewrite_links(source, destination, {**destinations, **siblings}).encode("utf-8")
        plan.files[destination] = data
    return plan


def _skipped(relative: Path) -> bool:
    return any(part in _SKIP_NAMES or part.endswith(".pyc") for part in relative.parts)


def _resolve(source: Path, link: Link) -> Path | None:
    path, _ = link.split()
    if not path:
        return None
    from urllib.parse import unquote

    return (source.parent / unquote(path)).resolve()


def _sibling_skill(target: Path, skills_dir: Path, skill_dir: Path) -> str | None:
    """``../<other>/<path>`` when ``target`` belongs to another bundled skill."""
    if target.is_relative_to(skill_dir) or not target.is_relative_to(skills_dir):
        return None
    relative = target.relative_to(skills_dir)
    if len(relative.parts) < 2:
        return None
    return (PurePosixPath("..") / relative.as_posix()).as_posix()


def _destination_for(target: Path, root: Path, skill_dir: Path) -> str:
    if target.is_relative_to(skill_dir):
        return target.relative_to(skill_dir).as_posix()
    if target.is_relative_to(root):
        relative = target.relative_to(root)
        if relative.parts[0] == "references":
            relative = relative.relative_to("references")
        return (PurePosixPath("references") / relative.as_posix()).as_posix()
    # A link leaving the bundle: keep only the file name.
    return f"references/{target.name}"


def _shown(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def _rewrite_links(source: Path, destination: str, destinations: Mapping[Path, str]) -> str:
    text = source.read_text(encoding="utf-8")
    here = PurePosixPath(destination).parent
    pieces: list[str] = []
    last = 0
    for link in find_links(text):
        if not link.is_local:
            continue
        target = _resolve(source, link)
        if target is None or target not in destinations:
            continue
        _, fragment = link.split()
        new = _relative(PurePosixPath(destinations[target]), here) + fragment
        pieces.append(text[last : link.start])
        pieces.append(new)
        last = link.end
    pieces.append(text[last:])
    return "".join(pieces)


def _relative(target: PurePosixPath, start: PurePosixPath) -> str:
    return Path(os.path.relpath(target.as_posix(), start.as_posix() or ".")).as_posix()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- installing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstallResult:
    name: str
    path: Path
    status: Status
    files: tuple[str, ...] = ()
    detail: str = ""
    warnings: tuple[str, ...] = ()


def install_skills(
    target: Path,
    names: list[str] | None = None,
    *,
    force: bool = False,
    bundle: Bundle | None = None,
) -> list[InstallResult]:
    """Install the named skills (all by default) into ``target``; one result per skill."""
    bundle = bundle if bundle is not None else find_bundle()
    available = bundle.skill_names()
    wanted = list(dict.fromkeys(names)) if names else available
    for name in wanted:
        if name not in available:
            raise UsageError(
                f"unknown skill {name!r}", hint="bundled skills: " + ", ".join(available)
            )
    plans = [plan_skill(bundle, name) for name in wanted]
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        hint = "choose another --target, or fix the permissions"
        codex_home = os.environ.get("CODEX_HOME")
        if codex_home and target == Path(codex_home).expanduser() / "skills":
            hint += "; the codex target comes from CODEX_HOME: correct it, or unset it"
        raise VaultError(
            f"cannot create the skills directory {target}: {exc.strerror or exc}", hint=hint
        ) from None
    results = []
    for plan in plans:
        result = _install_one(plan, target, force)
        warnings = [
            f"{file}:{line}: link {link!r} does not resolve; left as it is"
            for file, line, link in plan.broken
        ]
        warnings += [
            f"it links to skill {sibling}, which is not installed in {target}"
            for sibling in sorted(plan.siblings)
            if sibling not in wanted and not (target / sibling / "SKILL.md").is_file()
        ]
        results.append(dataclasses.replace(result, warnings=tuple(warnings)))
    return results


def _install_one(plan: SkillPlan, target: Path, force: bool) -> InstallResult:
    destination = target / plan.name
    files = tuple(sorted(plan.files))
    _remove_stale(target, plan.name)
    if not destination.exists() and not destination.is_symlink():
        _place(plan, destination, replace=False)
        return InstallResult(plan.name, destination, "installed", files)
    if destination.is_symlink() or not destination.is_dir():
        kind = "a symbolic link" if destination.is_symlink() else "not a directory"
        if not force:
            return InstallResult(
                plan.name, destination, "refused", files, f"{destination} is {kind}"
            )
        _place(plan, destination, replace=True)
        return InstallResult(plan.name, destination, "replaced", files, f"was {kind}")
    current = _read_tree(destination)
    wanted = plan.digests()
    recorded = _read_manifest(destination)
    if current == wanted:
        if recorded != wanted:
            _place(plan, destination, replace=True)  # same content; record it
        return InstallResult(plan.name, destination, "unchanged", files)
    changes = _describe_changes(recorded, current)
    if not changes:  # pristine: exactly what an earlier install wrote
        _place(plan, destination, replace=True)
        return InstallResult(plan.name, destination, "updated", files)
    if not force:
        return InstallResult(plan.name, destination, "refused", files, changes)
    _place(plan, destination, replace=True)
    return InstallResult(plan.name, destination, "replaced", files, changes)


def _describe_changes(recorded: dict[str, str] | None, current: dict[str, str]) -> str:
    """How the installed copy differs from what fly-vault wrote ('' when it does not)."""
    if recorded is None:
        return "it was not installed by fly-vault skills install (no manifest)"
    modified = sorted(p for p in current if p in recorded and current[p] != recorded[p])
    added = sorted(p for p in current if p not in recorded)
    removed = sorted(p for p in recorded if p not in current)
    parts = []
    for label, paths in (("modified", modified), ("added", added), ("removed", removed)):
        if paths:
            shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
            parts.append(f"{label} {shown}")
    return "; ".join(parts)


def _read_tree(directory: Path) -> dict[str, str]:
    digests: dict[str, str] = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if relative.as_posix() == MANIFEST_NAME:
            continue
        if path.is_file() or path.is_symlink():
            try:
                digests[relative.as_posix()] = _sha256(path.read_bytes())
            except OSError:
                digests[relative.as_posix()] = "unreadable"
    return digests


def _read_manifest(directory: Path) -> dict[str, str] | None:
    try:
        document = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = document.get("files") if isinstance(document, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in files.items()
    ):
        return None
    return dict(files)


def _manifest(plan: SkillPlan) -> bytes:
    from flyvault import __version__

    document = {
        "skill": plan.name,
        "installed_by": f"fly-vault {__version__}",
        "installed_at": int(time.time()),
        "files": plan.digests(),
    }
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _place(plan: SkillPlan, destination: Path, *, replace: bool) -> None:
    """Write the skill to a temporary sibling and rename it into place."""
    target = destination.parent
    staging = target / f".{plan.name}.tmp-{secrets.token_hex(4)}"
    try:
        staging.mkdir()
        for relative, data in plan.files.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        (staging / MANIFEST_NAME).write_bytes(_manifest(plan))
        if not replace:
            staging.rename(destination)
        elif destination.is_symlink() or not destination.is_dir():
            destination.unlink()
            staging.rename(destination)
        elif _exchange(staging, destination):
            shutil.rmtree(staging, ignore_errors=True)  # now holds the old copy
        else:
            aside = target / f".{plan.name}.old-{secrets.token_hex(4)}"
            destination.rename(aside)
            try:
                staging.rename(destination)
            except OSError:
                aside.rename(destination)
                raise
            shutil.rmtree(aside, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise VaultError(
            f"cannot install skill {plan.name} into {destination}: {exc.strerror or exc}",
            hint="check that the target directory is writable",
        ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _exchange(first: Path, second: Path) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    renameat2.restype = ctypes.c_int
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange)
    return bool(result == 0)


def _remove_stale(target: Path, name: str) -> None:
    """Temporary directories an interrupted install left behind (older than 10 minutes)."""
    now = time.time()
    with contextlib.suppress(OSError):
        for entry in target.iterdir():
            if entry.name.startswith((f".{name}.tmp-", f".{name}.old-")) and entry.is_dir():
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime > _STALE_SECONDS:
                        shutil.rmtree(entry, ignore_errors=True)


# -- CLI --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from flyvault.cli.output import report_error

    if getattr(args, "skills_command", None) != "install":
        raise UsageError("usage: fly-vault skills install [--target DIR|claude|codex|agents]")
    target = resolve_target(args.target)
    bundle = find_bundle()
    results = install_skills(target, args.skill or None, force=args.force, bundle=bundle)
    verbose = bool(getattr(args, "verbose", False))
    refused = 0
    for result in results:
        count = f"{len(result.files)} files"
        if result.status == "installed":
            print(f"installed {result.name} -> {result.path} ({count})")
        elif result.status == "updated":
            print(f"updated {result.name} -> {result.path} ({count})")
        elif result.status == "replaced":
            print(f"replaced {result.name} -> {result.path} ({count}; discarded: {result.detail})")
        elif result.status == "unchanged":
            print(f"unchanged {result.name}: {result.path} is up to date")
        else:
            refused += 1
            report_error(
                VaultError(
                    f"not replacing {result.path}: {result.detail}",
                    hint="re-run with --force to replace it (local changes are lost), or move "
                    "it away first",
                )
            )
        for warning in result.warnings:
            print(f"fly-vault: warning: skill {result.name}: {warning}", file=sys.stderr)
        if verbose and result.status != "refused":
            for relative in result.files:
                print(f"  {relative}")
    if refused:
        return 1
    print(f"skills are in {target}; start a new agent session to load them")
    return 0
