"""fly-vault init: the QUIC server inside the Fly Machine."""
