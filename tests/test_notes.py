"""The development-issuer note: once per vault and issuer per day, always with -v."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import InitProcess, vault_entry

from flyvault.cli.notes import QUIET_SECONDS, show_dev_issuer_note
from flyvault.standins import OidcIssuer


def test_the_note_is_shown_once_a_day_per_vault_and_issuer() -> None:
    assert show_dev_issuer_note("dev", "http://127.0.0.1:1", now=1000.0)
    assert not show_dev_issuer_note("dev", "http://127.0.0.1:1", now=1000.0 + 60)
    assert show_dev_issuer_note("other", "http://127.0.0.1:1", now=1000.0 + 60)
    assert show_dev_issuer_note("dev", "http://127.0.0.1:2", now=1000.0 + 60)  # a new issuer
    assert show_dev_issuer_note("dev", "http://127.0.0.1:1", now=1000.0 + QUIET_SECONDS)


def test_verbose_always_shows_it_and_a_log_file_does_not(tmp_path: Path) -> None:
    from flyvault.cli.output import configure_logging

    assert show_dev_issuer_note("dev", "x", now=5.0)
    try:
        configure_logging(str(tmp_path / "log.jsonl"), False)  # DEBUG to the file only
        assert not show_dev_issuer_note("dev", "x", now=6.0)
        configure_logging(None, True)  # -v
        assert show_dev_issuer_note("dev", "x", now=7.0)
    finally:
        configure_logging(None, False)


def test_a_stamp_that_cannot_be_kept_shows_the_note_every_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_STATE_HOME", str(blocker))  # no directory can be made under it
    assert show_dev_issuer_note("dev", "x", now=1.0)
    assert show_dev_issuer_note("dev", "x", now=2.0)


def test_a_damaged_stamp_file_shows_the_note(tmp_path: Path) -> None:
    stamps = Path(os.environ["XDG_STATE_HOME"]) / "fly-vault" / "notes.json"
    stamps.parent.mkdir(parents=True, exist_ok=True)
    stamps.write_text("[not a dict")
    assert show_dev_issuer_note("dev", "x", now=1.0)
    assert not show_dev_issuer_note("dev", "x", now=2.0)  # rewritten whole


def _exec(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flyvault.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_exec_prints_the_note_before_the_first_command_only(
    init_process: InitProcess, issuer: OidcIssuer
) -> None:
    from flyvault.config import save_vault

    save_vault(vault_entry(init_process.port, issuer, name="t"))
    first = _exec("exec", "t", "--", "true")
    assert first.returncode == 0, first.stderr
    assert "attested by the development issuer" in first.stderr
    second = _exec("exec", "t", "--", "true")
    assert (second.returncode, second.stderr) == (0, "")
    verbose = _exec("-v", "exec", "t", "--", "true")
    assert "attested by the development issuer" in verbose.stderr
