"""Managed blocks in shell rc files, and the env.d files ``env`` steps write (pure text).

A block is fenced by marker lines that name it::

    # >>> fly-vault <key> >>>
    ...
    # <<< fly-vault <key> <<<

Text outside the fences is never changed. A block added to a file that did not end in a
newline needs one in front of it; the begin marker then says so (`` +newline``), so that
removing the block gives back the original bytes exactly.
"""

from __future__ import annotations

import shlex

from flyvault.errors import UsageError

_BEGIN = "# >>> fly-vault {key} >>>"
_END = "# <<< fly-vault {key} <<<"
_ADDED_NEWLINE = " +newline"
#: The key of the one block that sources every env.d file.
ENV_BLOCK = "env"
ENV_DIR = ".config/fly-vault/env.d"


def upsert_block(text: str, key: str, body: str) -> str:
    """``text`` with the block ``key`` holding ``body`` (replaced in place, else appended)."""
    span = _find(text, key)
    lines = normal_body(body)
    if span is not None:
        start, end, added = span
        begin = _BEGIN.format(key=key) + (_ADDED_NEWLINE if added else "")
        return text[:start] + f"{begin}\n{lines}{_END.format(key=key)}\n" + text[end:]
    added = bool(text) and not text.endswith("\n")
    begin = _BEGIN.format(key=key) + (_ADDED_NEWLINE if added else "")
    return text + ("\n" if added else "") + f"{begin}\n{lines}{_END.format(key=key)}\n"


def remove_block(text: str, key: str) -> str:
    """``text`` without the block ``key`` (unchanged when there is none)."""
    span = _find(text, key)
    if span is None:
        return text
    start, end, added = span
    rest = text[end:]
    if added and not rest and start > 0 and text[start - 1] == "\n":
        start -= 1  # the newline this block brought goes with it
    elif (
        added
        and rest.startswith("# >>> fly-vault ")
        and not _first_line(rest).endswith(_ADDED_NEWLINE)
    ):
        # The next block now follows the text that lacked a final newline: it carries the
        # mark, so that removing it later gives the original bytes back.
        first = _first_line(rest)
        rest = first + _ADDED_NEWLINE + rest[len(first) :]
    return text[:start] + rest


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0]


def has_block(text: str, key: str) -> bool:
    return _find(text, key) is not None


def block_body(text: str, key: str) -> str | None:
    """The body of the block ``key`` as ``upsert_block`` wrote it, or None when absent."""
    span = _find(text, key)
    if span is None:
        return None
    start, end, _ = span
    lines = text[start:end].splitlines(keepends=True)
    return "".join(lines[1:-1])


def normal_body(body: str) -> str:
    """``body`` as a block holds it (with its final newline)."""
    return body if body.endswith("\n") or not body else body + "\n"


def _find(text: str, key: str) -> tuple[int, int, bool] | None:
    """(start, end, newline added) of the block ``key``: end is past its end marker's
    newline (or the text's end)."""
    begin, end_marker = _BEGIN.format(key=key), _END.format(key=key)
    offset = 0
    start: int | None = None
    added = False
    for line in text.splitlines(keepends=True):
        bare = line.rstrip("\n")
        if start is None and bare in (begin, begin + _ADDED_NEWLINE):
            start, added = offset, bare.endswith(_ADDED_NEWLINE)
        elif start is not None and bare == end_marker:
            return start, offset + len(line), added
        offset += len(line)
    if start is not None:
        raise UsageError(
            f"the fly-vault block {key!r} has a begin marker but no end marker: "
            "remove the stray marker line by hand, then apply again"
        )
    return None


def env_file(plan: str, step: str, variables: dict[str, str], path_prepend: list[str]) -> str:
    """An env.d file: sorted exports, and PATH entries added only when missing, so
    sourcing it twice does not grow PATH."""
    lines = [f"# fly-vault deploy: plan {plan}, step {step}. Managed: edits are overwritten."]
    for name in sorted(variables):
        lines.append(f"export {name}={shlex.quote(variables[name])}")
    for entry in reversed(path_prepend):
        quoted = shlex.quote(entry)
        lines.append(f'case ":$PATH:" in *:{quoted}:*) ;; *) PATH={quoted}:"$PATH" ;; esac')
    if path_prepend:
        lines.append("export PATH")
    return "\n".join(lines) + "\n"


def env_block_body(home: str) -> str:
    """The profile block that sources every env.d file (the glob unquoted, so it expands)."""
    directory = shlex.quote(f"{home}/{ENV_DIR}")
    return (
        f'for fv_env in {directory}/*.sh; do [ -r "$fv_env" ] && . "$fv_env"; done\nunset fv_env\n'
    )


def env_file_name(plan: str, step: str) -> str:
    return f"{plan}.{step}.sh"


def profile_files(home: str, shell: str) -> list[str]:
    """The rc files the env block goes into: ``~/.profile`` always (every POSIX login shell
    reads it), plus the login shell's own."""
    files = [f"{home}/.profile"]
    name = shell.rsplit("/", 1)[-1]
    if name == "bash":
        files.append(f"{home}/.bashrc")
    elif name == "zsh":
        files.append(f"{home}/.zshenv")
    return files
