"""TFTP server: sans-I/O transfer state machine plus a thin asyncio shell."""
