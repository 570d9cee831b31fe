"""``fly-vault build`` (the deploy context) and init's ``--firewall``.

The wheel is checked the way Fly's builder uses it: installed into a fresh virtual
environment, whose ``fly-vault-init`` must start and pass ``fly-vault doctor``. The firewall
runs only inside network namespaces this file creates (``unshare --net``); the host's own
ruleset is compared before and after to prove it was never touched.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TOKEN

from flyvault.cli.build import (
    build_context,
    find_project_root,
    render_dockerfile,
    render_fly_toml,
)
from flyvault.cli.main import main as cli_main
from flyvault.errors import FirewallError, VaultError
from flyvault.server.firewall import apply_firewall, render_ruleset
from flyvault.standins import FlyApiSocket, OidcIssuer

ROOT = Path(__file__).resolve().parents[1]
NFT = shutil.which("nft")
IS_ROOT = os.geteuid() == 0


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    logger = logging.getLogger("flyvault")
    handlers = list(logger.handlers)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = cli_main(list(args))
    finally:
        # main() adds a stderr handler bound to our StringIO; later tests must not log into it.
        logger.handlers[:] = handlers
    return code, out.getvalue(), err.getvalue()


@dataclass
class Context:
    out: Path
    stdout: str

    def read(self, name: str) -> str:
        return (self.out / name).read_text()

    @property
    def wheel(self) -> Path:
        (wheel,) = self.out.glob("*.whl")
        return wheel


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Context:
    """One real build through the CLI, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("context") / "fly-vault-build"
    code, stdout, stderr = run_cli("build", "--out", str(out))
    assert code == 0, stderr
    return Context(out, stdout)


# ---------------------------------------------------------------------------------------
# The build context


def test_context_holds_exactly_the_four_files(context: Context) -> None:
    names = sorted(p.name for p in context.out.iterdir())
    assert names == sorted(["Dockerfile", "README.md", "fly.toml", context.wheel.name])
    # The staging directory was renamed into place, not left next to it.
    assert [p.name for p in context.out.parent.iterdir()] == ["fly-vault-build"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert context.wheel.name == f"fly_vault-{version}-py3-none-any.whl"


def test_command_prints_what_it_wrote_and_what_comes_next(context: Context) -> None:
    for name in ("Dockerfile", "fly.toml", "README.md", context.wheel.name):
        assert re.search(rf"^  {re.escape(name)} +\d", context.stdout, re.M), context.stdout
    for command in (
        "fly apps create",
        "fly volumes create vault_data",
        "fly ips allocate-v4",
        "fly secrets set --app APP_NAME --stage ACCESS_TOKEN=",
        "fly deploy",
    ):
        assert command in context.stdout


def test_wheel_contains_init_and_its_entry_points(context: Context) -> None:
    with zipfile.ZipFile(context.wheel) as wheel:
        names = set(wheel.namelist())
        (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
        scripts = wheel.read(entry_points).decode()
    for module in (
        "flyvault/server/main.py",
        "flyvault/server/firewall.py",
        "flyvault/cli/build.py",
    ):
        assert module in names
    assert "fly-vault-init = flyvault.server.main:entry" in scripts
    # One installed namespace: nothing but flyvault and the dist-info at the top.
    assert {
        n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))
    } == {"flyvault"}
    assert "fly-vault = flyvault.cli.main:entry" in scripts
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    # pyproject.toml lists the packages by hand (the folders are mapped under flyvault): a
    # package folder missing from that list would be missing from the wheel.
    for folder, prefix in (
        ("flyvault", "flyvault"),
        *((top, f"flyvault/{top}") for top in RETIRED_TOPS),
    ):
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.relative_to(ROOT / folder)
            if (ROOT / folder / relative.parts[0]).is_symlink():
                continue
            assert f"{prefix}/{relative.as_posix()}" in names, f"{init} is not in the wheel"


