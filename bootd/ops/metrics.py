"""Prometheus metrics, in a registry owned by the daemon instance (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BOOT_BUCKETS = (10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200)


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
        self.http_image_bytes = Counter(
            "bootd_http_image_sent_bytes", "Image bytes served, by part", ["part"],
            registry=self.registry)
        self.http_refusals = Counter(
            "bootd_http_refusals", "Requests refused (wrong source address)", ["what"],
            registry=self.registry)
        self.node_events = Counter(
            "bootd_node_events", "Stages reported by nodes", ["stage"],
            registry=self.registry)
        self.token_failures = Gauge(
            "bootd_join_token_failures", "Consecutive failed refreshes of a cluster's token",
            ["cluster"], registry=self.registry)
        self.token_available = Gauge(
            "bootd_join_token_available", "1 if a join token is available for the cluster",
            ["cluster"], registry=self.registry)
        self.tokens_minted = Gauge(
            "bootd_join_tokens_per_node", "Per-node join tokens since start (minted, revoked, "
            "refused) and held now (outstanding)", ["cluster", "kind"], registry=self.registry)
        self.reloads = Counter(
            "bootd_config_reloads", "Config reloads, by outcome", ["outcome"],
            registry=self.registry)
        self.boot_events = Counter(
            "bootd_boot_events", "Boot events recorded, by stage and outcome",
            ["stage", "outcome"], registry=self.registry)
        self.stage_seconds = Histogram(
            "bootd_boot_stage_seconds", "Time from a stage to the next one in a boot attempt",
            ["stage"], buckets=STAGE_BUCKETS, registry=self.registry)
        self.boot_seconds = Histogram(
            "bootd_boot_seconds", "Whole boots: first DISCOVER of an attempt to `joined`",
            buckets=BOOT_BUCKETS, registry=self.registry)
        self.nodes_by_stage = Gauge(
            "bootd_nodes", "Nodes by current stage (stalled ones under `stalled`)", ["stage"],
            registry=self.registry)
        self.nodes_forgotten = Counter(
            "bootd_nodes_forgotten", "Unknown machines without an address forgotten to keep "
            "the event history bounded (a DISCOVER flood)", registry=self.registry)
        self.event_store_failures = Counter(
            "bootd_event_store_failures", "Event flushes the store refused (kept in memory "
            "and retried)", registry=self.registry)
        self.dhcp_leases = Gauge(
            "bootd_dhcp_dynamic_leases", "Addresses of the dynamic range with a lease record",
            registry=self.registry)
        # cluster mode (zero and unchanged on a single instance)
        self.cluster_registered = Gauge(
            "bootd_cluster_registered", "1 while this member holds its etcd membership lease "
            "(it allocates addresses only then)", registry=self.registry)
        self.cluster_members = Gauge(
            "bootd_cluster_members", "Live members this member sees", registry=self.registry)
        self.cluster_sessions = Counter(
            "bootd_cluster_sessions", "etcd sessions, by how they ended (started, lost)",
            ["event"], registry=self.registry)
        self.cluster_claims = Counter(
            "bootd_cluster_claims", "Lease writes to etcd: won, lost (another member wrote "
            "first), failed (etcd unreachable), skipped (not registered)", ["result"],
            registry=self.registry)
        self.cluster_claim_seconds = Histogram(
            "bootd_cluster_claim_seconds", "One batch's lease writes to etcd",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 2.5),
            registry=self.registry)
        self.cluster_timeline_writes = Counter(
            "bootd_cluster_timeline_writes", "Node timelines written to etcd (the shared "
            "fleet view)", registry=self.registry)
