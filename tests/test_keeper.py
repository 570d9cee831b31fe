"""The connection keeper end to end: real CLI processes, real unix sockets, a real init
process on 127.0.0.1. Nothing of ours is mocked.

The codec (``flyvault.protocol.mux``) is checked by property; everything else by running
``python -m flyvault.cli.main`` and looking at what it leaves behind: the keeper's pid file,
socket and log under ``$XDG_RUNTIME_DIR/fly-vault`` (a fresh directory per test, see
conftest's ``isolated_dirs``), ``fly-vault mux status --json``, and the vault's own view
(``list-exec``).
"""

from __future__ import annotations

import contextlib
import filecmp
import itertools
import json
import os
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TOKEN, InitProcess, pid_alive, read_until, vault_entry
from hypothesis import example, given, settings
from hypothesis import strategies as st

from flyvault.errors import LocalProtocolError, RemoteProtocolError
from flyvault.protocol.mux import (
    HEADER,
    MAX_FRAME,
    MUX_VERSION,
    OPS,
    MuxDecoder,
    MuxFrame,
    MuxKind,
    check_hello,
    encode,
    encode_json,
)
from flyvault.standins import OidcIssuer

ROOT = os.geteuid() == 0


# Helpers ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def first_call_waits(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The keeper a test's first call starts serves that call too (``FLY_VAULT_MUX=wait``),
    so what each call went through is known. Tests marked ``background`` keep the default:
    the first call goes direct and starts the keeper beside it."""
    if request.node.get_closest_marker("background") is None:
        monkeypatch.setenv("FLY_VAULT_MUX", "wait")


@pytest.fixture
def vault(init_process: InitProcess, issuer: OidcIssuer) -> str:
    from flyvault.config import save_vault

    save_vault(vault_entry(init_process.port, issuer, name="t"))
    return "t"


def fv(
    *args: str,
    env: dict[str, str] | None = None,
    input_: bytes | None = None,
    timeout: float = 60,
    python_flags: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, *python_flags, "-m", "flyvault.cli.main", *args],
        stdin=subprocess.DEVNULL if input_ is None else None,
        input=input_,
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def fv_popen(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "flyvault.cli.main", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


def keeper_dir() -> Path:
    return Path(os.environ["XDG_RUNTIME_DIR"]) / "fly-vault"


def pid_files() -> list[Path]:
    return sorted(keeper_dir().glob("*.pid"))


def the_keeper() -> tuple[int, Path]:
    """The one keeper's pid and its paths' stem (``.../t-<key>``)."""
    files = pid_files()
    assert len(files) == 1, f"expected one keeper pid file, found {files}"
    pid = int(json.loads(files[0].read_text())["pid"])
    return pid, files[0].with_suffix("")


def status(vault: str | None = None) -> list[dict[str, Any]]:
    result = fv("mux", "status", "--json", *((vault,) if vault else ()))
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    return rows


def wait_for(check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    """Poll ``check`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def sessions(vault: str) -> dict[str, Any]:
    result = fv("list-exec", vault, "--json")
    assert result.returncode == 0, result.stderr
    return {item["session_id"]: item for item in json.loads(result.stdout)}


@pytest.fixture
def reaper() -> Iterator[list[subprocess.Popen[bytes]]]:
    """CLI processes a test started: killed (by their own handle) if still running."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def expected_paths(vault: str) -> Any:
    """The keeper's paths for ``vault`` as the CLI computes them (same config bytes, same
    ``FLY_VAULT_*`` variables as the subprocesses inherit)."""
    from flyvault.client.mux import keeper_key, keeper_paths, runtime_dir
    from flyvault.paths import config_file

    path = config_file()
    return keeper_paths(runtime_dir(), vault, keeper_key(vault, path, path.read_bytes()))


# 1. The frame codec -------------------------------------------------------------------------

frames_strategy = st.lists(
    st.tuples(st.sampled_from(list(MuxKind)), st.binary(max_size=600)), max_size=12
)


@given(frames=frames_strategy, cuts=st.lists(st.integers(min_value=0), max_size=20))
@settings(max_examples=300, deadline=None)
def test_frames_survive_any_cuts(frames: list[tuple[MuxKind, bytes]], cuts: list[int]) -> None:
    stream = b"".join(encode(kind, payload) for kind, payload in frames)
    points = sorted({cut % (len(stream) + 1) for cut in cuts} | {0, len(stream)})
    decoder = MuxDecoder()
    out: list[MuxFrame] = []
    for start, end in itertools.pairwise(points):
        out += decoder.feed(stream[start:end])
    assert out == [MuxFrame(kind, payload) for kind, payload in frames]
    assert decoder.pending == 0


@given(
    frames=frames_strategy,
    kind=st.integers(0, 255).filter(lambda k: k not in set(MuxKind)),
    length=st.integers(0, 2**32 - 1),
)
def test_unknown_kind_is_refused_after_good_frames(
    frames: list[tuple[MuxKind, bytes]], kind: int, length: int
) -> None:
    good = b"".join(encode(k, p) for k, p in frames)
    with pytest.raises(RemoteProtocolError, match=f"unknown frame kind {kind}"):
        MuxDecoder().feed(good + HEADER.pack(kind, length))


@given(kind=st.sampled_from(list(MuxKind)), length=st.integers(MAX_FRAME + 1, 2**32 - 1))
def test_oversized_length_is_refused_from_the_header_alone(kind: MuxKind, length: int) -> None:
    decoder = MuxDecoder()
    with pytest.raises(RemoteProtocolError, match="over"):
        decoder.feed(HEADER.pack(kind, length))  # no payload needed: refused before buffering


def test_largest_frame_passes_and_one_byte_more_is_refused_both_ways() -> None:
    payload = os.urandom(MAX_FRAME)
    assert MuxDecoder().feed(encode(MuxKind.STDOUT, payload)) == [MuxFrame(MuxKind.STDOUT, payload)]
    with pytest.raises(LocalProtocolError):
        encode(MuxKind.STDOUT, payload + b"x")
    with pytest.raises(RemoteProtocolError):
        MuxDecoder().feed(HEADER.pack(MuxKind.STDOUT, MAX_FRAME + 1))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@given(op=st.sampled_from(sorted(OPS)), version=json_values)
@example(op="exec", version=True).via("JSON true == 1 in Python")
@example(op="exec", version=1.0).via("JSON 1.0 == 1 in Python")
@example(op="exec", version="1")
def test_hello_with_another_version_is_refused(op: str, version: Any) -> None:
    hello = {"version": version, "op": op}
    if type(version) is int and version == MUX_VERSION:
        assert check_hello(hello) == hello
    else:
        with pytest.raises(RemoteProtocolError, match="version"):
            check_hello(hello)


@given(op=json_values, extra=st.dictionaries(st.text(), json_values, max_size=3))
@example(op=["exec"], extra={}).via("a list is not hashable")
@example(op={"exec": 1}, extra={})
def test_hello_with_an_unknown_op_is_refused(op: Any, extra: dict[str, Any]) -> None:
    hello = {**extra, "version": MUX_VERSION, "op": op}
    if isinstance(op, str) and op in OPS:
        assert check_hello(hello) == hello
    else:
        with pytest.raises(RemoteProtocolError, match="unknown op"):
            check_hello(hello)


@given(value=json_values.filter(lambda v: not isinstance(v, dict)))
def test_hello_that_is_not_an_object_is_refused(value: Any) -> None:
    with pytest.raises(RemoteProtocolError, match="not a JSON object"):
        check_hello(value)


def test_frame_json_names_the_frame_when_it_is_not_json() -> None:
    with pytest.raises(RemoteProtocolError, match="RESULT frame does not hold JSON"):
        MuxFrame(MuxKind.RESULT, b"\xff{").json()


# 2. Reuse -----------------------------------------------------------------------------------

SPLIT = (
    "import sys; sys.stdout.buffer.write(bytes(range(256)) + b'out'); "
    "sys.stderr.buffer.write(b'err' + bytes(range(255, -1, -1))); sys.exit(7)"
)


def test_second_exec_reuses_the_keepers_connection(vault: str) -> None:
    command = ("exec", vault, "--", sys.executable, "-c", SPLIT)
    direct = fv(*command, env={"FLY_VAULT_MUX": "0"})
    assert pid_files() == []  # the direct call started nothing
    first = fv(*command)
    pid, _ = the_keeper()
    second = fv(*command)
    third = fv("exec", vault, "--", "sh", "-c", "printf two; printf owt >&2; exit 3")
    assert the_keeper()[0] == pid  # still the one keeper
    # Byte for byte what the direct call gave. The development issuer's note came with the
    # direct call, the first today, so neither keeper call repeats it.
    assert direct.returncode == 7
    assert direct.stdout == bytes(range(256)) + b"out"
    assert b"attested by the development issuer" in direct.stderr
    assert direct.stderr.endswith(b"err" + bytes(range(255, -1, -1)))
    assert (first.returncode, first.stdout, first.stderr) == (
        7,
        direct.stdout,
        b"err" + bytes(range(255, -1, -1)),
    )
    assert (second.returncode, second.stdout, second.stderr) == (
        7,
        direct.stdout,
        b"err" + bytes(range(255, -1, -1)),
    )
    assert (third.returncode, third.stdout, third.stderr) == (3, b"two", b"owt")
    [row] = status(vault)
    assert row["pid"] == pid
    assert row["requests"] == 4  # three execs and this status call
    assert row["connects"] == 1
    assert row["connected"] is True
    assert row["active"] == 1  # the status request itself


def test_a_large_file_goes_over_a_connection_of_its_own(
    vault: str, init_process: InitProcess, tmp_path: Path
) -> None:
    """cp through a keeper: small requests and small files use the keeper's connection; a
    file of DIRECT_FROM bytes or more goes over a connection of the cp's own, each way."""
    from flyvault.client.copy_engine import DIRECT_FROM

    def connections() -> int:
        return init_process.log.read_text().count("authenticated")

    big, small = tmp_path / "big", tmp_path / "small"
    big.write_bytes(os.urandom(1024 * 1024) * (DIRECT_FROM // (1024 * 1024)))
    small.write_bytes(b"small")
    assert fv("exec", vault, "--", "true").returncode == 0  # the keeper is up
    before = connections()
    for args in (
        (str(small), f"{vault}:{tmp_path}/small-up"),
        (f"{vault}:{tmp_path}/small-up", str(tmp_path / "small-down")),
    ):
        result = fv("cp", *args)
        assert result.returncode == 0, result.stderr
    assert connections() == before  # the keeper's connection served both
    for args in (
        (str(big), f"{vault}:{tmp_path}/big-up"),
        (f"{vault}:{tmp_path}/big-up", str(tmp_path / "big-down")),
    ):
        result = fv("cp", *args, timeout=120)
        assert result.returncode == 0, result.stderr
    assert connections() == before + 2
    assert (tmp_path / "small-down").read_bytes() == b"small"
    assert filecmp.cmp(big, tmp_path / "big-down", shallow=False)
    [row] = status(vault)
    assert row["connects"] == 1  # the keeper itself never reconnected


def test_a_tree_goes_through_the_keeper_whatever_its_size(
    vault: str, init_process: InitProcess, tmp_path: Path
) -> None:
    """cp -r up through a keeper: a tree's stream stays on the keeper's connection, also when
    its files of at most LARGE_FILE hold 64 MiB (which once took a connection of its own)."""
    from flyvault.client.copy_engine import LARGE_FILE

    def connections() -> int:
        return init_process.log.read_text().count("authenticated")

    small, large = tmp_path / "small", tmp_path / "large"
    small.mkdir()
    large.mkdir()
    (small / "a").write_bytes(b"a" * 1000)
    chunk = os.urandom(LARGE_FILE)  # LARGE_FILE itself still travels in the stream
    for i in range(64 * 1024 * 1024 // LARGE_FILE):
        (large / f"f{i}").write_bytes(chunk[i:] + chunk[:i])
    assert fv("exec", vault, "--", "true").returncode == 0  # the keeper is up
    before = connections()
    result = fv("cp", "-r", str(small), f"{vault}:{tmp_path}/small-up")
    assert result.returncode == 0, result.stderr
    result = fv("cp", "-r", str(large), f"{vault}:{tmp_path}/large-up", timeout=120)
    assert result.returncode == 0, result.stderr
    assert connections() == before
    assert filecmp.dircmp(large, tmp_path / "large-up").diff_files == []
    assert sorted(p.name for p in (tmp_path / "large-up").iterdir()) == sorted(
        p.name for p in large.iterdir()
    )
    assert (tmp_path / "small-up" / "a").read_bytes() == b"a" * 1000
    [row] = status(vault)
    assert row["connects"] == 1


def test_list_exec_and_kill_go_through_the_keeper_too(vault: str, reaper: list[Any]) -> None:
    proc = fv_popen("exec", vault, "--session", "lk", "--", "sh", "-c", "echo up; exec sleep 30")
    reaper.append(proc)
    read_until(proc, b"up\n")
    pid, _ = the_keeper()
    before = status(vault)[0]["requests"]
    assert sessions(vault)["lk"]["running"] is True
    killed = fv("kill", vault, "lk", "--signal", "KILL", "--wait", "0")
    assert killed.returncode == 0, killed.stderr
    assert proc.wait(timeout=30) == 137
    after = status(vault)[0]
    assert after["pid"] == pid
    assert after["requests"] == before + 3  # list-exec, kill (not waiting), this status
    waited = fv("kill", vault, "lk", "--signal", "KILL")  # it ended: one list says so
    assert b"session lk ended (killed by SIGKILL)" in waited.stdout, waited.stderr
    assert status(vault)[0]["requests"] == before + 6  # kill, one list, this status
    assert after["connects"] == 1


# 3. The thin path's imports -----------------------------------------------------------------

HEAVY = ("asyncio", "aioquic", "cryptography")


def imported(stderr: bytes) -> set[str]:
    """Top-level package names from ``-X importtime`` lines."""
    names = set()
    for line in stderr.decode(errors="replace").splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":  # the header line
                names.add(name.split(".")[0])
    return names


def test_thin_path_imports_no_asyncio_quic_or_crypto(vault: str) -> None:
    assert fv("exec", vault, "--", "true").returncode == 0  # warm: the keeper is up
    pid, _ = the_keeper()
    before = status(vault)[0]["requests"]
    thin = fv("exec", vault, "--", "true", python_flags=("-X", "importtime"))
    assert thin.returncode == 0, thin.stderr
    names = imported(thin.stderr)
    assert "flyvault" in names  # the parse worked
    assert not names & set(HEAVY), sorted(names & set(HEAVY))
    assert "subprocess" not in names  # a keeper is started with posix_spawn
    after = status(vault)[0]
    assert (after["pid"], after["requests"]) == (pid, before + 2)  # it went through the keeper
    # The same check does see them on the direct path: it can fail.
    direct = fv(
        "exec", vault, "--", "true", python_flags=("-X", "importtime"), env={"FLY_VAULT_MUX": "0"}
    )
    assert direct.returncode == 0
    assert set(HEAVY) <= imported(direct.stderr)


def test_cp_through_the_keeper_imports_no_quic_or_crypto(vault: str, tmp_path: Path) -> None:
    """cp needs asyncio, but through the keeper neither QUIC nor crypto (~0.1 s a call)."""
    source = tmp_path / "one"
    source.write_bytes(b"one")
    assert fv("exec", vault, "--", "true").returncode == 0  # warm: the keeper is up
    heavy = {"aioquic", "cryptography"}
    for args in (
        (str(source), f"{vault}:{tmp_path}/up"),
        (f"{vault}:{tmp_path}/up", str(tmp_path / "down")),
    ):
        result = fv("cp", *args, python_flags=("-X", "importtime"))
        assert result.returncode == 0, result.stderr
        names = imported(result.stderr)
        assert "flyvault" in names
        assert not names & heavy, sorted(names & heavy)
    assert (tmp_path / "down").read_bytes() == b"one"
    direct = fv(
        "cp",
        str(source),
        f"{vault}:{tmp_path}/up2",
        python_flags=("-X", "importtime"),
        env={"FLY_VAULT_MUX": "0"},
    )
    assert direct.returncode == 0, direct.stderr
    assert heavy <= imported(direct.stderr)  # the same check sees them: it can fail


def test_the_copy_modules_leave_the_exec_protocol_unimported() -> None:
    """``cp`` and ``forward`` reach ``Vault`` but no exec session: the exec protocol's
    modules (~12 ms of imports) load with ``flyvault.client.session`` only. Checked through
    ``sys.modules``: ``-X importtime`` misses what ``importlib.import_module`` loads."""
    exec_modules = ["flyvault.protocol.console", "flyvault.protocol.exec_client"]
    probe = (
        "import sys, importlib\n"
        "for name in sys.argv[1:]: importlib.import_module(name)\n"
        f"print(sorted(set({exec_modules!r}) & set(sys.modules)))"
    )

    def loaded(*modules: str) -> str:
        result = subprocess.run(
            [sys.executable, "-c", probe, *modules], capture_output=True, text=True, check=True
        )
        return result.stdout.strip()

    copy_path = (
        "flyvault.cli.cp",
        "flyvault.cli.mux",
        "flyvault.client.vault",
        "flyvault.client.copy_engine",
        "flyvault.client.copy_up",
        "flyvault.client.files",
        "flyvault.client.keeper_stream",
        "flyvault.client.forward",
    )
    assert loaded(*copy_path) == "[]"
    assert loaded(*copy_path, "flyvault.client.session") == repr(exec_modules)  # it can fail


@pytest.mark.parametrize("args", [("--help",), ("exec", "--help"), ("mux", "status")])
def test_help_and_mux_status_import_no_asyncio_quic_or_crypto(args: tuple[str, ...]) -> None:
    result = fv(*args, python_flags=("-X", "importtime"))
    assert result.returncode == 0, result.stderr
    names = imported(result.stderr)
    assert "flyvault" in names
    assert not names & set(HEAVY), sorted(names & set(HEAVY))


# 4. A stale socket --------------------------------------------------------------------------


def _stale_socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()  # the file stays; nothing listens
    with pytest.raises(ConnectionRefusedError):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        finally:
            probe.close()


@pytest.mark.parametrize("with_pid_file", [False, True])
def test_stale_socket_is_replaced_by_a_new_keeper(vault: str, with_pid_file: bool) -> None:
    paths = expected_paths(vault)
    _stale_socket(paths.socket)
    if with_pid_file:  # a keeper that was SIGKILLed leaves both behind
        dead = subprocess.Popen(["true"])
        dead.wait()
        paths.pid.write_text(json.dumps({"pid": dead.pid, "started_at": 0}))
    result = fv("exec", vault, "--", "sh", "-c", "echo fine")
    assert (result.returncode, result.stdout) == (0, b"fine\n"), result.stderr
    pid, stem = the_keeper()
    assert stem == paths.socket.with_suffix("")  # the path computed here is the CLI's
    assert pid_alive(pid)
    [row] = status(vault)
    assert row["pid"] == pid and row["requests"] >= 2  # the exec went through it


# 5. Another user ----------------------------------------------------------------------------


def _as_other_user(sock_path: Path, uid: int = 65534) -> bytes:
    """Fork; the child drops to ``uid``, connects, sends a HELLO and returns everything the
    keeper sends until it closes (a fork, not an interpreter: the checkout's directories
    need not be open to that user)."""
    hello = encode_json(MuxKind.HELLO, {"version": MUX_VERSION, "op": "status"})
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: system calls only, then _exit
        code = 1
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(20)
            sock.connect(str(sock_path))
            with contextlib.suppress(OSError):  # the keeper may have answered and closed
                sock.sendall(hello)
            data = b""
            with contextlib.suppress(ConnectionResetError):  # closed with our HELLO unread
                while chunk := sock.recv(65536):
                    data += chunk
            os.write(write_fd, data)
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    received = b""
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if select.select([read_fd], [], [], deadline - time.monotonic())[0]:
                chunk = os.read(read_fd, 65536)
                if not chunk:
                    break
                received += chunk
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)  # bounded: the child's socket timeout is 20 s
    assert os.waitstatus_to_exitcode(status) == 0, "the other user's child failed"
    return received


@pytest.mark.skipif(not ROOT, reason="dropping to another uid needs root")
def test_another_user_is_refused_even_with_open_modes(vault: str) -> None:
    assert fv("exec", vault, "--", "true").returncode == 0
    pid, stem = the_keeper()
    sock_path = stem.with_suffix(".sock")
    keeper_dir().parent.chmod(0o755)
    keeper_dir().chmod(0o755)
    sock_path.chmod(0o666)
    received = _as_other_user(sock_path)
    decoder = MuxDecoder()
    frames = decoder.feed(received)
    assert decoder.pending == 0
    assert [f.kind for f in frames] == [MuxKind.ERROR], frames
    message = frames[0].json()["message"]
    assert f"belongs to uid {os.getuid()}" in message
    assert "uid 65534 was refused" in message
    # The keeper is unharmed and counted the refusal (modes back first: status checks them).
    keeper_dir().chmod(0o700)
    [row] = status(vault)
    assert (row["pid"], row["refused"]) == (pid, 1)
    assert fv("exec", vault, "--", "true").returncode == 0


def _raw_exchange(path: Path, data: bytes) -> list[MuxFrame]:
    """Send ``data`` on a fresh connection; every frame until the keeper closes."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    try:
        sock.connect(str(path))
        with contextlib.suppress(OSError):
            sock.sendall(data)
        decoder, frames = MuxDecoder(), []
        while chunk := sock.recv(65536):
            frames += decoder.feed(chunk)
        assert decoder.pending == 0
        return frames
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (HEADER.pack(99, 0), "unknown frame kind 99"),
        (HEADER.pack(MuxKind.HELLO, MAX_FRAME + 1), "over"),
        (encode(MuxKind.STDIN, b"x"), "STDIN before HELLO"),
        (encode(MuxKind.HELLO, b"not json"), "does not hold JSON"),
        (encode_json(MuxKind.HELLO, {"version": True, "op": "status"}), "version True"),
        (
            encode_json(MuxKind.HELLO, {"version": MUX_VERSION, "op": ["exec"]}),
            "unknown op ['exec']",
        ),
        (
            encode_json(MuxKind.HELLO, {"version": MUX_VERSION, "op": "shutdown"}),
            "unknown op 'shutdown'",
        ),
    ],
    ids=["kind", "oversized", "stdin-first", "not-json", "version", "op-list", "op-name"],
)
def test_a_bad_client_gets_one_protocol_error_and_the_keeper_serves_on(
    vault: str, data: bytes, named: str
) -> None:
    assert fv("exec", vault, "--", "true").returncode == 0
    pid, stem = the_keeper()
    frames = _raw_exchange(stem.with_suffix(".sock"), data)
    assert [f.kind for f in frames] == [MuxKind.ERROR], frames
    assert named in frames[0].json()["message"]
    assert "Traceback" not in stem.with_suffix(".log").read_text()  # not taken for a bug
    [row] = status(vault)
    assert row["pid"] == pid and row["requests"] == 2  # the refused one did not count


# 6. Modes -----------------------------------------------------------------------------------


def test_directory_and_socket_modes(vault: str) -> None:
    assert fv("exec", vault, "--", "true").returncode == 0
    _, stem = the_keeper()
    assert stat.S_IMODE(keeper_dir().stat().st_mode) == 0o700
    for suffix in (".sock", ".pid", ".log"):
        info = os.lstat(stem.with_suffix(suffix))
        assert stat.S_IMODE(info.st_mode) == 0o600, suffix
        assert info.st_uid == os.getuid()
    assert stat.S_ISSOCK(os.lstat(stem.with_suffix(".sock")).st_mode)


def test_an_open_directory_means_no_keeper(vault: str) -> None:
    keeper_dir().mkdir(mode=0o700)
    keeper_dir().chmod(0o755)
    result = fv("exec", vault, "--", "sh", "-c", "echo direct; exit 5")
    assert (result.returncode, result.stdout) == (5, b"direct\n"), result.stderr
    assert list(keeper_dir().iterdir()) == []  # no socket, no pid file, no log
    assert stat.S_IMODE(keeper_dir().stat().st_mode) == 0o755  # left as it was
    mux = fv("mux", "status")
    assert mux.returncode == 2
    assert b"has mode 0755" in mux.stderr and b"0700" in mux.stderr


def test_a_symlinked_directory_means_no_keeper(vault: str, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    keeper_dir().symlink_to(target)
    result = fv("exec", vault, "--", "true")
    assert result.returncode == 0, result.stderr
    assert list(target.iterdir()) == []
    mux = fv("mux", "status")
    assert mux.returncode == 2 and b"is not a directory" in mux.stderr


# 7. The keeper killed in the middle of a command --------------------------------------------


def test_keeper_killed_mid_command(vault: str, reaper: list[Any]) -> None:
    proc = fv_popen("exec", vault, "--", "sh", "-c", "echo started; exec sleep 30")
    reaper.append(proc)
    read_until(proc, b"started\n")
    pid, stem = the_keeper()
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=15)  # bounded: the CLI must not wait for the command
    assert proc.returncode == 255
    assert b"the connection keeper ended" in err
    hint = re.search(rb"fly-vault exec \S+ --session (\S+)", err)
    assert hint, err
    session_id = hint.group(1).decode()
    assert session_id in sessions(vault)  # a real session the user can reattach to
    # The next call works; a new keeper replaced the dead one's socket.
    again = fv("exec", vault, "--", "sh", "-c", "echo again")
    assert (again.returncode, again.stdout) == (0, b"again\n"), again.stderr
    new_pid, new_stem = the_keeper()
    assert new_pid != pid and new_stem == stem
    assert not pid_alive(pid)


# 8. Ctrl-C ----------------------------------------------------------------------------------


def test_ctrl_c_detaches_the_session_on_the_vault(vault: str, reaper: list[Any]) -> None:
    proc = fv_popen("exec", vault, "--session", "S", "--", "sh", "-c", "echo up; exec sleep 30")
    reaper.append(proc)
    read_until(proc, b"up\n")
    pid, _ = the_keeper()
    assert sessions(vault)["S"]["attached"] is True
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 130 and b"interrupted" in err  # as on the direct path
    wait_for(lambda: sessions(vault)["S"]["attached"] is False, "the vault kept the client")
    info = sessions(vault)["S"]
    assert info["running"] is True  # detached, not killed: it can be picked up again
    [row] = status(vault)
    assert (row["pid"], row["active"]) == (pid, 1)  # only this status request
    assert fv("kill", vault, "S", "--signal", "KILL").returncode == 0


def test_ctrl_c_is_seen_while_the_vault_does_not_read_stdin(vault: str, reaper: list[Any]) -> None:
    """Stdin backed up (the command never reads it) must not hide the CLI leaving: the
    keeper reads the socket all the time, so the session is detached and the keeper idles
    again (it used to wait in the stdin hand-over and never noticed)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flyvault.cli.main",
            "exec",
            vault,
            "--session",
            "B",
            "--",
            "sh",
            "-c",
            "echo up; exec sleep 30",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    reaper.append(proc)
    read_until(proc, b"up\n")
    assert proc.stdin is not None
    written = [0]
    feeder = threading.Thread(target=_feed_until_closed, args=(proc.stdin, written), daemon=True)
    feeder.start()

    def backed_up() -> bool:
        """The feeder stopped making progress: every buffer on the way is full, stdin
        waits in the keeper's hand-over to the session."""
        before = written[0]
        time.sleep(0.3)
        return before > 0 and written[0] == before

    wait_for(backed_up, "stdin to back up", timeout=60)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=15)
    assert proc.returncode == 130
    wait_for(lambda: sessions(vault)["B"]["attached"] is False, "the vault kept the client")
    wait_for(lambda: status(vault)[0]["active"] == 1, "the keeper kept the request")
    assert fv("kill", vault, "B", "--signal", "KILL").returncode == 0


def _feed_until_closed(pipe: Any, written: list[int]) -> None:
    chunk = b"x" * 65536
    with contextlib.suppress(OSError, ValueError):
        for _ in range(4096):  # at most 256 MiB: bounded even if nothing ever blocks
            pipe.write(chunk)
            pipe.flush()
            written[0] += len(chunk)


def test_a_stream_reader_is_not_stopped_by_a_keeper_notice(tmp_path: Path) -> None:
    """NOTICE and PROGRESS frames on a stream request (a reconnect notice, say) are not
    stream data and must not kill the stream's reader: it returns the data, then the end.
    The peer here is a scripted keeper on a real unix socket."""
    import asyncio

    from flyvault.client.keeper_stream import KeeperConnection

    path = tmp_path / "k.sock"

    async def scripted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)  # the HELLO
        writer.write(encode(MuxKind.ACCEPTED))
        writer.write(encode_json(MuxKind.NOTICE, {"message": "reconnected to 't'"}))
        writer.write(encode_json(MuxKind.PROGRESS, {"phase": "x", "done": 1, "total": 2}))
        writer.write(encode(MuxKind.STDOUT, b"hello"))
        writer.write(encode(MuxKind.EOF))
        await writer.drain()
        await reader.read(65536)  # until the client is done
        writer.close()

    async def scenario() -> list[bytes]:
        server = await asyncio.start_unix_server(scripted, path=str(path))
        try:
            info = {"boot_id": "b", "protocol_version": 4, "vm_state": 0, "runtime_status": 0}
            connection = KeeperConnection(path, info)
            stream = connection.open_stream(5)
            stream.write_eof()
            got = [
                await asyncio.wait_for(stream.read(), 5),
                await asyncio.wait_for(stream.read(), 5),
            ]
            assert not connection.is_closed
            return got
        finally:
            server.close()

    assert asyncio.run(scenario()) == [b"hello", b""]


# 9. Idle exit -------------------------------------------------------------------------------


def _serving_pid(log: Path) -> int:
    match = re.search(r"serving \(pid (\d+)\)", log.read_text())
    assert match, log.read_text()
    return int(match.group(1))


def test_idle_keeper_exits_and_cleans_up(vault: str) -> None:
    paths = expected_paths(vault)
    result = fv("exec", vault, "--", "true", env={"FLY_VAULT_MUX_IDLE": "1"})
    assert result.returncode == 0, result.stderr
    pid = _serving_pid(paths.log)  # from the log: the pid file may already be gone
    wait_for(lambda: not pid_alive(pid), "the idle keeper did not exit")
    assert not paths.socket.exists()
    assert not paths.pid.exists()
    assert "exiting: idle for" in paths.log.read_text()


def test_busy_keeper_does_not_idle_out(vault: str) -> None:
    """A request running for longer than the idle time keeps its keeper: the command ends
    normally through it, and only then does the keeper idle out."""
    paths = expected_paths(vault)
    script = "echo up; sleep 3; echo done"
    result = fv("exec", vault, "--", "sh", "-c", script, env={"FLY_VAULT_MUX_IDLE": "1"})
    assert (result.returncode, result.stdout) == (0, b"up\ndone\n"), result.stderr
    pid = _serving_pid(paths.log)
    wait_for(lambda: not pid_alive(pid), "the idle keeper did not exit afterwards")
    log = paths.log.read_text()
    assert log.count("exiting") == 1 and "exiting: idle for" in log


# 10. mux stop, --no-mux, FLY_VAULT_MUX, mux = false -----------------------------------------


def test_mux_stop_stops_the_keeper(vault: str) -> None:
    assert fv("exec", vault, "--", "true").returncode == 0
    pid, stem = the_keeper()
    stopped = fv("mux", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert f"stopped the keeper of vault {vault} (pid {pid})".encode() in stopped.stdout
    wait_for(lambda: not pid_alive(pid), "the stopped keeper is still running")
    assert not stem.with_suffix(".sock").exists()
    assert not stem.with_suffix(".pid").exists()
    assert fv("mux", "status").stdout == b"no connection keepers running\n"


def test_mux_stop_names_one_vault_exactly(
    vault: str, init_process: InitProcess, issuer: OidcIssuer
) -> None:
    """``mux stop t`` stops vault ``t``'s keeper, not vault ``t-2``'s (whose files also
    start with ``t-``)."""
    from flyvault.config import save_vault

    save_vault(vault_entry(init_process.port, issuer, name="t-2"))
    for name in (vault, "t-2"):
        assert fv("exec", name, "--", "true").returncode == 0
    rows = {row["vault"]: row["pid"] for row in status()}
    assert set(rows) == {vault, "t-2"}
    assert [row["vault"] for row in status("t-2")] == ["t-2"]
    stopped = fv("mux", "stop", vault)
    assert stopped.returncode == 0, stopped.stderr
    wait_for(lambda: not pid_alive(rows[vault]), "the stopped keeper is still running")
    assert pid_alive(rows["t-2"])
    assert [row["vault"] for row in status()] == ["t-2"]


def test_mux_stop_removes_a_dead_keepers_leftovers(vault: str) -> None:
    assert fv("exec", vault, "--", "true").returncode == 0
    pid, stem = the_keeper()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), "the killed keeper")
    assert status(vault)[0]["error"].startswith("not answering")
    stopped = fv("mux", "stop")
    assert stopped.returncode == 0 and b"removed the keeper socket" in stopped.stdout
    assert pid_files() == [] and not stem.with_suffix(".sock").exists()


@pytest.mark.parametrize(
    "how",
    [("--no-mux",), {"FLY_VAULT_MUX": "0"}, {"FLY_VAULT_MUX": "off"}],
    ids=["--no-mux", "MUX=0", "MUX=off"],
)
def test_keeper_turned_off_never_starts(vault: str, how: Any) -> None:
    flags, env = (how, None) if isinstance(how, tuple) else ((), how)
    result = fv(*flags, "exec", vault, "--", "sh", "-c", "echo x; exit 4", env=env)
    assert (result.returncode, result.stdout) == (4, b"x\n"), result.stderr
    assert fv(*flags, "list-exec", vault, "--json", env=env).returncode == 0
    assert fv(*flags, "kill", vault, "ghost", env=env).returncode == 9
    assert not keeper_dir().exists() or list(keeper_dir().iterdir()) == []
    # The same call without the switch does start one: the check can fail.
    assert fv("exec", vault, "--", "true").returncode == 0
    assert len(pid_files()) == 1


def test_bogus_mux_variable_is_a_usage_error(vault: str) -> None:
    for args in (("exec", vault, "--", "true"), ("list-exec", vault), ("kill", vault, "x")):
        result = fv(*args, env={"FLY_VAULT_MUX": "bogus"})
        assert result.returncode == 2, (args, result.stderr)
        assert b"FLY_VAULT_MUX" in result.stderr
    assert pid_files() == []


def test_config_mux_false_never_starts_a_keeper(
    init_process: InitProcess, issuer: OidcIssuer
) -> None:
    from flyvault.config import save_vault

    save_vault(vault_entry(init_process.port, issuer, name="nomux", mux=False))
    result = fv("exec", "nomux", "--", "sh", "-c", "echo ok")
    assert (result.returncode, result.stdout) == (0, b"ok\n"), result.stderr
    assert fv("list-exec", "nomux").returncode == 0
    assert pid_files() == []
    from flyvault.config import load_vault

    assert load_vault("nomux").mux is False  # the saved entry did keep it
    assert not any(keeper_dir().glob("*.sock"))


# 11. The token never crosses the socket -------------------------------------------------------


class Recorder:
    """A relay at the keeper's socket path, in front of the real keeper (whose socket file
    was renamed): every byte each way is recorded."""

    def __init__(self, public: Path, real: Path) -> None:
        self.real = real
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(public))
        public.chmod(0o600)
        self.listener.listen(16)
        self.up = bytearray()
        self.down = bytearray()
        self.connections = 0
        self.threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.connect(str(self.real))
            for src, dst, log in ((client, server, self.up), (server, client, self.down)):
                thread = threading.Thread(target=self._pump, args=(src, dst, log), daemon=True)
                thread.start()
                self.threads.append(thread)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, log: bytearray) -> None:
        try:
            while data := src.recv(65536):
                log += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() thread
        self.listener.close()
        for thread in self.threads:
            thread.join(timeout=10)


def test_token_never_crosses_the_socket_nor_reaches_its_files(vault: str) -> None:
    assert fv("exec", vault, "--", "true").returncode == 0
    _, stem = the_keeper()
    public, real = stem.with_suffix(".sock"), stem.with_suffix(".real")
    public.rename(real)
    recorder = Recorder(public, real)
    try:
        result = fv("exec", vault, "--", "sh", "-c", "echo through; echo oops >&2", input_=b"in")
        assert (result.returncode, result.stdout) == (0, b"through\n"), result.stderr
        assert fv("list-exec", vault, "--json").returncode == 0
        status_out = fv("mux", "status", "--json")
        assert status_out.returncode == 0
    finally:
        recorder.close()
    assert recorder.connections == 3  # every call went through the relay
    up = MuxDecoder().feed(bytes(recorder.up))
    down = MuxDecoder().feed(bytes(recorder.down))
    assert [f.kind for f in up if f.kind is MuxKind.HELLO] == [MuxKind.HELLO] * 3
    assert MuxFrame(MuxKind.STDOUT, b"through\n") in down  # the relay saw the real traffic
    for blob in (bytes(recorder.up), bytes(recorder.down), status_out.stdout):
        assert TOKEN.encode() not in blob
    for path in keeper_dir().iterdir():
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


# More: concurrent starts, a changed config, the keeper as its own process, a lost vault --------


def test_concurrent_first_calls_share_one_keeper(vault: str, reaper: list[Any]) -> None:
    procs = [fv_popen("exec", vault, "--", "sh", "-c", f"echo {n}") for n in range(6)]
    reaper.extend(procs)
    for n, proc in enumerate(procs):
        out, err = proc.communicate(timeout=60)
        assert (proc.returncode, out) == (0, f"{n}\n".encode()), err
    pid, _ = the_keeper()  # the lock let one keeper listen; the others used it
    [row] = status(vault)
    assert row["pid"] == pid and row["connects"] == 1
    assert row["requests"] == 7  # every call went through it, and this status


def test_a_changed_config_gets_a_new_keeper(
    vault: str, init_process: InitProcess, issuer: OidcIssuer
) -> None:
    from flyvault.config import save_vault

    assert fv("exec", vault, "--", "true").returncode == 0
    old_pid, old_stem = the_keeper()
    save_vault(vault_entry(init_process.port, issuer, name=vault, mux_idle=1))
    assert fv("exec", vault, "--", "true").returncode == 0
    stems = {p.with_suffix("") for p in pid_files()}
    assert len(stems) == 2 and old_stem in stems  # the old one idles out on its own
    new_stem = (stems - {old_stem}).pop()
    new_pid = int(json.loads(new_stem.with_suffix(".pid").read_text())["pid"])
    assert new_pid != old_pid
    # mux_idle = 1 from the new config: it goes by itself, the old one stays.
    wait_for(lambda: not pid_alive(new_pid), "the new keeper (mux_idle = 1) did not exit")
    assert pid_alive(old_pid)


def test_a_keeper_started_from_main_runs_as_its_own_process(vault: str) -> None:
    """Outside the ``fly-vault`` entry point (a host program calling ``main()``) the keeper
    is not forked off the caller but started as ``python -m flyvault.cli.keeperd``."""
    script = (
        "import sys; from flyvault.cli.main import main; "
        f"sys.exit(main(['exec', {vault!r}, '--', 'sh', '-c', 'echo hosted']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout) == (0, b"hosted\n"), result.stderr
    pid, _ = the_keeper()
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        assert b"flyvault.cli.keeperd" in cmdline.read()
    again = fv("exec", vault, "--", "true")  # the entry point's calls use it
    assert again.returncode == 0
    [row] = status(vault)
    assert (row["pid"], row["requests"]) == (pid, 3)


def test_bad_idle_variable_is_a_usage_error(vault: str) -> None:
    result = fv("exec", vault, "--", "true", env={"FLY_VAULT_MUX_IDLE": "soon"})
    assert result.returncode == 2, result.stderr
    assert b"FLY_VAULT_MUX_IDLE" in result.stderr
    assert pid_files() == []


def test_keeper_exits_when_its_vault_is_gone_while_idle(
    vault: str, init_process: InitProcess
) -> None:
    assert fv("exec", vault, "--", "true").returncode == 0
    pid, stem = the_keeper()
    init_process.process.kill()  # no goodbye: the keeper's connection times out
    init_process.process.wait()
    wait_for(lambda: not pid_alive(pid), "the keeper outlived its vault", timeout=60)
    assert "the connection to the vault was lost" in stem.with_suffix(".log").read_text()
    assert not stem.with_suffix(".sock").exists() and not stem.with_suffix(".pid").exists()


# Streams through the keeper: cp and forward --stdio ------------------------------------------


def test_cp_reuses_the_keepers_connection_and_verifies_every_byte(
    vault: str, tmp_path: Path
) -> None:
    """Two copies in, two out: one connection (the keeper's), every byte checked."""
    payload = os.urandom(3 * 1024 * 1024 + 17)  # more than one relay chunk, an odd tail
    source = tmp_path / "in.bin"
    source.write_bytes(payload)
    for name in ("a.bin", "b.bin"):
        result = fv("cp", str(source), f"{vault}:{tmp_path / name}")
        assert result.returncode == 0, result.stderr
        back = tmp_path / f"back-{name}"
        result = fv("cp", f"{vault}:{tmp_path / name}", str(back))
        assert result.returncode == 0, result.stderr
        assert back.read_bytes() == payload
    (row,) = status(vault)
    assert row["connects"] == 1
    assert row["requests"] >= 4  # each copy: connect, then its streams


def test_cp_goes_on_directly_when_the_keeper_dies_before_it_starts(
    vault: str, tmp_path: Path
) -> None:
    """A keeper killed between two calls: the next copy falls back (a new keeper or a
    direct connection) instead of failing."""
    source = tmp_path / "in.bin"
    source.write_bytes(b"x" * 100_000)
    assert fv("cp", str(source), f"{vault}:{tmp_path / 'one.bin'}").returncode == 0
    pid, _stem = the_keeper()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), "the killed keeper")
    result = fv("cp", str(source), f"{vault}:{tmp_path / 'two.bin'}")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "two.bin").read_bytes() == source.read_bytes()


def test_a_stream_to_a_closed_port_is_refused_through_the_keeper(vault: str) -> None:
    """forward --stdio to a port nobody listens on: the vault's refusal (not a hang, not a
    generic error) reaches the CLI through the relay, and the keeper serves on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: nothing listens there
    result = fv("forward", "--stdio", vault, f"127.0.0.1:{port}", timeout=60)
    assert result.returncode != 0
    assert b"refused" in result.stderr.lower(), result.stderr
    # connect and stream went through the keeper (a direct forward would leave only the
    # status request itself).
    assert status(vault)[0]["requests"] >= 3
    assert fv("exec", vault, "--", "true").returncode == 0
    (row,) = status(vault)
    assert row["connects"] == 1


# Port forwards through the keeper -----------------------------------------------------------


class EchoServer:
    """A TCP echo server on 127.0.0.1 (the forward's target), served by daemon threads."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.listener.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def echo_through(port: int, payload: bytes, timeout: float = 30) -> bytes:
    """Send ``payload`` to 127.0.0.1:``port`` (retrying the connect until the forward
    listens, bounded) and read as many bytes back."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, f"nothing listens on {port}"
            time.sleep(0.05)
    with conn:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        received = bytearray()
        while data := conn.recv(65536):
            received += data
    return bytes(received)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


def test_a_port_forward_goes_through_the_keeper_and_holds_it(
    vault: str, echo: EchoServer, reaper: list[Any]
) -> None:
    """Each forwarded connection is a stream on the keeper's connection (no handshake of the
    forward's own), and the keeper stays while the forward runs, idle time or not."""
    assert fv("exec", vault, "--", "true", env={"FLY_VAULT_MUX_IDLE": "1"}).returncode == 0
    pid, _ = the_keeper()
    local = free_port()
    proc = fv_popen("forward", vault, f"{local}:127.0.0.1:{echo.port}")
    reaper.append(proc)
    payloads = [os.urandom(300_000), os.urandom(5)]
    for payload in payloads:
        assert echo_through(local, payload) == payload
    time.sleep(2.5)  # past idle time + check interval (1 s each): the lease keeps it
    assert pid_alive(pid)
    [row] = status(vault)
    assert (row["pid"], row["connects"]) == (pid, 1)
    assert row["active"] == 2  # the forward's lease and this status request
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    wait_for(lambda: not pid_alive(pid), "the keeper did not idle out once the forward ended")


def test_a_forward_goes_on_directly_when_its_keeper_dies(
    vault: str, echo: EchoServer, reaper: list[Any]
) -> None:
    assert fv("exec", vault, "--", "true").returncode == 0
    pid, _ = the_keeper()
    local = free_port()
    proc = fv_popen("forward", vault, f"{local}:127.0.0.1:{echo.port}")
    reaper.append(proc)
    assert echo_through(local, b"before") == b"before"
    os.kill(pid, signal.SIGKILL)
    # The lease ends with the keeper, and the forward says so; from then on connections are
    # made without it (one made in the instant before it noticed can still fail).
    read_until(proc, b"the connection keeper ended", stderr=True)
    assert echo_through(local, b"after" * 1000) == b"after" * 1000
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0


def test_an_aborted_keeper_stream_with_unread_data_ends_its_task(
    vault: str, tmp_path: Path
) -> None:
    """A read through the keeper left with more than HIGH_WATER unread: its task waited on
    the stream's own event, and once the abort made the connection forget the stream,
    nothing held the task: it was collected pending ("Task was destroyed but it is
    pending!" on the user's terminal). It must end instead, its socket closed."""
    import asyncio
    import gc
    import weakref

    from flyvault.cli.mux import _locate
    from flyvault.client.keeper_stream import HIGH_WATER, KeeperConnection
    from flyvault.protocol.constants import StreamTag
    from flyvault.protocol.files import FileClient
    from flyvault.protocol.files_messages import FileOp, FileRequest

    big = tmp_path / "big"
    big.write_bytes(os.urandom(8 * 1024 * 1024))
    assert fv("exec", vault, "--", "true").returncode == 0  # the keeper is up
    paths = _locate(vault)
    assert paths is not None

    async def body() -> tuple[bool, list[str]]:
        loop = asyncio.get_running_loop()
        problems: list[str] = []
        loop.set_exception_handler(lambda _, context: problems.append(context["message"]))
        connection = await KeeperConnection.open(paths.socket)
        stream = connection.open_stream(StreamTag.FILES)
        request = FileRequest(FileOp.READ, path=str(big))
        stream.write(FileClient(request, loop.time()).data_to_send(), end_stream=True)
        deadline = loop.time() + 10
        while stream.queued <= HIGH_WATER and loop.time() < deadline:
            await asyncio.sleep(0.01)  # unread: the stream's queue fills past HIGH_WATER
        assert stream.queued > HIGH_WATER
        task = weakref.ref(stream._task)
        stream.abort()
        del stream
        gc.collect()
        while (alive := task()) is not None and not alive.done() and loop.time() < deadline:
            await asyncio.sleep(0.01)
        gc.collect()
        connection.close()
        return task() is None or task().done(), problems  # type: ignore[union-attr]

    ended, problems = asyncio.run(body())
    assert ended and not [p for p in problems if "destroyed" in p], problems
