"""The fly-vault command line."""

#: Set by ``main.entry()``: this process is the ``fly-vault`` CLI's own, so it may fork the
#: connection keeper off itself (no interpreter start, nothing imported twice). Elsewhere
#: (tests that call ``main()``, a host program) the keeper starts as a fresh process.
FORK_ALLOWED = False
