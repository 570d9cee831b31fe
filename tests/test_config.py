"""flyvault.config: parsing, validation messages, token hygiene and safe rewriting."""

from __future__ import annotations

import fcntl
import os
import stat
import threading
import tomllib
import traceback
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flyvault.config import (
    DEFAULT_ISSUER_BASE_URL,
    VAULT_KEYS,
    Config,
    ForwardSpec,
    RootfsFile,
    RootfsUrl,
    VaultConfig,
    load_config,
    load_vault,
    parse_address,
    parse_forward_spec,
    remove_vault,
    save_vault,
)
from flyvault.errors import ConfigError

TOKEN = "fvtok_Zq9SECRETxx4242"
MINIMAL = '[vault.prod]\naddress = "prod.example.com:443"\norg = "acme"\napp = "vault-prod"\n'


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default config path, isolated under tmp_path."""
    monkeypatch.delenv("FLY_VAULT_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "xdg" / "fly-vault" / "config.toml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load_error(path: Path, text: str) -> ConfigError:
    write(path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


def entry(**fields: object) -> VaultConfig:
    base: dict[str, object] = {"name": "prod", "address": "h.example:443", "org": "o", "app": "a"}
    return VaultConfig(**{**base, **fields})


# --- addresses and forward specs -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("host:1", ("host", 1)),
        ("my-app.fly.dev:443", ("my-app.fly.dev", 443)),
        ("10.0.0.1:65535", ("10.0.0.1", 65535)),
        ("[::1]:8443", ("::1", 8443)),
        ("[2001:db8::7]:22", ("2001:db8::7", 22)),
        ("[fe80::1%eth0]:22", ("fe80::1%eth0", 22)),
        ("h:0080", ("h", 80)),
    ],
)
def test_parse_address_accepts(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("host", "missing ':PORT'"),
        ("host:", "port is empty"),
        (":80", "host is empty"),
        ("host:0", "port 0 is out of range 1-65535"),
        ("host:65536", "port 65536 is out of range 1-65535"),
        ("host:" + "9" * 5000, "is out of range 1-65535"),
        ("host:abc", "port 'abc' is not a number"),
        ("host:+80", "is not a number"),
        ("host:8_0", "is not a number"),
        ("host:\u0663", "is not a number"),
        ("::1:80", "IPv6 host must be written in brackets"),
        ("[::1]80", "expected ':PORT' after ']'"),
        ("[::1:80", "without a closing ']'"),
        ("[nope]:80", "'nope' is not a valid IPv6 address"),
        ("a b:80", "not allowed in a host name"),
        ("http://h:80", "IPv6 host must be written in brackets"),
    ],
)
def test_parse_address_refuses_with_reason_and_form(text: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_address(text)
    msg = info.value.message
    assert msg.startswith("invalid address ")
    assert reason in msg
    assert "expected HOST:PORT or [IPV6]:PORT" in msg
    if len(text) < 80:
        assert repr(text) in msg  # names the bad value


@pytest.mark.parametrize(
    ("text", "spec", "shown"),
    [
        ("8080:localhost:8080", ForwardSpec(8080, "localhost", 8080), "8080:localhost:8080"),
        ("1:10.0.0.1:65535", ForwardSpec(1, "10.0.0.1", 65535), "1:10.0.0.1:65535"),
        ("5432:[::1]:5432", ForwardSpec(5432, "::1", 5432), "5432:[::1]:5432"),
        ("80:[2001:db8::1]:8080", ForwardSpec(80, "2001:db8::1", 8080), "80:[2001:db8::1]:8080"),
    ],
)
def test_parse_forward_spec_accepts_and_prints(text: str, spec: ForwardSpec, shown: str) -> None:
    parsed = parse_forward_spec(text)
    assert parsed == spec
    assert str(parsed) == shown
    assert parsed.target == shown.split(":", 1)[1]


def test_forward_spec_shape_error_message_is_exact() -> None:
    with pytest.raises(ConfigError) as info:
        parse_forward_spec("x")
    assert info.value.message == (
        "invalid forward spec 'x': expected LOCAL_PORT:HOST:REMOTE_PORT, e.g. 8080:localhost:80"
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("8080:localhost", "expected LOCAL_PORT:HOST:REMOTE_PORT"),
        ("0:h:80", "local port 0 is out of range 1-65535"),
        ("70000:h:80", "local port 70000 is out of range 1-65535"),
        ("80:h:0", "remote port 0 is out of range 1-65535"),
        ("x:h:80", "local port 'x' is not a number"),
        ("80:h:y", "remote port 'y' is not a number"),
        (":h:80", "local port is empty"),
        ("80::80", "host is empty"),
        ("80:a:b:80", "IPv6 host must be written in brackets"),
        ("80:[zz]:80", "'zz' is not a valid IPv6 address"),
        ("80:[::1]", "expected ':PORT' after ']'"),
    ],
)
def test_parse_forward_spec_says_what_is_wrong(text: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_forward_spec(text)
    msg = info.value.message
    assert msg.startswith(f"invalid forward spec {text!r}: ")
    assert reason in msg
    assert msg.endswith("expected LOCAL_PORT:HOST:REMOTE_PORT, e.g. 8080:localhost:80")


@pytest.mark.parametrize(
    "args", [(0, "h", 1), (1, "h", 65536), (1, "", 1), (1, "a b", 1), (True, "h", 1), (1, "zz:", 1)]
)
def test_forward_spec_constructor_keeps_invariants(args: tuple[int, str, int]) -> None:
    with pytest.raises(ConfigError, match="invalid forward spec"):
        ForwardSpec(*args)


_hosts = st.from_regex(r"[A-Za-z0-9_.-]{1,20}", fullmatch=True)
_v6 = st.ip_addresses(v=6).map(str)
_ports = st.integers(1, 65535)


@given(st.text(max_size=60) | st.from_regex(r"\[?[0-9a-f:]*\]?:[0-9]{0,7}", fullmatch=True))
def test_parse_address_never_raises_anything_else(text: str) -> None:
    try:
        host, port = parse_address(text)
    except ConfigError:
        return
    assert host and 1 <= port <= 65535
    shown = f"[{host}]" if ":" in host else host
    assert parse_address(f"{shown}:{port}") == (host, port)


@given(
    st.text(max_size=60) | st.from_regex(r"[0-9]{0,6}:\[?[a-z0-9:]*\]?:[0-9]{0,6}", fullmatch=True)
)
def test_parse_forward_spec_never_raises_anything_else(text: str) -> None:
    try:
        spec = parse_forward_spec(text)
    except ConfigError:
        return
    assert 1 <= spec.local_port <= 65535 and 1 <= spec.remote_port <= 65535 and spec.host
    assert parse_forward_spec(str(spec)) == spec


@given(_ports, _hosts | _v6, _ports)
def test_valid_forward_specs_round_trip(local: int, host: str, remote: int) -> None:
    spec = ForwardSpec(local, host, remote)
    assert parse_forward_spec(str(spec)) == spec
    assert parse_address(spec.target) == (host, remote)


# --- loading ---------------------------------------------------------------------------------


def test_minimal_vault_loads_with_defaults(cfg: Path) -> None:
    write(cfg, MINIMAL)
    vault = load_vault("prod")
    assert vault.name == "prod"
    assert (vault.address, vault.org, vault.app) == ("prod.example.com:443", "acme", "vault-prod")
    assert vault.host_port() == ("prod.example.com", 443)
    assert vault.access_token is None and vault.machine_id is None
    assert vault.forward == () and vault.forwards() == []
    assert vault.rootfs is None and vault.rootfs_url is None
    assert vault.issuer_base_url() == DEFAULT_ISSUER_BASE_URL == "https://oidc.fly.io"
    assert not vault.is_issuer_overridden


def test_full_vault_and_ipv6_address(cfg: Path) -> None:
    write(
        cfg,
        f"""
