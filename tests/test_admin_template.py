"""Tenant templates: the original's example unchanged, rendering rules, and every refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
from admin_support import ACCESS_TOKEN, APP, EXAMPLE_TEMPLATE, SIMPLE_TEMPLATE, write_template
from hypothesis import given
from hypothesis import strategies as st

from flyvault.admin.errors import TemplateError
from flyvault.admin.template import (
    check_app,
    load_template,
    parse_vars,
    render_plan,
    validate_tenant_id,
)
from flyvault.errors import UsageError


def test_original_example_template_renders_unchanged() -> None:
    template = load_template(EXAMPLE_TEMPLATE)
    check_app(template, "vault-tenants")
    plans = render_plan(template, "acme", access_token=ACCESS_TOKEN, variables={})
    assert len(plans) == 1
    request = plans[0].request
    assert request["name"] == "tenant-acme-1"
    assert request["region"] == "ord"
    assert request["lease_ttl"] == 120
    config = request["config"]
    assert config["image"] == "registry.fly.io/vault-tenants/init:2026-03-02"
    assert config["size"] == "shared-cpu-2x"
    assert config["env"] == {"ACCESS_TOKEN": ACCESS_TOKEN}
    assert config["metadata"] == {
        "role": "tenant-vm",
        "environment": "prod",
        "fly_vault.tenant_id": "acme",
        "fly_vault.managed_by": "fly-vault-admin",
        "fly_vault.template": "tenant_template.toml",
    }
    (volume,) = plans[0].volumes
    assert (volume.name, volume.region, volume.size_gb) == ("tvol_acme_1", "ord", 30)
    assert config["mounts"] == [{"path": "/data", "name": "tvol_acme_1"}]


def test_index_is_one_based_and_size_from_mount(tmp_path: Path) -> None:
    template = load_template(write_template(tmp_path, SIMPLE_TEMPLATE))
    plans = render_plan(template, "t1", access_token="x" * 8, variables={})
    assert [p.request["name"] for p in plans] == ["tenant-t1-1", "tenant-t1-2"]
    assert [v.size_gb for p in plans for v in p.volumes] == [5, 5]


def _template(tmp_path: Path, body: str) -> Path:
    return write_template(tmp_path, body)


BASE = f'version = 1\napp = "{APP}"\nmachine_count = 1\n'


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("version = 1\napp = [\n", "invalid TOML"),
        (BASE.replace("version = 1", "version = 2") + '[machine.config]\nimage="i"\n', "version 2"),
        (
            'app = "a"\nmachine_count = 1\n[machine.config]\nimage="i"\n',
            "missing required key 'version'",
        ),
        (
            BASE.replace("machine_count = 1", "machine_count = 0")
            + '[machine.config]\nimage="i"\n',
            "greater than zero",
        ),
        (
            BASE + "machine_cont = 2\n" + '[machine.config]\nimage="i"\n',
            "unknown top-level key(s): machine_cont",
        ),
        (
            BASE + '[machine]\nregoin = "ord"\n[machine.config]\nimage="i"\n',
            "unknown key 'machine.regoin'",
        ),
        (BASE + "[machine]\nconfig = 3\n", "'machine.config' must be a table"),
        (BASE + "[machine]\nlease_ttl = true\n[machine.config]\nimage='i'\n", "must be an integer"),
        (BASE + "[machine.config]\nsize = 'x'\n", "machine.config.image must be a string"),
        (
            BASE + "[machine.config]\nimage='i'\n[metadata]\nrole = 3\n",
            "metadata.role must be a string",
        ),
        (
            BASE + "[machine.config]\nimage='i'\n[metadata]\n'fly_vault.tenant_id' = 'x'\n",
            "reserved",
        ),
        (
            BASE + "[machine.config]\nimage='i'\nenv = {A = '{{ bad-name }}'}\n",
            "malformed placeholder",
        ),
        (BASE + "[machine.config]\nimage='i{{'\n", "unbalanced"),
        (BASE + "[machine.config]\nimage='i'\ncmd = ['}} x']\n", "machine.config.cmd[0]"),
    ],
)
def test_bad_templates_are_refused_with_a_reason(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(TemplateError) as info:
        load_template(_template(tmp_path, text))
    assert needle in info.value.message
    assert info.value.exit_code == 3


def test_unreadable_template(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="cannot read template file"):
        load_template(tmp_path / "missing.toml")


def test_unknown_placeholders_listed_with_locations(tmp_path: Path) -> None:
    text = (
        BASE
        + "[machine]\nname = 'n-{{tenant_id}}'\n[machine.config]\nimage = 'img:{{tag}}'\n"
        + "[machine.config.env]\nX = '{{ flavour }}'\nT = '{{access_token}}'\n"
    )
    template = load_template(_template(tmp_path, text))
    with pytest.raises(TemplateError) as info:
        render_plan(template, "acme", access_token=None, variables={})
    message = info.value.message
    assert "unknown placeholder {{tag}} at machine.config.image (line 7)" in message
    assert "unknown placeholder {{ flavour }} at machine.config.env.X (line 9)" in message
    assert "{{access_token}} at machine.config.env.T (line 10) needs --access-token" in message
    assert "tag" not in (info.value.hint or "").split("known variables: ")[1].split(";")[0]
    plans = render_plan(
        template, "acme", access_token="tok-123456", variables={"tag": "v2", "flavour": "mint"}
    )
    assert plans[0].request["config"]["image"] == "img:v2"
    assert plans[0].request["config"]["env"]["X"] == "mint"


def test_app_must_match(tmp_path: Path) -> None:
    template = load_template(EXAMPLE_TEMPLATE)
    with pytest.raises(TemplateError, match="template app 'vault-tenants' does not match"):
        check_app(template, "other-app")


def test_parse_vars_rules() -> None:
    assert parse_vars(["a=1", " b =x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}
    for bad, needle in [
        (["novalue"], "expected key=value"),
        (["=v"], "empty key"),
        (["a=1", "a =2"], "duplicate --var key 'a '"),
        (["tenant_id=x"], "built-in"),
        (["1x=3"], "invalid --var key"),
    ]:
        with pytest.raises(UsageError, match=needle):
            parse_vars(bad)


def test_volume_names_checked_before_any_call() -> None:
    template = load_template(EXAMPLE_TEMPLATE)
    with pytest.raises(TemplateError, match="not a valid Fly volume name"):
        render_plan(template, "acme-co", access_token="tok-123456", variables={})


def test_tenant_id_validation() -> None:
    validate_tenant_id("acme_1.prod-x")
    for bad in ("", "-x", "a b", "x" * 64, "ä"):
        with pytest.raises(UsageError):
            validate_tenant_id(bad)


@given(value=st.text(min_size=0, max_size=40))
def test_rendering_is_single_pass_so_any_value_is_inserted_verbatim(value: str) -> None:
    # A value holding "{{tenant_id}}" or stray braces must come out exactly as given.
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.toml"
        path.write_text(
            BASE + "[machine.config]\nimage = 'i'\nenv = {V = '{{v}}', T = '{{tenant_id}}'}\n"
        )
        template = load_template(path)
        plans = render_plan(template, "acme", access_token=None, variables={"v": value})
    assert plans[0].request["config"]["env"] == {"V": value, "T": "acme"}
