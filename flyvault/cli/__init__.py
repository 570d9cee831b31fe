"""The fly-vault command line."""
