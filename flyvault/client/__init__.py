"""Client API shared by the CLI and the MCP server (no printing here)."""
