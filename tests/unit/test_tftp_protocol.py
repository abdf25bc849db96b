"""TFTP transfer state machine: every transition, with time passed in."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootd.fleet.filetree import BytesSource
from bootd.tftp.protocol import (
    ErrorCode,
    Limits,
    Negotiated,
    Opcode,
    ReadTransfer,
    TftpError,
    TransferDone,
    TransferFailed,
    encode_ack,
    encode_data,
    encode_error,
    encode_oack,
    encode_request,
    negotiate,
    netascii,
    parse_error,
    parse_request,
)

LIMITS = Limits(max_blksize=1468, max_windowsize=16, initial_timeout=1.0, max_timeout=8.0,
                max_retries=3, unconfirmed_retries=2)


def data_blocks(datagrams: list[bytes]) -> list[int]:
    out = []
    for d in datagrams:
        op, block = struct.unpack_from("!HH", d)
        assert op == Opcode.DATA
        out.append(block)
    return out


def payload(d: bytes) -> bytes:
    return d[4:]


# -- request parsing


def test_parse_rrq_with_options() -> None:
    req = parse_request(encode_request(Opcode.RRQ, "a/b.efi", "OCTET",
                                       {"BLKSIZE": "1468", "tsize": "0", "windowsize": "8"}))
    assert req.opcode is Opcode.RRQ and req.filename == "a/b.efi" and req.mode == "octet"
    assert req.options == {"blksize": "1468", "tsize": "0", "windowsize": "8"}


def test_parse_wrq() -> None:
    assert parse_request(encode_request(Opcode.WRQ, "x", "netascii")).opcode is Opcode.WRQ


@pytest.mark.parametrize(("data", "code"), [
    (b"", ErrorCode.ILLEGAL_OPERATION),
    (b"\x00\x01", ErrorCode.ILLEGAL_OPERATION),
    (b"\x00\x03\x00\x01abc", ErrorCode.ILLEGAL_OPERATION),
    (b"\x00\x01file\x00octet", ErrorCode.ILLEGAL_OPERATION),  # no final NUL
    (b"\x00\x01file\x00", ErrorCode.ILLEGAL_OPERATION),
    (b"\x00\x01file\x00mail\x00", ErrorCode.ILLEGAL_OPERATION),
    (b"\x00\x01file\x00\xff\xfe\x00", ErrorCode.ILLEGAL_OPERATION),
    (b"\x00\x01\xff\xfe\x00octet\x00", ErrorCode.ACCESS_VIOLATION),
    (b"\x00\x01" + b"a" * 3000 + b"\x00octet\x00", ErrorCode.ILLEGAL_OPERATION),
])
def test_bad_requests(data: bytes, code: ErrorCode) -> None:
    with pytest.raises(TftpError) as info:
        parse_request(data)
    assert info.value.code == code
    assert info.value.packet().startswith(struct.pack("!HH", Opcode.ERROR, code))


def test_odd_option_field_and_bad_encoding_ignored() -> None:
    req = parse_request(b"\x00\x01f\x00octet\x00blksize\x00900\x00orphan\x00")
    assert req.options == {"blksize": "900"}
    req = parse_request(b"\x00\x01f\x00octet\x00\xff\x00x\x00tsize\x000\x00")
    assert req.options == {"tsize": "0"}


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_parse_request_fuzz(data: bytes) -> None:
    """Anything at all: a Request or a TftpError, never another exception."""
    with contextlib.suppress(TftpError):
        parse_request(data)


def test_error_codec() -> None:
    assert parse_error(encode_error(ErrorCode.FILE_NOT_FOUND, "nope")) == (1, "nope")


# -- negotiation


@pytest.mark.parametrize(("options", "expected_blk", "expected_win", "oack"), [
    ({}, 512, 1, {}),
    ({"blksize": "1468"}, 1468, 1, {"blksize": "1468"}),
    ({"blksize": "65464"}, 1468, 1, {"blksize": "1468"}),  # capped to the MTU
    ({"blksize": "7"}, 512, 1, {}),  # below RFC 2348 minimum: ignored
    ({"blksize": "x"}, 512, 1, {}),
    ({"windowsize": "8"}, 512, 8, {"windowsize": "8"}),
    ({"windowsize": "1000"}, 512, 16, {"windowsize": "16"}),
    ({"windowsize": "0"}, 512, 1, {}),
    ({"tsize": "0"}, 512, 1, {"tsize": "12345"}),
    ({"timeout": "3"}, 512, 1, {"timeout": "3"}),
    ({"timeout": "0"}, 512, 1, {}),
    ({"timeout": "256"}, 512, 1, {}),
    ({"multicast": ""}, 512, 1, {}),
])
def test_negotiate(options: dict[str, str], expected_blk: int, expected_win: int,
                   oack: dict[str, str]) -> None:
    n = negotiate(options, 12345, LIMITS)
    assert (n.blksize, n.windowsize, n.oack) == (expected_blk, expected_win, oack)


def test_negotiate_timeout_value() -> None:
    assert negotiate({"timeout": "3"}, 0, LIMITS).timeout == 3.0


# -- transfers


def transfer(data: bytes, now: float = 0.0, **neg: object) -> ReadTransfer:
    return ReadTransfer(BytesSource(data), Negotiated(**neg), LIMITS, now)  # type: ignore[arg-type]


def run_to_end(t: ReadTransfer) -> bytes:
    """Play a perfect client; return the bytes it received."""
    got = bytearray()
    now = 0.0
    for _ in range(10000):
        out = t.datagrams_to_send()
        if not out:
            break
        for d in out:
            if d[1] == Opcode.OACK:
                t.receive_datagram(encode_ack(0), now)
                continue
            got += payload(d)
        last = struct.unpack_from("!H", out[-1], 2)[0]
        if out[-1][1] == Opcode.DATA:
            t.receive_datagram(encode_ack(last), now)
    return bytes(got)


def test_lock_step_small_file() -> None:
    t = transfer(b"hello")
    out = t.datagrams_to_send()
    assert out == [encode_data(1, b"hello")]
    assert t.get_timer() == 1.0
    t.receive_datagram(encode_ack(1), 0.1)
    assert t.next_event() == TransferDone(5, 1, 0)
    assert t.closed and t.get_timer() is None and t.datagrams_to_send() == []


def test_exact_multiple_of_blksize_ends_with_empty_block() -> None:
    t = transfer(b"x" * 1024)
    assert run_to_end(t) == b"x" * 1024
    event = t.next_event()
    assert isinstance(event, TransferDone) and event.blocks == 3


def test_empty_file() -> None:
    t = transfer(b"")
    assert t.datagrams_to_send() == [encode_data(1, b"")]
    t.receive_datagram(encode_ack(1), 0)
    assert isinstance(t.next_event(), TransferDone)


def test_oack_then_ack0_starts_data() -> None:
    t = transfer(b"a" * 3000, blksize=1468, oack={"blksize": "1468"})
    assert t.datagrams_to_send() == [encode_oack({"blksize": "1468"})]
    t.receive_datagram(encode_ack(5), 0.1)  # not ACK 0: ignored
    assert t.datagrams_to_send() == []
    t.receive_datagram(encode_ack(0), 0.2)
    out = t.datagrams_to_send()
    assert data_blocks(out) == [1] and len(payload(out[0])) == 1468


def test_oack_retransmitted_on_timeout() -> None:
    t = transfer(b"a", oack={"tsize": "1"})
    t.datagrams_to_send()
    t.handle_timer(0.5)  # early: nothing
    assert t.datagrams_to_send() == []
    t.handle_timer(1.0)
    assert t.datagrams_to_send() == [encode_oack({"tsize": "1"})]
    assert t.retransmits == 1


def test_client_refuses_oack_with_error_8() -> None:
    t = transfer(b"a", oack={"blksize": "1468"})
    t.receive_datagram(encode_error(ErrorCode.OPTION_REFUSED, "no"), 0.1)
    event = t.next_event()
    assert isinstance(event, TransferFailed) and event.client_refused_options


def test_client_error_mid_transfer_fails_transfer() -> None:
    t = transfer(b"a" * 2000)
    t.receive_datagram(encode_error(ErrorCode.DISK_FULL, "full"), 0.1)
    event = t.next_event()
    assert isinstance(event, TransferFailed) and not event.client_refused_options
    assert "full" in event.reason
    t.receive_datagram(encode_ack(1), 0.2)  # ignored after close
    assert t.next_event() is None


def test_unexpected_opcode_answered_with_error_4() -> None:
    t = transfer(b"a" * 2000)
    t.datagrams_to_send()
    t.receive_datagram(encode_data(1, b"x"), 0.1)
    out = t.datagrams_to_send()
    assert parse_error(out[0])[0] == ErrorCode.ILLEGAL_OPERATION
    assert isinstance(t.next_event(), TransferFailed)


def test_runt_datagrams_ignored() -> None:
    t = transfer(b"a" * 2000)
    t.datagrams_to_send()
    t.receive_datagram(b"\x00", 0.1)
    assert t.datagrams_to_send() == [] and not t.closed


def test_duplicate_ack_does_not_resend() -> None:
    """The sorcerer's apprentice: a delayed duplicate ACK must not double the traffic."""
    t = transfer(b"a" * 2000)
    t.datagrams_to_send()
    t.receive_datagram(encode_ack(1), 0.1)
    assert data_blocks(t.datagrams_to_send()) == [2]
    t.receive_datagram(encode_ack(1), 0.2)
    assert t.datagrams_to_send() == []


