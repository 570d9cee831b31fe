"""Init's optional nftables firewall (``fly-vault-init --firewall``).

The workload shares the Fly machine's network (reference flaw 6), so any server it starts on
``0.0.0.0`` is reachable over Fly's private network by every other app in the org. This
default-drop input policy leaves only the vault's own QUIC port open.

Fixed against the original (reference §1.4, flaws 5 and 24):

* It lives in its own table, ``inet fly_vault``, instead of the generic ``inet filter`` that
  other tools also use, and the script deletes that table before re-creating it, so applying
  it twice (init restarted in the same boot) replaces the rules instead of appending
  duplicates. ``add table`` first makes the ``delete`` valid when the table does not exist
  yet; nft runs the whole script as one transaction, so there is never a moment without
  rules, and a script that fails leaves the previous rules in place.
* TCP 22 is closed unless asked for (see ``render_ruleset``).
* ICMP echo is accepted, so ``ping`` keeps working for diagnosis.
* A missing ``nft`` binary gives a message that says how to fix it (the original's image did
  not install nftables at all, so its firewall could never start).

Only the ``input`` and ``forward`` hooks are filtered; output stays open so the server can
reach Fly's OIDC endpoint, ``rootfs_url`` hosts and DNS, whose replies come back as
``established``.
"""

from __future__ import annotations

import shutil
import subprocess

from flyvault.errors import FirewallError

TABLE_FAMILY = "inet"
TABLE_NAME = "fly_vault"
NFT_TIMEOUT_SECONDS = 30.0

_INSTALL_HINT = (
    "install nftables (Debian/Ubuntu: apt-get install nftables); the image made by "
    "'fly-vault build' has it. Or start init without --firewall."
)


def render_ruleset(listen_port: int, *, allow_ssh: bool = False) -> str:
    """The ``nft -f`` script: replace table ``inet fly_vault`` with the default-drop rules.

    A pure function so the exact text can be unit-tested without root or nft.
    """
    if isinstance(listen_port, bool) or not isinstance(listen_port, int):
        raise FirewallError(f"firewall: listen port must be an integer, got {listen_port!r}")
    if not 1 <= listen_port <= 65535:
        # Port 0 means "any free port": a rule cannot name a port chosen later.
        raise FirewallError(
            f"firewall: listen port {listen_port} is out of range 1-65535",
            hint="--firewall needs a fixed port in --listen (e.g. fly-global-services:8443)",
        )
    ssh_rule = (
        [
            "        # --firewall-allow-ssh: Fly's SSH (hallpass, 'fly ssh console') and any sshd",
            "        # in the workload. It grants a root shell to anyone holding Fly credentials",
            "        # for this app, without the vault's ACCESS_TOKEN.",
            '        tcp dport 22 accept comment "ssh"',
        ]
        if allow_ssh
        else [
            # Said in the ruleset too, so whoever runs 'nft list ruleset' on the machine
            # learns why ssh does not answer.
            "        # TCP 22 is closed on purpose: Fly SSH would bypass the vault's ACCESS_TOKEN",
            "        # (start init with --firewall-allow-ssh to open it).",
        ]
    )
    lines = [
        f"# fly-vault init firewall (UDP {listen_port}); replaces any earlier copy atomically.",
        f"add table {TABLE_FAMILY} {TABLE_NAME}",
        f"delete table {TABLE_FAMILY} {TABLE_NAME}",
        f"table {TABLE_FAMILY} {TABLE_NAME} {{",
        "    chain input {",
        # A drop in any base chain is final, so other tables' accept rules cannot reopen
        # what this policy closes.
        "        type filter hook input priority 0; policy drop;",
        '        iif "lo" accept',
        "        ct state established,related accept",
        # IPv6 stops working without neighbour discovery (Fly's private network is IPv6).
        "        icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, "
        "nd-router-advert } accept",
        "        icmp type echo-request accept",
        "        icmpv6 type echo-request accept",
        f'        udp dport {listen_port} accept comment "fly-vault QUIC"',
        *ssh_rule,
        # Counted so 'nft list table inet fly_vault' shows how much was refused.
        '        counter drop comment "default drop"',
        "    }",
        "    chain forward {",
        # The workload shares the host's network namespace; nothing is routed through here.
        "        type filter hook forward priority 0; policy drop;",
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def find_nft() -> str:
    """The path of the ``nft`` binary, or a ``FirewallError`` saying how to get it."""
    nft = shutil.which("nft")
    if nft is None:
        raise FirewallError(
            "firewall: the 'nft' command was not found on PATH; it is needed by --firewall",
            hint=_INSTALL_HINT,
        )
    return nft


def apply_firewall(listen_port: int, *, allow_ssh: bool = False) -> None:
    """Replace this network namespace's ``inet fly_vault`` table with the init firewall.

    Idempotent: applying it again gives the same rules, never duplicates. Raises
    ``FirewallError`` when nft is missing or refuses the script (not root, no nf_tables in
    the kernel); the message carries nft's own error text.
    """
    script = render_ruleset(listen_port, allow_ssh=allow_ssh)
    nft = find_nft()
    try:
        result = subprocess.run(
            [nft, "-f", "-"],
            input=script,
            capture_output=True,
            text=True,
            timeout=NFT_TIMEOUT_SECONDS,
            check=False,
        )
    except FileNotFoundError:
        # Removed between which() and exec, or a broken symlink on PATH.
        raise FirewallError(f"firewall: cannot run {nft}: not found", hint=_INSTALL_HINT) from None
    except subprocess.TimeoutExpired:
        raise FirewallError(
            f"firewall: nft did not finish within {NFT_TIMEOUT_SECONDS:.0f} s"
        ) from None
    except OSError as exc:
        raise FirewallError(f"firewall: cannot run {nft}: {exc.strerror or exc}") from None
    if result.returncode != 0:
        detail = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
        if len(detail) > 500:  # a syntax error echoes the script; the start names the cause
            detail = detail[:497] + "..."
        hint = None
        if "Operation not permitted" in result.stderr:
            hint = "nft needs root (CAP_NET_ADMIN); init runs as root on a Fly machine"
        elif "No such file or directory" in result.stderr or "Protocol not supported" in (
            result.stderr
        ):
            hint = (
                "this kernel seems to lack nf_tables (or a module the rules need); "
                "start init without --firewall"
            )
        raise FirewallError(f"firewall: nft refused the ruleset: {detail}", hint=hint)
