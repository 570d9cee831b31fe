"""``fly-vault cp``'s command line: every mistake is a usage error (exit 2) found before a
config is read or a connection made, with a message naming the problem."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flyvault.cli.main import main


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["cp", "only-one"], "cp needs a SRC and a DST"),
        (["cp", "a", "b"], "neither SRC nor DST is on a vault"),
        (["cp", "nosuch:/a", "other:/b"], "copying between vault paths is not supported"),
        (["cp", "b@d:/x", "."], "is not a vault name"),
        (["cp", "-", "x", "nosuch:/b"], "must be the only SRC"),
        (["cp", "--json", "nosuch:/a", "-"], "--json prints to standard output"),
        (["cp", "--user", "bad/user", "nosuch:/a", "."], "is not a user name"),
    ],
)
def test_usage_errors_exit_2_before_reading_the_config(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run(argv, capsys)
    assert code == 2, err
    assert message in err


def test_a_directory_without_r_is_refused_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The vault name is not in any config: the usage error comes first (2, not 3).
    code, err = run(["cp", str(tmp_path), "nosuch:/x"], capsys)
    assert code == 2
    assert "is a directory: copying a directory needs -r" in err
    assert "fly-vault cp -r" in err


def test_a_missing_local_source_exits_9(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(["cp", str(tmp_path / "nope"), "nosuch:/x"], capsys)
    assert code == 9
    assert "no such file or directory (ENOENT)" in err


def test_a_local_destination_under_a_file_is_not_a_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The kernel's word (ENOTDIR, naming the file in the way), not "no such directory".
    (tmp_path / "file").write_text("x")
    for dest in ("file/sub", "file/a/b", "file/"):
        code, err = run(["cp", "nosuch:/x", f"{tmp_path}/{dest}"], capsys)
        assert code == 10, dest
        assert f"{tmp_path / 'file'}: not a directory (ENOTDIR)" in err, dest
    code, err = run(["cp", "nosuch:/x", str(tmp_path / "none" / "sub")], capsys)
    assert code == 9
    assert f"{tmp_path / 'none'}: no such directory (ENOENT)" in err


def test_several_sources_need_a_local_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run(["cp", "nosuch:/a", "nosuch:/b", str(tmp_path / "file")], capsys)
    assert code == 2
    assert "several sources need an existing directory" in err


def test_cp_help_loads_no_quic(capsys: pytest.CaptureFixture[str]) -> None:
    import subprocess

    probe = (
        "import sys\n"
        "from flyvault.cli.main import main\n"
        "try:\n    main(['cp', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('aioquic' in sys.modules, 'cryptography' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("False False")
