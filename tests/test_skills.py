"""The agent skills and the references: format, links, command lines, error coverage, install.

- Every ``skills/<name>/SKILL.md`` follows the Agent Skills format (front matter ``name`` equal
  to the folder, a ``description`` of at most 1024 characters, a body under ~5,000 tokens) and
  has an ``agents/openai.yaml``.
- Every relative link in ``skills/`` and ``references/`` resolves, anchors included.
- Every ``fly-vault ...`` / ``fly-vault-admin ...`` command line shown in a code block or a code
  span parses with the real argparse parsers (placeholders such as VAULT are plain strings).
- Every MCP tool a skill names in a "tool" column exists on the MCP server.
- Every error message the code can raise (flyvault/, server/, admin/) appears in
  ``references/troubleshooting.md``.
- ``fly-vault skills install`` into temporary targets: idempotent, refuses to clobber changes
  without ``--force``, atomic, and the links of the installed copy still resolve.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import functools
import io
import json
import re
import shlex
import shutil
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flyvault.cli import skills as skills_cli
from flyvault.cli.skills import MANIFEST_NAME, Bundle, find_links, install_skills

ROOT = Path(__file__).resolve().parent.parent
SKILLS = ROOT / "skills"
REFERENCES = ROOT / "references"
SKILL_NAMES = sorted(p.name for p in SKILLS.iterdir() if (p / "SKILL.md").is_file())
MARKDOWN = sorted([*SKILLS.rglob("*.md"), *REFERENCES.glob("*.md")])
BODY_LIMIT = 20_000  # characters, about 5,000 tokens
OPTIONAL_KEYS = {"license", "compatibility", "metadata", "allowed-tools"}


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


# -- a small YAML subset: what SKILL.md front matter and openai.yaml use ------------------------

_PLAIN_FORBIDDEN = re.compile(r": |\s#|^[-?:,\[\]{}#&*!|>'\"%@`]")


def _scalar(raw: str, where: str) -> str | bool:
    value = raw.strip()
    if value.startswith('"'):
        assert value.endswith('"') and len(value) >= 2, f"{where}: unterminated string"
        result = json.loads(value)  # YAML double-quoted strings without YAML-only escapes
        assert isinstance(result, str)
        return result
    if value.startswith("'"):
        assert value.endswith("'") and len(value) >= 2, f"{where}: unterminated string"
        return value[1:-1].replace("''", "'")
    if value in ("true", "false"):
        return value == "true"
    assert not _PLAIN_FORBIDDEN.search(value), (
        f"{where}: plain YAML scalar {value[:60]!r}... contains ': ', ' #' or starts with an "
        "indicator; quote it"
    )
    return value


def parse_yaml_mapping(text: str, where: str) -> dict[str, object]:
    """Nested block mappings of scalars (two-space indents); anything else fails loudly."""
    root: dict[str, object] = {}
    stack: list[tuple[int, dict[str, object]]] = [(-1, root)]
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip(" "))
        key, sep, value = line.strip().partition(":")
        assert sep and re.fullmatch(r"[A-Za-z0-9_-]+", key), f"{where}:{number}: not key: value"
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        assert key not in parent, f"{where}:{number}: duplicate key {key}"
        if value.strip():
            parent[key] = _scalar(value, f"{where}:{number}")
        else:
            child: dict[str, object] = {}
            parent[key] = child
            stack.append((indent, child))
    return root


def front_matter(path: Path) -> tuple[dict[str, object], str]:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n"), f"{rel(path)}: must start with YAML front matter"
    end = text.index("\n---\n", 4)
    return parse_yaml_mapping(text[4:end], rel(path)), text[end + 5 :]


# -- the skills' format -----------------------------------------------------------------------


def test_there_are_skills() -> None:
    assert {"remote-vm", "remote-task", "vault-admin"} <= set(SKILL_NAMES)


@pytest.mark.parametrize("name", SKILL_NAMES)
def test_front_matter(name: str) -> None:
    meta, body = front_matter(SKILLS / name / "SKILL.md")
    assert meta.get("name") == name, "name must equal the folder"
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name) and len(name) <= 64
    description = meta.get("description")
    assert isinstance(description, str) and description.strip()
    assert len(description) <= 1024, f"description is {len(description)} characters"
    assert "Use when" in description, "say when to use the skill"
    assert set(meta) - {"name", "description"} <= OPTIONAL_KEYS
    assert len(body) < BODY_LIMIT, f"body is {len(body)} characters (~{len(body) // 4} tokens)"
    assert body.count("\n") < 500
    assert re.search(r"^# ", body, re.MULTILINE), "the body starts with a title"


@pytest.mark.parametrize("name", SKILL_NAMES)
def test_openai_yaml(name: str) -> None:
    path = SKILLS / name / "agents" / "openai.yaml"
    data = parse_yaml_mapping(path.read_text(encoding="utf-8"), rel(path))
    interface = data["interface"]
    assert isinstance(interface, dict)
    assert isinstance(interface.get("display_name"), str) and interface["display_name"]
    short = interface.get("short_description")
    assert isinstance(short, str) and 25 <= len(short) <= 64, short
    prompt = interface.get("default_prompt")
    assert isinstance(prompt, str) and f"${name}" in prompt
    policy = data.get("policy", {})
    assert isinstance(policy, dict)
    implicit = policy.get("allow_implicit_invocation", True)
    assert isinstance(implicit, bool)
    if name == "vault-admin":
        assert implicit is False, "destructive tenant operations only on explicit request"


# -- links ------------------------------------------------------------------------------------


def github_slug(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # link text only
    text = text.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    masked = skills_cli._masked(text)
    found: set[str] = set()
    counts: dict[str, int] = {}
    for match in re.finditer(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", masked, re.MULTILINE):
        slug = github_slug(text[match.start(1) : match.end(1)])
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    found |= set(re.findall(r"<a (?:name|id)=\"([^\"]+)\"", text))
    return found


def broken_links(files: list[Path]) -> list[str]:
    problems = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        for link in find_links(text):
            if not link.is_local:
                if link.target.startswith("#") and link.target[1:] not in anchors(path):
                    problems.append(f"{path}:{link.line}: no heading for {link.target}")
                continue
            target_path, fragment = link.split()
            target = (path.parent / target_path).resolve()
            if not target.exists():
                problems.append(f"{path}:{link.line}: {link.target} does not exist")
            elif fragment and target.suffix == ".md" and fragment[1:] not in anchors(target):
                problems.append(f"{path}:{link.line}: no heading for {link.target}")
    return problems


def test_every_relative_link_resolves() -> None:
    assert broken_links(MARKDOWN) == []


def test_skills_link_their_references() -> None:
    body = (SKILLS / "remote-vm" / "SKILL.md").read_text(encoding="utf-8")
    assert "../../references/troubleshooting.md" in body
    assert "## Troubleshooting" in body


# -- command lines ----------------------------------------------------------------------------

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
_CODE_SPAN = re.compile(r"(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)
_PLACEHOLDER = re.compile(r"<([A-Za-z][\w .|/-]*)>")
#: Synopsis lines (``fly-vault [--log-file PATH] COMMAND ...``) describe, they do not run.
_SYNOPSIS = re.compile(r"\[-|\s\[[A-Z]|\.\.\.|\w\|\w|\s\(|\s[A-Z]+\|")
_OPERATORS = {"|", "||", "&", "&&", ";", ";;", "(", ")", "|&"}
_WRAPPERS = {"timeout", "gtimeout", "nohup", "env", "command", "exec", "time", "sudo"}
PROGRAMS = ("fly-vault", "fly-vault-admin")


@dataclass(frozen=True)
class CommandLine:
    where: str
    text: str
    argv: tuple[str, ...]
    #: From a code span in prose: may name a command without its arguments.
    mention: bool = False


def code_snippets(path: Path) -> Iterator[tuple[int, str, bool]]:
    """(line, text, inline) of every fenced block's lines and every inline code span."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    fence: str | None = None
    block: list[str] = []
    start = 0
    prose: list[tuple[int, str]] = []
    for number, line in enumerate(lines, 1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence, block, start = match.group(1), [], number + 1
        elif fence is not None:
            if match and match.group(1).startswith(fence[0]) and not match.group(2).strip():
                for number, snippet in _logical_lines(block, start):
                    yield number, snippet, False
                fence = None
            else:
                block.append(line)
        else:
            prose.append((number, line))
    for number, line in prose:
        for span in _CODE_SPAN.finditer(line):
            yield number, span.group(2).strip(), True


def _logical_lines(block: list[str], first: int) -> Iterator[tuple[int, str]]:
    """Join backslash continuations and lines inside open quotes."""
    pending: list[str] = []
    start = first
    for offset, line in enumerate(block):
        if not pending:
            start = first + offset
        if line.rstrip().endswith("\\"):
            pending.append(line.rstrip()[:-1] + " ")
            continue
        pending.append(line)
        joined = "".join(p if p.endswith(" ") else p + "\n" for p in pending).rstrip("\n")
        try:
            shlex.split(joined, comments=False)
        except ValueError:  # an open quote: the command goes on
            continue
        yield start, joined
        pending = []
    if pending:
        yield start, "".join(pending)


def _segments(tokens: list[str]) -> Iterator[list[str]]:
    current: list[str] = []
    for token in tokens:
        if token in _OPERATORS:
            yield current
            current = []
        else:
            current.append(token)
    yield current


def _strip_redirections(tokens: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for token in tokens:
        if skip:
            skip = False
            continue
        if token and set(token) <= set("<>&") and any(c in token for c in "<>"):
            if out and out[-1].isdigit():
                out.pop()  # the fd of 2>&1
            skip = True
            continue
        out.append(token)
    return out


def _unwrap(tokens: list[str]) -> list[str]:
    """Drop leading NAME=value assignments and wrappers such as ``timeout -s INT 20``."""
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", token):
            index += 1
        elif token in _WRAPPERS:
            index += 1
            while index < len(tokens) and tokens[index].startswith("-"):
                takes_value = tokens[index] in ("-s", "-k", "--signal", "--kill-after", "-u")
                index += 2 if takes_value else 1
            if token in ("timeout", "gtimeout") and index < len(tokens):
                index += 1  # the duration
        else:
            break
    return tokens[index:]


def command_lines(path: Path) -> Iterator[CommandLine]:
    for number, snippet, inline in code_snippets(path):
        if not any(program in snippet for program in PROGRAMS):
            continue
        if inline and (", " in snippet or ": " in snippet):
            continue  # a quoted message or prose, not a command line
        stripped = snippet.strip()
        stripped = stripped[2:] if stripped.startswith("$ ") else stripped
        if stripped.startswith("#") or _SYNOPSIS.search(stripped):
            continue
        text = _PLACEHOLDER.sub(lambda m: m.group(1).upper().replace(" ", "_"), stripped)
        try:
            lexer = shlex.shlex(text, posix=True, punctuation_chars="|&;()<>")
            lexer.whitespace_split = True
            lexer.commenters = "#"
            tokens = list(lexer)
        except ValueError:
            continue
        for segment in _segments(_strip_redirections(tokens)):
            argv = _unwrap(segment)
            if len(argv) < 2 or Path(argv[0]).name not in PROGRAMS:
                continue  # not a command, or just the program's name
            if re.fullmatch(r"[A-Z][A-Z_]*", argv[1]):
                continue  # `fly-vault COMMAND --help`: a placeholder for any command
            yield CommandLine(f"{rel(path)}:{number}", stripped, tuple(argv), inline)


def _parse(parser: argparse.ArgumentParser, arguments: list[str]) -> tuple[int, str]:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(arguments)
        except SystemExit as exc:
            return int(exc.code or 0), stderr.getvalue()
    return -1, ""


def check_command(command: CommandLine) -> str | None:
    """None when the line parses like the real CLI would parse it; else why not."""
    program, arguments = Path(command.argv[0]).name, list(command.argv[1:])
    if program == "fly-vault":
        from flyvault.cli.main import build_parser

        remote: list[str] | None = None
        if "--" in arguments:
            split = arguments.index("--")
            arguments, remote = arguments[:split], arguments[split + 1 :]
        parser = build_parser()
    else:
        from flyvault.admin.main import build_parser as build_admin_parser

        parser = build_admin_parser()
        remote = None
    code, stderr = _parse(parser, arguments)
    if code == 0:
        return None  # --help or --version
    if code != -1:
        incomplete = "arguments are required" in stderr or "expected one argument" in stderr
        if command.mention and incomplete:
            return None  # prose naming `fly-vault forward` or `--forward`, not a runnable line
        return stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {code}"
    args = parser.parse_args(arguments)
    if getattr(args, "version", False):
        return None
    if args.command is None:
        return "no command"
    if command.mention and program == "fly-vault-admin" and args.action is None:
        return None  # `fly-vault-admin tenant`: naming the command group
    if program == "fly-vault":
        if remote is not None and not hasattr(args, "argv"):
            return "'--' is only used by exec, before the remote command"
        if args.command == "exec" and not (args.argv or remote) and not args.session:
            return "exec requires a command unless --session is given"
    elif getattr(args, "action", None) is None:
        return "no tenant action"
    return None


ALL_COMMANDS = [command for path in MARKDOWN for command in command_lines(path)]


def test_command_lines_were_found() -> None:
    found = {command.where.split(":")[0] for command in ALL_COMMANDS}
    for name in SKILL_NAMES:
        assert f"skills/{name}/SKILL.md" in found
    programs = {Path(command.argv[0]).name for command in ALL_COMMANDS}
    assert programs == set(PROGRAMS)
    subcommands = {command.argv[1] for command in ALL_COMMANDS if len(command.argv) > 1}
    assert {"exec", "list-exec", "kill", "doctor", "forward", "reprovision", "local"} <= subcommands


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: f"{c.where} {' '.join(c.argv)}")
def test_command_line_parses(command: CommandLine) -> None:
    problem = check_command(command)
    assert problem is None, f"{command.where}: {command.text!r}: {problem}"


@pytest.mark.parametrize(
    "line",
    [
        "fly-vault exec VAULT --bogus -- true",
        "fly-vault list-exec",
        "fly-vault kill VAULT",
        "fly-vault doctor VAULT -- uname",
        "fly-vault exec VAULT",
        "fly-vault-admin tenant create acme",
        "fly-vault-admin tenant",
        "fly-vault skills install --target",
    ],
)
def test_the_command_checker_rejects_bad_lines(line: str) -> None:
    argv = tuple(shlex.split(line))
    assert check_command(CommandLine("test", line, argv)) is not None


def test_the_command_extractor_handles_shell_syntax(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Run `fly-vault exec <vault> --session ID` or `fly-vault exec VAULT -- COMMAND [ARGS...]`.\n"
        "\n```bash\n"
        "timeout -s INT 20 fly-vault exec VAULT --session a -- sh -c 'x | y' </dev/null\n"
        "FLY_APP=x fly-vault-admin tenant list \\\n  --json | jq .\n"
        "fly-vault forward VAULT 8080:localhost:80 >/tmp/f.log 2>&1 &\n"
        "fly-vault: error: not a command\n"
        "```\n",
        encoding="utf-8",
    )
    found = [command.argv for command in command_lines(page)]
    assert found == [
        ("fly-vault", "exec", "VAULT", "--session", "a", "--", "sh", "-c", "x | y"),
        ("fly-vault-admin", "tenant", "list", "--json"),
        ("fly-vault", "forward", "VAULT", "8080:localhost:80"),
        ("fly-vault", "exec", "VAULT", "--session", "ID"),
    ]


# -- MCP tools named by the skills ------------------------------------------------------------


def skill_tool_names() -> dict[str, set[str]]:
    """Backticked names in table columns whose header mentions "tool", per skill."""
    names: dict[str, set[str]] = {}
    for name in SKILL_NAMES:
        lines = (SKILLS / name / "SKILL.md").read_text(encoding="utf-8").splitlines()
        column: int | None = None
        for line in lines:
            if not line.startswith("|"):
                column = None
                continue
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if column is None:
                column = next((i for i, c in enumerate(cells) if "tool" in c.lower()), -1)
                continue
            if column < 0 or column >= len(cells) or set(cells[0]) <= set("-: "):
                continue
            names.setdefault(name, set()).update(re.findall(r"`([^`]+)`", cells[column]))
    return names


def test_skills_name_only_real_mcp_tools() -> None:
    mentioned = skill_tool_names()
    assert {"remote-vm", "remote-task", "vault-admin"} <= set(mentioned)
    try:
        from flyvault.mcp_server.server import build_server

        tools = {tool.name for tool in asyncio.run(build_server(tenant_tool=True).list_tools())}
    except Exception as exc:  # the MCP server is optional for this check
        pytest.skip(f"the MCP server cannot be built here: {exc}")
    unknown = {skill: sorted(names - tools) for skill, names in mentioned.items() if names - tools}
    assert unknown == {}


# -- every error message is in troubleshooting.md -----------------------------------------------

MESSAGE_SCOPES = ("flyvault", "server", "admin", "mcp_server", "proxy")
MESSAGE_EXCLUDED = ("flyvault/standins",)
#: Functions whose first string argument is a message a user can see.
MESSAGE_HELPERS = {"_err", "_fail", "send_error", "_refuse", "refuse", "warn"}
#: Messages that never reach a user (caught and handled internally).
INTERNAL_CLASSES = {"_CorruptCache", "StreamReset", "MachineFailed"}
MIN_FRAGMENT = 8


@dataclass(frozen=True)
class Message:
    where: str
    kind: str
    template: str  # "\0" marks a value filled in at run time

    def fragments(self) -> list[str]:
        parts = (normalize(part) for part in self.template.split("\0"))
        return [part for part in parts if len(part) >= MIN_FRAGMENT]


def normalize(text: str) -> str:
    return " ".join(text.replace("`", "").replace("\\|", "|").split())


def _source_files() -> Iterator[tuple[Path, str]]:
    for scope in MESSAGE_SCOPES:
        for path in sorted((ROOT / scope).rglob("*.py")):
            name = rel(path)
            if not name.startswith(MESSAGE_EXCLUDED):
                yield path, name


def _error_classes(trees: list[ast.Module]) -> set[str]:
    names = {"VaultError"}
    changed = True
    while changed:
        changed = False
        for tree in trees:
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef) and node.name not in names:
                    bases = {
                        b.id if isinstance(b, ast.Name) else getattr(b, "attr", "")
                        for b in node.bases
                    }
                    if bases & names:
                        names.add(node.name)
                        changed = True
    return names - INTERNAL_CLASSES


