"""``vault-proxy``: a UDP multiplexer in front of fly-vault tenant machines.

``wire`` decodes the client's datagram prefix, ``discovery`` keeps the machine map from the
Machines API (and wakes stopped machines, rate limited), ``relay`` moves datagrams with a
session table keyed by machine id and QUIC connection ids, ``status`` serves the loopback
``/healthz`` and formats the structured logs, ``main`` is the command line.
"""
