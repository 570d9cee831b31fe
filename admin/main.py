"""``fly-vault-admin``: not built yet; says so clearly instead of failing with a traceback."""

import sys


def main() -> int:
    print(
        "fly-vault-admin: not available in this version of fly-vault yet "
        "(planned: tenant create/list/delete/update-image/usage-facts)",
        file=sys.stderr,
    )
    return 1
