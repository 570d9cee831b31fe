"""The MCP file tools over a real ``fly-vault-mcp`` process on stdio, against a real init
(host mode, real QUIC on 127.0.0.1): the vault sees this machine's files, so each test
checks what landed on disk directly.

Covers: text reads by line offset and tail (small and big files), the byte cap, binary
detection and base64 reads byte-exact, text and base64 writes with SHA-256, modes, parents
and symlinks, edits (once, zero, several, replace_all, a file that changed meanwhile),
list_dir with glob and limit, copy_files up and down with progress notifications, and
errors (a missing path, permission denied as a user, bad arguments).
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import run_async
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp_support import Session, repo_root, text, vault

__all__ = ["vault"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLY_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def over_stdio(scenario: Callable[[Session], Awaitable[None]], timeout: float = 90) -> None:
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "flyvault.mcp_server.main"], env=_env(), cwd=repo_root()
    )

    async def main() -> None:
        async with Client(params) as client:
            await scenario(Session(client))

    run_async(main(), timeout)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_read_text_by_lines_and_tail_binary_flagged_and_base64_exact(
    vault: str, tmp_path: Path
) -> None:
    lines = tmp_path / "lines.txt"
    lines.write_bytes(b"".join(b"line %d\n" % n for n in range(1, 3001)))
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes("é\r\nno newline at the end".encode())
    blob = tmp_path / "blob.bin"
    blob_data = bytes(range(256)) * 4  # 1 KiB with NUL bytes and invalid UTF-8
    blob.write_bytes(blob_data)
    wide = tmp_path / "wide.txt"
    wide.write_bytes(b"".join(b"%04d %s\n" % (n, b"w" * 95) for n in range(2000)))
    big = tmp_path / "big.log"
    big.write_bytes(b"".join(b"entry %07d\n" % n for n in range(400_000)))  # 5.2 MB

    async def scenario(s: Session) -> None:
        first = await s.call("read_file", {"vault": vault, "path": str(lines)})
        data = first.structured_content
        assert (data["first_line"], data["lines"], data["total_lines"]) == (1, 2000, 3000)
        assert data["truncated"] is True and data["next_offset"] == 2000
        assert data["size"] == lines.stat().st_size and data["sha256"] == sha(lines.read_bytes())
        assert data["content"].startswith("line 1\nline 2\n")
        assert "     1\tline 1\n     2\tline 2" in text(first)

        rest = await s.data("read_file", {"vault": vault, "path": str(lines), "offset": 2000})
        assert (rest["first_line"], rest["lines"], rest["truncated"]) == (2001, 1000, False)
        assert rest["next_offset"] is None and rest["content"].endswith("line 3000\n")
        tail = await s.data("read_file", {"vault": vault, "path": str(lines), "offset": -3})
        assert tail["content"] == "line 2998\nline 2999\nline 3000\n"
        assert tail["first_line"] == 2998 and tail["truncated"] is False
        window = await s.data(
            "read_file", {"vault": vault, "path": str(lines), "offset": 10, "limit": 2}
        )
        assert window["content"] == "line 11\nline 12\n" and window["next_offset"] == 12

        exact = await s.data("read_file", {"vault": vault, "path": str(mixed)})
        assert exact["content"].encode() == mixed.read_bytes() and exact["total_lines"] == 2

        capped = await s.data("read_file", {"vault": vault, "path": str(wide)})
        assert capped["truncated"] and capped["returned_bytes"] <= 128 * 1024
        assert capped["content"].endswith("\n") and capped["next_offset"] == capped["lines"]

        flagged = await s.call("read_file", {"vault": vault, "path": str(blob)})
        binary = flagged.structured_content
        assert binary["binary"] is True and binary["encoding"] is None
        assert binary["content"] == "" and binary["size"] == 1024
        assert binary["sha256"] == sha(blob_data)
        assert 'encoding="base64"' in text(flagged) and "\ufffd" not in text(flagged)
        raw = await s.data("read_file", {"vault": vault, "path": str(blob), "encoding": "base64"})
        assert base64.b64decode(raw["content"]) == blob_data
        assert raw["binary"] is True and raw["sha256"] == sha(blob_data)
        part = await s.data(
            "read_file",
            {"vault": vault, "path": str(blob), "encoding": "base64", "offset": -16},
        )
        assert base64.b64decode(part["content"]) == blob_data[-16:]
        assert part["byte_offset"] == 1008 and part["sha256"] == sha(blob_data)

        # Over 4 MiB: streamed as far as needed, hashed by the vault, tail by bytes.
        head = await s.data(
            "read_file", {"vault": vault, "path": str(big), "offset": 5, "limit": 2}
        )
        assert head["content"] == "entry 0000005\nentry 0000006\n"
        assert head["first_line"] == 6 and head["total_lines"] is None and head["truncated"]
        assert head["sha256"] == sha(big.read_bytes())
        end = await s.call("read_file", {"vault": vault, "path": str(big), "offset": -2})
        assert end.structured_content["content"] == "entry 0399998\nentry 0399999\n"
        assert end.structured_content["first_line"] is None
        assert "line numbers unknown" in text(end)

    over_stdio(scenario)


def test_tails_say_when_a_line_was_cut_and_count_lines_by_newline_only(
    vault: str, tmp_path: Path
) -> None:
    """A tail cut by the byte bound said nothing (or came back empty, for a big file whose
    last 128 KiB hold no newline), and a lone \\r split a line the count did not."""
    cr = tmp_path / "cr.txt"
    cr.write_bytes(b"a\rb\nc\n")
    long_tail = tmp_path / "long.txt"
    long_tail.write_bytes(b"short\n" + b"x" * 200_000 + b"\n")
    big = tmp_path / "big.json"
    big.write_bytes(b"{}\n" * 1_500_000 + b'"' + b"z" * 200_000 + b'"')  # 4.7 MB
    log = tmp_path / "big.log"
    log.write_bytes(b"".join(b"entry %07d\n" % n for n in range(400_000)))  # 5.2 MB

    async def scenario(s: Session) -> None:
        tail = await s.data("read_file", {"vault": vault, "path": str(cr), "offset": -2})
        assert (tail["content"], tail["first_line"], tail["lines"]) == ("a\rb\nc\n", 1, 2)
        assert tail["total_lines"] == 2 and tail["truncated"] is False
        cut = await s.data("read_file", {"vault": vault, "path": str(long_tail), "offset": -1})
        assert cut["first_line"] == 2 and cut["content"] == "x" * (128 * 1024 - 1) + "\n"
        assert cut["truncated"] is True and "line 2 is only the end" in cut["next_step"]
        huge = await s.data("read_file", {"vault": vault, "path": str(big), "offset": -1})
        assert huge["content"].endswith('zzz"') and huge["lines"] == 1
        assert huge["truncated"] is True and "only the end of a line" in huge["next_step"]
        many = await s.data("read_file", {"vault": vault, "path": str(log), "offset": -20_000})
        assert many["content"].endswith("entry 0399999\n") and 0 < many["lines"] < 20_000
        assert many["content"].startswith("entry ")  # whole lines only: none cut
        assert many["truncated"] is True and "earlier lines lie before" in many["next_step"]

    over_stdio(scenario)


def test_a_tail_takes_its_limit_and_a_base64_window_through_a_character_is_text(
    vault: str, tmp_path: Path
) -> None:
    """A negative offset ignored ``limit``, and a base64 window that began or ended inside
    a UTF-8 character said ``binary: true`` of a text file."""
    lines = tmp_path / "lines.txt"
    lines.write_bytes(b"".join(b"line %d\n" % n for n in range(1, 3001)))
    log = tmp_path / "big.log"
    log.write_bytes(b"".join(b"entry %07d\n" % n for n in range(400_000)))  # 5.2 MB
    accents = tmp_path / "accents.txt"
    accents.write_bytes("é".encode() * 1000)

    async def scenario(s: Session) -> None:
        call = {"vault": vault, "path": str(lines)}
        part = await s.data("read_file", {**call, "offset": -50, "limit": 10})
        assert part["content"] == "".join(f"line {n}\n" for n in range(2951, 2961))
        assert (part["first_line"], part["lines"], part["total_lines"]) == (2951, 10, 3000)
        assert part["truncated"] is True and part["next_offset"] == 2960
        whole = await s.data("read_file", {**call, "offset": -3, "limit": 10})
        assert whole["content"] == "line 2998\nline 2999\nline 3000\n"
        assert whole["truncated"] is False
        before = await s.data("read_file", {**call, "offset": -5000, "limit": 2})
        assert before["content"] == "line 1\nline 2\n" and before["first_line"] == 1

        big = {"vault": vault, "path": str(log)}
        first = await s.data("read_file", {**big, "offset": -20, "limit": 5})
        assert first["content"] == "".join(f"entry {n:07d}\n" for n in range(399_980, 399_985))
        assert first["truncated"] is True and first["next_offset"] == -15
        assert first["next_step"] == "more: read_file(offset=-15)"
        rest = await s.data("read_file", {**big, "offset": first["next_offset"]})
        assert rest["content"] == "".join(f"entry {n:07d}\n" for n in range(399_985, 400_000))
        assert rest["truncated"] is False

        window = {"vault": vault, "path": str(accents), "encoding": "base64"}
        for offset, limit in ((1, 10), (0, 11), (-3, None), (101, 100)):
            args = {**window, "offset": offset} | ({"limit": limit} if limit else {})
            got = await s.data("read_file", args)
            assert got["binary"] is False, (offset, limit)
        whole_file = await s.data("read_file", {**window})
        assert whole_file["binary"] is False
        assert base64.b64decode(whole_file["content"]) == accents.read_bytes()

    over_stdio(scenario)


def test_write_text_and_base64_with_sha256_modes_parents_and_symlinks(
    vault: str, tmp_path: Path
) -> None:
    nested = tmp_path / "new" / "dir" / "a.txt"
    blob = tmp_path / "tool.bin"
    blob_data = os.urandom(4096) + b"\0"
    kept = tmp_path / "script.sh"
    kept.write_text("#!/bin/sh\necho old\n")
    kept.chmod(0o750)
    target = tmp_path / "target.txt"
    target.write_text("before\n")
    link = tmp_path / "link.txt"
    link.symlink_to(target.name)

    async def scenario(s: Session) -> None:
        refused = await s.call(
            "write_file", {"vault": vault, "path": str(nested), "content": "x"}, ok=False
        )
        assert str(nested.parent) in text(refused) or str(nested) in text(refused)
        written = await s.data(
            "write_file",
            {"vault": vault, "path": str(nested), "content": "héllo\n", "make_parents": True},
        )
        assert nested.read_bytes() == "héllo\n".encode()
        assert written["size"] == 7 and written["sha256"] == sha("héllo\n".encode())
        assert written["replaced"] is False

        raw = await s.data(
            "write_file",
            {
                "vault": vault,
                "path": str(blob),
                "content": base64.b64encode(blob_data).decode(),
                "encoding": "base64",
                "mode": "0755",
            },
        )
        assert blob.read_bytes() == blob_data and raw["sha256"] == sha(blob_data)
        assert stat.S_IMODE(blob.stat().st_mode) == 0o755

        again = await s.data(
            "write_file", {"vault": vault, "path": str(kept), "content": "echo new\n"}
        )
        assert again["replaced"] is True and kept.read_text() == "echo new\n"
        assert stat.S_IMODE(kept.stat().st_mode) == 0o750

        await s.data("write_file", {"vault": vault, "path": str(link), "content": "after\n"})
        assert link.is_symlink() and target.read_text() == "after\n"

        bad = await s.call(
            "write_file",
            {"vault": vault, "path": str(blob), "content": "not base64!", "encoding": "base64"},
            ok=False,
        )
        assert "content is not valid base64" in text(bad)
        assert blob.read_bytes() == blob_data
        wrapped = base64.encodebytes(b"wrapped at 76 columns " * 10).decode()  # MIME lines
        assert "\n" in wrapped.rstrip("\n")
        done = await s.data(
            "write_file",
            {
                "vault": vault,
                "path": str(tmp_path / "w.txt"),
                "content": wrapped,
                "encoding": "base64",
            },
        )
        assert (tmp_path / "w.txt").read_bytes() == b"wrapped at 76 columns " * 10
        assert done["size"] == 220
        directory = await s.call(
            "write_file", {"vault": vault, "path": str(tmp_path), "content": "x"}, ok=False
        )
        assert f"{tmp_path} is a directory" in text(directory)

    over_stdio(scenario)


def test_edit_once_zero_many_replace_all_and_changed_meanwhile(vault: str, tmp_path: Path) -> None:
    source = tmp_path / "app.py"
    source.write_text("alpha = 1\nbeta = 2\nalpha_again = 3\n")
    source.chmod(0o751)

    async def scenario(s: Session) -> None:
        base = {"vault": vault, "path": str(source)}
        edited = await s.call(
            "edit_file", {**base, "old_string": "beta = 2", "new_string": "beta = 20"}
        )
        data = edited.structured_content
        assert source.read_text() == "alpha = 1\nbeta = 20\nalpha_again = 3\n"
        assert data["replacements"] == 1 and data["sha256"] == sha(source.read_bytes())
        assert "-beta = 2\n+beta = 20" in data["diff"] and "-beta = 2" in text(edited)
        assert stat.S_IMODE(source.stat().st_mode) == 0o751

        zero = await s.call(
            "edit_file", {**base, "old_string": "gamma", "new_string": "x"}, ok=False
        )
        assert f"old_string not found in {source}" in text(zero)
        many = await s.call(
            "edit_file", {**base, "old_string": "alpha", "new_string": "a"}, ok=False
        )
        assert f"old_string occurs 2 times in {source}" in text(many)
        assert "replace_all=true" in text(many)
        assert source.read_text() == "alpha = 1\nbeta = 20\nalpha_again = 3\n"
        every = await s.data(
            "edit_file", {**base, "old_string": "alpha", "new_string": "a", "replace_all": True}
        )
        assert (
            every["replacements"] == 2 and source.read_text() == "a = 1\nbeta = 20\na_again = 3\n"
        )

        # A file whose content differs on every read (a fresh UUID each time): its SHA-256
        # at the write check is never the one read, so the edit must refuse.
        moving = "/proc/sys/kernel/random/uuid"
        changed = await s.call(
            "edit_file",
            {
                "vault": vault,
                "path": moving,
                "old_string": "-",
                "new_string": "_",
                "replace_all": True,
            },
            ok=False,
        )
        assert f"{moving} changed while edit_file was editing it; nothing was written" in text(
            changed
        )

        blob = tmp_path / "blob.bin"
        blob.write_bytes(b"\0\1\2")
        binary = await s.call(
            "edit_file",
            {"vault": vault, "path": str(blob), "old_string": "a", "new_string": "b"},
            ok=False,
        )
        assert "is binary; edit_file changes text only" in text(binary)

    over_stdio(scenario)


def test_list_dir_with_glob_and_limit(vault: str, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("b.py", "a.py", "c.txt"):
        (tree / name).write_text(name)
    (tree / "c.txt").chmod(0o600)
    (tree / "sub").mkdir()
    (tree / "to-a").symlink_to("a.py")
    os.utime(tree / "a.py", ns=(0, 1_700_000_000_123_000_000))

    async def scenario(s: Session) -> None:
        listing = await s.data("list_dir", {"vault": vault, "path": str(tree)})
        entries = {e["name"]: e for e in listing["entries"]}
        assert [e["name"] for e in listing["entries"]] == ["a.py", "b.py", "c.txt", "sub", "to-a"]
        assert listing["total"] == 5 and listing["truncated"] is False
        assert entries["a.py"]["kind"] == "file" and entries["a.py"]["size"] == 4
        assert entries["a.py"]["mtime"] == "2023-11-14T22:13:20Z"
        assert entries["c.txt"]["mode"] == "0600" and entries["sub"]["kind"] == "dir"
        assert entries["to-a"]["kind"] == "symlink" and entries["to-a"]["target"] == "a.py"
        python = await s.data("list_dir", {"vault": vault, "path": str(tree), "glob": "*.py"})
        assert [e["name"] for e in python["entries"]] == ["a.py", "b.py"]
        assert python["total"] == 2 and not python["truncated"]
        two = await s.data("list_dir", {"vault": vault, "path": str(tree), "limit": 2})
        assert len(two["entries"]) == 2 and two["truncated"] is True and two["total"] == 5

    over_stdio(scenario)


def test_a_directory_of_exactly_the_searched_size_is_listed_whole(
    vault: str, tmp_path: Path
) -> None:
    """10,000 entries (hard links: no inode each, so quick to make) are all searched: it
    said truncated; one more is not, and says so."""
    tree = tmp_path / "many"
    tree.mkdir()
    (tmp_path / "one").write_text("x")
    for n in range(10_000):
        os.link(tmp_path / "one", tree / f"{n:05d}")

    async def scenario(s: Session) -> None:
        whole = await s.data("list_dir", {"vault": vault, "path": str(tree), "limit": 10_000})
        assert (whole["total"], whole["truncated"], len(whole["entries"])) == (
            10_000,
            False,
            10_000,
        )
        os.link(tmp_path / "one", tree / "10000")
        over = await s.data("list_dir", {"vault": vault, "path": str(tree), "glob": "?999?"})
        # 09990-09999 among the first 10,000 names; "10000" was not searched: truncated.
        assert over["truncated"] is True and over["total"] == 10

    over_stdio(scenario)


def test_names_that_are_not_utf8_are_shown_escaped_and_the_server_lives_on(
    vault: str, tmp_path: Path
) -> None:
    """A file name or link target with bytes that are not UTF-8 reaches the server as lone
    surrogates. Sent as they were, they stopped the whole server (its JSON writer cannot
    encode them): in a listing, and in a copy's progress notification."""
    tree = tmp_path / "tree"
    tree.mkdir()
    with open(os.path.join(os.fsencode(tree), b"caf\xe9.txt"), "wb") as file:
        file.write(b"x" * 10)
    os.symlink(b"tar\xffget", os.path.join(os.fsencode(tree), b"link"))
    notes: list[str | None] = []

    async def progress(done: float, total: float | None, message: str | None) -> None:
        notes.append(message)

    async def scenario(s: Session) -> None:
        listing = await s.data("list_dir", {"vault": vault, "path": str(tree)})
        entries = {e["name"]: e for e in listing["entries"]}
        assert set(entries) == {"caf\\xe9.txt", "link"}
        assert entries["link"]["target"] == "tar\\xffget"
        copied = await s.call(
            "copy_files",
            {
                "vault": vault,
                "source": str(tree),
                "destination": str(tmp_path / "out"),
                "direction": "download",
                "recursive": True,
            },
            progress=progress,
        )
        assert not copied.is_error, text(copied)
        again = await s.data("list_dir", {"vault": vault, "path": str(tmp_path / "out")})
        assert len(again["entries"]) == 2  # the server is still there

    over_stdio(scenario)
    assert (tmp_path / "out" / os.fsdecode(b"caf\xe9.txt")).read_bytes() == b"x" * 10
    assert any(note and "\\xe9" in note for note in notes), notes


