"""A splice handed over to the tunnel core (``handover``): the same bytes, counts, half-closes,
flow control and failure causes as the splice's own relays (``test_fastpath``), with neither
asyncio transport left, and the destination's session still kept for the next connection.

Every test runs on asyncio's default loop and on uvloop (the gateway's). The rig is
``support.splice_rig``'s: a TCP connection for the device, a TLS server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import hashlib
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from fleetgate.clock import FakeClock
from fleetgate.dataplane import handover
from fleetgate.dataplane.endpoint import PlainEndpoint
from fleetgate.dataplane.splice import Splicing, start_splice
from fleetgate.dataplane.tls_endpoint import TlsEndpoint
from support.splice_rig import (
    Rig,
    assert_destination_lost,
    broken_record,
    exchange,
    reset,
    splice_rig,
    tcp_pair,
)


def test_the_handover_is_available() -> None:
    # scripts/test builds the tunnel core; without it every splice stays on its transports.
    assert handover.AVAILABLE
    assert handover.ENABLED


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _run(
    loop_kind: str,
    tmp_path: Path,
    test: Callable[[Rig], Awaitable[None]],
    *,
    device_tls: bool = False,
) -> None:
    """``test`` on a rig (a device over TCP, plain or speaking TLS) on that kind of loop."""

    async def main() -> None:
        async with splice_rig(tmp_path, compiled=True, tcp=True, device_tls=device_tls) as rig:
            await test(rig)

    if loop_kind == "uvloop":
        uvloop.run(main())
    else:
        asyncio.run(main())


def _handed_over(rig: Rig) -> bool:
    """The splice went to the core, and both transports let go of their sockets."""
    return (
        rig.splicing.relay == "core"
        and rig.device_end.transport is None
        and rig.destination.transport is None
    )


def _core_count(clock: FakeClock) -> int:
    return int(handover._loop_core(clock).core.count)


def test_messages_and_half_closes_cross_both_ways(loop_kind: str, tmp_path: Path) -> None:
    async def test(rig: Rig) -> None:
        clock = FakeClock()
        rig.start(clock)
        assert _handed_over(rig)
        assert _core_count(clock) == 1
        moved = await exchange(rig, 12)
        rig.device.shutdown(socket.SHUT_WR)  # close_notify to the server
        assert await asyncio.wait_for(rig.server.read_some(), 10) == b""
        rig.server.write(b"last words")  # the other direction goes on
        rig.server.write_eof()
        assert await asyncio.wait_for(rig.receive_to_end(), 10) == b"last words"
        result = await asyncio.wait_for(rig.done, 10)
        assert (result.reason, result.relay) == ("closed", "core")
        assert (result.up_bytes, result.down_bytes) == (moved, moved + len(b"last words"))
        # The endpoints' counters, as if they had relayed it themselves.
        assert (rig.device_end.received, rig.destination.sent) == (moved, moved)
        assert (rig.destination.received, rig.device_end.sent) == (moved + 10, moved + 10)
        assert _core_count(clock) == 0

    _run(loop_kind, tmp_path, test)


def test_a_large_transfer_arrives_whole_to_a_slow_reader(loop_kind: str, tmp_path: Path) -> None:
    async def test(rig: Rig) -> None:
        rig.start(FakeClock())

        async def echo() -> None:
            while data := await rig.server.read_some():
                rig.server.write(data)
                await rig.server.drain()
            rig.server.write_eof()

        loop = asyncio.get_running_loop()
        serving = loop.create_task(echo())
        payload = os.urandom(16 * 1024 * 1024)
        sending = loop.create_task(rig.send(payload))
        digest, received = hashlib.sha256(), 0
        while received < len(payload):  # small reads: the core must hold back both ways
            chunk = await asyncio.wait_for(loop.sock_recv(rig.device, 4096), 10)
            assert chunk, f"the device's connection ended after {received} bytes"
            digest.update(chunk)
            received += len(chunk)
        await sending
        assert digest.digest() == hashlib.sha256(payload).digest()
        rig.device.shutdown(socket.SHUT_WR)
        assert await asyncio.wait_for(rig.receive_to_end(), 10) == b""
        await asyncio.wait_for(serving, 10)
        result = await asyncio.wait_for(rig.done, 10)
        assert (result.reason, result.up_bytes, result.down_bytes) == (
            "closed",
            len(payload),
            len(payload),
        )

    _run(loop_kind, tmp_path, test)


@pytest.mark.parametrize(
    ("breaking", "cause", "tail"),
    [(broken_record, "bad_record_mac", b"tail"), (reset, None, b"")],
    ids=["broken-record", "reset"],
)
def test_a_broken_destination_ends_it_with_the_cause(
    loop_kind: str,
    tmp_path: Path,
    breaking: Callable[[Rig], Awaitable[None]],
    cause: str | None,
    tail: bytes,
) -> None:
    async def test(rig: Rig) -> None:
        rig.start(FakeClock())
        moved = await exchange(rig, 3)
        await breaking(rig)
        # What authenticated still reaches the device, then a reset: the stream was cut.
        assert await asyncio.wait_for(rig.receive_to_reset(), 10) == tail
        result = await asyncio.wait_for(rig.done, 10)
        assert_destination_lost(rig, result, moved, tail, cause)

    _run(loop_kind, tmp_path, test)


def test_a_reset_before_the_destination_spoke_is_named(loop_kind: str, tmp_path: Path) -> None:
    """A TLS 1.3 server refusing our certificate resets the connection before sending a byte:
    the refusal the tcp listener reports (``reset_after_handshake``), as on the transports."""

    async def test(rig: Rig) -> None:
        rig.start(FakeClock())
        await reset(rig)  # the core reads the reset (no write has to meet it)
        result = await asyncio.wait_for(rig.done, 10)
        assert (result.reason, result.down_bytes) == ("destination_lost", 0)
        assert isinstance(rig.destination, TlsEndpoint)
        failure = rig.destination.failure
        assert failure is not None
        assert failure.cause == "reset_after_handshake", failure

    _run(loop_kind, tmp_path, test)


def test_an_idle_connection_is_ended_on_the_clock(loop_kind: str, tmp_path: Path) -> None:
    async def test(rig: Rig) -> None:
        clock = FakeClock()
        rig.start(clock)
        await exchange(rig, 1)
        clock.advance(50.0)
        await exchange(rig, 1)  # at 50 s: the deadline moves to 110 s
        clock.advance(20.0)  # 70 s: past the first deadline (60 s), not the second
        handover.check_timeouts(clock)
        assert not rig.done.done()
        await exchange(rig, 1)  # still relaying
        clock.advance(61.0)
        handover.check_timeouts(clock)
        result = await asyncio.wait_for(rig.done, 10)
        assert result.reason == "idle_timeout"
        # The server gets a close_notify, the device the end.
        assert await asyncio.wait_for(rig.server.read_some(), 10) == b""
        assert await asyncio.wait_for(rig.receive_to_end(), 10) == b""

    _run(loop_kind, tmp_path, test)


def test_ending_the_splice_cuts_the_connection(loop_kind: str, tmp_path: Path) -> None:
    """A cut (a revoked credential, a drain that ran out of time): the device gets a reset,
    never an end it could take for a complete answer; the destination a close_notify."""

    async def test(rig: Rig) -> None:
        clock = FakeClock()
        rig.start(clock)
        await exchange(rig, 2)
        rig.splicing.finish("cut")
        result = await asyncio.wait_for(rig.done, 10)
        assert result.reason == "cut"
        assert await asyncio.wait_for(rig.server.read_some(), 10) == b""
        assert rig.server.failure is not None  # a FIN without close_notify: cut, not complete
        assert await asyncio.wait_for(rig.receive_to_reset(), 10) == b""
        assert _core_count(clock) == 0

    _run(loop_kind, tmp_path, test)


def test_connections_with_different_idle_timeouts_each_end_on_their_own(
    loop_kind: str, tmp_path: Path
) -> None:
    """Listeners set their own idle timeouts: a connection with a short one, quiet behind one
    with a long one, still ends on time (each timeout waits in a queue of its own)."""

    async def test(patient: Rig) -> None:
        clock = FakeClock()
        patient.start(clock, idle_timeout_s=60.0)
        async with splice_rig(tmp_path / "second", compiled=True, tcp=True) as hasty:
            hasty.start(clock, idle_timeout_s=10.0)
            await exchange(hasty, 1)  # the hasty one went quiet after the patient one
            clock.advance(1.0)
            handover.check_timeouts(clock)  # both rest
            assert handover._loop_core(clock).core.resting == 2
            clock.advance(10.0)
            handover.check_timeouts(clock)
            result = await asyncio.wait_for(hasty.done, 10)
            assert result.reason == "idle_timeout"
            assert not patient.done.done()
            await exchange(patient, 1)  # still relayed
            clock.advance(61.0)
            handover.check_timeouts(clock)
            assert (await asyncio.wait_for(patient.done, 10)).reason == "idle_timeout"

    (tmp_path / "second").mkdir()
    _run(loop_kind, tmp_path, test)


def test_a_cut_after_the_end_finds_nothing(loop_kind: str, tmp_path: Path) -> None:
    """A connection's key names it only while it lives, also once its slot is taken again."""

    async def test(rig: Rig) -> None:
        clock = FakeClock()
        rig.start(clock)
        core = handover._loop_core(clock).core
        handed = rig.splicing.handover
        assert handed is not None
        old_key = handed._key
        rig.splicing.finish("cut")
        await asyncio.wait_for(rig.done, 10)
        assert not core.cut(old_key, "again")
        second = await rig.dial()
        async with splice_rig(tmp_path / "next", compiled=True, tcp=True) as other:
            other.start(clock)
            assert other.splicing.handover is not None
            assert other.splicing.handover._key != old_key  # same slot, a new generation
            assert not core.cut(old_key, "again")
            assert _core_count(clock) == 1
        second.abort()

    (tmp_path / "next").mkdir()
    _run(loop_kind, tmp_path, test)