[vault."my.v6"]
address = "[2001:db8::1]:8443"
org = "acme"
app = "vault-x"
access_token = "{TOKEN}"
machine_id = "148e21ea7e46e8"
forward = ["8080:localhost:8080", "5432:[::1]:5432"]
rootfs_url = "https://example.com/rootfs.tar.gz"
""",
    )
    vault = load_config().vaults["my.v6"]
    assert vault.host_port() == ("2001:db8::1", 8443)
    assert vault.require_access_token() == TOKEN
    assert vault.machine_id == "148e21ea7e46e8"
    assert vault.forwards() == [
        ForwardSpec(8080, "localhost", 8080),
        ForwardSpec(5432, "::1", 5432),
    ]
    assert vault.rootfs_source("cold boot") == RootfsUrl("https://example.com/rootfs.tar.gz")


def test_config_path_honours_fly_vault_config(
    cfg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = write(tmp_path / "elsewhere.toml", MINIMAL.replace("prod", "other", 1))
    write(cfg, MINIMAL)
    assert list(load_config().vaults) == ["prod"]
    monkeypatch.setenv("FLY_VAULT_CONFIG", str(other))
    config = load_config()
    assert config.path == other and list(config.vaults) == ["other"]


def test_missing_file_is_an_error_unless_missing_ok(cfg: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config()
    assert info.value.message == f"config file {cfg} not found"
    assert info.value.hint is not None and "[vault.NAME]" in info.value.hint
    assert 'address = "' in info.value.hint
    assert load_config(missing_ok=True) == Config(cfg, {})
    assert not cfg.exists()


def test_vault_not_found_lists_configured_names(cfg: Path) -> None:
    write(cfg, MINIMAL + MINIMAL.replace("prod]", "dev]"))
    with pytest.raises(ConfigError) as info:
        load_vault("staging")
    assert info.value.message == f"vault staging not found in {cfg}"
    assert info.value.hint == "configured vaults: dev, prod"


def test_vault_not_found_in_empty_file_shows_example(cfg: Path) -> None:
    write(cfg, "")
    with pytest.raises(ConfigError) as info:
        load_vault("prod", cfg)
    assert info.value.message == f"vault prod not found in {cfg}"
    assert info.value.hint is not None and "[vault.NAME]" in info.value.hint


def test_unknown_key_suggests_closest(cfg: Path) -> None:
    err = load_error(cfg, MINIMAL + 'adress = "x:1"\n')
    assert err.message == "unknown key 'adress' in [vault.prod]; did you mean 'address'?"
    assert err.hint is not None and str(cfg) in err.hint
    assert all(key in err.hint for key in VAULT_KEYS)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('zzz = "1"', "unknown key 'zzz' in [vault.prod]"),
        ('name = "other"', "unknown key 'name' in [vault.prod]"),
        (
            'rootfs_uri = "https://x/y"',
            "unknown key 'rootfs_uri' in [vault.prod]; did you mean 'rootfs_url'?",
        ),
        ("provision_token = 'x'", "unknown key 'provision_token' in [vault.prod]"),
    ],
)
def test_unknown_keys_are_refused(cfg: Path, extra: str, message: str) -> None:
    assert load_error(cfg, MINIMAL + extra + "\n").message.startswith(message)


def test_unknown_top_level_key_is_refused(cfg: Path) -> None:
    err = load_error(cfg, "vaults = 1\n" + MINIMAL)
    assert err.message == "unknown key 'vaults' in the top level; did you mean 'vault'?"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("vault = 3\n", "'vault' must hold [vault.<name>] tables, got integer"),
        ('[vault]\nprod = "x"\n', "[vault.prod] must be a table, got string"),
        ('[vault."a b"]\n', "invalid vault name 'a b': use only letters, digits, '_', '.' and '-'"),
        ('[vault."pröd"]\n', "invalid vault name 'pröd'"),
    ],
)
def test_structure_errors(cfg: Path, text: str, message: str) -> None:
    assert load_error(cfg, text).message.startswith(message)


def test_vault_names(cfg: Path) -> None:
    write(cfg, MINIMAL.replace("prod]", '"a.B-1_x"]'))
    assert list(load_config().vaults) == ["a.B-1_x"]
    with pytest.raises(ConfigError, match="invalid vault name 'a/b'"):
        entry(name="a/b")


def test_missing_required_keys_are_named_with_the_vault(cfg: Path) -> None:
    err = load_error(cfg, '[vault.prod]\naddress = "h:1"\n')
    assert err.message.splitlines() == [
        "[vault.prod] is missing required key 'org'",
        "[vault.prod] is missing required key 'app'",
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("org = 5", "[vault.prod] org must be a string, got integer"),
        ("access_token = true", "[vault.prod] access_token must be a string, got boolean"),
        ('forward = "8080:h:80"', "[vault.prod] forward must be an array of strings, got string"),
        ("forward = [1]", "[vault.prod] forward[0] must be a string, got integer"),
        ("machine_id = { a = 1 }", "[vault.prod] machine_id must be a string, got table"),
        ("rootfs = 1.5", "[vault.prod] rootfs must be a string, got float"),
        (
            'rootfs_allow_devices = "yes"',
            "[vault.prod] rootfs_allow_devices must be true or false, got string",
        ),
        (
            "rootfs_max_expansion_ratio = 2.5",
            "[vault.prod] rootfs_max_expansion_ratio must be an integer, got float",
        ),
        (
            "rootfs_max_expansion_ratio = true",
            "[vault.prod] rootfs_max_expansion_ratio must be an integer, got boolean",
        ),
    ],
)
def test_wrong_types_are_named(cfg: Path, extra: str, message: str) -> None:
    key = extra.split(" ")[0]
    lines = [line for line in MINIMAL.splitlines() if not line.startswith(key)]
    assert load_error(cfg, "\n".join([*lines, extra, ""])).message == message


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('address = "nope"', "[vault.prod] invalid address 'nope': missing ':PORT'; expected"),
        ('forward = ["8080:h"]', "[vault.prod] invalid forward spec '8080:h': expected"),
        ('org = ""', "[vault.prod] org must not be empty"),
        ('app = "a b"', "[vault.prod] app must not contain spaces"),
        ('org = "a/b"', "[vault.prod] org must not contain spaces or any of / ? # %"),
        ('machine_id = ""', "[vault.prod] machine_id must not be empty"),
        ('rootfs = ""', "[vault.prod] rootfs must not be empty"),
        (
            'rootfs_url = "ftp://x/y"',
            "[vault.prod] rootfs_url must use http or https scheme, got ftp",
        ),
        (
            'rootfs_url = "x/y.tar.gz"',
            "[vault.prod] rootfs_url must use http or https scheme, got none",
        ),
        ('rootfs_url = "https:///y"', "[vault.prod] rootfs_url has no host"),
        ('rootfs_url = "https://h/a b"', "[vault.prod] rootfs_url must not contain spaces"),
        (
            "rootfs_max_expansion_ratio = -1",
            "[vault.prod] rootfs_max_expansion_ratio must be a whole number from 0 (no limit) "
            "to 4294967295",
        ),
    ],
)
def test_value_rules(cfg: Path, extra: str, message: str) -> None:
    key = extra.split(" ")[0]
    lines = [line for line in MINIMAL.splitlines() if not line.startswith(key)]
    assert load_error(cfg, "\n".join([*lines, extra, ""])).message.startswith(message)


def test_all_problems_are_reported_together(cfg: Path) -> None:
    err = load_error(cfg, MINIMAL + 'adress = "x"\n[vault.dev]\naddress = "h"\n')
    assert err.message.splitlines() == [
        "unknown key 'adress' in [vault.prod]; did you mean 'address'?",
        "[vault.dev] invalid address 'h': missing ':PORT'; expected HOST:PORT or [IPV6]:PORT, "
        "e.g. my-app.fly.dev:443",
        "[vault.dev] is missing required key 'org'",
        "[vault.dev] is missing required key 'app'",
    ]


def test_toml_syntax_error_shows_path_line_and_column(cfg: Path) -> None:
    err = load_error(cfg, MINIMAL + "machine_id = \n")
    assert err.message == f"config file {cfg} is not valid TOML: line 5, column 14: Invalid value"


def test_non_utf8_file(cfg: Path) -> None:
    cfg.parent.mkdir(parents=True)
    cfg.write_bytes(b'[vault.prod]\norg = "\xff"\n')
    with pytest.raises(ConfigError, match="is not valid UTF-8"):
        load_config()


def test_unreadable_config_is_a_config_error(cfg: Path) -> None:
    cfg.mkdir(parents=True)  # a directory where the file should be
    with pytest.raises(ConfigError, match=f"cannot read config file {cfg}"):
        load_config()


def test_direct_construction_raises_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        VaultConfig(name="prod", address="h:1", org="o", app="a", bogus=1)
    assert info.value.message == "unknown key 'bogus' in [vault.prod]"
    assert entry().name == "prod"


# --- tokens ----------------------------------------------------------------------------------


def _all_text(exc: ConfigError) -> str:
    return "".join(traceback.format_exception(exc)) + exc.message + (exc.hint or "") + repr(exc)


@pytest.mark.parametrize(
    "text",
    [
        f'[vault.prod]\naddress = "h:1"\norg = 5\napp = "a"\naccess_token = "{TOKEN}"\n',
        f'[vault.prod]\naddress = "h:1"\norg = "o"\napp = "a"\naccess_token = ["{TOKEN}"]\n',
        f'[vault.prod]\naddress = "h:1"\norg = "o"\napp = "a"\naccess_token = {{ v = "{TOKEN}" }}\n',
        f'{MINIMAL}access_token = "{TOKEN}"\nacces_tokn = "{TOKEN}"\n',
        f'{MINIMAL}acces_token = "{TOKEN}"\n',
        f'[vault.prod]\naddress = "bad address"\norg = "o"\napp = "a"\naccess_token = "{TOKEN}"\n',
        f'[vault.prod]\naddress = "{TOKEN}"\norg = "o"\napp = "a"\naccess_token = "{TOKEN}"\n',
        f'[vault.prod]\naccess_token = "{TOKEN}"\n',
        f'{MINIMAL}access_token = "{TOKEN}"\nforward = ["{TOKEN}"]\nrootfs_url = "ftp://{TOKEN}"\n',
        f'{MINIMAL}access_token = "{TOKEN}"\n[vault.dev]\napp = "{TOKEN}x"\n',
        f'{MINIMAL}access_token = "{TOKEN}\n',
        f"{MINIMAL}access_token = {TOKEN}\n",
        f'{TOKEN} = "x"\n{MINIMAL}access_token = "{TOKEN}"\n',
        f'[vault."{TOKEN} x"]\naccess_token = "{TOKEN}"\n',
        f'{MINIMAL}access_token = "{TOKEN}"\noidc_issuer_url = "http://{TOKEN}.example/"\n',
    ],
)
def test_no_error_text_contains_the_token(cfg: Path, text: str) -> None:
    err = load_error(cfg, text)
    assert TOKEN not in _all_text(err)
    assert err.message  # still says something useful


def test_no_token_from_direct_construction_or_model_output() -> None:
    for bad in ({"address": TOKEN}, {"org": None}, {"forward": [TOKEN]}, {"extra": TOKEN}):
        with pytest.raises(ConfigError) as info:
            entry(access_token=TOKEN, **bad)
        assert TOKEN not in _all_text(info.value)
    with pytest.raises(ConfigError) as info:
        VaultConfig(name="prod", access_token=TOKEN)  # pydantic's "missing" carries the dict
    assert TOKEN not in _all_text(info.value)
    vault = entry(access_token=TOKEN)
    for shown in (repr(vault), str(vault), repr(vault.to_fields()), str(vault.to_fields())):
        assert TOKEN not in shown
    assert vault.require_access_token() == TOKEN


@pytest.mark.parametrize("token", [None, ""])
def test_access_token_required_when_connecting(token: str | None) -> None:
    with pytest.raises(ConfigError) as info:
        entry(name="my.prod", access_token=token).require_access_token()
    assert info.value.message == "access_token is required"
    assert info.value.hint is not None and '[vault."my.prod"] access_token' in info.value.hint


# --- rootfs ----------------------------------------------------------------------------------


def test_rootfs_both_and_neither() -> None:
    both = entry(rootfs="/r.tar.gz", rootfs_url="https://h/r.tar.gz")
    with pytest.raises(ConfigError) as info:
        both.rootfs_source("cold boot")
    assert info.value.message == "both rootfs and rootfs_url are set; configure exactly one"
    for purpose in ("cold boot", "reprovision"):
        with pytest.raises(ConfigError) as info:
            entry().rootfs_source(purpose)
        assert info.value.message == f"either rootfs path or rootfs_url is required for {purpose}"
        assert info.value.hint is not None and "[vault.prod]" in info.value.hint


@pytest.mark.parametrize(
    "url", ["http://h/r.tar.gz", "https://h:8443/r.tar.gz?sig=1", "HTTPS://H/r"]
)
def test_rootfs_url(url: str) -> None:
    assert entry(rootfs_url=url).rootfs_source("reprovision") == RootfsUrl(url)


def test_rootfs_options_load_and_are_written_back(cfg: Path) -> None:
    write(cfg, MINIMAL + "rootfs_allow_devices = true\nrootfs_max_expansion_ratio = 0\n")
    vault = load_vault("prod")
    assert vault.rootfs_allow_devices is True and vault.rootfs_max_expansion_ratio == 0
    assert vault.to_toml()["rootfs_max_expansion_ratio"] == 0  # 0 (no limit) is not a default
    defaults = entry()
    assert defaults.rootfs_allow_devices is False and defaults.rootfs_max_expansion_ratio is None
    assert "rootfs_allow_devices" not in defaults.to_toml()
    assert "rootfs_max_expansion_ratio" not in defaults.to_toml()


def test_rootfs_url_scheme_rechecked_when_used() -> None:
    # _trusted skips validation, as a hand-built entry might
    bad = VaultConfig._trusted(
        {"name": "p", "address": "h:1", "org": "o", "app": "a", "rootfs_url": "file:///r"}
    )
    with pytest.raises(ConfigError) as info:
        bad.rootfs_source("cold boot")
    assert info.value.message == "rootfs_url must use http or https scheme, got file"


def test_rootfs_file_home_expansion(cfg: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    write(home / "img" / "rootfs.tar.gz", "x")
    assert entry(rootfs="~/img/rootfs.tar.gz").rootfs_source("cold boot") == RootfsFile(
        home / "img" / "rootfs.tar.gz"
    )
    # only a leading ~/ is expanded
    with pytest.raises(ConfigError, match="rootfs file img/~/x not found"):
        entry(rootfs="img/~/x").rootfs_source("cold boot")


def test_rootfs_file_missing_or_unusable(tmp_path: Path) -> None:
    missing = tmp_path / "nope.tar.gz"
    with pytest.raises(ConfigError) as info:
        entry(rootfs=str(missing)).rootfs_source("cold boot")
    assert info.value.message == f"rootfs file {missing} not found"
    assert info.value.hint is not None and "rootfs_url" in info.value.hint
    with pytest.raises(ConfigError, match="is not a regular file"):
        entry(rootfs=str(tmp_path)).rootfs_source("cold boot")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # would block on open(); must be refused without opening
    with pytest.raises(ConfigError, match="is not a regular file"):
        entry(rootfs=str(fifo)).rootfs_source("reprovision")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a mode-000 file")
def test_rootfs_file_unreadable(tmp_path: Path) -> None:
    locked = write(tmp_path / "r.tar.gz", "x")
    locked.chmod(0)
    with pytest.raises(ConfigError, match=f"rootfs file {locked} is not readable"):
        entry(rootfs=str(locked)).rootfs_source("cold boot")


# --- issuer override -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("http://127.0.0.1:8123", "http://127.0.0.1:8123"),
        ("http://127.9.8.7/", "http://127.9.8.7"),
        ("https://localhost:9/base/", "https://localhost:9/base"),
        ("http://[::1]:8000", "http://[::1]:8000"),
    ],
)
def test_issuer_override_on_loopback(cfg: Path, url: str, base: str) -> None:
    write(cfg, f'{MINIMAL}oidc_issuer_url = "{url}"\n')
    vault = load_vault("prod")
    assert vault.is_issuer_overridden
    assert vault.issuer_base_url() == base


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://oidc.example.com", "got host 'oidc.example.com'"),
        ("http://10.0.0.1:80", "got host '10.0.0.1'"),
        ("http://[::2]:80", "got host '::2'"),
        ("http://localhost.evil.com", "got host 'localhost.evil.com'"),
        ("http://0x7f000001/", "got host '0x7f000001'"),
        ("ftp://127.0.0.1/", "oidc_issuer_url must use http or https scheme, got ftp"),
        ("http://127.0.0.1/?x=1", "must be a plain base URL"),
        ("http://u:p@127.0.0.1/", "must be a plain base URL"),
        ("http://127.0.0.1:99999/", "is not a valid URL"),
    ],
)
def test_issuer_override_refused_off_loopback(cfg: Path, url: str, reason: str) -> None:
    err = load_error(cfg, f'{MINIMAL}oidc_issuer_url = "{url}"\n')
    assert err.message.startswith("[vault.prod] oidc_issuer_url")
    assert reason in err.message
    with pytest.raises(ConfigError):
        entry(oidc_issuer_url=url)


# --- writing ---------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_save_creates_file_0600_and_round_trips(cfg: Path) -> None:
    old_umask = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        save_roundtrip(cfg)
    finally:
        os.umask(old_umask)


def save_roundtrip(cfg: Path) -> None:
    full = entry(
        name="my.v6",
        address="[::1]:8443",
        access_token=TOKEN,
        machine_id="m1",
        forward=["8080:localhost:80", "1:[::1]:2"],
        rootfs="~/r.tar.gz",
        oidc_issuer_url="http://127.0.0.1:1",
    )
    save_vault(full)
    save_vault(entry())
    assert mode(cfg) == 0o600
    assert load_config().vaults == {"my.v6": full, "prod": entry()}
    assert TOKEN in cfg.read_text()  # the user's own file is where the secret lives
    assert sorted(p.name for p in cfg.parent.iterdir()) == ["config.toml", "config.toml.lock"]


def test_defaults_are_written_sparsely(cfg: Path) -> None:
    save_vault(entry())
    assert tomllib.loads(cfg.read_text()) == {
        "vault": {"prod": {"address": "h.example:443", "org": "o", "app": "a"}}
    }
    assert "forward" not in cfg.read_text()


OTHER = """\
title = "kept"
[other]
when = 1979-05-27T07:32:00Z
ratio = 0.1
list = [1, [2, "three"], { four = 4 }]

