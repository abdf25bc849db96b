"""HTTP side: what booting nodes fetch (boot network) and the admin API (unix socket)."""
