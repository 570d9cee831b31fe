"""``fly-vault-mcp``: not built yet; says so clearly instead of failing with a traceback."""

import sys


def main() -> int:
    print(
        "fly-vault-mcp: not available in this version of fly-vault yet "
        "(planned: MCP tools over the fly-vault client)",
        file=sys.stderr,
    )
    return 1