def test_copy_a_tree_up_and_down_with_progress(vault: str, tmp_path: Path) -> None:
    local = tmp_path / "local"
    (local / "pkg" / "deep").mkdir(parents=True)
    (local / "pkg" / "readme.md").write_text("hello\n")
    (local / "pkg" / "deep" / "data.bin").write_bytes(os.urandom(300_000) + b"\0")
    (local / "pkg" / "run.sh").write_text("#!/bin/sh\n")
    (local / "pkg" / "run.sh").chmod(0o755)
    (local / "pkg" / "latest").symlink_to("readme.md")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(local / "pkg" / "listener.sock"))  # skipped, and said so
    remote = tmp_path / "remote"
    remote.mkdir()
    back = tmp_path / "back"
    back.mkdir()
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, total, message))

    def snapshot(root: Path) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for path in sorted(root.rglob("*")):
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path))
            elif path.is_file():
                found[rel] = ("file", path.read_bytes(), stat.S_IMODE(path.stat().st_mode))
            else:
                found[rel] = ("dir",)
        return found

    async def scenario(s: Session) -> None:
        up = await s.data(
            "copy_files",
            {
                "vault": vault,
                "source": str(local / "pkg"),
                "destination": str(remote),
                "recursive": True,
                "preserve": True,
            },
            progress=on_progress,
        )
        expected = snapshot(local / "pkg")
        del expected["listener.sock"]
        assert snapshot(remote / "pkg") == expected
        assert up["files"] == 3 and up["symlinks"] == 1 and up["verified"] is True
        assert len(up["skipped"]) == 1 and "listener.sock" in up["skipped"][0]
        assert up["direction"] == "upload" and up["destination"] == str(remote)
        assert progress and all("copying" in (m or "") for _, _, m in progress)
        values = [v for v, _, _ in progress]
        assert values == sorted(values)

        progress.clear()
        down = await s.data(
            "copy_files",
            {
                "vault": vault,
                "source": str(remote / "pkg"),
                "destination": str(back),
                "direction": "download",
                "recursive": True,
            },
            progress=on_progress,
        )
        assert snapshot(back / "pkg").keys() == expected.keys()
        assert (back / "pkg" / "deep" / "data.bin").read_bytes() == (
            local / "pkg" / "deep" / "data.bin"
        ).read_bytes()
        assert down["bytes"] >= 300_001 and progress

        stdout = await s.call(
            "copy_files", {"vault": vault, "source": "-", "destination": str(remote)}, ok=False
        )
        assert "local path '-' is not a file path" in text(stdout)

    try:
        over_stdio(scenario)
    finally:
        listener.close()