[vault.a]
address = "a.example:1"
org = "o"
app = "a"
access_token = "tok-a"
future_key = "kept even though load refuses it"

[vault.prod]
address = "old.example:1"
org = "old"
app = "old"

[vault.z]
address = "z.example:1"
org = "o"
app = "z"
forward = ["1:h:2"]
"""


def test_save_replaces_in_place_and_keeps_everything_else(cfg: Path) -> None:
    write(cfg, OTHER)
    before = tomllib.loads(OTHER)
    save_vault(entry(access_token=TOKEN))
    after = tomllib.loads(cfg.read_text())
    assert list(after["vault"]) == ["a", "prod", "z"]  # replaced entry keeps its place
    assert after["vault"]["prod"] == entry(access_token=TOKEN).to_toml()
    assert {k: v for k, v in after.items() if k != "vault"} == {
        k: v for k, v in before.items() if k != "vault"
    }
    assert after["vault"]["a"] == before["vault"]["a"]
    assert after["vault"]["z"] == before["vault"]["z"]
    save_vault(entry(name="new"))
    assert list(tomllib.loads(cfg.read_text())["vault"]) == ["a", "prod", "z", "new"]


def test_remove_vault(cfg: Path) -> None:
    write(cfg, OTHER)
    before = tomllib.loads(OTHER)
    assert remove_vault("prod") is True
    after = tomllib.loads(cfg.read_text())
    del before["vault"]["prod"]
    assert after == before
    assert mode(cfg) == 0o600


def test_remove_absent_vault_leaves_file_untouched(cfg: Path) -> None:
    write(cfg, OTHER)
    cfg.chmod(0o644)
    assert remove_vault("nope") is False
    assert cfg.read_text() == OTHER and mode(cfg) == 0o644


def test_remove_from_missing_file_creates_nothing(cfg: Path) -> None:
    assert remove_vault("prod") is False
    assert not cfg.parent.exists()


def test_remove_last_vault_leaves_no_empty_table(cfg: Path) -> None:
    save_vault(entry())
    assert remove_vault("prod") is True
    assert tomllib.loads(cfg.read_text()) == {}
    assert load_config().vaults == {}


def test_remove_invalid_name_is_refused(cfg: Path) -> None:
    with pytest.raises(ConfigError, match="invalid vault name"):
        remove_vault("a b")


@pytest.mark.parametrize("broken", ['[vault.prod\naddress = "x"\n', "vault = 5\n", "a = \xff"])
def test_broken_file_is_never_overwritten(cfg: Path, broken: str) -> None:
    write(cfg, broken)
    raw = cfg.read_bytes()
    for action in (lambda: save_vault(entry()), lambda: remove_vault("prod")):
        with pytest.raises(ConfigError, match="not modifying it"):
            action()
        assert cfg.read_bytes() == raw
    assert not [p for p in cfg.parent.iterdir() if p.name.endswith(".tmp")]


def test_save_refuses_an_unvalidated_entry(cfg: Path) -> None:
    write(cfg, MINIMAL)
    bad = VaultConfig._trusted({"name": "dev", "address": "nope", "org": "o", "app": "a"})
    with pytest.raises(ConfigError, match="invalid address 'nope'"):
        save_vault(bad)
    assert cfg.read_text() == MINIMAL


def test_save_tightens_existing_mode(cfg: Path) -> None:
    write(cfg, MINIMAL)
    cfg.chmod(0o644)
    save_vault(entry(name="dev"))
    assert mode(cfg) == 0o600


def test_save_writes_through_a_symlink(cfg: Path, tmp_path: Path) -> None:
    real = write(tmp_path / "dotfiles" / "fly.toml", MINIMAL)
    cfg.parent.mkdir(parents=True)
    cfg.symlink_to(real)
    save_vault(entry(name="dev"))
    assert cfg.is_symlink()
    assert list(load_config(real).vaults) == ["prod", "dev"]


def test_save_waits_for_the_lock(cfg: Path) -> None:
    write(cfg, MINIMAL)
    lock = os.open(cfg.with_name("config.toml.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    saver = threading.Thread(target=save_vault, args=(entry(name="dev"),))
    saver.start()
    saver.join(0.3)
    assert saver.is_alive() and list(load_config().vaults) == ["prod"]
    os.close(lock)
    saver.join(10)
    assert not saver.is_alive() and list(load_config().vaults) == ["prod", "dev"]


def test_concurrent_saves_lose_nothing(cfg: Path) -> None:
    names = [f"v{i}" for i in range(12)]
    threads = [threading.Thread(target=save_vault, args=(entry(name=n),)) for n in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert sorted(load_config().vaults) == sorted(names)


def test_documented_full_example_loads(tmp_path: Path) -> None:
    doc = (Path(__file__).parents[1] / "references" / "config.md").read_text(encoding="utf-8")
    example = doc.split("## Full example", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    config = load_config(write(tmp_path / "c.toml", example))
    assert list(config.vaults) == ["prod", "scratch.eu"]
    assert config.vaults["scratch.eu"].host_port() == ("2a09:8280:1::2a", 4433)
    assert config.vaults["prod"].forwards()[1] == ForwardSpec(5432, "::1", 5432)


def test_validated_file_is_read_without_pydantic(cfg: Path) -> None:
    """The second read of the same bytes comes from the validated-file cache."""
    import subprocess
    import sys

    write(cfg, MINIMAL)
    probe = (
        "import sys; from flyvault.config import load_vault; v = load_vault('prod'); "
        "print(v.address, 'pydantic' in sys.modules)"
    )
    first = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    second = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert first.stdout.split()[1] == "True", first.stderr
    assert second.stdout.split()[1] == "False", second.stderr
    assert first.stdout.split()[0] == second.stdout.split()[0]
    # Any change to the bytes is validated again, and a broken file is still refused.
    write(cfg, MINIMAL.replace("address", "adress"))
    third = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert "unknown key 'adress'" in third.stderr
