"""fly-vault: remote development VMs on Fly.io with attestation-gated access."""

__version__ = "0.1.0"
