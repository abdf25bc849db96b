"""What bootd remembers: leases, boot events and their derivation, the SQLite store."""
