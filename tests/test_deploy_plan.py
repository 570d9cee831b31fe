"""Deploy plans without a vault: the TOML checks (line numbers in the errors), resolution
and fingerprints, the managed blocks (a property test) and the env.d files (sourced twice
by a real sh), and the CLI's usage errors (exit 2, before connecting)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_provision_e2e import fv

from flyvault.client.deploy import blocks
from flyvault.client.deploy.plan import parse_plan, resolve
from flyvault.errors import UsageError

GOOD = """\
schema = 1
name = "web"
[target]
user = "dev"
[vars]
V = "1.2"

[[step]]
id = "tool"
kind = "shell"
run = "install tool ${V}"
creates = "{{home}}/bin/tool"

[[step]]
id = "conf"
kind = "file"
dest = "{{home}}/.toolrc"
content = "version=${V}\\n"
"""


def refused(text: str) -> str:
    with pytest.raises(UsageError) as caught:
        parse_plan(text, source="p.toml")
    return str(caught.value)


def test_a_good_plan_resolves_vars_now_and_home_per_vault() -> None:
    plan = parse_plan(GOOD)
    assert [s.id for s in plan.steps] == ["tool", "conf"]
    tool = resolve(plan.steps[0], "/home/dev")
    assert tool.fields["run"] == "install tool 1.2"
    assert tool.fields["creates"] == "/home/dev/bin/tool"
    assert tool.domain == "rootfs" and not tool.as_user
    conf = resolve(plan.steps[1], "/home/dev")
    assert plan.steps[1].data == b"version=1.2\n"
    assert conf.as_user and conf.domain == "home"  # under {{home}}: the user's, persistent
    # Deterministic, and sensitive to the home and to any field.
    assert conf.fingerprint == resolve(plan.steps[1], "/home/dev").fingerprint
    assert conf.fingerprint != resolve(plan.steps[1], "/home/other").fingerprint
    edited = parse_plan(GOOD.replace('V = "1.2"', 'V = "1.3"'))
    assert resolve(edited.steps[1], "/home/dev").fingerprint != conf.fingerprint
    assert resolve(edited.steps[0], "/home/dev").fingerprint != tool.fingerprint


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ('creates = "{{home}}/bin/tool"', 'creates = "x"\nruns = "y"'),
            "p.toml:13: unknown key 'runs'",
        ),
        (('id = "conf"', 'id = "tool"'), "p.toml:15: duplicate step id 'tool' (first at line 9)"),
        (('name = "web"', 'name = "Web App"'), "p.toml:2: plan name 'Web App'"),
        (("${V}\\n", "${W}\\n"), "p.toml:18: ${W} is not defined in [vars]"),
        (('kind = "file"', 'kind = "ftp"'), "p.toml:16: unknown step kind 'ftp'"),
        (("schema = 1", "schema = 2"), "schema 2 is not one this fly-vault reads"),
        (
            ('dest = "{{home}}/.toolrc"', 'dest = "relative"'),
            "p.toml:17: 'relative' must be absolute",
        ),
        (
            ('content = "version=${V}\\n"', 'mode = "0644"'),
            "needs exactly one of 'source' and 'content'",
        ),
        (('user = "dev"', 'user = "dev"\nshell = "zsh"'), "p.toml:5: unknown key 'target.shell'"),
        (('run = "install tool ${V}"', ""), "p.toml:8: missing key 'run'"),
    ],
)
def test_bad_plans_are_refused_with_the_line(change: tuple[str, str], message: str) -> None:
    assert change[0] in GOOD
    assert message in refused(GOOD.replace(change[0], change[1], 1))


def test_a_missing_source_is_named(tmp_path: Path) -> None:
    text = GOOD.replace('content = "version=${V}\\n"', 'source = "files/rc"')
    with pytest.raises(UsageError, match="cannot read source"):
        parse_plan(text, source="p.toml", base=tmp_path)
    (tmp_path / "files").mkdir()
    (tmp_path / "files/rc").write_bytes(b"abc")
    plan = parse_plan(text, source="p.toml", base=tmp_path)
    assert plan.steps[1].data == b"abc"


_lines = st.lists(
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r"), max_size=12
    ),
    max_size=5,
)


@settings(max_examples=300, deadline=None)
@given(
    foreign=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60),
    keys=st.lists(
        st.sampled_from(["env", "p/a", "p/b", "q/c"]), min_size=1, max_size=4, unique=True
    ),
    bodies=st.lists(_lines, min_size=4, max_size=4),
    order=st.permutations(range(4)),
)
def test_blocks_are_idempotent_and_leave_foreign_text_byte_for_byte(
    foreign: str, keys: list[str], bodies: list[list[str]], order: list[int]
) -> None:
    if "fly-vault" in foreign:
        return
    text = foreign
    for key, body in zip(keys, bodies, strict=False):
        body_text = "\n".join(line for line in body if "fly-vault" not in line)
        once = blocks.upsert_block(text, key, body_text)
        assert blocks.upsert_block(once, key, body_text) == once  # idempotent
        assert blocks.has_block(once, key)
        text = once
    for index in order:  # removed in any order
        if index < len(keys):
            text = blocks.remove_block(text, keys[index])
    assert text == foreign


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX sh")
def test_env_files_set_vars_and_guard_path_when_sourced_twice(tmp_path: Path) -> None:
    env_dir = tmp_path / blocks.ENV_DIR
    env_dir.mkdir(parents=True)
    (env_dir / "p.a.sh").write_text(
        blocks.env_file("p", "a", {"EDITOR": "vim it", "Q": "it's"}, ["/opt/x bin", "/opt/y"])
    )
    profile = tmp_path / ".profile"
    profile.write_text(
        blocks.upsert_block("", blocks.ENV_BLOCK, blocks.env_block_body(str(tmp_path)))
    )
    out = subprocess.run(
        [
            "sh",
            "-c",
            '. "$1"; . "$1"; printf "%s|%s|%s" "$EDITOR" "$Q" "$PATH"',
            "sh",
            str(profile),
        ],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        check=True,
    ).stdout
    editor, quote, path = out.split("|")
    assert (editor, quote) == ("vim it", "it's")
    assert path == "/opt/x bin:/opt/y:/usr/bin:/bin"


def test_profile_files_follow_the_login_shell() -> None:
    assert blocks.profile_files("/h", "/bin/bash") == ["/h/.profile", "/h/.bashrc"]
    assert blocks.profile_files("/h", "/bin/zsh") == ["/h/.profile", "/h/.zshenv"]
    assert blocks.profile_files("/h", "/bin/sh") == ["/h/.profile"]


def test_a_begin_marker_without_its_end_is_refused_in_words() -> None:
    with pytest.raises(UsageError, match="no end marker"):
        blocks.upsert_block("# >>> fly-vault env >>>\nx\n", "env", "y")


def test_usage_errors_exit_2_before_connecting(tmp_path: Path) -> None:
    plan = tmp_path / "p.toml"
    plan.write_text(
        'schema = 1\nname = "x"\n[[step]]\nid = "a"\nkind = "shell"\nrun = "true"\nrunn = 1\n'
    )
    bad = fv("deploy", "apply", "nowhere", str(plan))
    assert bad.returncode == 2
    assert b"p.toml:7: unknown key 'runn'" in bad.stderr
    missing = fv("deploy", "apply", "nowhere", str(tmp_path / "none.toml"))
    assert missing.returncode == 2 and b"no such plan file" in missing.stderr
    plan.write_text('schema = 1\nname = "x"\n[[step]]\nid = "a"\nkind = "shell"\nrun = "true"\n')
    forced = fv("deploy", "apply", "nowhere", str(plan), "--force", "zz")
    assert forced.returncode == 2 and b"no step with that id" in forced.stderr
    name = fv("deploy", "reverse", "nowhere", "Bad Name")
    assert name.returncode == 2 and b"is not a plan name" in name.stderr


def _tarball(path: Path, members: list[tuple[str, str, str]]) -> Path:
    """(name, kind, data or link target) members, gzip-compressed."""
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as archive:
        for name, kind, value in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(value)
                archive.addfile(info, io.BytesIO(value.encode()))
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, value
                archive.addfile(info)
            elif kind == "chr":
                info.type = tarfile.CHRTYPE
                archive.addfile(info)
    return path


def _artifact_plan(source: str, sha: str, target: str = 'extract_to = "/opt/t"') -> str:
    return (
        'schema = 1\nname = "a"\n[[step]]\nid = "t"\nkind = "artifact"\n'
        f'source = "{source}"\nsha256 = "{sha}"\n{target}\n'
    )


def test_artifacts_are_checked_before_connecting(tmp_path: Path) -> None:
    import hashlib

    good = _tarball(
        tmp_path / "good.tar.gz",
        [("./bin", "dir", ""), ("./bin/tool", "file", "x"), ("./bin/t", "symlink", "tool")],
    )
    sha = hashlib.sha256(good.read_bytes()).hexdigest()
    plan = parse_plan(_artifact_plan("good.tar.gz", sha), source="p.toml", base=tmp_path)
    assert plan.steps[0].members == ("bin", "bin/tool", "bin/t")
    assert resolve(plan.steps[0], "/root").domain == "rootfs"

    with pytest.raises(UsageError, match=r"has SHA-256 .*, the plan says 0000"):
        parse_plan(_artifact_plan("good.tar.gz", "0" * 64), source="p.toml", base=tmp_path)
    with pytest.raises(UsageError, match="exactly one of 'dest' and 'extract_to'"):
        parse_plan(_artifact_plan("good.tar.gz", sha, ""), source="p.toml", base=tmp_path)
    for members, problem in [
        ([("../up", "file", "x")], "would land outside extract_to"),
        ([("/abs", "file", "x")], "would land outside extract_to"),
        ([("a/l", "symlink", "../../etc")], "outside extract_to"),
        ([("a/l", "symlink", "/etc/passwd")], "outside extract_to"),
        ([("null", "chr", "")], "device node or a fifo"),
    ]:
        bad = _tarball(tmp_path / "bad.tar.gz", members)
        digest = hashlib.sha256(bad.read_bytes()).hexdigest()
        with pytest.raises(UsageError, match=problem):
            parse_plan(_artifact_plan("bad.tar.gz", digest), source="p.toml", base=tmp_path)
    (tmp_path / "notar").write_bytes(b"plain bytes, not an archive" * 40)
    digest = hashlib.sha256((tmp_path / "notar").read_bytes()).hexdigest()
    with pytest.raises(UsageError, match="not a readable tar archive"):
        parse_plan(_artifact_plan("notar", digest), source="p.toml", base=tmp_path)
    single = parse_plan(
        _artifact_plan("notar", digest, 'dest = "/usr/local/bin/x"'), source="p.toml", base=tmp_path
    )
    assert single.steps[0].members == () and single.steps[0].fields["mode"] == "0755"