def test_timeout_retransmits_with_backoff_then_gives_up() -> None:
    t = transfer(b"a" * 2000)
    assert data_blocks(t.datagrams_to_send()) == [1]
    t.receive_datagram(encode_ack(1), 0.0)  # the client is there
    assert data_blocks(t.datagrams_to_send()) == [2]
    deadlines = []
    for _ in range(3):
        deadline = t.get_timer()
        assert deadline is not None
        deadlines.append(deadline)
        t.handle_timer(deadline)
        assert data_blocks(t.datagrams_to_send()) == [2]
    assert deadlines == [1.0, 3.0, 7.0]  # 1s, then 2s, then 4s
    last = t.get_timer()
    assert last == 15.0
    t.handle_timer(last)
    event = t.next_event()
    assert isinstance(event, TransferFailed) and "3 retries" in event.reason
    assert not event.final_ack_missing
    assert t.closed and t.retransmits == 3


@pytest.mark.parametrize("oack", [{}, {"blksize": "1468"}])
def test_an_unconfirmed_client_gets_its_first_packet_three_times_at_most(
        oack: dict[str, str]) -> None:
    """A forged RRQ that is never ACKed: the first packet (DATA 1, or the OACK) goes out
    1 + unconfirmed_retries times, not 1 + max_retries (issue 16, finding 4)."""
    neg = {"blksize": 1468, "oack": oack} if oack else {}
    t = transfer(b"a" * 100_000, **neg)
    sent = list(t.datagrams_to_send())
    while not t.closed:
        deadline = t.get_timer()
        assert deadline is not None
        t.handle_timer(deadline)
        sent += t.datagrams_to_send()
    assert len(sent) == 1 + Limits().unconfirmed_retries == 3
    assert len(set(sent)) == 1  # the same packet each time
    event = t.next_event()
    assert isinstance(event, TransferFailed) and "never answered" in event.reason
    assert t.get_timer() is None and t.closed


