"""bootd: one daemon that network-boots a bare-metal Kubernetes fleet (DHCP, TFTP, HTTP)."""

__version__ = "0.1.0"
