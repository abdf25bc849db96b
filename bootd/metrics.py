"""Prometheus metrics, in a registry owned by the daemon instance (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.dhcp_packets = Counter(
            "bootd_dhcp_packets", "DHCP requests handled, by outcome",
            ["outcome"], registry=self.registry)
        self.tftp_transfers = Counter(
            "bootd_tftp_transfers", "TFTP transfers, by outcome", ["outcome"],
            registry=self.registry)
        self.tftp_bytes = Counter(
            "bootd_tftp_sent_bytes", "TFTP payload bytes sent, retransmissions included",
            registry=self.registry)
        self.dhcp_leases = Gauge(
            "bootd_dhcp_dynamic_leases", "Addresses of the dynamic range with a lease record",
            registry=self.registry)
