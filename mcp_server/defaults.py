"""Defaults of the MCP server that more than one module states, each once.

A leaf module (no imports) so that ``fly-vault-mcp --help`` can show them without loading
the client.
"""

#: Output kept per exec session in the MCP server's process (``--buffer-mib``).
BUFFER_MIB = 4
BUFFER_BYTES = BUFFER_MIB * 1024 * 1024
#: Older output of a session kept on disk past the memory buffer (``--spill-mib``).
SPILL_MIB = 256
SPILL_BYTES = SPILL_MIB * 1024 * 1024
