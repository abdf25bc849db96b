"""Lease table and its SQLite persistence: no address to two clients, returning clients
get their address back, restarts lose nothing."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from bootd.state.leases import Lease, LeaseDeleted, LeaseState, LeaseTable
from bootd.state.store import Store

A, B, C = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:00:0c"


def ip(n: int) -> IPv4Address:
    return IPv4Address(f"10.0.0.{n}")


def table(first: int = 100, last: int = 103, reserved: tuple[int, ...] = ()) -> LeaseTable:
    return LeaseTable(ip(first), ip(last), [ip(r) for r in reserved], offer_hold=60,
                      quarantine=600)


def test_offers_fresh_addresses_in_order_skipping_reserved() -> None:
    t = table(reserved=(101,))
    assert t.offer(A, 0) == ip(100)
    assert t.offer(B, 0) == ip(102)
    assert t.offer(C, 0) == ip(103)
    assert t.offer("02:00:00:00:00:0d", 0) is None  # exhausted


def test_same_client_gets_same_offer() -> None:
    t = table()
    assert t.offer(A, 0) == ip(100)
    assert t.offer(A, 1) == ip(100)
    assert t.offer(B, 1) == ip(101)


def test_requested_address_honoured_when_unused() -> None:
    t = table()
    assert t.offer(A, 0, requested=ip(102)) == ip(102)
    assert t.offer(B, 0, requested=ip(102)) == ip(100)  # held by A
    assert t.offer(C, 0, requested=ip(50)) == ip(101)  # outside the range


def test_offer_expires_and_address_is_reused_last() -> None:
    t = table(last=101)
    assert t.offer(A, 0) == ip(100)
    assert t.offer(B, 0) == ip(101)
    assert t.offer(C, 10) is None
    assert t.offer(C, 61) == ip(100)  # A's offer lapsed


def test_bind_is_durable_offer_is_not() -> None:
    t = table()
    t.offer(A, 0)
    assert t.drain_changes() == []
    lease = t.bind(A, ip(100), 0, 3600, "n-a")
    assert lease == Lease(ip(100), A, LeaseState.BOUND, 3600, "n-a")
    assert t.drain_changes() == [lease]
    assert t.drain_changes() == []


def test_bound_client_rediscovering_keeps_its_bound_lease() -> None:
    t = table()
    t.offer(A, 0)
    t.bind(A, ip(100), 0, 3600)
    assert t.offer(A, 10) == ip(100)
    held = t.holder(ip(100))
    assert held is not None and held.state is LeaseState.BOUND


def test_is_free_for() -> None:
    t = table(reserved=(102,))
    t.offer(A, 0)
    t.bind(A, ip(100), 0, 100)
    assert t.is_free_for(ip(100), A, 50)
    assert not t.is_free_for(ip(100), B, 50)
    assert t.is_free_for(ip(100), B, 100)  # expired
    assert not t.is_free_for(ip(102), A, 0)  # reserved
    assert not t.is_free_for(ip(99), A, 0)  # outside
    assert t.is_free_for(ip(101), B, 0)


def test_returning_client_gets_previous_address_after_expiry() -> None:
    t = table()
    t.offer(A, 0)
    t.bind(A, ip(100), 0, 10)
    t.offer(B, 0)
    t.bind(B, ip(101), 0, 10)
    # long after both expired, fresh addresses go to newcomers first
    assert t.offer(C, 1000) == ip(102)
    assert t.offer(A, 1000) == ip(100)
    assert t.offer(B, 1000) == ip(101)


def test_expired_lease_of_another_client_reused_only_when_fresh_run_out() -> None:
    t = table(last=101)
    t.offer(A, 0)
    t.bind(A, ip(100), 0, 10)
    t.offer(B, 0)
    t.bind(B, ip(101), 0, 20)
    assert t.offer(C, 15) == ip(100)  # A's lease expired, B's has not
    assert t.lookup(A) is None  # A's history moved on with the address
    t.bind(C, ip(100), 15, 100)
    assert t.offer(A, 16) is None


def test_rebinding_elsewhere_deletes_old_row() -> None:
    t = table()
    t.offer(A, 0)
    t.bind(A, ip(100), 0, 100)
    t.drain_changes()
    t.bind(A, ip(102), 1, 100)
    changes = t.drain_changes()
    assert changes[0] == LeaseDeleted(ip(100))
    assert isinstance(changes[1], Lease) and changes[1].ip == ip(102)
    assert t.holder(ip(100)) is None


def test_release_keeps_address_as_first_choice() -> None:
    t = table()
    t.offer(A, 0)
    t.bind(A, ip(100), 0, 3600)
    assert t.release(A, ip(100), 5)
    assert t.is_free_for(ip(100), B, 5)
    assert t.offer(A, 6) == ip(100)
    assert not t.release(B, ip(100), 7)  # not B's
    assert not t.release(A, ip(103), 7)


def test_decline_quarantines() -> None:
    t = table(last=101)
    t.offer(A, 0)
    t.bind(A, ip(100), 0, 3600)
    assert t.decline(A, ip(100), 10)
    assert t.lookup(A) is None
    assert not t.is_free_for(ip(100), A, 11)
    assert t.offer(A, 11) == ip(101)
    assert not t.is_free_for(ip(100), B, 609)
    assert t.is_free_for(ip(100), B, 611)
    assert not t.decline(B, ip(101), 12)
    assert not t.release(A, ip(100), 12)


def test_forget_offer() -> None:
    t = table()
    t.offer(A, 0)
    t.forget_offer(A)
    assert t.holder(ip(100)) is None and t.lookup(A) is None
    t.offer(A, 0)
    t.bind(A, ip(100), 0, 100)
    t.forget_offer(A)  # bound leases are not forgotten
    assert t.lookup(A) is not None


def test_restore_skips_addresses_outside_range_or_reserved() -> None:
    t = table(reserved=(101,))
    kept = t.restore([
        Lease(ip(100), A, LeaseState.BOUND, 100),
        Lease(ip(101), B, LeaseState.BOUND, 100),
        Lease(ip(150), C, LeaseState.BOUND, 100),
    ])
    assert kept == 1
    assert t.offer(B, 0) == ip(102)
    assert t.drain_changes() == []


def test_store_round_trip(tmp_path: Path) -> None:
    store = Store.in_state_dir(tmp_path / "state")
    t = table()
    t.offer(A, 0)
    t.bind(A, ip(100), 0, 3600, "a")
    t.offer(B, 0)
    t.bind(B, ip(101), 0, 3600, None)
    t.bind(B, ip(102), 1, 3600, None)
    t.decline(A, ip(100), 2)
    store.apply_lease_changes(t.drain_changes())
    store.close()

    again = Store.in_state_dir(tmp_path / "state")
    rows = sorted(again.load_leases(), key=lambda lease: int(lease.ip))
    assert rows == [
        Lease(ip(100), A, LeaseState.DECLINED, 602, None),
        Lease(ip(102), B, LeaseState.BOUND, 3601, None),
    ]
    t2 = table()
    t2.restore(rows)
    assert t2.offer(B, 5) == ip(102)
    assert t2.offer(C, 5) == ip(101)


def test_store_skips_unreadable_rows(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite3")
    store._db.execute("INSERT INTO leases VALUES ('not-an-ip', 'x', 'bound', 1, NULL)")
    store._db.execute("INSERT INTO leases VALUES ('10.0.0.1', 'x', 'weird', 1, NULL)")
    assert store.load_leases() == []


def test_store_refuses_newer_schema(tmp_path: Path) -> None:
    import pytest

    from bootd.state.store import StoreError

    store = Store(tmp_path / "s.sqlite3")
    store._db.execute("PRAGMA user_version=99")
    store.close()
    with pytest.raises(StoreError, match="newer bootd"):
        Store(tmp_path / "s.sqlite3")
    with pytest.raises(StoreError, match="cannot open"):
        (tmp_path / "file").write_text("x")
        Store(tmp_path / "file" / "db.sqlite3")


def test_token_bucket() -> None:
    from bootd.ops.ratelimit import TokenBucket

    bucket = TokenBucket(rate=2.0, burst=3.0, size=2)
    assert [bucket.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.allow("a", 0.5)  # one token back after 0.5 s at 2/s
    assert not bucket.allow("a", 0.5)
    assert bucket.allow("b", 0.0) and bucket.allow("c", 0.0)
    assert bucket.allow("a", 0.5)  # "a" was forgotten (size 2): a fresh bucket


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["offer", "bind", "release", "decline", "forget"]),
                          st.integers(0, 7), st.integers(0, 400)), max_size=80))
def test_reuse_picks_the_address_that_expired_longest_ago(
        ops: list[tuple[str, int, int]]) -> None:
    """The expiry heap answers what a scan of every lease would (the scan it replaced):
    among free addresses, the earliest expiry, then the lowest address."""
    t = table(first=100, last=103)
    now = 0.0
    for op, client, dt in ops:
        now += dt
        mac = f"02:00:00:00:01:{client:02x}"
        if op == "offer":
            t.offer(mac, now)
        elif op == "bind" and (lease := t.lookup(mac)) and t.is_free_for(lease.ip, mac, now):
            t.bind(mac, lease.ip, now, lease_time=300)
        elif op == "release" and (lease := t.lookup(mac)):
            t.release(mac, lease.ip, now)
        elif op == "decline" and (lease := t.lookup(mac)):
            t.decline(mac, lease.ip, now)
        elif op == "forget":
            t.forget_offer(mac)
        stranger = "02:00:00:00:02:00"
        free = [held for held in t.leases() if t.is_free_for(held.ip, stranger, now)]
        expected = min(free, key=lambda h: (h.expires, int(h.ip))).ip if free else None
        assert t._oldest_expired(now, stranger) == expected
