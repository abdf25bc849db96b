"""HTTP, split by trust: `boot` is what booting nodes reach on the boot network, `admin`
the operator's API on a unix socket or loopback. `serve` runs either on its listener."""