def test_errors_name_the_path_and_permission_denied_as_a_user(vault: str, tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    secret = tmp_path / "root-only.txt"
    secret.write_text("root only\n")
    secret.chmod(0o600)

    async def scenario(s: Session) -> None:
        gone = await s.call("read_file", {"vault": vault, "path": str(missing)}, ok=False)
        assert f"{missing}: no such file or directory (ENOENT)" in text(gone)
        gone_edit = await s.call(
            "edit_file",
            {"vault": vault, "path": str(missing), "old_string": "a", "new_string": "b"},
            ok=False,
        )
        assert str(missing) in text(gone_edit)
        gone_dir = await s.call("list_dir", {"vault": vault, "path": str(missing)}, ok=False)
        assert str(missing) in text(gone_dir)
        directory = await s.call("read_file", {"vault": vault, "path": str(tmp_path)}, ok=False)
        assert f"{tmp_path} is a directory" in text(directory) and "list_dir" in text(directory)
        if os.geteuid() == 0:
            denied = await s.call(
                "read_file", {"vault": vault, "path": str(secret), "user": "nobody"}, ok=False
            )
            assert "permission denied (EACCES)" in text(denied)
            mine = await s.data("read_file", {"vault": vault, "path": str(secret)})
            assert mine["content"] == "root only\n"

    over_stdio(scenario)


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs a root vault")
def test_writes_as_a_user_belong_to_that_user(vault: str, tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    # pytest's own directories are root's alone (0700): nobody needs a way in from /tmp.
    shared = Path(tempfile.mkdtemp(prefix="mcp-files-", dir="/tmp"))
    shared.chmod(0o777)
    path = shared / "theirs.txt"

    async def scenario(s: Session) -> None:
        await s.data(
            "write_file", {"vault": vault, "path": str(path), "content": "x\n", "user": "nobody"}
        )
        assert path.stat().st_uid == nobody.pw_uid
        # Root editing it keeps the owner (the replacement would otherwise be root's).
        await s.data(
            "edit_file", {"vault": vault, "path": str(path), "old_string": "x", "new_string": "y"}
        )
        assert path.read_text() == "y\n" and path.stat().st_uid == nobody.pw_uid

    try:
        over_stdio(scenario)
    finally:
        shutil.rmtree(shared)