def test_dockerfile(context: Context) -> None:
    text = context.read("Dockerfile")
    wheel = context.wheel.name
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert "apt-get install -y --no-install-recommends nftables util-linux ca-certificates" in text
    assert f"COPY {wheel} /tmp/" in text
    assert f'pip install --no-cache-dir --disable-pip-version-check "/tmp/{wheel}[zstd]"' in text
    assert re.search(r'^ENTRYPOINT \["fly-vault-init"\]$', text, re.M)
    (env,) = [line for line in text.splitlines() if line.startswith("ENV ")]
    assert "VAULT_LISTEN=fly-global-services:8443" in env
    assert "VAULT_DATA_DIR=/data" in env
    # The token comes from Fly secrets, never from the image.
    assert "ACCESS_TOKEN" not in env
    assert "fly secrets set ACCESS_TOKEN" in text
    assert text == render_dockerfile(wheel, context.wheel.name.split("-")[1])


def test_fly_toml(context: Context) -> None:
    text = context.read("fly.toml")
    assert text == render_fly_toml()
    config = tomllib.loads(text)
    assert config["app"] == "APP_NAME"
    assert config["build"]["dockerfile"] == "Dockerfile"
    assert config["mounts"] == [{"source": "vault_data", "destination": "/data"}]
    (service,) = config["services"]
    assert service["protocol"] == "udp"
    assert service["internal_port"] == 8443
    assert service["ports"] == [{"port": 8443}]
    assert config["vm"][0]["size"]
    assert "ACCESS_TOKEN" not in config.get("env", {})
    assert config["env"]["VAULT_FIREWALL"] == "1"


def test_readme_steps_and_a_config_entry_that_parses(context: Context, isolated_dirs: Path) -> None:
    text = context.read("README.md")
    for step in (
        "fly apps create APP_NAME",
        "fly volumes create vault_data",
        'fly secrets set --app APP_NAME --stage ACCESS_TOKEN="$ACCESS_TOKEN"',
        "fly deploy",
    ):
        assert step in text
    (entry,) = re.findall(r"```toml\n(.*?)```", text, re.S)
    assert "[vault.NAME]" in entry
    # The example must be accepted by the real config parser once the blanks are filled.
    from flyvault.config import load_vault

    filled = entry.replace("IPV4", "203.0.113.7")
    path = isolated_dirs / "deployed.toml"
    path.write_text(filled)
    vault = load_vault("NAME", path)
    assert (vault.org, vault.app, vault.machine_id) == ("ORG", "APP_NAME", "MACHINE_ID")
    assert vault.address == "203.0.113.7:8443"


@pytest.fixture
def area(tmp_path: Path) -> Path:
    """An empty directory of its own (tmp_path also holds the autouse fixture's home)."""
    path = tmp_path / "area"
    path.mkdir()
    return path


def test_refuses_a_non_empty_directory_without_force(area: Path) -> None:
    out = area / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code, _, stderr = run_cli("build", "--out", str(out))
    assert code == 1
    assert "is not empty; refusing to overwrite it" in stderr
    assert "--force" in stderr
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert [p.name for p in area.iterdir()] == ["out"]  # nothing staged either


def test_force_replaces_a_previous_build(area: Path) -> None:
    out = area / "out"
    out.mkdir()
    (out / "stale.whl").write_text("old")
    result = build_context(out, force=True)
    names = {p.name for p in out.iterdir()}
    assert names == {"Dockerfile", "README.md", "fly.toml", result.wheel.name}
    assert [p.name for p in area.iterdir()] == ["out"]  # the old copy was removed


def test_an_empty_directory_is_filled_without_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = build_context(out)
    assert result.wheel.is_file()


def test_force_never_replaces_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious").write_text("x")
    monkeypatch.chdir(work)
    for out in (".", ".."):
        with pytest.raises(VaultError, match="refusing to replace"):
            build_context(Path(out), force=True)
    assert (work / "precious").read_text() == "x"


def test_out_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("x")
    with pytest.raises(VaultError, match="exists and is not a directory"):
        build_context(tmp_path / "out", force=True)


def broken_project(tmp_path: Path) -> Path:
    """A fly-vault source tree whose build backend does not exist: pip fails quickly."""
    root = tmp_path / "src"
    (root / "flyvault").mkdir(parents=True)
    (root / "flyvault" / "__init__.py").write_text("")
    (root / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "no_such_backend_for_fly_vault"\n'
        '[project]\nname = "fly-vault"\nversion = "0.0.0"\n'
    )
    return root


