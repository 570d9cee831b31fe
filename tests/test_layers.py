"""The layers hold: every import in the five packages follows references/architecture.md.

The table of layers and the list of known exceptions are read from that page, so the page
and this test cannot drift apart. Every import counts: at module level, inside functions
(lazy imports), under ``TYPE_CHECKING``, relative ones, and module names handed to
``importlib.import_module``, ``__import__`` or the CLIs' ``_lazy``.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "references" / "architecture.md"
#: Source folder -> the import name it is installed under (one namespace, item 4 of issue 13).
PACKAGES = {
    "flyvault": "flyvault",
    "server": "flyvault.server",
    "proxy": "flyvault.proxy",
    "admin": "flyvault.admin",
    "mcp_server": "flyvault.mcp_server",
}
#: Top-level names the wheel no longer installs: importing one is always a mistake.
RETIRED_TOPS = frozenset(folder for folder in PACKAGES if folder != "flyvault")
#: Calls whose first argument, a string, names a module that gets imported.
IMPORTING_CALLS = {"import_module", "__import__", "_lazy"}


@dataclass(frozen=True)
class Layer:
    name: str
    modules: tuple[str, ...]
    may_import: frozenset[str]
    stdlib_only: bool
    stdlib_forbidden: frozenset[str]


@dataclass(frozen=True)
class Rules:
    layers: dict[str, Layer]
    #: (importing module, imported module) -> what removes it.
    exceptions: dict[tuple[str, str], str]

    def layer_of(self, module: str) -> Layer | None:
        best: tuple[int, Layer] | None = None
        for layer in self.layers.values():
            for prefix in layer.modules:
                if (module == prefix or module.startswith(prefix + ".")) and (
                    best is None or len(prefix) > best[0]
                ):
                    best = (len(prefix), layer)
        return best[1] if best else None


def _table(text: str, header: tuple[str, ...]) -> list[list[str]]:
    """The rows of the markdown table whose header row is ``header``."""
    lines = text.splitlines()
    wanted = [cell.lower() for cell in header]
    for at, line in enumerate(lines):
        cells = [cell.strip().lower() for cell in line.strip().strip("|").split("|")]
        if cells == wanted:
            rows = []
            for row in lines[at + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append([cell.strip() for cell in row.strip().strip("|").split("|")])
            return rows
    raise AssertionError(f"{PAGE.name} has no table with the header {' | '.join(header)}")


def _names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def load_rules(text: str) -> Rules:
    layers = {}
    for name, modules, may, outside in _table(
        text, ("layer", "modules", "may import", "outside the project")
    ):
        stdlib_only = outside.startswith("the standard library")
        forbidden = frozenset(_names(outside.partition("except")[2])) if stdlib_only else set()
        layers[name] = Layer(
            name=name,
            modules=tuple(_names(modules)),
            may_import=frozenset(part.strip() for part in may.split(",") if part.strip()),
            stdlib_only=stdlib_only,
            stdlib_forbidden=frozenset(forbidden),
        )
    exceptions = {}
    for importer, imported, why in _table(text, ("importer", "imported", "removed by")):
        (source,), (target,) = _names(importer), _names(imported)
        exceptions[source, target] = why
    return Rules(layers, exceptions)


def module_sources() -> dict[str, tuple[Path, bool]]:
    """Every module of the five packages: name -> (path, is a package)."""
    found = {}
    for folder, name in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT / folder)
            if any((ROOT / folder / parent).is_symlink() for parent in relative.parents):
                continue  # flyvault/server -> ../server: counted once, under its folder
            parts = [*name.split("."), *relative.with_suffix("").parts]
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            found[".".join(parts)] = (path, is_package)
    return found


def imports_of(
    module: str, is_package: bool, tree: ast.AST, known: set[str]
) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import in ``tree``, wherever it sits."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{node.module}" if node.module else package
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                # ``from flyvault import localvault`` imports a module; ``from x import name``
                # imports x.
                yield (candidate if candidate in known else base), node.lineno
        elif isinstance(node, ast.Call) and node.args:
            function = node.func
            called = function.id if isinstance(function, ast.Name) else None
            if isinstance(function, ast.Attribute):
                called = function.attr
            first = node.args[0]
            if (
                called in IMPORTING_CALLS
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                yield first.value, node.lineno


@dataclass(frozen=True)
class Finding:
    importer: str
    imported: str
    line: int
    why: str

    def __str__(self) -> str:
        return f"{self.importer}:{self.line} imports {self.imported}: {self.why}"


def check(
    rules: Rules, sources: dict[str, tuple[str, bool]]
) -> tuple[list[Finding], set[tuple[str, str]]]:
    """Arrows against the rules, and the exceptions that were used."""
    known = set(sources)
    findings = []
    used: set[tuple[str, str]] = set()
    for module, (source, is_package) in sorted(sources.items()):
        layer = rules.layer_of(module)
        if layer is None:
            findings.append(Finding(module, "-", 0, "the module belongs to no layer"))
            continue
        tree = ast.parse(source)
        for imported, line in sorted(set(imports_of(module, is_package, tree, known))):
            top = imported.partition(".")[0]
            if top in RETIRED_TOPS:
                findings.append(
                    Finding(module, imported, line, f"{top} is installed as flyvault.{top}")
                )
                continue
            if top != "flyvault":
                if layer.stdlib_only and (
                    top not in sys.stdlib_module_names and top != "__future__"
                ):
                    findings.append(
                        Finding(module, imported, line, f"{layer.name} uses the stdlib only")
                    )
                elif top in layer.stdlib_forbidden:
                    findings.append(
                        Finding(module, imported, line, f"{layer.name} never imports {top}")
                    )
                continue
            target = rules.layer_of(imported)
            if target is None:
                findings.append(Finding(module, imported, line, "the target is in no layer"))
            elif target is layer or target.name in layer.may_import:
                continue
            elif (module, imported) in rules.exceptions:
                used.add((module, imported))
            else:
                findings.append(
                    Finding(
                        module,
                        imported,
                        line,
                        f"{layer.name} may not import {target.name} "
                        f"(may import: {', '.join(sorted(layer.may_import)) or 'nothing'})",
                    )
                )
    return findings, used


@pytest.fixture(scope="module")
def rules() -> Rules:
    return load_rules(PAGE.read_text())


def test_every_import_follows_the_layers(rules: Rules) -> None:
    sources = {
        name: (path.read_text(), is_package)
        for name, (path, is_package) in module_sources().items()
    }
    findings, used = check(rules, sources)
    assert not findings, "arrows against references/architecture.md:\n" + "\n".join(
        map(str, findings)
    )
    stale = sorted(set(rules.exceptions) - used)
    assert not stale, (
        "known exceptions in references/architecture.md that no longer happen "
        f"(remove their rows): {stale}"
    )


def test_the_table_is_well_formed(rules: Rules) -> None:
    modules = module_sources()
    assert {"protocol", "transport", "client", "cli", "server", "proxy", "admin"} <= set(
        rules.layers
    )
    for layer in rules.layers.values():
        assert layer.modules, f"layer {layer.name} lists no modules"
        for name in layer.modules:
            assert name in modules, f"layer {layer.name}: no module {name}"
        unknown = layer.may_import - set(rules.layers)
        assert not unknown, f"layer {layer.name} may import unknown layers {unknown}"

    # The arrows go one way: no layer reaches itself through others.
    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for step in rules.layers[start].may_import:
            if step == goal or (step not in seen and reaches(step, goal, seen | {step})):
                return True
        return False

    cycles = [name for name in rules.layers if reaches(name, name, set())]
    assert not cycles, f"layers that import themselves through others: {cycles}"
    for importer, _ in rules.exceptions:
        assert importer in modules, f"exception for a module that does not exist: {importer}"


def test_the_checker_sees_lazy_relative_and_string_imports(rules: Rules) -> None:
    """What the real tree must never do, in miniature: each kind of import is caught."""
    sources = {
        "flyvault.client.fake": (
            "def later():\n    import server.app\n",
            False,
        ),
        "flyvault.localvault": ("from flyvault.server.auth import AccessToken\n", False),
        "flyvault.proxy.fake": ("from flyvault.admin import commands\n", False),
        "flyvault.proxy.old": ("from ..admin import commands\n", False),
        "flyvault.protocol.fake": ("import asyncio\nimport aioquic\nfrom . import codec\n", False),
        "flyvault.cli.fake": (
            "import importlib\nimportlib.import_module('flyvault.mcp_server.server')\n"
            "_lazy('flyvault.cli.local', 'run')\n",
            False,
        ),
        "flyvault.admin.fake": (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from flyvault.proxy.wire import Drop\n",
            False,
        ),
        "flyvault.admin.commands": ("", False),
        "flyvault.protocol.codec": ("", False),
    }
    findings, _ = check(rules, sources)
    caught = {(f.importer, f.imported) for f in findings}
    assert caught == {
        ("flyvault.client.fake", "server.app"),
        ("flyvault.localvault", "flyvault.server.auth"),
        ("flyvault.proxy.fake", "flyvault.admin.commands"),
        ("flyvault.proxy.old", "flyvault.admin.commands"),
        ("flyvault.protocol.fake", "asyncio"),
        ("flyvault.protocol.fake", "aioquic"),
        ("flyvault.cli.fake", "flyvault.mcp_server.server"),
        ("flyvault.admin.fake", "flyvault.proxy.wire"),
    }, findings
