"""DHCP responder: sans-I/O codec and decision logic, plus a thin asyncio transport."""