def test_a_failing_wheel_build_leaves_no_directory(tmp_path: Path) -> None:
    root = broken_project(tmp_path)
    parent = tmp_path / "parent"
    parent.mkdir()
    with pytest.raises(VaultError, match="building the wheel failed") as caught:
        build_context(parent / "out", project_root=root)
    assert "no_such_backend_for_fly_vault" in str(caught.value)
    assert list(parent.iterdir()) == []


def test_a_failing_forced_build_keeps_the_old_directory(area: Path) -> None:
    root = broken_project(area)
    out = area / "out"
    out.mkdir()
    (out / "Dockerfile").write_text("previous build")
    with pytest.raises(VaultError, match="building the wheel failed"):
        build_context(out, force=True, project_root=root)
    assert [p.name for p in out.iterdir()] == ["Dockerfile"]
    assert (out / "Dockerfile").read_text() == "previous build"
    assert sorted(p.name for p in area.iterdir()) == ["out", "src"]


def test_a_failure_after_the_wheel_leaves_no_directory(
    area: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flyvault.cli.build as build_module

    def fail() -> str:
        raise RuntimeError("interrupted while writing fly.toml")

    monkeypatch.setattr(build_module, "render_fly_toml", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        build_context(area / "out")
    assert list(area.iterdir()) == []


def test_an_installed_copy_is_not_a_source_checkout(tmp_path: Path) -> None:
    package = tmp_path / "site-packages" / "flyvault"
    package.mkdir(parents=True)
    with pytest.raises(VaultError, match="needs a source checkout") as caught:
        find_project_root(package)
    assert caught.value.hint and "pip install -e" in caught.value.hint
    assert find_project_root(ROOT / "flyvault") == ROOT


def test_a_source_tree_of_another_project_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "something-else"\n')
    (tmp_path / "flyvault").mkdir()
    with pytest.raises(VaultError, match="'something-else'"):
        find_project_root(tmp_path / "flyvault")


# ---------------------------------------------------------------------------------------
# The wheel in a fresh virtual environment


def clean_env(venv: Path | None = None) -> dict[str, str]:
    """The environment without any trace of the development venv or the source tree."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "ACCESS_TOKEN")
    }
    dev_bin = str(Path(sys.executable).parent)
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != dev_bin]
    if venv is not None:
        path.insert(0, str(venv / "bin"))
    env["PATH"] = os.pathsep.join(path)
    # The autouse fixture points XDG_CACHE_HOME at an empty directory; pip's usual cache
    # makes a re-run take seconds instead of downloading every dependency again.
    env.setdefault("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))
    return env


RETIRED_TOPS = ("server", "proxy", "admin", "mcp_server")
#: Every console script and a word its --help prints.
CONSOLE_SCRIPTS = {
    "fly-vault": "connect",
    "fly-vault-init": "--firewall",
    "fly-vault-mcp": "--http",
    "vault-proxy": "--backend-port",
    "fly-vault-admin": "--api-token",
}
WHERE_INSTALLED = f"""
import importlib.metadata, importlib.util, json, flyvault, flyvault.server.main
tops = sorted({{
    str(f).split("/")[0] for f in importlib.metadata.files("fly-vault")
    if not str(f).startswith("..") and not str(f).split("/")[0].endswith((".dist-info", ".data"))
}})
retired = {{name: importlib.util.find_spec(name) is not None for name in {RETIRED_TOPS!r}}}
files = [flyvault.__file__, flyvault.server.main.__file__]
import importlib, pkgutil
broken = {{}}
for module in pkgutil.walk_packages(flyvault.__path__, "flyvault."):
    try:
        importlib.import_module(module.name)
    except Exception as exc:
        broken[module.name] = repr(exc)
print(json.dumps({{"tops": tops, "retired": retired, "files": files, "broken": broken}}))
"""


@pytest.mark.timeout(600)
def test_wheel_installs_into_a_fresh_venv_and_init_serves(
    context: Context, tmp_path: Path, fly_api: FlyApiSocket, issuer: OidcIssuer
) -> None:
    """Slow (a pip install of every dependency): the wheel alone must be enough to run init."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", str(context.wheel)],
        capture_output=True,
        text=True,
        timeout=480,
        env=clean_env(),
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    # cwd is tmp_path: `python -m` puts the cwd on sys.path, and the source tree must not be
    # what gets imported.
    where = subprocess.run(
        [str(python), "-c", WHERE_INSTALLED],
        capture_output=True,
        text=True,
        check=True,
        env=clean_env(venv),
        cwd=tmp_path,
    )
    report = json.loads(where.stdout)
    # One installed namespace: the distribution's files have one top-level import package,
    # and the generic names the folders carry in the repository are not importable.
    assert report["tops"] == ["flyvault"], report
    assert report["broken"] == {}, report  # every module of the wheel imports
    assert report["retired"] == {name: False for name in RETIRED_TOPS}, report
    for module_file in report["files"]:
        assert Path(module_file).is_relative_to(venv), report
    for script, expected in CONSOLE_SCRIPTS.items():
        ran = subprocess.run(
            [str(venv / "bin" / script), "--help"],
            capture_output=True,
            text=True,
            env=clean_env(venv),
            cwd=tmp_path,
            timeout=60,
        )
        assert ran.returncode == 0 and expected in ran.stdout, (script, ran.stdout, ran.stderr)

    init = venv / "bin" / "fly-vault-init"
    ready = tmp_path / "ready.json"
    env = clean_env(venv)
    env["ACCESS_TOKEN"] = TOKEN
    log = tmp_path / "init.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [
                str(init),
                "--host-mode",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                str(tmp_path / "data"),
                "--fly-api-socket",
                str(fly_api.path),
                "--ready-file",
                str(ready),
            ],
            env=env,
            cwd=tmp_path,
            stdout=log_file,
            stderr=log_file,
        )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "init did not listen: " + log.read_text()
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        assert info["pid"] == process.pid  # the token re-exec keeps the PID
        # The re-exec'd server is the venv's interpreter running the installed package.
        cmdline = Path(f"/proc/{info['pid']}/cmdline").read_bytes().split(b"\0")
        assert cmdline[0].decode().startswith(str(venv)), cmdline
        assert TOKEN.encode() not in Path(f"/proc/{info['pid']}/environ").read_bytes()

        # A client from the development tree gets through every step against it.
        config = Path(os.environ["XDG_CONFIG_HOME"]) / "fly-vault" / "config.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(
            f'[vault.wheel]\naddress = "127.0.0.1:{info["port"]}"\norg = "test-org"\n'
            f'app = "test-app"\naccess_token = "{TOKEN}"\n'
            f'oidc_issuer_url = "{issuer.base_url}"\n'
        )
        doctor = subprocess.run(
            [sys.executable, "-m", "flyvault.cli.main", "doctor", "wheel"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr + log.read_text()
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
        code = process.wait(timeout=30)
    assert code == 0, log.read_text()


# ---------------------------------------------------------------------------------------
# The firewall ruleset (pure)


def input_rules(ruleset: str) -> list[str]:
    """The rule lines of the input chain, as written or as listed by nft (no comments,
    no hook line, no counters' values)."""
    lines = iter(ruleset.split("chain input {", 1)[1].splitlines())
    rules = []
    for raw in lines:
        line = raw.strip()
        if line == "}":
            break
        if line and not line.startswith(("#", "type ")):
            rules.append(re.sub(r"counter packets \d+ bytes \d+", "counter", line))
    return rules


def test_ruleset_replaces_its_own_table_in_one_script() -> None:
    text = render_ruleset(8443)
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[:3] == [
        "add table inet fly_vault",
        "delete table inet fly_vault",
        "table inet fly_vault {",
    ]
    assert "inet filter" not in text  # the original's shared table is left alone


def test_ruleset_default_drop_with_the_documented_exceptions() -> None:
    text = render_ruleset(8443)
    assert "type filter hook input priority 0; policy drop;" in text
    assert "type filter hook forward priority 0; policy drop;" in text
    rules = input_rules(text)
    assert rules == [
        'iif "lo" accept',
        "ct state established,related accept",
        "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, "
        "nd-router-advert } accept",
        "icmp type echo-request accept",
        "icmpv6 type echo-request accept",
        'udp dport 8443 accept comment "fly-vault QUIC"',
        'counter drop comment "default drop"',
    ]
    assert "tcp dport 22" not in text
    assert "Fly SSH would bypass the vault's ACCESS_TOKEN" in text


def test_ruleset_opens_ssh_only_when_asked() -> None:
    rules = input_rules(render_ruleset(4433, allow_ssh=True))
    assert 'tcp dport 22 accept comment "ssh"' in rules
    assert 'udp dport 4433 accept comment "fly-vault QUIC"' in rules
    assert rules[-1] == 'counter drop comment "default drop"'


@pytest.mark.parametrize("port", [0, -1, 65536, True, "8443"])
def test_ruleset_refuses_a_bad_port(port: object) -> None:
    with pytest.raises(FirewallError, match="listen port"):
        render_ruleset(port)  # type: ignore[arg-type]


def test_missing_nft_says_how_to_fix_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    with pytest.raises(FirewallError) as caught:
        apply_firewall(8443)
    assert "'nft' command was not found" in str(caught.value)
    assert caught.value.hint is not None
    assert "apt-get install nftables" in caught.value.hint
    assert "fly-vault build" in caught.value.hint


def fake_nft(directory: Path, *, stderr: str = "", code: int = 0) -> Path:
    """An ``nft`` on PATH that records its arguments and stdin, then fails or succeeds."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "nft"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" > "{directory}/args"\n'
        f'cat > "{directory}/stdin"\n'
        f"printf '%s' '{stderr}' >&2\n"
        f"exit {code}\n"
    )
    script.chmod(0o755)
    return directory


def test_the_script_goes_to_nft_on_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = fake_nft(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    apply_firewall(8443, allow_ssh=True)
    assert (bin_dir / "args").read_text().split() == ["-f", "-"]
    assert (bin_dir / "stdin").read_text() == render_ruleset(8443, allow_ssh=True)


@pytest.mark.parametrize(
    ("stderr", "hint"),
    [
        ("netlink: Error: cache initialization failed: Operation not permitted", "needs root"),
        ("Error: Could not process rule: No such file or directory", "lack nf_tables"),
        ("Error: syntax error", None),
    ],
)
def test_nft_errors_are_reported_with_its_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stderr: str, hint: str | None
) -> None:
    bin_dir = fake_nft(tmp_path / "bin", stderr=stderr, code=1)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(FirewallError) as caught:
        apply_firewall(8443)
    assert str(caught.value) == f"firewall: nft refused the ruleset: {stderr}"
    if hint is None:
        assert caught.value.hint is None
    else:
        assert caught.value.hint is not None and hint in caught.value.hint


def init_command(tmp_path: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "flyvault.server.main",
        "--host-mode",
        "--data-dir",
        str(tmp_path / "data"),
        "--fly-api-socket",
        str(tmp_path / "no-api.sock"),
        "--ready-file",
        str(tmp_path / "ready.json"),
        *args,
    ]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_init_exits_before_listening_when_nft_is_missing(tmp_path: Path, how: str) -> None:
    env = {**os.environ, "PATH": ""}
    args = ["--listen", "127.0.0.1:8443"]
    if how == "flag":
        args.append("--firewall")
    else:
        env["VAULT_FIREWALL"] = "1"
    result = subprocess.run(
        init_command(tmp_path, *args), env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1, result.stderr
    assert "fly-vault-init: firewall: the 'nft' command was not found" in result.stderr
    assert "hint: install nftables" in result.stderr
    assert not (tmp_path / "ready.json").exists()


def test_init_firewall_needs_a_fixed_port(tmp_path: Path) -> None:
    result = subprocess.run(
        init_command(tmp_path, "--listen", "127.0.0.1:0", "--firewall"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "listen port 0 is out of range" in result.stderr
    assert "needs a fixed port" in result.stderr


# ---------------------------------------------------------------------------------------
# The firewall in real network namespaces (root and nft only)


def _can_unshare_net() -> str | None:
    if not IS_ROOT:
        return "needs root (network namespaces, nftables)"
    if NFT is None:
        return "nft is not installed (apt-get install nftables)"
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "unshare/nsenter (util-linux) missing"
    probe = subprocess.run(
        ["unshare", "--net", "--", NFT, "list", "ruleset"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"cannot run nft in a new network namespace: {probe.stderr.strip()}"
    return None


_NETNS_SKIP = _can_unshare_net()
needs_netns = pytest.mark.skipif(_NETNS_SKIP is not None, reason=_NETNS_SKIP or "")


@pytest.fixture
def host_ruleset_untouched() -> Iterator[None]:
    """Fails the test if the host's own ruleset changed while it ran."""
    assert NFT is not None
    before = subprocess.run([NFT, "list", "ruleset"], capture_output=True, text=True)
    yield
    after = subprocess.run([NFT, "list", "ruleset"], capture_output=True, text=True)
    assert after.stdout == before.stdout, "the host's nftables ruleset changed"


IDEMPOTENCE = """
import json, subprocess
from flyvault.server.firewall import apply_firewall

def table():
    return subprocess.run(["nft", "list", "table", "inet", "fly_vault"],
                          capture_output=True, text=True, check=True).stdout

def tables():
    return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                          check=True).stdout.split("\\n")

apply_firewall(8443)
first = table()
apply_firewall(8443)
second = table()
apply_firewall(8443, allow_ssh=True)
third = table()
print(json.dumps({"first": first, "second": second, "third": third, "tables": tables()}))
"""


@needs_netns
def test_applying_twice_does_not_duplicate_rules(host_ruleset_untouched: None) -> None:
    result = subprocess.run(
        ["unshare", "--net", "--", sys.executable, "-c", IDEMPOTENCE],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    listings = json.loads(result.stdout)
    assert listings["first"] == listings["second"]
    first = input_rules(listings["first"])
    assert len(first) == 7, first
    assert "udp dport 8443 accept" in listings["first"]
    assert "policy drop" in listings["first"]
    assert not any("dport 22" in rule for rule in first)
    # Re-applied with ssh: replaced, one rule more, not appended to the old set.
    third = input_rules(listings["third"])
    assert len(third) == 8
    assert any("tcp dport 22 accept" in rule for rule in third)
    assert [t for t in listings["tables"] if t] == ["table inet fly_vault"]


# Runs inside namespace B, behind the firewall: echoes UDP on the vault port and on 9000,
# listens on TCP 22 and 8080, and checks that its own outbound connection still works.
LISTENER = """
import json, select, socket, sys, time
port, peer = int(sys.argv[1]), sys.argv[2]
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind(("0.0.0.0", port))
other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); other.bind(("0.0.0.0", 9000))
tcp = [socket.create_server(("0.0.0.0", p)) for p in (22, 8080)]
try:
    socket.create_connection((peer, 7000), timeout=3).close()
    outbound = "ok"
except OSError as exc:
    outbound = repr(exc)
print("ready", flush=True)
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    readable, _, _ = select.select([udp, other], [], [], 0.5)
    for sock in readable:
        data, address = sock.recvfrom(100)
        if data == b"stop":
            print(json.dumps({"outbound": outbound}), flush=True)
            sys.exit(0)
        sock.sendto(data, address)
"""

# Runs in namespace A (itself a fresh namespace): builds B with a veth pair between them,
# applies the firewall in B (unless MODE is "none", the control run), and probes it from A.
PROBE = """
import json, os, socket, struct, subprocess, sys, time
mode, port, listener_code = sys.argv[1], int(sys.argv[2]), sys.argv[3]
A, B = "10.199.0.1", "10.199.0.2"

def run(*cmd):
    subprocess.run(cmd, check=True, capture_output=True, text=True)

def checksum(data):
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF

def ping(host):
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        s.settimeout(2)
        ident = os.getpid() & 0xFFFF
        body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"fly-vault!"
        s.sendto(body[:2] + struct.pack("!H", checksum(body)) + body[4:], (host, 0))
        end = time.monotonic() + 2
        while time.monotonic() < end:
            try:
                data, _ = s.recvfrom(1024)
            except TimeoutError:
                return False
            icmp = data[(data[0] & 0x0F) * 4:]
            if icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:
                return True
        return False

def udp_echo(dport):
    # The echo needs the listener process scheduled (TCP and ping are the kernel's): a
    # timeout with room for a loaded machine, paid in full only by the blocked port.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(4)
        s.sendto(b"hello", (B, dport))
        try:
            return s.recvfrom(100)[0].decode()
        except TimeoutError:
            return None

def tcp(dport):
    try:
        socket.create_connection((B, dport), timeout=1.5).close()
        return "open"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return repr(exc)

inner = subprocess.Popen(["unshare", "--net", "--", "sleep", "120"])
try:
    own = os.readlink("/proc/self/ns/net")
    deadline = time.monotonic() + 10
    while os.readlink(f"/proc/{inner.pid}/ns/net") == own:
        assert time.monotonic() < deadline, "unshare did not switch namespaces"
        time.sleep(0.01)
    in_b = ["nsenter", f"--target={inner.pid}", "--net", "--"]
    run("ip", "link", "set", "lo", "up")
    run("ip", "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", str(inner.pid))
    run("ip", "addr", "add", f"{A}/24", "dev", "va")
    run("ip", "link", "set", "va", "up")
    run(*in_b, "ip", "link", "set", "lo", "up")
    run(*in_b, "ip", "addr", "add", f"{B}/24", "dev", "vb")
    run(*in_b, "ip", "link", "set", "vb", "up")
    if mode != "none":
        run(*in_b, sys.executable, "-c",
            "from flyvault.server.firewall import apply_firewall; "
            f"apply_firewall({port}, allow_ssh={mode == 'ssh'})")
    back = socket.create_server((A, 7000))  # for B's outbound connection
    listener = subprocess.Popen([*in_b, sys.executable, "-c", listener_code, str(port), A],
                                stdout=subprocess.PIPE, text=True)
    assert listener.stdout.readline().strip() == "ready"
    result = {
        "udp_vault_port": udp_echo(port),
        "udp_other_port": udp_echo(9000),
        "tcp_22": tcp(22),
        "tcp_8080": tcp(8080),
        "ping": ping(B),
    }
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"stop", (B, port))
    line = listener.stdout.readline()
    listener.wait(timeout=10)
    result.update(json.loads(line) if line else {"outbound": None})
    print(json.dumps(result))
finally:
    inner.kill()
    inner.wait()
"""


@needs_netns
@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        # The control run: without the firewall everything answers, so the probes can tell.
        (
            "none",
            {"udp_vault_port": "hello", "udp_other_port": "hello", "tcp_22": "open",
             "tcp_8080": "open", "ping": True, "outbound": "ok"},
        ),
        (
            "default",
            {"udp_vault_port": "hello", "udp_other_port": None, "tcp_22": "timeout",
             "tcp_8080": "timeout", "ping": True, "outbound": "ok"},
        ),
        (
            "ssh",
            {"udp_vault_port": "hello", "udp_other_port": None, "tcp_22": "open",
             "tcp_8080": "timeout", "ping": True, "outbound": "ok"},
        ),
    ],
)  # fmt: skip
def test_firewall_lets_through_only_what_it_should(
    mode: str, expected: dict[str, object], host_ruleset_untouched: None
) -> None:
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is not installed")
    result = subprocess.run(
        ["unshare", "--net", "--", sys.executable, "-c", PROBE, mode, "8443", LISTENER],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == expected


@needs_netns
def test_init_applies_the_firewall_before_listening(
    tmp_path: Path, host_ruleset_untouched: None
) -> None:
    ready = tmp_path / "ready.json"
    env = {**os.environ, "ACCESS_TOKEN": TOKEN}
    command = init_command(tmp_path, "--listen", "127.0.0.1:8443", "--firewall")
    log = tmp_path / "init.log"
    with open(log, "wb") as log_file:
        # exec keeps the PID: the Popen pid is init's, inside the new namespace.
        process = subprocess.Popen(
            ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
             *command],
            env=env,
            stdout=log_file,
            stderr=log_file,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        listing = subprocess.run(
            ["nsenter", f"--target={process.pid}", "--net", "--", "nft", "list", "table",
             "inet", "fly_vault"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout  # fmt: skip
        assert "udp dport 8443 accept" in listing
        assert "dport 22" not in listing
        assert "firewall applied" in log.read_text()
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
        code = process.wait(timeout=30)
    assert code == 0, log.read_text()
