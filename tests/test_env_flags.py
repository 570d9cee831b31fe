"""Bad environment variables and flag values: a usage or config error, never a traceback.

Each case runs one of the five console scripts as a subprocess with one bad value and checks
the exit code (2 for usage errors, 3 for config errors), that the message names the variable
or flag and says what to do, and that no Python traceback reaches the user. The variables and
their accepted values are listed in references/config.md; the messages in
references/troubleshooting.md.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flyvault.envvars import env_flag, env_float, env_int, number
from flyvault.errors import UsageError

BIN = Path(sys.executable).parent
MODULES = {
    "fly-vault": "flyvault.cli.main",
    "fly-vault-init": "flyvault.server.main",
    "vault-proxy": "flyvault.proxy.main",
    "fly-vault-admin": "flyvault.admin.main",
    "fly-vault-mcp": "flyvault.mcp_server.main",
}
PROXY_ENV = {"FLY_APP": "tenants", "FLY_API_TOKEN": "fo1_test-token"}
ADMIN_ENV = {"FLY_API_TOKEN": "fo1_test-token", "FLY_APP": "tenants"}
INIT_ARGS = ("--listen", "127.0.0.1:0", "--host-mode", "--data-dir", "{dir}")


@dataclass(frozen=True)
class Case:
    id: str
    script: str
    args: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    code: int = 2
    #: Every one of these must appear in the output (the name, and the fix).
    expect: tuple[str, ...] = ()


def init(id: str, env: dict[str, str], *expect: str, code: int = 2, args=INIT_ARGS) -> Case:
    return Case(id, "fly-vault-init", tuple(args), env, code, expect)


def init_flag(id: str, args: tuple[str, ...], *expect: str) -> Case:
    return Case(id, "fly-vault-init", (*INIT_ARGS, *args), {}, 2, expect)


def proxy(id: str, args: tuple[str, ...], env: dict[str, str], *expect: str) -> Case:
    return Case(id, "vault-proxy", args, {**PROXY_ENV, **env}, 2, expect)


def admin(id: str, args: tuple[str, ...], env: dict[str, str], *expect: str, code=2) -> Case:
    return Case(id, "fly-vault-admin", args, {**ADMIN_ENV, **env}, code, expect)


def mcp(id: str, args: tuple[str, ...], env: dict[str, str], *expect: str, code=2) -> Case:
    return Case(id, "fly-vault-mcp", args, env, code, expect)


def cli(id: str, args: tuple[str, ...], env: dict[str, str], *expect: str, code=2) -> Case:
    return Case(id, "fly-vault", args, env, code, expect)


UNSET_OR_SET = ("for the default, or set e.g.",)

CASES = [
    # -- fly-vault-init: environment ---------------------------------------------------------
    init(
        "VAULT_SESSION_BUFFER-text",
        {"VAULT_SESSION_BUFFER": "abc"},
        "VAULT_SESSION_BUFFER='abc'",
        "at least 131072",
        "unset VAULT_SESSION_BUFFER",
    ),
    init(
        "VAULT_SESSION_BUFFER-small",
        {"VAULT_SESSION_BUFFER": "10"},
        "VAULT_SESSION_BUFFER='10'",
        "at least 131072",
        "VAULT_SESSION_BUFFER=1048576",
    ),
    init(
        "VAULT_SESSION_TTL-text",
        {"VAULT_SESSION_TTL": "an hour"},
        "VAULT_SESSION_TTL='an hour'",
        "number of seconds",
        *UNSET_OR_SET,
    ),
    init(
        "VAULT_SESSION_TTL-nan",
        {"VAULT_SESSION_TTL": "nan"},
        "VAULT_SESSION_TTL='nan'",
        "finite number",
    ),
    init(
        "VAULT_SESSION_TTL-negative",
        {"VAULT_SESSION_TTL": "-1"},
        "VAULT_SESSION_TTL='-1'",
        "at least 0",
    ),
    init(
        "VAULT_MAX_SESSIONS-text",
        {"VAULT_MAX_SESSIONS": "many"},
        "VAULT_MAX_SESSIONS='many'",
        "whole number",
        "VAULT_MAX_SESSIONS=256",
    ),
    init(
        "VAULT_MAX_SESSIONS-zero",
        {"VAULT_MAX_SESSIONS": "0"},
        "VAULT_MAX_SESSIONS='0'",
        "at least 1",
    ),
    init(
        "VAULT_LOG_LEVEL",
        {"VAULT_LOG_LEVEL": "loud"},
        "VAULT_LOG_LEVEL='loud'",
        "debug, info, warning, error, critical",
        "VAULT_LOG_LEVEL=info",
    ),
    init(
        "VAULT_FIREWALL",
        {"VAULT_FIREWALL": "maybe"},
        "VAULT_FIREWALL='maybe'",
        "yes/no",
        "VAULT_FIREWALL=1",
    ),
    init(
        "VAULT_FIREWALL_ALLOW_SSH",
        {"VAULT_FIREWALL_ALLOW_SSH": "2"},
        "VAULT_FIREWALL_ALLOW_SSH='2'",
        "yes/no",
        "VAULT_FIREWALL_ALLOW_SSH=0",
    ),
    init(
        "VAULT_LISTEN",
        {"VAULT_LISTEN": "nonsense"},
        "VAULT_LISTEN",
        "HOST:PORT",
        args=("--host-mode", "--data-dir", "{dir}"),
    ),
    init(
        "VAULT_DATA_DIR",
        {"VAULT_DATA_DIR": "{file}"},
        "VAULT_DATA_DIR=",
        "is not a directory",
        "mount point",
        args=("--listen", "127.0.0.1:0", "--host-mode"),
    ),
    init(
        "FLY_VAULT_DATAGRAM_SIZE",
        {"FLY_VAULT_DATAGRAM_SIZE": "big"},
        "FLY_VAULT_DATAGRAM_SIZE='big'",
        "unset FLY_VAULT_DATAGRAM_SIZE",
        code=3,
    ),
    init(
        "FLY_VAULT_PMTU",
        {"FLY_VAULT_PMTU": "maybe"},
        "FLY_VAULT_PMTU='maybe' is not a yes/no value",
        "FLY_VAULT_PMTU=0",
        code=3,
    ),
    # -- fly-vault-init: flags ---------------------------------------------------------------
    init_flag(
        "--session-buffer-text",
        ("--session-buffer", "abc"),
        "--session-buffer",
        "invalid int value",
    ),
    init_flag(
        "--session-buffer-small",
        ("--session-buffer", "10"),
        "--session-buffer must be at least 131072",
    ),
    init_flag(
        "--session-ttl-inf", ("--session-ttl", "inf"), "--session-ttl", "expected a finite number"
    ),
    init_flag(
        "--session-ttl-negative", ("--session-ttl", "-5"), "--session-ttl must not be negative"
    ),
    init_flag("--max-sessions-zero", ("--max-sessions", "0"), "--max-sessions must be at least 1"),
    init_flag(
        "--url-timeout-nan", ("--url-timeout", "nan"), "--url-timeout", "expected a finite number"
    ),
    init_flag("--url-timeout-zero", ("--url-timeout", "0"), "--url-timeout must be greater than 0"),
    init_flag("--url-max-bytes", ("--url-max-bytes", "0"), "--url-max-bytes must be at least 1"),
    init_flag("--log-level", ("--log-level", "loud"), "--log-level", "expected one of debug, info"),
    init_flag("--log-format", ("--log-format", "xml"), "--log-format", "invalid choice"),
    init_flag("--listen", ("--listen", "nonsense"), "--listen", "HOST:PORT"),
    init_flag("--data-dir", ("--data-dir", "{file}"), "--data-dir", "is not a directory"),
    init_flag(
        "--ready-file",
        ("--ready-file", "{missing}/ready.json"),
        "--ready-file",
        "no such directory",
    ),
    init_flag(
        "--access-token-fd", ("--access-token-fd", "987"), "--access-token-fd 987", "without it"
    ),
    # -- vault-proxy ---------------------------------------------------------------------------
    proxy(
        "VAULT_PROXY_PORT-text",
        (),
        {"VAULT_PROXY_PORT": "https"},
        "VAULT_PROXY_PORT='https'",
        "from 0 to 65535",
        "VAULT_PROXY_PORT=8443",
    ),
    proxy(
        "VAULT_PROXY_PORT-range",
        (),
        {"VAULT_PROXY_PORT": "70000"},
        "VAULT_PROXY_PORT='70000'",
        "from 0 to 65535",
    ),
    proxy(
        "VAULT_PROXY_STATUS-malformed",
        (),
        {"VAULT_PROXY_STATUS": "status"},
        "VAULT_PROXY_STATUS",
        "HOST:PORT",
    ),
    proxy(
        "VAULT_PROXY_STATUS-public",
        (),
        {"VAULT_PROXY_STATUS": "0.0.0.0:9090"},
        "VAULT_PROXY_STATUS must be a loopback address",
    ),
    proxy(
        "VAULT_PROXY_LOG_LEVEL",
        (),
        {"VAULT_PROXY_LOG_LEVEL": "chatty"},
        "VAULT_PROXY_LOG_LEVEL='chatty'",
        "debug, info",
        "VAULT_PROXY_LOG_LEVEL=info",
    ),
    proxy(
        "FLY_API_BASE",
        (),
        {"FLY_API_BASE": "api.machines.dev"},
        "FLY_API_BASE=",
        "http(s) URL",
        "unset FLY_API_BASE",
    ),
    proxy("FLY_APP", (), {"FLY_APP": ""}, "FLY_APP env var required"),
    proxy("FLY_API_TOKEN", (), {"FLY_API_TOKEN": " "}, "FLY_API_TOKEN env var required"),
    proxy("--port", ("--port", "70000"), {}, "--port 70000 is out of range 0-65535"),
    proxy("--backend-port", ("--backend-port", "0"), {}, "--backend-port 0 is out of range"),
    proxy(
        "--refresh-interval-secs-nan",
        ("--refresh-interval-secs", "nan"),
        {},
        "--refresh-interval-secs",
        "expected a finite number",
    ),
    proxy(
        "--refresh-interval-secs-zero",
        ("--refresh-interval-secs", "0"),
        {},
        "--refresh-interval-secs must be positive",
    ),
    proxy(
        "--min-refresh-interval-secs",
        ("--min-refresh-interval-secs", "-1"),
        {},
        "--min-refresh-interval-secs must not be negative",
    ),
    proxy(
        "--session-timeout-secs",
        ("--session-timeout-secs", "inf"),
        {},
        "--session-timeout-secs",
        "expected a finite number",
    ),
    proxy(
        "--wake-interval-secs",
        ("--wake-interval-secs", "0"),
        {},
        "--wake-interval-secs must be positive",
    ),
    proxy(
        "--summary-interval-secs",
        ("--summary-interval-secs", "-1"),
        {},
        "--summary-interval-secs must not be negative",
    ),
    proxy("--max-sessions", ("--max-sessions", "0"), {}, "--max-sessions must be at least 1"),
    proxy(
        "--max-sessions-per-ip",
        ("--max-sessions-per-ip", "x"),
        {},
        "--max-sessions-per-ip",
        "invalid int value",
    ),
    proxy("--max-id-length", ("--max-id-length", "0"), {}, "--max-id-length must be at least 1"),
    proxy("--cid-length", ("--cid-length", "21"), {}, "--cid-length must be 0-20"),
    proxy("--api-base", ("--api-base", "ftp://x"), {}, "--api-base", "http(s) URL"),
    proxy("--status", ("--status", "9090"), {}, "--status", "HOST:PORT"),
    proxy("--log-level", ("--log-level", "loud"), {}, "--log-level", "expected one of debug"),
    proxy(
        "--ready-file",
        ("--ready-file", "{missing}/ready.json"),
        {},
        "--ready-file",
        "no such directory",
    ),
    # -- fly-vault-admin ----------------------------------------------------------------------
    admin(
        "FLY_API_TOKEN",
        ("tenant", "list"),
        {"FLY_API_TOKEN": ""},
        "FLY_API_TOKEN",
        "fly tokens create",
    ),
    admin("FLY_APP", ("tenant", "list"), {"FLY_APP": ""}, "FLY_APP", "--app"),
    admin(
        "FLY_API_BASE",
        ("tenant", "list"),
        {"FLY_API_BASE": "ftp://x"},
        "FLY_API_BASE",
        "http(s) URL",
    ),
    admin(
        "XDG_STATE_HOME",
        ("tenant", "update-image", "--image", "i", "--all-tenants"),
        {"XDG_STATE_HOME": "{file}", "FLY_API_BASE": "http://127.0.0.1:9"},
        "cannot read rollout state",
        "XDG_STATE_HOME",
        "--state-file",
        code=3,
    ),
    admin(
        "--state-file",
        (
            "tenant",
            "update-image",
            "--image",
            "i",
            "--all-tenants",
            "--state-file",
            "{file}/state.json",
        ),
        {"FLY_API_BASE": "http://127.0.0.1:9"},
        "cannot read rollout state",
        "--state-file",
        code=3,
    ),
    admin(
        "create --wait-timeout-secs",
        ("tenant", "create", "t1", "--template", "t.toml", "--wait-timeout-secs", "inf"),
        {},
        "--wait-timeout-secs",
        "expected a finite number",
    ),
    admin(
        "delete --wait-timeout-secs",
        ("tenant", "delete", "t1", "--yes", "--wait-timeout-secs", "0"),
        {},
        "--wait-timeout-secs must be > 0",
    ),
    admin(
        "--soak-secs",
        ("tenant", "update-image", "--image", "i", "--all-tenants", "--soak-secs", "nan"),
        {},
        "--soak-secs",
        "expected a finite number",
    ),
    admin(
        "--poll-interval",
        ("tenant", "update-image", "--image", "i", "--all-tenants", "--poll-interval", "0"),
        {},
        "--poll-interval must be > 0",
    ),
    admin(
        "--concurrency",
        ("tenant", "update-image", "--image", "i", "--all-tenants", "--concurrency", "0"),
        {},
        "--concurrency must be >= 1",
    ),
    admin(
        "--lease-ttl-secs",
        ("tenant", "update-image", "--image", "i", "--all-tenants", "--lease-ttl-secs", "ten"),
        {},
        "--lease-ttl-secs",
        "invalid int value",
    ),
    admin(
        "usage-facts --listen",
        ("tenant", "usage-facts", "--listen", "localhost"),
        {},
        "listen address",
        "127.0.0.1:18083",
    ),
    # -- fly-vault-mcp ------------------------------------------------------------------------
    mcp(
        "FLY_VAULT_DATAGRAM_SIZE",
        (),
        {"FLY_VAULT_DATAGRAM_SIZE": "0"},
        "FLY_VAULT_DATAGRAM_SIZE='0'",
        "unset FLY_VAULT_DATAGRAM_SIZE",
        code=3,
    ),
    mcp(
        "FLY_VAULT_PMTU",
        (),
        {"FLY_VAULT_PMTU": "maybe"},
        "FLY_VAULT_PMTU='maybe' is not a yes/no value",
        "FLY_VAULT_PMTU=0",
        code=3,
    ),
    mcp(
        "FLY_VAULT_CONFIG",
        (),
        {"FLY_VAULT_CONFIG": "{dir}"},
        "FLY_VAULT_CONFIG=",
        "is a directory",
        "unset it",
        code=3,
    ),
    mcp(
        "FLY_VAULT_MCP_TOKEN-missing",
        ("--http", "127.0.0.1:0"),
        {},
        "FLY_VAULT_MCP_TOKEN",
        "--token-file",
    ),
    mcp(
        "FLY_VAULT_MCP_TOKEN-short",
        ("--http", "127.0.0.1:0"),
        {"FLY_VAULT_MCP_TOKEN": "short"},
        "FLY_VAULT_MCP_TOKEN",
        "shorter than 16 characters",
    ),
    mcp(
        "--token-env",
        ("--http", "127.0.0.1:0", "--token-env", "NO_SUCH_TOKEN"),
        {},
        "NO_SUCH_TOKEN",
        "--token-file",
    ),
    mcp(
        "--token-file",
        ("--http", "127.0.0.1:0", "--token-file", "{missing}"),
        {},
        "--token-file",
        "No such file",
    ),
    mcp("--config", ("--config", "{dir}"), {}, "--config", "is a directory", "config.toml"),
    mcp("--buffer-mib-zero", ("--buffer-mib", "0"), {}, "--buffer-mib must be at least 1"),
    mcp("--buffer-mib-text", ("--buffer-mib", "lots"), {}, "--buffer-mib", "invalid int value"),
    mcp("--http-public", ("--http", "0.0.0.0:8765"), {}, "--http", "non-loopback", "127.0.0.1"),
    mcp("--http-malformed", ("--http", "8765"), {}, "--http", "HOST:PORT"),
    # -- fly-vault ------------------------------------------------------------------------------
    cli(
        "FLY_VAULT_CONFIG-directory",
        ("list-exec", "dev"),
        {"FLY_VAULT_CONFIG": "{dir}"},
        "FLY_VAULT_CONFIG=",
        "is a directory",
        "unset it",
        code=3,
    ),
    cli(
        "FLY_VAULT_CONFIG-unreadable",
        ("list-exec", "dev"),
        {"FLY_VAULT_CONFIG": "{file}/config.toml"},
        "cannot read config file",
        "comes from FLY_VAULT_CONFIG",
        "unset it",
        code=3,
    ),
    cli(
        "XDG_CONFIG_HOME",
        ("list-exec", "dev"),
        {"XDG_CONFIG_HOME": "{file}"},
        "cannot read config file",
        "comes from XDG_CONFIG_HOME",
        code=3,
    ),
    cli(
        "XDG_DATA_HOME",
        ("local", "up"),
        {"XDG_DATA_HOME": "{file}"},
        "cannot use the local vault directory",
        "XDG_DATA_HOME",
        code=3,
    ),
    cli(
        "FLY_VAULT_DATAGRAM_SIZE",
        ("list-exec", "dev"),
        {"FLY_VAULT_CONFIG": "{config}", "FLY_VAULT_DATAGRAM_SIZE": "99999"},
        "FLY_VAULT_DATAGRAM_SIZE='99999'",
        "unset FLY_VAULT_DATAGRAM_SIZE",
        code=3,
    ),
    cli(
        "FLY_VAULT_PMTU",
        ("list-exec", "dev"),
        {"FLY_VAULT_CONFIG": "{config}", "FLY_VAULT_PMTU": "maybe"},
        "FLY_VAULT_PMTU='maybe' is not a yes/no value",
        "FLY_VAULT_PMTU=0",
        code=3,
    ),
    cli(
        "CODEX_HOME",
        ("skills", "install", "--target", "codex"),
        {"CODEX_HOME": "{file}"},
        "cannot create the skills directory",
        "CODEX_HOME",
        code=1,
    ),
    cli(
        "exec --reconnect-timeout",
        ("exec", "dev", "--reconnect-timeout", "nan", "--", "true"),
        {},
        "--reconnect-timeout",
        "finite number of seconds",
    ),
    cli(
        "connect --reconnect-timeout",
        ("connect", "dev", "--reconnect-timeout", "-1"),
        {},
        "--reconnect-timeout",
        "at least 0",
    ),
    cli("local up --port", ("local", "up", "--port", "99999"), {}, "--port", "from 0 to 65535"),
    cli(
        "kill --signal",
        ("kill", "dev", "s1", "--signal", "BOGUS"),
        {"FLY_VAULT_CONFIG": "{config}"},
        "unknown signal 'BOGUS'",
    ),
]


def _substitute(text: str, places: dict[str, str]) -> str:
    for key, value in places.items():
        text = text.replace("{" + key + "}", value)
    return text


def _command(script: str) -> list[str]:
    installed = BIN / script
    if installed.exists():
        return [str(installed)]
    return [sys.executable, "-m", MODULES[script]]


@pytest.fixture
def places(tmp_path: Path) -> dict[str, str]:
    directory = tmp_path / "a-directory"
    directory.mkdir()
    regular = tmp_path / "a-file"
    regular.write_text("not a directory\n")
    config = tmp_path / "config.toml"
    config.write_text(
        '[vault.dev]\naddress = "127.0.0.1:9"\norg = "o"\napp = "a"\n'
        'access_token = "test-access-token-0123456789"\n'
    )
    return {
        "dir": str(directory),
        "file": str(regular),
        "missing": str(tmp_path / "missing"),
        "config": str(config),
    }


def _environment(tmp_path: Path, extra: dict[str, str]) -> dict[str, str]:
    scrubbed = ("FLY_", "VAULT_", "XDG_")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(scrubbed) and k not in ("ACCESS_TOKEN", "CODEX_HOME")
    }
    home = tmp_path / "home"
    for variable, sub in (
        ("XDG_CONFIG_HOME", "config"),
        ("XDG_CACHE_HOME", "cache"),
        ("XDG_DATA_HOME", "data"),
        ("XDG_STATE_HOME", "state"),
    ):
        (home / sub).mkdir(parents=True, exist_ok=True)
        env[variable] = str(home / sub)
    env["HOME"] = str(home)
    # The test's own runtime directory: a keeper a CLI call starts is stopped at teardown
    # (without it, keepers would gather in the shared /tmp/fly-vault-<uid>).
    env["XDG_RUNTIME_DIR"] = os.environ["XDG_RUNTIME_DIR"]
    env.update(extra)
    return env


def run(
    script: str, args: list[str], env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_command(script), *args],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("case", CASES, ids=[f"{c.script}:{c.id}" for c in CASES])
def test_bad_value_is_reported_without_traceback(
    case: Case, places: dict[str, str], tmp_path: Path
) -> None:
    args = [_substitute(arg, places) for arg in case.args]
    extra = {key: _substitute(value, places) for key, value in case.env.items()}
    result = run(case.script, args, _environment(tmp_path, extra), tmp_path)
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == case.code, output
    for text in case.expect:
        assert _substitute(text, places) in output, (text, output)


def test_help_works_whatever_the_environment(tmp_path: Path) -> None:
    """Variables are read after parsing: --help never fails on them."""
    bad = {
        "VAULT_SESSION_BUFFER": "abc",
        "VAULT_SESSION_TTL": "abc",
        "VAULT_MAX_SESSIONS": "abc",
        "VAULT_LOG_LEVEL": "abc",
        "VAULT_FIREWALL": "abc",
        "VAULT_PROXY_PORT": "abc",
        "VAULT_PROXY_LOG_LEVEL": "abc",
        "FLY_API_BASE": "abc",
        "FLY_VAULT_DATAGRAM_SIZE": "abc",
        "FLY_VAULT_PMTU": "abc",
        "FLY_VAULT_CONFIG": str(tmp_path),
    }
    env = _environment(tmp_path, bad)
    for script in MODULES:
        result = run(script, ["--help"], env, tmp_path)
        assert result.returncode == 0, result.stderr
        assert "usage:" in result.stdout and "Traceback" not in result.stderr


def test_mcp_http_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = _environment(tmp_path, {"FLY_VAULT_MCP_TOKEN": "x" * 32})
        result = run("fly-vault-mcp", ["--http", f"127.0.0.1:{port}"], env, tmp_path)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    assert f"--http 127.0.0.1:{port}: cannot listen there" in result.stderr
    assert "pick another port" in result.stderr


def test_good_values_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X_INT", " 131072 ")
    monkeypatch.setenv("X_FLOAT", "2.5")
    monkeypatch.setenv("X_FLAG", "Yes")
    assert env_int("X_INT", 1, minimum=131072) == 131072
    assert env_float("X_FLOAT", 1.0, minimum=0) == 2.5
    assert env_flag("X_FLAG") is True
    monkeypatch.setenv("X_FLAG", "off")
    assert env_flag("X_FLAG") is False
    monkeypatch.setenv("X_INT", "")
    assert env_int("X_INT", 7) == 7  # blank counts as unset
    monkeypatch.delenv("X_FLAG")
    assert env_flag("X_FLAG") is False
    assert number(int, minimum=0, maximum=65535)("8443") == 8443
    with pytest.raises(UsageError, match="X_FLOAT='inf' is not valid"):
        monkeypatch.setenv("X_FLOAT", "inf")
        env_float("X_FLOAT", 1.0)
    with pytest.raises(UsageError, match=r"X_INT='1e3' is not valid: expected a whole number"):
        monkeypatch.setenv("X_INT", "1e3")
        env_int("X_INT", 1)


def test_rollout_state_write_failure_names_its_source(tmp_path: Path) -> None:
    from flyvault.admin.rollout_state import RolloutState
    from flyvault.errors import ConfigError

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    state = RolloutState(app="a", image="i", selection=None, path=blocker / "state.json")
    with pytest.raises(ConfigError, match="cannot write rollout state") as caught:
        state.save()
    assert caught.value.hint and "XDG_STATE_HOME" in caught.value.hint
