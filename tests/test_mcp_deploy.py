"""The MCP deploy tool on a VM-mode vault (root, busybox, namespaces): a plan given as TOML
text is a dry run until confirm=true, then applied, then unchanged; status reads the ledger;
reverse undoes it; a bad plan is refused in words before anything connects."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import InitProcess, run_async
from mcp import Client
from mcp_support import Session, configure_vault, mcp_server, text
from test_deploy_e2e import PLAN, deploy_rootfs

from flyvault.standins import OidcIssuer

__all__ = ["mcp_server"]

BUSYBOX = Path("/bin/busybox")
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and pivot_root need root"),
    pytest.mark.skipif(not BUSYBOX.exists(), reason="needs /bin/busybox (busybox-static)"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare"),
]

#: The e2e plan without its source file (a plan given as text has no directory of its own).
TEXT_PLAN = PLAN.replace('source = "files/gitconfig"', 'content = "[user]\\\\n  name = Dev\\\\n"')


def test_deploy_tool_dry_run_apply_status_reverse(
    mcp_server: Any, vm_init: InitProcess, issuer: OidcIssuer, tmp_path: Path
) -> None:
    configure_vault(vm_init, issuer, name="vm", rootfs=str(deploy_rootfs(tmp_path / "r.tar.gz")))

    async def scenario(s: Session) -> None:
        dry = await s.data("deploy", {"vault": "vm", "action": "apply", "plan": TEXT_PLAN})
        assert dry["ok"] is True, dry
        assert dry["result"]["dry_run"] is True and dry["result"]["changed"] == 6
        assert "confirm=true" in dry["result"]["next_step"]
        motd = await s.data("exec", {"vault": "vm", "command": "cat /etc/motd"})
        assert motd["stdout"] == "the old motd\n"  # the dry run changed nothing

        args = {"vault": "vm", "action": "apply", "plan": TEXT_PLAN, "confirm": True}
        applied = await s.data("deploy", args)
        assert applied["ok"] is True and applied["result"]["changed"] == 6, applied
        again = await s.data("deploy", args)
        assert again["result"]["changed"] == 0 and again["result"]["status"] == "applied"
        status = await s.data("deploy", {"vault": "vm", "action": "status"})
        assert status["result"]["converged"] is True
        assert status["result"]["plans"][0]["plan"] == "dev-box"

        undo = await s.data(
            "deploy", {"vault": "vm", "action": "reverse", "plan": "dev-box", "confirm": True}
        )
        assert undo["ok"] is True and undo["result"]["status"] == "reversed", undo
        motd = await s.data("exec", {"vault": "vm", "command": "cat /etc/motd"})
        assert motd["stdout"] == "the old motd\n"

        bad = await s.call(
            "deploy",
            {"vault": "vm", "action": "apply", "plan": "schema = 1\nname = 'x'\nbogus = 1\n"},
            ok=False,
        )
        assert "unknown key 'bogus'" in text(bad)
        none = await s.call("deploy", {"vault": "vm", "action": "apply"}, ok=False)
        assert "needs plan" in text(none)

    async def main() -> None:
        async with Client(mcp_server) as client:
            await scenario(Session(client))

    run_async(main(), 180)
