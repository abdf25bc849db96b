"""TFTP server: the sans-I/O transfer state machine (`protocol`), a thin asyncio shell
(`server`) and what a finished transfer becomes in logs, metrics and events (`report`).
Which bytes a name means is the fleet's boot file tree (`bootd.fleet.filetree`)."""