def test_lost_final_ack_is_reported_as_such() -> None:
    t = transfer(b"a" * 600)
    t.datagrams_to_send()
    t.receive_datagram(encode_ack(1), 0.1)
    t.datagrams_to_send()
    now = 0.1
    while not t.closed:
        deadline = t.get_timer()
        assert deadline is not None
        now = deadline
        t.handle_timer(now)
    event = t.next_event()
    assert isinstance(event, TransferFailed) and event.final_ack_missing


def test_ack_resets_backoff() -> None:
    t = transfer(b"a" * 2000)
    t.datagrams_to_send()
    t.handle_timer(1.0)
    t.datagrams_to_send()
    t.receive_datagram(encode_ack(1), 2.0)
    assert t.get_timer() == 3.0


def test_client_timeout_option_caps_backoff() -> None:
    limits = Limits(max_retries=3, unconfirmed_retries=3)
    t = ReadTransfer(BytesSource(b"a" * 2000), Negotiated(timeout=3.0, oack={"timeout": "3"}),
                     limits, 0.0)
    t.datagrams_to_send()
    t.handle_timer(1.0)  # we still start at 1s
    assert t.get_timer() == 3.0
    t.handle_timer(3.0)
    assert t.get_timer() == 6.0  # 2s then capped at the client's 3s
    t.handle_timer(6.0)
    assert t.get_timer() == 9.0


