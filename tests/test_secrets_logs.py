"""One scrubber for every secret, logs worth reading, and sweeps that no token ever shows.

- ``flyvault.redact``: the matching rules (long secrets anywhere, short ones as whole words,
  JSON-escaped and percent-encoded forms), structured values, the log filter, the stream.
- ``fly-vault -v --log-file`` against a real init over QUIC: the log has every step with
  timings (config, resolve, handshake, attestation with its issuer, authentication, stream
  opens and closes) and no secret; an unwritable log file is a usage error, not a traceback.
- A token in any config field is refused, naming the field, never printing the token.
- Sweeps: a known token (the access token; the API token, tenant access token, bearer and
  secret variables for fly-vault-admin) over stdout, stderr, the log file and --json of
  every command that runs locally.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import admin_support
import pytest
from admin_support import (
    ACCESS_TOKEN,
    API_TOKEN,
    APP,
    BEARER,
    IMAGE_V2,
    SIMPLE_TEMPLATE,
    Cli,
    write_template,
)
from conftest import TOKEN, InitProcess

from flyvault import redact
from flyvault.standins import OidcIssuer

standin = admin_support.standin
cli = admin_support.cli


# -- the scrubber ------------------------------------------------------------------------------


def test_long_secrets_go_everywhere_short_ones_as_whole_words() -> None:
    redact.register("Lq8-long-secret-value")
    redact.register("ab3")
    text = "x=Lq8-long-secret-value; glued:zzLq8-long-secret-valuezz ab3 'ab3' ab3. lab3 ab3-x"
    assert redact.scrub(text) == (
        "x=<redacted>; glued:zz<redacted>zz <redacted> '<redacted>' <redacted>. lab3 ab3-x"
    )
    assert redact.scrub("fly secrets set --stage") == "fly secrets set --stage"


def test_whitespace_json_and_url_forms_are_registered_too() -> None:
    redact.register('  tok"en/with spaces+plus  ')
    assert 'tok"en' not in redact.scrub('value:  tok"en/with spaces+plus  !')
    as_json = json.dumps({"t": 'tok"en/with spaces+plus'})
    assert redact.scrub(as_json) == '{"t": "<redacted>"}'
    assert redact.scrub("GET /x?t=tok%22en%2Fwith%20spaces%2Bplus") == "GET /x?t=<redacted>"


def test_empty_and_none_are_ignored_and_register_is_idempotent() -> None:
    before = redact.scrub("nothing here at all")
    redact.register(None)
    redact.register("")
    redact.register("   ")
    assert redact.scrub("nothing here at all") == before
    redact.register("idempotent-secret-1")
    redact.register("idempotent-secret-1")
    assert redact.scrub("idempotent-secret-1") == "<redacted>"


def test_scrub_value_covers_keys_lists_and_tuples() -> None:
    redact.register("structured-secret-42")
    value = {
        "structured-secret-42": ["a structured-secret-42", ("structured-secret-42", 1)],
        "n": 3,
        "none": None,
    }
    assert redact.scrub_value(value) == {
        "<redacted>": ["a <redacted>", ("<redacted>", 1)],
        "n": 3,
        "none": None,
    }


def test_log_filter_scrubs_args_exceptions_and_extras() -> None:
    redact.register("log-secret-value-77")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(message)s %(event)s"))
    logger = logging.getLogger("flyvault.test_redact")
    logger.addHandler(handler)
    logger.propagate = False
    redact.install_log_filter(logger)
    redact.install_log_filter(logger)  # once is enough
    assert sum(isinstance(f, redact.ScrubFilter) for f in handler.filters) == 1
    try:
        try:
            raise ValueError("bad log-secret-value-77")
        except ValueError:
            logger.exception(
                "token %s and %d%%",
                "log-secret-value-77",
                5,
                extra={"event": "log-secret-value-77"},
            )
    finally:
        logger.removeHandler(handler)
    text = out.getvalue()
    assert "log-secret-value-77" not in text
    assert "token <redacted> and 5% <redacted>" in text
    assert "ValueError: bad <redacted>" in text


def test_scrubbing_stream_delegates() -> None:
    redact.register("stream-secret-value-9")
    inner = io.StringIO()
    stream = redact.ScrubbingStream(inner)
    print("say stream-secret-value-9", file=stream)  # type: ignore[arg-type]
    stream.writelines(["x stream-secret-value-9\n"])
    assert inner.getvalue() == "say <redacted>\nx <redacted>\n"
    assert stream.getvalue() == inner.getvalue()  # anything else is the wrapped stream's


def test_init_registers_its_access_token() -> None:
    from flyvault.server.auth import AccessToken

    AccessToken("init-side-token-0451")
    assert redact.scrub("echo init-side-token-0451") == "echo <redacted>"


def test_a_loaded_config_token_is_registered(tmp_path: Path) -> None:
    from flyvault.config import load_config

    path = tmp_path / "config.toml"
    path.write_text(
        '[vault.a]\naddress = "h:1"\norg = "o"\napp = "a"\naccess_token = "config-token-3141"\n'
    )
    load_config(path)
    assert redact.scrub("config-token-3141") == "<redacted>"


# -- the CLI against a real init ----------------------------------------------------------------


def fly_vault(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flyvault.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def write_config(text: str) -> Path:
    path = Path(os.environ["XDG_CONFIG_HOME"]) / "fly-vault" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def table(name: str, **values: object) -> str:
    lines = [f"[vault.{name}]" if "." not in name else f'[vault."{name}"]']
    for key, value in values.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def good_entry(issuer: OidcIssuer, port: int, name: str = "dev", **overrides: object) -> str:
    values: dict[str, object] = {
        "address": f"127.0.0.1:{port}",
        "org": "test-org",
        "app": "test-app",
        "access_token": TOKEN,
        "oidc_issuer_url": issuer.base_url,
    }
    values.update(overrides)
    return table(name, **values)


def log_lines(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_clean(*texts: str, secrets: tuple[str, ...] = (TOKEN,)) -> None:
    for text in texts:
        for secret in secrets:
            assert secret not in text, f"secret leaked into:\n{text}"


def test_verbose_and_log_file_record_every_step(
    init_process: InitProcess, issuer: OidcIssuer, tmp_path: Path
) -> None:
    config = write_config(good_entry(issuer, init_process.port))
    log = tmp_path / "fly-vault.log"
    result = fly_vault("-v", "--log-file", str(log), "exec", "dev", "--", "echo", "hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello\n"
    entries = log_lines(log)
    messages = [e["msg"] for e in entries]
    text = "\n".join(messages)

    def has(fragment: str) -> bool:
        return any(fragment in m for m in messages)

    assert all(e["ts"] and e["level"] and e["logger"].startswith("flyvault") for e in entries)
    assert has(f"config {config}: [vault.dev] address 127.0.0.1:{init_process.port}"), text
    assert has(f"connecting to vault dev at 127.0.0.1:{init_process.port}"), text
    assert has("handshake: ok in ") and has("resolve: 127.0.0.1 -> 127.0.0.1"), text
    assert has("attestation: ok in ") and has(f"issuer {issuer.base_url}/test-org"), text
    assert has("app test-app, machine "), text
    assert has("authenticate: ok in ") and has("access token accepted"), text
    assert has("authenticated to vault dev: ready"), text
    assert has("stream 0 open: control") and has("open: console"), text
    assert has("closed: console") or has("closed with the connection: console"), text
    # -v: the INFO lines on stderr too, with a time of day; DEBUG only in the file.
    assert "handshake: ok in" in result.stderr and "attestation: ok in" in result.stderr
    assert "stream 0 open" not in result.stderr
    assert_clean(result.stdout, result.stderr, log.read_text())

    # More commands, same log file (truncated each run), same guarantees.
    listed = fly_vault("-v", "--log-file", str(log), "list-exec", "dev", "--json")
    assert listed.returncode == 0, listed.stderr
    json.loads(listed.stdout)
    assert any("open: exec_list" in m for m in (e["msg"] for e in log_lines(log)))
    assert_clean(listed.stdout, listed.stderr, log.read_text())

    doctor = fly_vault("--log-file", str(log), "doctor", "dev")
    assert doctor.returncode == 0, doctor.stdout
    assert doctor.stderr.count("fly-vault: ") == 1  # the dev-issuer note; no log lines
    assert any("authenticate: ok in" in e["msg"] for e in log_lines(log))
    assert_clean(doctor.stdout, doctor.stderr, log.read_text())


def test_a_failed_step_is_logged_with_its_reason(
    init_process: InitProcess, issuer: OidcIssuer, tmp_path: Path
) -> None:
    write_config(good_entry(issuer, init_process.port, access_token="not-the-right-token-123"))
    log = tmp_path / "failed.log"
    result = fly_vault("--log-file", str(log), "exec", "dev", "--", "true")
    assert result.returncode == 255
    messages = [e["msg"] for e in log_lines(log)]
    assert any(m.startswith("authenticate: failed after") for m in messages), messages
    assert_clean(result.stderr, log.read_text(), secrets=("not-the-right-token-123",))


def test_log_file_environment_variable_and_unwritable_paths(tmp_path: Path) -> None:
    write_config(table("x", address="127.0.0.1:9", org="o", app="a"))
    missing = tmp_path / "no-such-dir" / "fly-vault.log"
    for args, env in (
        (("--log-file", str(missing), "doctor", "x"), None),
        (("doctor", "x"), {"FLY_VAULT_LOG_FILE": str(missing)}),
        (("--log-file", str(tmp_path), "doctor", "x"), None),  # a directory
    ):
        result = fly_vault(*args, env=env)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert "fly-vault: error: cannot write log file " in result.stderr
        assert "fly-vault: hint: " in result.stderr
        assert not missing.parent.exists()
    result = fly_vault("--log-file", str(missing), "doctor", "x")
    assert f"create the directory {missing.parent} first" in result.stderr
    ok = tmp_path / "env.log"
    result = fly_vault("doctor", "x", env={"FLY_VAULT_LOG_FILE": str(ok)})
    assert result.returncode == 4
    assert "handshake: failed after" in ok.read_text()
    assert oct(ok.stat().st_mode & 0o777) == "0o600"


def test_a_lost_connection_and_the_reconnect_are_logged(
    init_process: InitProcess, issuer: OidcIssuer, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    from conftest import run_async, vault_entry

    from flyvault.client.vault import ExecHooks, ExecSession, Vault
    from flyvault.protocol.console import OpenSession

    async def scenario() -> None:
        vault = Vault(vault_entry(init_process.port, issuer), reconnect_timeout=20)
        out = bytearray()
        session = ExecSession(
            vault,
            OpenSession(
                "log-drop", (sys.executable, "-c", "import time; time.sleep(1.5)"), keep=True
            ),
            ExecHooks(stdout=out.extend, stderr=out.extend),
        )
        runner = asyncio.ensure_future(session.run())
        await asyncio.sleep(0.5)
        (await vault.connection()).close()
        assert (await asyncio.wait_for(runner, 30)).exit_status == 0
        await vault.close()

    with caplog.at_level(logging.DEBUG, logger="flyvault"):
        run_async(scenario())
    messages = [r.getMessage() for r in caplog.records]
    text = "\n".join(messages)
    assert any("exec session log-drop: stream lost" in m and "reattaching" in m for m in messages)
    assert any(m.startswith("connection to vault test given up: ") for m in messages), text
    assert any(m.startswith("reconnected to vault test after ") for m in messages), text
    assert any(m.startswith("exec session log-drop: reattached at output offset") for m in messages)
    assert any(m.startswith("exec session log-drop: exited with status 0") for m in messages)
    assert_clean(text)


# -- a token in any config field ----------------------------------------------------------------

FIELD_CASES = {
    "address": {"address": f"{TOKEN}:443"},
    "org": {"org": TOKEN},
    "app": {"app": f"app-{TOKEN}"},
    "machine_id": {"machine_id": TOKEN},
    "rootfs": {"rootfs": f"~/{TOKEN}.tar.gz"},
    "rootfs_url": {"rootfs_url": f"https://bucket.example/r.tar.gz?sig={TOKEN}"},
    "oidc_issuer_url": {"oidc_issuer_url": f"http://127.0.0.1:9/{TOKEN}"},
    "forward[1]": {"forward": ["8080:localhost:80", f"8081:{TOKEN}:80"]},
}


@pytest.mark.parametrize("field", sorted(FIELD_CASES))
def test_a_token_in_any_field_is_a_config_error_naming_it(field: str, tmp_path: Path) -> None:
    values: dict[str, object] = {
        "address": "127.0.0.1:9",
        "org": "test-org",
        "app": "test-app",
        "access_token": TOKEN,
        **FIELD_CASES[field],
    }
    write_config(table("dev", **values))
    log = tmp_path / "config.log"
    outputs = []
    commands = [
        (("doctor", "dev"), 3),
        (("doctor", "dev", "--json"), 3),
        (("exec", "dev", "--", "true"), 255),
    ]
    for command, code in commands:
        result = fly_vault("-v", "--log-file", str(log), *command)
        assert result.returncode == code, (command, result.stdout, result.stderr)
        both = result.stdout + result.stderr
        assert f"[vault.dev] {field} contains an access token" in both, both
        outputs += [result.stdout, result.stderr, log.read_text()]
    assert_clean(*outputs)


def test_another_entrys_token_and_a_token_as_table_name_are_refused() -> None:
    other = "second-entry-token-2718"
    write_config(
        table("a", address="127.0.0.1:9", org="o", app=f"x{other}", access_token=TOKEN)
        + table("b", address="127.0.0.1:9", org="o", app="b", access_token=other)
    )
    result = fly_vault("doctor", "b")
    assert result.returncode == 3
    assert "[vault.a] app contains an access token" in result.stdout
    assert_clean(result.stdout, result.stderr, secrets=(TOKEN, other))

    write_config(table(TOKEN, address="127.0.0.1:9", org="o", app="a", access_token=TOKEN))
    result = fly_vault("doctor", "anything")
    assert result.returncode == 3
    assert "table name contains an access token" in result.stdout
    assert_clean(result.stdout, result.stderr)


def test_a_token_in_a_field_is_refused_in_code_too() -> None:
    from flyvault.config import VaultConfig
    from flyvault.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        VaultConfig(name="v", address="h:1", org="o", app="a", machine_id=TOKEN, access_token=TOKEN)
    assert "machine_id contains an access token" in caught.value.message
    assert TOKEN not in caught.value.message


# -- sweeps -------------------------------------------------------------------------------------


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_access_token_never_shows_in_any_command(
    init_process: InitProcess, issuer: OidcIssuer, tmp_path: Path
) -> None:
    wrong = "wrong-token-for-the-sweep-1618"
    write_config(
        good_entry(issuer, init_process.port)
        + good_entry(issuer, init_process.port, "wrong", access_token=wrong)
        + good_entry(issuer, init_process.port, "other", app="other-app")
        + good_entry(issuer, _free_udp_port(), "gone")
    )
    log = tmp_path / "sweep.log"
    commands: list[tuple[tuple[str, ...], int]] = [
        (("doctor", "dev"), 0),
        (("doctor", "dev", "--json"), 0),
        (("exec", "dev", "--", "echo", "out"), 0),
        (("exec", "dev", "--", "sh", "-c", "exit 3"), 3),
        (("exec", "dev", "--session", "sweep-1", "--context", "sweep", "--", "sleep", "30"), -1),
        (("list-exec", "dev"), 0),
        (("list-exec", "dev", "--json"), 0),
        (("kill", "dev", "sweep-1"), 0),
        (("kill", "dev", "no-such-session"), 9),
        (("doctor", "wrong"), 6),
        (("doctor", "wrong", "--json"), 6),
        (("exec", "wrong", "--", "true"), 255),
        (("list-exec", "wrong"), 6),
        (("doctor", "other"), 5),
        (("exec", "other", "--", "true"), 255),
        (("doctor", "gone"), 4),
        (("list-exec", "gone", "--json"), 4),
        (("doctor", "missing"), 3),
        (("exec", "missing", "--", "true"), 255),
        (("local", "status", "--json"), 1),
        (("skills", "install", "--target", str(tmp_path / "skills")), 0),
    ]
    for command, code in commands:
        if code == -1:
            # A session left running in the background (killed by the next commands).
            process = subprocess.Popen(
                [sys.executable, "-m", "flyvault.cli.main", "-v", "--log-file", str(log), *command],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            _wait_for_session(init_process, issuer, "sweep-1")
            continue
        result = fly_vault("-v", "--log-file", str(log), *command)
        assert result.returncode == code, (command, result.stdout, result.stderr)
        assert_clean(result.stdout, result.stderr, log.read_text(), secrets=(TOKEN, wrong))
    out, err = process.communicate(timeout=30)
    assert_clean(out, err, secrets=(TOKEN, wrong))


def _wait_for_session(init_process: InitProcess, issuer: OidcIssuer, session: str) -> None:
    import time

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        listed = fly_vault("list-exec", "dev", "--json")
        if listed.returncode == 0 and any(
            s["session_id"] == session for s in json.loads(listed.stdout)
        ):
            return
        time.sleep(0.1)
    raise AssertionError(f"session {session} never appeared")


# -- fly-vault-admin ----------------------------------------------------------------------------

SECRET_VAR = "SECRET-VAR-CANARY-9e8d7c6b"
LITERAL_ENV = "LITERAL-ENV-CANARY-1a2b3c4d"
ADMIN_SECRETS = (API_TOKEN, ACCESS_TOKEN, BEARER, SECRET_VAR, LITERAL_ENV)

TEMPLATE_WITH_SECRETS = SIMPLE_TEMPLATE.replace(
    'ACCESS_TOKEN = "{{access_token}}"',
    'ACCESS_TOKEN = "{{access_token}}"\n'
    'DB_PASSWORD = "{{db_password}}"\n'
    f'LITERAL_API_KEY = "{LITERAL_ENV}"\n'
    'REGION_NAME = "ord"\n',
)


def test_admin_commands_never_show_a_secret(cli: Cli, tmp_path: Path) -> None:
    path = write_template(tmp_path, TEMPLATE_WITH_SECRETS)
    create = (
        "tenant",
        "create",
        "acme",
        "--template",
        str(path),
        "--access-token",
        ACCESS_TOKEN,
        "--secret-var",
        f"db_password={SECRET_VAR}",
    )
    runs = [
        (("-v", *create, "--dry-run"), 0),
        (("-v", *create), 0),
        (("-v", *create), 13),  # the tenant exists: refused
        (("-v", "tenant", "create", "x", "--template", str(path), "--var", "db_password=1"), 3),
        (("-v", "tenant", "list"), 0),
        (("-v", "tenant", "list", "--wide"), 0),
        (("-v", "tenant", "list", "--json"), 0),
        (("-v", "tenant", "usage-facts"), 0),
        (("-v", "tenant", "usage-facts", "--bearer-token", BEARER), 0),
        (
            (
                "-v",
                "tenant",
                "update-image",
                "--image",
                IMAGE_V2,
                "--tenant",
                "acme",
                "--soak-secs",
                "0.1",
            ),
            0,
        ),
        (("-v", "--api-token", "WRONG-" + API_TOKEN, "tenant", "list"), 6),
        (("-v", "tenant", "delete", "acme", "--yes"), 0),
    ]
    for argv, code in runs:
        result = cli(*argv)
        assert result.code == code, (argv, result.out, result.err)
        assert_clean(result.out, result.err, secrets=(*ADMIN_SECRETS, "WRONG-" + API_TOKEN))
    plan = json.loads(cli(*create, "--dry-run").out)
    assert plan[0]["config"]["env"] == dict.fromkeys(
        ("ACCESS_TOKEN", "DB_PASSWORD", "LITERAL_API_KEY", "REGION_NAME"), "<redacted>"
    )


def test_admin_registers_secret_shaped_config_values_only() -> None:
    from flyvault.admin.template import config_secrets

    config = {
        "env": {
            "ACCESS_TOKEN": "tok-value-1",
            "db_password": "pw-value-2",
            "DATABASE_URL": "postgres://u:pw-value-3@db/x",
            "API_KEY": "on",  # too short to be a secret
            "TENANT": "acme",
            "PORT": "8080",
            "HOME_URL": "https://example.com/x",
        },
        "files": [{"guest_path": "/etc/x", "raw_value": "ZmlsZS1jb250ZW50"}],
        "containers": [{"env": {"SIDECAR_SECRET": "side-value-4"}}],
    }
    assert config_secrets(config) == [
        "tok-value-1",
        "pw-value-2",
        "postgres://u:pw-value-3@db/x",
        "ZmlsZS1jb250ZW50",
        "side-value-4",
    ]


def test_admin_secret_var_and_var_may_not_share_a_key(cli: Cli, tmp_path: Path) -> None:
    path = write_template(tmp_path, TEMPLATE_WITH_SECRETS)
    result = cli(
        "tenant",
        "create",
        "acme",
        "--template",
        str(path),
        "--access-token",
        ACCESS_TOKEN,
        "--var",
        "db_password=1",
        "--secret-var",
        f"db_password={SECRET_VAR}",
        "--dry-run",
    )
    assert result.code == 2
    assert "duplicate --var key 'db_password'" in result.err
    assert_clean(result.out, result.err, secrets=ADMIN_SECRETS)


def test_admin_log_handler_scrubs(cli: Cli) -> None:
    assert cli("-v", "tenant", "list").code == 0
    # Its own loggers and the Machines API client's (flyvault.fly: retries, leases).
    for name in ("admin", "flyvault.fly"):
        logger = logging.getLogger(name)
        handlers = [h for h in logger.handlers if h.get_name() == "fly-vault-admin"]
        assert handlers and any(isinstance(f, redact.ScrubFilter) for f in handlers[0].filters)
    assert APP  # the stand-in's app is what the fixture configured
