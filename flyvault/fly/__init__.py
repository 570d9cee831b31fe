"""The Fly platform as fly-vault's tools see it: the Machines API client and its errors.

``machines`` (the client: timeouts, retries, deadlines, pagination, error mapping), ``leases``
(acquire with read-back, refresh, release), ``errors`` and ``hints`` (the API's branch of the
error tree, with hints by cause), ``clock`` (injectable time) and ``images`` (image
references). ``fly-vault-admin`` and ``vault-proxy`` both build on it and never import each
other; its stand-in for tests and local runs is ``flyvault.standins.machines``.
"""