def _template(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(
            v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else "\0"
            for v in node.values
        )
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _template(node.left), _template(node.right)
        if left is None and right is None:
            return None
        return (left or "\0") + (right or "\0")
    if isinstance(node, ast.IfExp):
        return f"{_template(node.body) or ''}\0{_template(node.orelse) or ''}"
    return None


@functools.cache
def collect_messages() -> tuple[Message, ...]:
    sources = [
        (path, name, ast.parse(path.read_text(encoding="utf-8"))) for path, name in _source_files()
    ]
    classes = _error_classes([tree for _, _, tree in sources])
    messages: list[Message] = []
    for _, name, tree in sources:
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            owner = func.value if isinstance(func, ast.Attribute) else None
            if called in classes or called in MESSAGE_HELPERS:
                kind = called
            elif called == "ValueError" and name in (
                "flyvault/config.py",
                "flyvault/config_values.py",
            ):
                kind = "ValueError"  # validator messages become ConfigError lines
            elif called == "append" and isinstance(owner, ast.Name) and owner.id == "problems":
                kind = "problem"
            elif called == "error" and isinstance(owner, ast.Name) and owner.id == "parser":
                kind = "parser.error"
            elif called in ("notice", "_notice") and owner is not None:
                kind = "notice"
            else:
                continue
            for argument in node.args:
                template = _template(argument)
                if template is not None:
                    messages.append(Message(f"{name}:{node.lineno}", str(kind), template))
                    break
    return tuple(messages)


def test_the_message_collector_finds_known_messages() -> None:
    templates = {normalize(m.template.replace("\0", "<>")) for m in collect_messages()}
    for expected in (
        "access_token is required",
        "setup failed: access token verification failed",
        "exec session <> not found",
        "attestation org mismatch: issuer=<> expected=<>",
        "refusing delete without --yes",
    ):
        assert expected in templates


def test_every_error_message_is_in_troubleshooting() -> None:
    page = normalize((REFERENCES / "troubleshooting.md").read_text(encoding="utf-8"))
    missing = [
        f"{message.where} ({message.kind}): {message.template.replace(chr(0), '<...>')!r}"
        for message in collect_messages()
        if any(fragment not in page for fragment in message.fragments())
    ]
    assert missing == [], "add these to references/troubleshooting.md:\n" + "\n".join(missing)


# -- skills install ---------------------------------------------------------------------------


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from flyvault.cli.main import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def installed_files(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_install_into_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "agent" / "skills"
    code, out, _ = run_cli(["skills", "install", "--target", str(target)], capsys)
    assert code == 0
    for name in SKILL_NAMES:
        assert f"installed {name} -> {target / name}" in out
        installed = target / name
        assert (installed / "SKILL.md").is_file()
        assert (installed / "agents" / "openai.yaml").is_file()
        manifest = json.loads((installed / MANIFEST_NAME).read_text(encoding="utf-8"))
        recorded = set(manifest["files"])
        assert recorded == set(installed_files(installed)) - {MANIFEST_NAME}
        meta, _ = front_matter(installed / "SKILL.md")
        assert meta["name"] == name
    assert [p.name for p in target.iterdir() if p.name.startswith(".")] == []
    vm = (target / "remote-vm" / "SKILL.md").read_text(encoding="utf-8")
    assert "](references/troubleshooting.md)" in vm
    assert "../../references/" not in vm
    assert (target / "remote-vm" / "references" / "troubleshooting.md").is_file()


def test_installed_links_resolve(tmp_path: Path) -> None:
    install_skills(tmp_path, bundle=Bundle(ROOT))
    files = sorted(tmp_path.rglob("*.md"))
    assert files
    assert broken_links(files) == []
    # Every linked reference came along: nothing points outside the target.
    for path in files:
        for link in find_links(path.read_text(encoding="utf-8")):
            if link.is_local:
                target = (path.parent / link.split()[0]).resolve()
                assert target.is_relative_to(tmp_path.resolve()), f"{path}: {link.target}"


def test_install_is_idempotent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["skills", "install", "--target", str(tmp_path)], capsys)[0] == 0
    before = {name: installed_files(tmp_path / name) for name in SKILL_NAMES}
    code, out, _ = run_cli(["skills", "install", "--target", str(tmp_path)], capsys)
    assert code == 0
    for name in SKILL_NAMES:
        assert f"unchanged {name}: {tmp_path / name} is up to date" in out
        assert installed_files(tmp_path / name) == before[name]


def test_refuses_to_clobber_a_modified_skill(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(["skills", "install", "--target", str(tmp_path)], capsys)[0] == 0
    skill = tmp_path / "remote-vm" / "SKILL.md"
    skill.write_text(skill.read_text(encoding="utf-8") + "\nmy own notes\n", encoding="utf-8")
    code, out, err = run_cli(["skills", "install", "--target", str(tmp_path)], capsys)
    assert code == 1
    assert f"fly-vault: error: not replacing {tmp_path / 'remote-vm'}: modified SKILL.md" in err
    assert "--force" in err
    assert "unchanged remote-task" in out  # the others are still handled
    assert skill.read_text(encoding="utf-8").endswith("my own notes\n")

    code, out, _ = run_cli(["skills", "install", "--target", str(tmp_path), "--force"], capsys)
    assert code == 0
    assert "replaced remote-vm" in out and "modified SKILL.md" in out
    assert "my own notes" not in skill.read_text(encoding="utf-8")


def test_refuses_added_files_and_foreign_directories(tmp_path: Path) -> None:
    bundle = Bundle(ROOT)
    install_skills(tmp_path, ["remote-task"], bundle=bundle)
    (tmp_path / "remote-task" / "notes.md").write_text("mine\n", encoding="utf-8")
    (result,) = install_skills(tmp_path, ["remote-task"], bundle=bundle)
    assert result.status == "refused" and "added notes.md" in result.detail
    foreign = tmp_path / "vault-admin"
    foreign.mkdir()
    (foreign / "SKILL.md").write_text("---\nname: vault-admin\n---\nmine\n", encoding="utf-8")
    (result,) = install_skills(tmp_path, ["vault-admin"], bundle=bundle)
    assert result.status == "refused" and "no manifest" in result.detail
    assert (foreign / "SKILL.md").read_text(encoding="utf-8").endswith("mine\n")
    (result,) = install_skills(tmp_path, ["vault-admin"], bundle=bundle, force=True)
    assert result.status == "replaced"
    assert "mine" not in (foreign / "SKILL.md").read_text(encoding="utf-8")


def test_refuses_a_symlinked_skill_without_force(tmp_path: Path) -> None:
    target = tmp_path / "skills"
    target.mkdir()
    elsewhere = tmp_path / "checkout"
    elsewhere.mkdir()
    (target / "remote-vm").symlink_to(elsewhere, target_is_directory=True)
    (result,) = install_skills(target, ["remote-vm"], bundle=Bundle(ROOT))
    assert result.status == "refused" and "symbolic link" in result.detail
    (result,) = install_skills(target, ["remote-vm"], bundle=Bundle(ROOT), force=True)
    assert result.status == "replaced"
    assert not (target / "remote-vm").is_symlink() and elsewhere.is_dir()


def copy_bundle(destination: Path) -> Bundle:
    """A bundle laid out like an installed wheel's share/fly-vault."""
    shutil.copytree(SKILLS, destination / "skills")
    shutil.copytree(REFERENCES, destination / "references")
    return Bundle(destination)


def test_a_pristine_install_is_updated(tmp_path: Path) -> None:
    bundle = copy_bundle(tmp_path / "share" / "fly-vault")
    target = tmp_path / "target"
    install_skills(target, ["remote-task"], bundle=bundle)
    source = bundle.skills_dir / "remote-task" / "SKILL.md"
    source.write_text(source.read_text(encoding="utf-8") + "\nNew section.\n", encoding="utf-8")
    (result,) = install_skills(target, ["remote-task"], bundle=bundle)
    assert result.status == "updated"
    assert (
        (target / "remote-task" / "SKILL.md").read_text(encoding="utf-8").endswith("New section.\n")
    )
    manifest = json.loads((target / "remote-task" / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert set(manifest["files"]) == set(result.files)


def test_a_failed_install_leaves_the_old_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = copy_bundle(tmp_path / "bundle")
    target = tmp_path / "target"
    install_skills(target, ["remote-vm"], bundle=bundle)
    before = installed_files(target / "remote-vm")
    source = bundle.skills_dir / "remote-vm" / "SKILL.md"
    source.write_text(source.read_text(encoding="utf-8") + "\nchanged\n", encoding="utf-8")

    def fail(plan: object) -> bytes:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(skills_cli, "_manifest", fail)
    from flyvault.errors import VaultError

    with pytest.raises(VaultError, match="No space left on device"):
        install_skills(target, ["remote-vm"], bundle=bundle)
    assert installed_files(target / "remote-vm") == before
    assert sorted(p.name for p in target.iterdir()) == ["remote-vm"]


def test_the_exchange_fallback_replaces_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = copy_bundle(tmp_path / "bundle")
    target = tmp_path / "target"
    install_skills(target, ["remote-task"], bundle=bundle)
    monkeypatch.setattr(skills_cli, "_exchange", lambda first, second: False)
    source = bundle.skills_dir / "remote-task" / "SKILL.md"
    source.write_text(source.read_text(encoding="utf-8") + "\nv2\n", encoding="utf-8")
    (result,) = install_skills(target, ["remote-task"], bundle=bundle)
    assert result.status == "updated"
    assert (target / "remote-task" / "SKILL.md").read_text(encoding="utf-8").endswith("v2\n")
    assert sorted(p.name for p in target.iterdir()) == ["remote-task"]


def test_a_subset_warns_about_sibling_links(tmp_path: Path) -> None:
    (result,) = install_skills(tmp_path, ["remote-task"], bundle=Bundle(ROOT))
    assert result.status == "installed"
    assert any("links to skill remote-vm" in warning for warning in result.warnings)
    assert not (tmp_path / "remote-task" / "references" / "skills").exists()


def test_unknown_skill_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(
        ["skills", "install", "--target", str(tmp_path), "--skill", "nope"], capsys
    )
    assert code == 2
    assert "unknown skill 'nope'" in err and "remote-vm" in err


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ".agents/skills"),
        ("agents", ".agents/skills"),
        ("claude", ".claude/skills"),
        ("codex", ".codex/skills"),
    ],
)
def test_named_targets(
    value: str | None, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("CODEX_HOME", raising=False)
    assert skills_cli.resolve_target(value) == tmp_path / expected


def test_codex_home_and_relative_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CODEX_HOME", str(tmp_path / "codex"))
    assert skills_cli.resolve_target("codex") == tmp_path / "codex" / "skills"
    monkeypatch.chdir(tmp_path)
    assert skills_cli.resolve_target("./claude") == tmp_path / "claude"
    assert skills_cli.resolve_target("proj/.agents/skills") == tmp_path / "proj/.agents/skills"


def test_install_to_a_named_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    code, out, _ = run_cli(["skills", "install", "--target", "claude"], capsys)
    assert code == 0
    assert (tmp_path / ".claude" / "skills" / "remote-vm" / "SKILL.md").is_file()
    assert f"skills are in {tmp_path / '.claude' / 'skills'}" in out


def test_the_installed_data_layout_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wheel install has no skills/ beside flyvault/, only <prefix>/share/fly-vault."""
    data = tmp_path / "prefix" / "share" / "fly-vault"
    copy_bundle(data)
    monkeypatch.setattr(skills_cli, "_bundle_candidates", lambda: iter([tmp_path / "x", data]))
    assert skills_cli.find_bundle().root == data
    monkeypatch.setattr(skills_cli, "_bundle_candidates", lambda: iter([tmp_path / "x"]))
    from flyvault.errors import VaultError

    with pytest.raises(VaultError, match="cannot find the bundled agent skills"):
        skills_cli.find_bundle()


def test_pyproject_ships_the_skills_in_a_wheel() -> None:
    """Every file an install copies must be in the wheel's data files."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    data_files = config.get("tool", {}).get("setuptools", {}).get("data-files")
    if data_files is None:
        pytest.skip("pyproject.toml has no [tool.setuptools.data-files] for the skills yet")
    shipped: set[str] = set()
    for destination, patterns in data_files.items():
        if not destination.startswith("share/fly-vault/"):
            continue
        for pattern in patterns:
            for path in ROOT.glob(pattern):
                relative = destination.removeprefix("share/fly-vault/") + "/" + path.name
                if path.is_file() and relative == rel(path):
                    shipped.add(relative)
    bundle = Bundle(ROOT)
    needed: set[str] = set()
    for name in bundle.skill_names():
        plan = skills_cli.plan_skill(bundle, name)
        for destination in plan.files:
            source = _source_of(name, destination)
            needed.add(source)
    assert sorted(needed - shipped) == []


def _source_of(skill: str, destination: str) -> str:
    if destination.startswith("references/") and not (SKILLS / skill / destination).exists():
        return destination
    return f"skills/{skill}/{destination}"


# -- the skills teach what the code does ------------------------------------------------------


@pytest.mark.parametrize(
    ("needle", "where"),
    [
        ("list-exec VAULT --json", "remote-task"),
        ("--context", "remote-task"),
        ("1 MiB", "remote-task"),
        ("bytes of output were dropped from the vault's buffer", "remote-task"),
        ("fly-vault kill VAULT", "remote-task"),
        ("128+N", "remote-vm"),
        ("255", "remote-vm"),
        ("--yes", "vault-admin"),
    ],
)
def test_skills_mention(needle: str, where: str) -> None:
    assert needle in (SKILLS / where / "SKILL.md").read_text(encoding="utf-8")


def test_exit_code_help_matches_the_skill() -> None:
    from flyvault.cli.main import EXIT_CODES_HELP

    body = (SKILLS / "remote-vm" / "SKILL.md").read_text(encoding="utf-8")
    for code, meaning in re.findall(r"^\s+(\d+)\s+(\S[^\n]*?)(?:\s{2,}|$)", EXIT_CODES_HELP, re.M):
        if code not in ("0", "1", "2"):
            assert f"{code} " in body, f"exit code {code} ({meaning}) is not explained"
