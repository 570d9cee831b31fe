"""``vault-proxy``: not built yet; says so clearly instead of failing with a traceback."""

import sys


def main() -> int:
    print(
        "vault-proxy: not available in this version of fly-vault yet (planned: UDP "
        "multiplexer to tenant machines, see references/protocol.md)",
        file=sys.stderr,
    )
    return 1