def test_windowsize_sends_window_and_resumes_after_partial_ack() -> None:
    data = bytes(range(256)) * 20  # 5120 bytes = 10 blocks of 512 + 1 empty
    t = transfer(data, windowsize=4, oack={"windowsize": "4"})
    t.datagrams_to_send()
    t.receive_datagram(encode_ack(0), 0)
    assert data_blocks(t.datagrams_to_send()) == [1, 2, 3, 4]
    t.receive_datagram(encode_ack(2), 0.1)  # blocks 3 and 4 were lost
    assert data_blocks(t.datagrams_to_send()) == [3, 4, 5, 6]
    t.receive_datagram(encode_ack(6), 0.2)
    assert data_blocks(t.datagrams_to_send()) == [7, 8, 9, 10]
    t.handle_timer(1.2)  # whole window lost: resend from the last ACK
    assert data_blocks(t.datagrams_to_send()) == [7, 8, 9, 10]
    t.receive_datagram(encode_ack(10), 1.3)
    assert data_blocks(t.datagrams_to_send()) == [11]
    t.receive_datagram(encode_ack(11), 1.4)
    assert isinstance(t.next_event(), TransferDone)


def test_windowed_transfer_delivers_file() -> None:
    data = bytes(range(256)) * 100
    t = transfer(data, blksize=1468, windowsize=8, oack={"blksize": "1468"})
    assert run_to_end(t) == data


def test_block_number_rollover() -> None:
    """More than 65535 blocks: the 16-bit block number wraps to 0 and the file is whole."""
    data = bytes(range(256)) * 8 * 8193  # 65544 blocks of 8 bytes
    t = transfer(data, blksize=8)
    got = bytearray()
    now = 0.0
    seen_zero = False
    while not t.closed:
        out = t.datagrams_to_send()
        assert len(out) == 1
        block = struct.unpack_from("!H", out[0], 2)[0]
        seen_zero |= block == 0
        got += payload(out[0])
        t.receive_datagram(encode_ack(block), now)
    assert seen_zero
    assert bytes(got) == data
    event = t.next_event()
    assert isinstance(event, TransferDone) and event.blocks == len(data) // 8 + 1


def test_rollover_with_window_and_stale_ack() -> None:
    data = b"z" * (8 * 65540)
    t = transfer(data, blksize=8, windowsize=16, oack={"windowsize": "16"})
    t.receive_datagram(encode_ack(0), 0)
    t.datagrams_to_send()
    acked = 0
    while acked < 65530:
        acked += 16
        t.receive_datagram(encode_ack(acked & 0xFFFF), 0)
        t.datagrams_to_send()
    t.receive_datagram(encode_ack(5), 0)  # stale ACK from long ago (block 5, not 65541)
    assert t.datagrams_to_send() == []


@settings(max_examples=200, deadline=None)
@given(size=st.integers(0, 5000), blksize=st.sampled_from([8, 512, 1468]),
       window=st.integers(1, 8),
       drops=st.lists(st.booleans(), max_size=200))
def test_lossy_client_always_gets_the_file(size: int, blksize: int, window: int,
                                           drops: list[bool]) -> None:
    """A client that loses arbitrary DATA packets still ends with the exact file."""
    data = bytes(i % 251 for i in range(size))
    # > len(drops); this client never resends its RRQ, so it is patient before its first
    # ACK too
    patient = Limits(max_blksize=1468, max_windowsize=16, max_retries=250,
                     unconfirmed_retries=250)
    t = ReadTransfer(BytesSource(data), Negotiated(
        blksize=blksize, windowsize=window,
        oack={"windowsize": str(window)} if window > 1 else {}), patient, 0.0)
    if window > 1:
        t.datagrams_to_send()
        t.receive_datagram(encode_ack(0), 0)
    got: dict[int, bytes] = {}
    expected_next = 1
    now = 0.0
    drop_iter = iter(drops)
    for _ in range(5000):
        if t.closed:
            break
        out = t.datagrams_to_send()
        if not out:
            now = t.get_timer() or now
            t.handle_timer(now)
            continue
        for d in out:
            if next(drop_iter, False):
                continue
            block = struct.unpack_from("!H", d, 2)[0]
            if block == expected_next & 0xFFFF:
                got[expected_next] = payload(d)
                expected_next += 1
        t.receive_datagram(encode_ack((expected_next - 1) & 0xFFFF), now)
    event = t.next_event()
    assert isinstance(event, TransferDone), event
    assert b"".join(got[i] for i in sorted(got)) == data


def test_netascii() -> None:
    assert netascii(b"a\nb\rc\r\n") == b"a\r\nb\r\0c\r\0\r\n"
