"""The ``fly-vault`` command line as a user runs it: real processes, real QUIC."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TOKEN, InitProcess

from flyvault.standins import OidcIssuer


def fly_vault(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flyvault.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )


def write_config(text: str) -> Path:
    path = Path(os.environ["XDG_CONFIG_HOME"]) / "fly-vault" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def entry(name: str, port: int, issuer: OidcIssuer, **overrides: str) -> str:
    values = {
        "address": f"127.0.0.1:{port}",
        "org": "test-org",
        "app": "test-app",
        "access_token": TOKEN,
        "oidc_issuer_url": issuer.base_url,
        **overrides,
    }
    body = "\n".join(f'{key} = "{value}"' for key, value in values.items())
    return f"[vault.{name}]\n{body}\n"


NO_HEAVY_IMPORTS = """
import sys
from flyvault.cli.main import main
code = main(sys.argv[1:])
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('aioquic', 'cryptography', 'jwt'))
print('HEAVY:' + ','.join(heavy))
sys.exit(code)
"""


def test_help_imports_no_quic_or_crypto() -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "flyvault.cli.main", "--help"], capture_output=True, text=True
    )
    assert help_text.returncode == 0
    assert "doctor" in help_text.stdout and "exit codes" in help_text.stdout
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\nfrom flyvault.cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('aioquic','cryptography','jwt')))",
        ],
        capture_output=True,
        text=True,
    )
    assert check.stdout.strip().endswith("[]"), check.stdout


def test_config_errors_import_no_quic_or_crypto() -> None:
    write_config("[vault.broken\naddress = 1\n")
    result = subprocess.run(
        [sys.executable, "-c", NO_HEAVY_IMPORTS, "doctor", "broken"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 3
    assert "HEAVY:\n" in result.stdout
    assert "line 1" in result.stdout + result.stderr


def test_doctor_passes_against_init_with_standins(
    init_process: InitProcess, issuer: OidcIssuer
) -> None:
    write_config(entry("dev", init_process.port, issuer))
    result = fly_vault("doctor", "dev")
    assert result.returncode == 0, result.stdout + result.stderr
    for step in ("config", "handshake", "attestation", "authenticate"):
        assert any(line.split()[:2] == ["ok", step] for line in result.stdout.splitlines()), (
            result.stdout
        )
    assert "attested by the development issuer" in result.stderr  # the override is announced
    assert TOKEN not in result.stdout + result.stderr

    report = json.loads(fly_vault("doctor", "dev", "--json").stdout)
    assert report["ok"] is True
    assert [s["step"] for s in report["steps"]] == [
        "config",
        "handshake",
        "attestation",
        "authenticate",
        "keeper",  # none runs: doctor reports it and starts none
    ]
    assert report["keeper"]["state"] == "none"
    assert all(s["elapsed_ms"] >= 0 for s in report["steps"])


@pytest.mark.parametrize(
    ("overrides", "code", "step", "message"),
    [
        ({"app": "other-app"}, 5, "attestation", "attestation app mismatch"),
        ({"org": "other-org"}, 5, "attestation", "org mismatch"),
        ({"machine_id": "0123456789abcd"}, 5, "attestation", "machine mismatch"),
        ({"access_token": "not-the-token"}, 6, "authenticate", "verification failed"),
    ],
)
def test_doctor_names_the_failed_step_and_the_fix(
    init_process: InitProcess,
    issuer: OidcIssuer,
    overrides: dict[str, str],
    code: int,
    step: str,
    message: str,
) -> None:
    write_config(entry("dev", init_process.port, issuer, **overrides))
    result = fly_vault("doctor", "dev")
    assert result.returncode == code, result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if line.strip().startswith("FAIL")]
    assert failed and failed[0].split()[1] == step
    assert message in result.stdout
    assert "fix:" in result.stdout
    assert TOKEN not in result.stdout + result.stderr
    assert "not-the-token" not in result.stdout + result.stderr


def test_doctor_unreachable_and_unknown_vault(issuer: OidcIssuer) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    write_config(entry("gone", port, issuer))
    result = fly_vault("doctor", "gone")
    assert result.returncode == 4
    assert "FAIL  handshake" in result.stdout
    unknown = fly_vault("doctor", "nope")
    assert unknown.returncode == 3
    assert "vault nope not found" in unknown.stdout
    assert "gone" in unknown.stdout  # the hint lists the configured names


def test_a_vault_that_does_not_answer_gets_a_hint_naming_it(issuer: OidcIssuer) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    write_config(
        entry("gone", port, issuer)
        + entry("local", port, issuer, org="local", app="fly-vault-local")
    )
    remote = fly_vault("--no-mux", "exec", "gone", "--", "true")
    assert remote.returncode == 255
    assert "fly-vault: hint: is the vault running" in remote.stderr
    assert "check with: fly-vault doctor gone" in remote.stderr
    local = fly_vault("--no-mux", "exec", "local", "--", "true")
    assert local.returncode == 255
    assert "the local dev vault is not running: start it with fly-vault local up" in local.stderr


def test_missing_config_file_is_a_clear_error() -> None:
    result = fly_vault("doctor", "anything")
    assert result.returncode == 3
    assert "not found" in result.stdout
    assert "[vault." in result.stdout  # the hint shows an example entry


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["connect", "anything", "--forward", "abc:def"], "--forward 'abc:def'"),
        (["forward", "anything", "abc"], "forward spec 'abc'"),
        (["forward", "anything"], "the following arguments are required: L:HOST:R"),
        (["exec", "anything", "--env", "FOO", "--", "true"], "--env 'FOO'"),
    ],
)
def test_usage_errors_exit_2_before_the_config_is_read(argv: list[str], words: str) -> None:
    """No config file exists here: a usage error must be found (exit 2) before it is read,
    let alone before anything connects."""
    result = fly_vault(*argv)
    assert result.returncode == 2, result.stderr
    assert words in result.stderr and "config file" not in result.stderr


def test_local_vault_up_doctor_status_down_keeps_other_entries(issuer: OidcIssuer) -> None:
    path = write_config(
        '[vault.prod]\naddress = "prod.example:8443"\norg = "acme"\napp = "vault"\n'
        'forward = ["8080:localhost:80"]\n'
    )
    up = fly_vault("local", "up")
    assert up.returncode == 0, up.stderr
    try:
        text = path.read_text()
        assert "[vault.prod]" in text and "8080:localhost:80" in text
        assert "[vault.local]" in text
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        again = fly_vault("local", "up")
        assert "already running" in again.stdout
        doctor = fly_vault("doctor", "local")
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert "runtime host mode" in doctor.stdout
        status = fly_vault("local", "status", "--json")
        info = json.loads(status.stdout)
        assert info["running"] is True and info["mode"] == "host"
        pid, init_pid = info["pid"], info["init_pid"]
        # The supervisor and init are two processes; init is the real server, started by
        # its entry point (the client side imports nothing of it), the token over a pipe.
        assert init_pid != pid
        init_cmdline = Path(f"/proc/{init_pid}/cmdline").read_bytes().split(b"\0")
        assert b"--host-mode" in init_cmdline and b"--access-token-fd" in init_cmdline
        assert Path(f"/proc/{init_pid}/stat").read_text().split(")")[-1].split()[1] == str(pid)
        for process in (pid, init_pid):
            environ = Path(f"/proc/{process}/environ").read_bytes()
            assert b"ACCESS_TOKEN" not in environ
        text = fly_vault("local", "status")
        assert f"fly-vault-init, pid {init_pid}" in text.stdout
    finally:
        down = fly_vault("local", "down")
    assert down.returncode == 0
    assert "stopped" in down.stdout
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.05)
    assert not _alive(pid)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(init_pid):
        time.sleep(0.05)
    assert not _alive(init_pid)
    status = fly_vault("local", "status")
    assert status.returncode == 1
    assert "not running" in status.stdout
    assert "[vault.prod]" in path.read_text()


def test_rootfs_option_flags_override_the_entry_and_are_checked() -> None:
    from flyvault.cli.main import build_parser
    from flyvault.cli.remote import with_rootfs_options
    from flyvault.config import VaultConfig
    from flyvault.errors import UsageError

    parser = build_parser()
    vault = VaultConfig(name="v", address="h:1", org="o", app="a", rootfs_max_expansion_ratio=50)
    for argv in (["reprovision", "v", "--yes"], ["connect", "v", "--reprovision"]):
        plain = parser.parse_args(argv)
        assert with_rootfs_options(vault, plain) is vault  # no flag: the entry as it is
        flagged = parser.parse_args([*argv, "--allow-devices", "--max-expansion-ratio", "0"])
        changed = with_rootfs_options(vault, flagged)
        assert changed.rootfs_allow_devices is True and changed.rootfs_max_expansion_ratio == 0
        assert changed.address == vault.address
    bad = parser.parse_args(["reprovision", "v", "--max-expansion-ratio", "-3"])
    with pytest.raises(UsageError, match="--max-expansion-ratio must be from 0"):
        with_rootfs_options(vault, bad)
    # local up without a rootfs has nothing to apply them to.
    result = fly_vault("local", "up", "--allow-devices")
    assert result.returncode == 2
    assert "--allow-devices and --max-expansion-ratio apply to a rootfs" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="vm mode (local up --rootfs) needs root")
def test_local_up_saves_the_rootfs_options(tmp_path: Path) -> None:
    image = tmp_path / "rootfs.tar.gz"
    image.write_bytes(b"not looked at until the first connect")
    path = write_config("")
    up = fly_vault(
        "local", "up", "--rootfs", str(image), "--allow-devices", "--max-expansion-ratio", "0"
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        text = path.read_text()
        assert "rootfs_allow_devices = true" in text
        assert "rootfs_max_expansion_ratio = 0" in text
    finally:
        fly_vault("local", "down")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.split(")")[-1].split()[0] != "Z"


def test_init_server_scrubs_token_from_proc_environ(init_process: InitProcess) -> None:
    environ = Path(f"/proc/{init_process.process.pid}/environ").read_bytes()
    assert TOKEN.encode() not in environ
    assert b"ACCESS_TOKEN" not in environ


def test_init_stops_cleanly_on_sigterm(init_process: InitProcess) -> None:
    init_process.process.send_signal(signal.SIGTERM)
    assert init_process.process.wait(timeout=10) == 0
    assert "shutting down" in init_process.log.read_text()


def test_init_rejects_bad_listen_address(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flyvault.server.main",
            "--listen",
            "nonsense",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--listen" in result.stderr and "HOST:PORT" in result.stderr
