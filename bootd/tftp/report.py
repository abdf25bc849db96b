"""What a finished TFTP transfer becomes: a log line, metrics and a boot event, each
named by the node holding the client's address (in the snapshot the transfer ran under)."""

from __future__ import annotations

import time
from types import MappingProxyType

import structlog

from bootd.ops.metrics import Metrics
from bootd.state import events
from bootd.state.events import BootEvent
from bootd.state.recorder import Recorder
from bootd.tftp.server import TftpSettings, TransferOutcome, TransferRecord

log = structlog.get_logger("bootd.tftp")

# the client has the file: a missing last ACK usually means it moved on to booting it
DELIVERED = frozenset({TransferOutcome.OK, TransferOutcome.UNCONFIRMED})


class TransferReporter:
    def __init__(self, metrics: Metrics, recorder: Recorder | None = None) -> None:
        self.metrics = metrics
        self.recorder = recorder

    def __call__(self, r: TransferRecord, settings: TftpSettings) -> None:
        now = time.time()
        found = settings.directory.holder_of(r.client, now)
        if self.recorder is not None and found is not None:
            self.recorder.record(BootEvent(
                now, events.TFTP, found.node.name, found.mac, str(r.client), found.node.pool,
                "ok" if r.outcome in DELIVERED else "error", MappingProxyType({
                    "file": r.filename, "bytes": r.size, "blksize": r.blksize,
                    "windowsize": r.windowsize, "duration": round(r.duration, 4),
                    "result": str(r.outcome), "reason": r.detail or None})))
        fields: dict[str, object] = {
            "client": f"{r.client}:{r.port}", "file": r.filename, "size": r.size,
            "blksize": r.blksize, "windowsize": r.windowsize,
            "duration_s": round(r.duration, 4), "outcome": str(r.outcome),
        }
        if found is not None:
            fields.update(node=found.node.name, mac=found.mac, pool=found.node.pool)
        if r.retransmits:
            fields["retransmits"] = r.retransmits
        if r.detail:
            fields["detail"] = r.detail
        self.metrics.tftp_transfers.labels(str(r.outcome)).inc()
        self.metrics.tftp_bytes.inc(r.bytes_sent)
        if r.outcome is TransferOutcome.OK:
            log.info("tftp transfer", **fields)
        else:
            log.warning("tftp transfer", **fields)