def test_out_of_descriptors_the_transports_keep_the_connection(
    loop_kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No descriptor for the core's copy (EMFILE): the splice relays on its transports."""

    def no_descriptor(fd: int) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    async def test(rig: Rig) -> None:
        monkeypatch.setattr(os, "dup", no_descriptor)
        rig.start(FakeClock())
        assert rig.splicing.relay == "compiled"
        assert rig.device_end.transport is not None
        monkeypatch.undo()
        moved = await exchange(rig, 2)
        rig.splicing.finish("closed")
        result = await asyncio.wait_for(rig.done, 10)
        assert (result.relay, result.up_bytes) == ("compiled", moved)

    _run(loop_kind, tmp_path, test)


def test_the_destinations_session_is_kept_for_the_next_connection(
    loop_kind: str, tmp_path: Path
) -> None:
    """TLS 1.3 tickets come after the handshake, with the first records: read by the core,
    they are still taken for the next connection, which resumes."""

    async def test(rig: Rig) -> None:
        rig.start(FakeClock())
        await exchange(rig, 1)
        second = await rig.dial()
        try:
            assert isinstance(second, TlsEndpoint)
            assert second.session_reused
        finally:
            second.abort()

    _run(loop_kind, tmp_path, test)


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_loop_that_goes_away_with_a_connection_frees_it(tmp_path: Path) -> None:
    """The core of a loop closed with a connection still relayed is collected with the loop:
    the connection's sockets close, no descriptor is left behind."""

    async def main() -> None:
        async with splice_rig(tmp_path, compiled=True, tcp=True) as rig:
            rig.start(FakeClock())
            await exchange(rig, 1)
            assert _handed_over(rig)

    gc.collect()  # what earlier tests left for the collector
    before = _open_descriptors()
    asyncio.run(main())
    gc.collect()
    assert _open_descriptors() == before


# -- a device that speaks TLS (tls, mtls and psk listeners) -----------------------------------


def test_a_tls_devices_connection_is_relayed_by_the_core(loop_kind: str, tmp_path: Path) -> None:
    """Both sides decrypted and encrypted in C; each close_notify passed on to the other side."""

    async def test(rig: Rig) -> None:
        rig.start(FakeClock())
        assert _handed_over(rig)
        moved = await exchange(rig, 12)
        rig.server.write(b"last words")
        rig.server.write_eof()  # close_notify: the device gets one too, after the words
        assert await asyncio.wait_for(rig.receive_to_end(), 10) == b"last words"
        assert rig.tls is not None
        await rig.tls.close_notify()
        assert await asyncio.wait_for(rig.server.read_some(), 10) == b""
        result = await asyncio.wait_for(rig.done, 10)
        assert (result.reason, result.relay) == ("closed", "core")
        assert (result.up_bytes, result.down_bytes) == (moved, moved + len(b"last words"))

    _run(loop_kind, tmp_path, test, device_tls=True)


def test_a_tls_device_moves_a_large_transfer_whole(loop_kind: str, tmp_path: Path) -> None:
    async def test(rig: Rig) -> None:
        rig.start(FakeClock())
        assert _handed_over(rig)

        async def echo() -> None:
            while data := await rig.server.read_some():
                rig.server.write(data)
                await rig.server.drain()

        loop = asyncio.get_running_loop()
        serving = loop.create_task(echo())
        payload = os.urandom(16 * 1024 * 1024)
        sending = loop.create_task(rig.send(payload))
        digest, received = hashlib.sha256(), 0
        while received < len(payload):
            chunk = await asyncio.wait_for(rig.receive(min(65536, len(payload) - received)), 10)
            digest.update(chunk)
            received += len(chunk)
        await sending
        assert digest.digest() == hashlib.sha256(payload).digest()
        rig.splicing.finish("done")
        result = await asyncio.wait_for(rig.done, 10)
        assert (result.up_bytes, result.down_bytes) == (len(payload), len(payload))
        serving.cancel()

    _run(loop_kind, tmp_path, test, device_tls=True)


def test_a_tls_devices_cut_connection_is_reset(loop_kind: str, tmp_path: Path) -> None:
    async def test(rig: Rig) -> None:
        rig.start(FakeClock())
        await exchange(rig, 2)
        rig.splicing.finish("cut")
        assert (await asyncio.wait_for(rig.done, 10)).reason == "cut"
        assert await asyncio.wait_for(rig.server.read_some(), 10) == b""
        assert await asyncio.wait_for(rig.receive_to_reset(), 10) == b""

    _run(loop_kind, tmp_path, test, device_tls=True)


def test_a_tls_device_sending_a_broken_record_is_lost_and_the_destination_told(
    loop_kind: str, tmp_path: Path
) -> None:
    async def test(rig: Rig) -> None:
        rig.start(FakeClock())
        moved = await exchange(rig, 2)
        # An application-data record whose authentication cannot pass, on the device's socket.
        await asyncio.get_running_loop().sock_sendall(
            rig.device, b"\x17\x03\x03\x00\x20" + bytes(32)
        )
        result = await asyncio.wait_for(rig.done, 10)
        assert (result.reason, result.up_bytes, result.down_bytes) == ("device_lost", moved, moved)
        assert await asyncio.wait_for(rig.server.read_some(), 10) == b""
        assert rig.server.failure is not None  # a cut stream, not a close_notify

    _run(loop_kind, tmp_path, test, device_tls=True)


def test_a_tls_devices_fin_without_close_notify_reaches_the_destination_as_a_cut(
    loop_kind: str, tmp_path: Path
) -> None:
    """Only a close_notify says a TLS stream is complete: a device's bare FIN is passed on as a
    bare FIN."""

    async def test(rig: Rig) -> None:
        rig.start(FakeClock())
        moved = await exchange(rig, 2)
        rig.device.shutdown(socket.SHUT_WR)  # under the device's TLS: no close_notify
        assert await asyncio.wait_for(rig.server.read_some(), 10) == b""
        assert rig.server.failure is not None  # it saw the stream cut, not ended
        assert (await asyncio.wait_for(rig.done, 10)).up_bytes == moved

    _run(loop_kind, tmp_path, test, device_tls=True)


def test_a_destinations_fin_without_close_notify_is_no_close_notify_to_a_tls_device(
    loop_kind: str, tmp_path: Path
) -> None:
    async def test(rig: Rig) -> None:
        rig.start(FakeClock())
        await exchange(rig, 2)
        assert rig.server.transport is not None
        rig.server.transport.write_eof()  # a TCP FIN under the destination's TLS
        with pytest.raises(ssl.SSLEOFError):  # a bare FIN, not a close_notify
            await asyncio.wait_for(rig.receive_to_end(), 10)

    _run(loop_kind, tmp_path, test, device_tls=True)


def test_the_timer_outlives_the_last_connection_until_the_memory_went_back(
    loop_kind: str, tmp_path: Path
) -> None:
    """A fleet that leaves at once (an outage, a drain) ends every connection; what they held
    goes back to the system, at most every 10 s: the loop core's timer, which stops with its
    last connection, keeps going until it has."""
    fleet = 70  # more than the 64 fewer connections a trim waits for

    async def test(rig: Rig) -> None:
        clock = FakeClock()
        loop = asyncio.get_running_loop()
        held, ended = [], []

        def done(splicing: Splicing, _: object) -> None:
            splicing.device.close()
            splicing.destination.close()
            ended.append(splicing)

        for _ in range(fleet):
            device, gateway_side = tcp_pair()
            _, device_end = await loop.connect_accepted_socket(PlainEndpoint, gateway_side)
            splicing = start_splice(
                device_end, await rig.dial(), clock, idle_timeout_s=60.0, on_done=done
            )
            held.append((device, splicing))
        loop_core = handover._loop_core(clock)
        assert loop_core.core.count == fleet
        clock.advance(1.0)
        handover.check_timeouts(clock)  # all quiet: the burst of set-ups is over
        assert (loop_core.core.trims, loop_core.core.trim_due) == (1, False)
        for device, splicing in held:
            splicing.finish("cut")
            device.close()
        await asyncio.sleep(0)  # the splices' done callbacks: each cuts its connection
        assert len(ended) == fleet
        assert loop_core.core.count == 0
        assert loop_core.core.trim_due  # but not 10 s after the last trim
        loop_core._expire()
        assert loop_core._tick is not None  # no connection left, and still ticking
        clock.advance(10.0)
        loop_core._expire()
        assert (loop_core.core.trims, loop_core.core.trim_due) == (2, False)
        assert loop_core._tick is None  # done: an idle gateway does not wake

    _run(loop_kind, tmp_path, test)
