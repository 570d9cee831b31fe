"""The client API the CLI and the MCP server share (issue 13 item 2): the exec request and
its checks, signal names, the development-issuer event, and ``Vault.diagnose()`` against a
real init on 127.0.0.1."""

from __future__ import annotations

import signal
from typing import Any

import pytest
from conftest import TOKEN, InitProcess, run_async, vault_entry

from flyvault.client import (
    DevelopmentIssuer,
    Diagnosis,
    DiagnosisStep,
    ExecRequest,
    new_session_id,
    parse_signal,
    signal_name,
)
from flyvault.errors import AuthError, UsageError
from flyvault.protocol.console import OpenSession
from flyvault.protocol.limits import MAX_ARGV, MAX_CONTEXT_LENGTH
from flyvault.standins import OidcIssuer

# -- the exec request ------------------------------------------------------------------------


def test_exec_request_builds_the_wire_message_field_for_field() -> None:
    request = ExecRequest(
        session_id="build-1",
        argv=("make", "-j4"),
        pty=True,
        keep=True,
        context="why",
        term="xterm",
        rows=24,
        cols=80,
        cwd="/src",
        env=(("A", "1"),),
    )
    assert request.creates
    assert request.open_session() == OpenSession(
        "build-1", ("make", "-j4"), True, False, True, "why", "xterm", 24, 80, "/src", (("A", "1"),)
    )
    again = ExecRequest.reattach("build-1", 42)
    assert not again.creates and again.open_session().resume_offset == 42


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"session_id": "-bad"}, "invalid session id '-bad'"),
        ({"session_id": "a" * 129}, "invalid session id"),
        ({"argv": ()}, "argv must not be empty"),
        ({"argv": ("x",) * (MAX_ARGV + 1)}, f"more than {MAX_ARGV}"),
        ({"argv": ("echo", "a\0b")}, "an argument contains a NUL byte"),
        ({"argv": ("true",), "context": "é" * MAX_CONTEXT_LENGTH}, "context is 8192 bytes"),
        ({"argv": ("true",), "env": (("A=B", "1"),)}, "invalid environment variable name"),
        ({"argv": ("true",), "env": (("", "1"),)}, "invalid environment variable name"),
        ({"argv": ("true",), "rows": 70000}, "rows 70000 is outside 0-65535"),
        ({"resume_offset": -1}, "cannot be negative"),
    ],
)
def test_exec_request_refuses_what_the_vault_would(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError) as caught:
        ExecRequest(**{"session_id": "s1", **fields})
    assert message in caught.value.message
    assert caught.value.exit_code == 2


def test_a_login_shell_needs_no_argv_and_generated_ids_are_valid() -> None:
    assert ExecRequest(session_id=new_session_id("shell"), shell=True, pty=True).creates
    assert ExecRequest(session_id=new_session_id("mcp")).session_id.startswith("mcp-")


# -- signals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "number"),
    [("TERM", 15), ("sigint", 2), (" kill ", 9), ("1", 1), ("64", 64), ("SIGHUP", 1)],
)
def test_signal_names_and_numbers(text: str, number: int) -> None:
    assert parse_signal(text) == number


@pytest.mark.parametrize("text", ["BOGUS", "0", "65", "", "-9"])
def test_unknown_signals_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError, match="unknown signal"):
        parse_signal(text)


def test_signal_name_covers_unnamed_numbers() -> None:
    assert signal_name(signal.SIGTERM) == "SIGTERM"
    assert signal_name(None) is None
    unnamed = next(n for n in range(35, 64) if n not in {s.value for s in signal.Signals})
    assert signal_name(unnamed) == f"SIG{unnamed}"


# -- diagnosis -------------------------------------------------------------------------------


def test_a_failure_outside_the_steps_becomes_a_step_of_its_own() -> None:
    error = AuthError("no token", hint="set access_token")
    passed = DiagnosisStep("handshake", True, 1.0, "ok")
    alone = Diagnosis("v", (passed,), error=error).unobserved_failure()
    assert alone == DiagnosisStep("config", False, 0.0, "no token", "set access_token")
    failed = DiagnosisStep("authenticate", False, 1.0, "no token", "set access_token")
    assert Diagnosis("v", (passed, failed), error=error).unobserved_failure() is None
    assert Diagnosis("v", (passed,), cold="cold").unobserved_failure() is None
    assert Diagnosis("v", (passed,), cold="cold").state == "cold"
    assert Diagnosis("v", (), error=error).state == "unavailable"


def test_diagnose_reports_steps_emits_the_issuer_event_once_and_prints_nothing(
    init_process: InitProcess, issuer: OidcIssuer, capsys: pytest.CaptureFixture[str]
) -> None:
    from flyvault.client import Vault

    events: list[Any] = []
    seen: list[DiagnosisStep] = []
    vault = Vault(vault_entry(init_process.port, issuer, name="dev"), on_event=events.append)

    async def scenario() -> tuple[Diagnosis, Diagnosis, Diagnosis]:
        try:
            first = await vault.diagnose(on_step=seen.append)
            reused = await vault.diagnose()
            await vault.connection()  # the pooled connection serves requests
            fresh = await vault.diagnose(fresh=True)
            return first, reused, fresh
        finally:
            await vault.close()

    first, reused, fresh = run_async(scenario())
    assert first.ok and first.state == "ready" and first.runtime == "host mode"
    assert [s.step for s in first.steps] == ["handshake", "attestation", "authenticate"]
    assert list(first.steps) == seen and all(s.ok for s in seen)
    assert reused.reused and [s.step for s in reused.steps] == ["connection"]
    assert reused.connection is first.connection
    assert fresh.ok and not fresh.reused and fresh.connection is not first.connection
    assert events == [DevelopmentIssuer("dev", issuer.base_url)]
    assert "development issuer" in events[0].message
    out, err = capsys.readouterr()
    assert out == "" and err == ""  # the client prints nothing; the caller shows events
    assert TOKEN not in repr(first) + repr(fresh)


def test_diagnose_reports_a_refused_token_as_the_failed_step(
    init_process: InitProcess, issuer: OidcIssuer
) -> None:
    from flyvault.client import Vault

    vault = Vault(vault_entry(init_process.port, issuer, token="nope-" + "x" * 32))

    async def scenario() -> Diagnosis:
        try:
            return await vault.diagnose()
        finally:
            await vault.close()

    diagnosis = run_async(scenario())
    assert not diagnosis.ok and diagnosis.state == "unavailable"
    assert isinstance(diagnosis.error, AuthError)
    assert diagnosis.steps[-1].step == "authenticate" and not diagnosis.steps[-1].ok
    assert diagnosis.unobserved_failure() is None
    assert vault.current is None  # a failed check adopts nothing
