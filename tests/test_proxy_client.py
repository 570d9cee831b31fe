"""The client's side of proxy mode: the ``proxy`` config key and the transport it selects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import run_async

from flyvault.client import connection as connection_module
from flyvault.config import VaultConfig, load_config
from flyvault.errors import ConfigError, ConnectError
from flyvault.proxy.wire import decode
from flyvault.transport import TransportSettings

BASE = {"name": "v", "address": "proxy.example.com:443", "org": "o", "app": "a"}


def test_proxy_needs_a_machine_id() -> None:
    with pytest.raises(ConfigError, match=r"\[vault.v\] proxy = true needs machine_id"):
        VaultConfig(**BASE, proxy=True)
    assert VaultConfig(**BASE, machine_id="148e21ea7e46e8", proxy=True).proxy is True
    # machine_id alone pins the machine but keeps the direct transport (e.g. the local vault).
    assert VaultConfig(**BASE, machine_id="148e21ea7e46e8").proxy is False


@pytest.mark.parametrize("value", ['"true"', "1", '"yes"'])
def test_proxy_is_a_real_boolean(tmp_path: Path, value: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[vault.v]\naddress = "h:1"\norg = "o"\napp = "a"\nmachine_id = "m"\nproxy = {value}\n'
    )
    with pytest.raises(ConfigError, match=r"\[vault.v\] proxy must be true or false"):
        load_config(path)


def test_proxy_is_written_back_only_when_set() -> None:
    assert "proxy" not in VaultConfig(**BASE).to_toml()
    table = VaultConfig(**BASE, machine_id="m1", proxy=True).to_toml()
    assert table["proxy"] is True and table["machine_id"] == "m1"


def _capture_connect(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    seen: list[Any] = []

    async def fake_connect(host: str, port: int, settings: TransportSettings | None = None) -> Any:
        seen.append(settings)
        raise ConnectError("captured")

    monkeypatch.setattr(connection_module, "connect", fake_connect)
    return seen


def test_open_vault_wraps_datagrams_only_in_proxy_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _capture_connect(monkeypatch)
    for proxy in (True, False):
        entry = VaultConfig(**BASE, machine_id="148e21ea7e46e8", proxy=proxy)
        with pytest.raises(ConnectError):
            run_async(connection_module.open_vault(entry))
    wrapped, direct = seen
    assert direct is None  # nothing changed for the direct path
    assert wrapped.datagram_wrapper is not None
    assert decode(wrapped.datagram_wrapper(b"\xc3quic")) == ("148e21ea7e46e8", 22)
    # The caller's other settings are kept.
    custom = TransportSettings(handshake_timeout=3.0)
    entry = VaultConfig(**BASE, machine_id="148e21ea7e46e8", proxy=True)
    with pytest.raises(ConnectError):
        run_async(connection_module.open_vault(entry, settings=custom))
    assert seen[-1].handshake_timeout == 3.0 and seen[-1].datagram_wrapper is not None
    assert custom.datagram_wrapper is None  # not mutated


def test_a_machine_id_too_long_for_the_mtu_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _capture_connect(monkeypatch)
    entry = VaultConfig(**BASE, machine_id="m" * 25, proxy=True)
    with pytest.raises(ConfigError, match="at most 24 fit"):
        run_async(connection_module.open_vault(entry))
