"""SPDY/3.1 framing (proxy/spdy.py): byte layouts written out by hand, the dictionary, header blocks compressed by
plain zlib (not by our encoder), hostile frames, and a session pair over a socket pair."""

from __future__ import annotations

import asyncio
import socket
import struct
import zlib

import pytest

from proxy import spdy
from proxy.dialer import TCPStream


def test_the_dictionary_is_the_spdy3_one() -> None:
    # 1423 bytes; its Adler-32 is the dictionary id a zlib stream with this preset dictionary names.
    assert len(spdy.DICTIONARY) == 1423
    assert zlib.adler32(spdy.DICTIONARY) == 0xE3C6A7C2
    assert spdy.DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")
    assert spdy.DICTIONARY.endswith(b"utf-,*,enq=0.")


def _block(pairs: list[tuple[bytes, bytes]]) -> bytes:
    raw = struct.pack(">I", len(pairs)) + b"".join(
        struct.pack(">I", len(n)) + n + struct.pack(">I", len(v)) + v for n, v in pairs)
    c = zlib.compressobj(zdict=spdy.DICTIONARY)
    return c.compress(raw) + c.flush(zlib.Z_SYNC_FLUSH)


def test_a_syn_stream_laid_out_by_hand_parses() -> None:
    block = _block([(b"streamtype", b"error"), (b"port", b"80")])
    payload = struct.pack(">IIBB", 5, 0, 0, 0) + block
    wire = struct.pack(">HHI", 0x8003, 1, len(payload)) + payload  # control bit, version 3, type 1, flags 0
    frames = spdy.FrameCodec().feed(wire)
    assert len(frames) == 1
    f = frames[0]
    assert (f.kind, f.stream_id, f.flags) == (spdy.SYN_STREAM, 5, 0)
    assert f.headers == {"streamtype": ["error"], "port": ["80"]}


def test_data_frames_and_control_frames_encode_as_the_spec_lays_them_out() -> None:
    codec = spdy.FrameCodec()
    assert codec.encode(spdy.Frame(spdy.DATA, 7, spdy.FLAG_FIN, b"hi")) == bytes.fromhex("00000007 01000002 6869")
    rst = bytes.fromhex("80030003 00000008 00000007 00000005")
    assert codec.encode(spdy.Frame(spdy.RST_STREAM, 7, status=5)) == rst
    assert codec.encode(spdy.Frame(spdy.PING, 1)) == bytes.fromhex("80030006 00000004 00000001")
    assert codec.encode(spdy.Frame(spdy.GOAWAY, 0)) == bytes.fromhex("80030007 00000008 00000000 00000000")


def test_header_blocks_share_one_compression_context_per_direction() -> None:
    sender, receiver = spdy.FrameCodec(), spdy.FrameCodec()
    wire = b"".join(sender.encode(spdy.Frame(spdy.SYN_STREAM, i, headers={"streamtype": [t], "x": ["a", "b"]}))
                    for i, t in ((1, "stdin"), (3, "stdout"), (5, "stderr")))
    frames = []
    for i in range(0, len(wire), 3):  # any split of the bytes gives the same frames
        frames += receiver.feed(wire[i:i + 3])
    assert [f.headers["streamtype"] for f in frames] == [["stdin"], ["stdout"], ["stderr"]]
    assert frames[0].headers["x"] == ["a", "b"]  # several values: NUL-separated on the wire


@pytest.mark.parametrize(("wire", "why"), [
    (struct.pack(">HHI", 0x8002, 1, 0), "version 2"),
    (struct.pack(">HHI", 0x8003, 1, 0x200000), "frame of"),
    (struct.pack(">HHI", 0x8003, 1, 12) + struct.pack(">IIBB", 1, 0, 0, 0) + b"xx", "decompress"),
    (struct.pack(">HHI", 0x8003, 3, 4) + b"\0\0\0\1", "too short"),
    (struct.pack(">HHI", 0x8003, 99, 0), "unknown control frame"),
])
def test_hostile_frames_are_protocol_errors(wire: bytes, why: str) -> None:
    with pytest.raises(spdy.SPDYError, match=why):
        spdy.FrameCodec().feed(wire)


def test_a_header_bomb_is_refused() -> None:
    bomb = _block([(b"x", b"a" * (spdy.MAX_HEADER_BLOCK + 10))])
    payload = struct.pack(">IIBB", 1, 0, 0, 0) + bomb
    with pytest.raises(spdy.SPDYError, match="header block over"):
        spdy.FrameCodec().feed(struct.pack(">HHI", 0x8003, 1, len(payload)) + payload)


def test_window_update_and_settings_are_read_and_ignored() -> None:
    wire = struct.pack(">HHI", 0x8003, 9, 8) + struct.pack(">II", 1, 1000) + struct.pack(">HHI", 0x8003, 4, 4) + \
        struct.pack(">I", 0) + struct.pack(">II", 1, 2) + b"ok"
    frames = spdy.FrameCodec().feed(wire)
    assert [(f.kind, f.data) for f in frames] == [(spdy.DATA, b"ok")]


async def _pair() -> tuple[spdy.Session, spdy.Session, asyncio.Queue[spdy.SPDYStream]]:
    a, b = socket.socketpair()
    incoming: asyncio.Queue[spdy.SPDYStream] = asyncio.Queue()
    ra, wa = await asyncio.open_connection(sock=a)
    rb, wb = await asyncio.open_connection(sock=b)
    client = spdy.Session(TCPStream(ra, wa), client=True)
    server = spdy.Session(TCPStream(rb, wb), client=False, on_stream=incoming.put_nowait)
    return client, server, incoming


async def test_sessions_open_streams_move_bytes_and_half_close() -> None:
    client, server, incoming = await _pair()
    try:
        stream = await client.open_stream({"streamtype": ["stdin"]})
        assert stream.id == 1
        peer = await asyncio.wait_for(incoming.get(), 5)
        assert peer.header("streamType") == "stdin"
        await stream.write(b"hello ")
        await stream.write(b"world", fin=True)
        got = b""
        while chunk := await peer.read():
            got += chunk
        assert got == b"hello world"
        await peer.write(b"back")
        await peer.close()
        assert await stream.read() == b"back" and await stream.read() == b""
        assert client.streams == {} and server.streams == {}  # closed both ways: released
    finally:
        await client.close()
        await server.close()


async def test_a_reset_or_a_lost_session_is_never_a_clean_end() -> None:
    client, server, incoming = await _pair()
    stream = await client.open_stream({"streamtype": ["stdout"]})
    peer = await asyncio.wait_for(incoming.get(), 5)
    await peer.reset()
    with pytest.raises(spdy.SPDYError, match="reset"):
        await asyncio.wait_for(stream.read(), 5)
    second = await client.open_stream({"streamtype": ["stderr"]})
    await asyncio.wait_for(incoming.get(), 5)
    server.stream._writer.transport.abort()  # type: ignore[attr-defined]  # the connection drops
    with pytest.raises(spdy.SPDYError):
        await asyncio.wait_for(second.read(), 5)
    await client.close()
    await server.close()


async def test_a_peer_that_is_not_read_is_held_back_not_buffered() -> None:
    client, server, incoming = await _pair()
    try:
        stream = await client.open_stream({"streamtype": ["data"]})
        peer = await asyncio.wait_for(incoming.get(), 5)
        sent = 0

        async def flood() -> None:
            nonlocal sent
            for _ in range(10_000):  # bounded
                await stream.write(b"x" * 65536)
                sent += 65536

        task = asyncio.create_task(flood())
        last, stalled_for = -1, 0.0
        for _ in range(100):  # bounded: the writer must stall once the unread stream is full and TCP fills
            await asyncio.sleep(0.05)
            stalled_for = stalled_for + 0.05 if sent == last else 0.0
            last = sent
            if stalled_for >= 0.3:
                break
        assert stalled_for >= 0.3 and not task.done(), f"the writer never stalled ({sent} bytes)"
        assert len(peer._chunks) <= spdy.STREAM_QUEUE
        assert sent < 64 * 1024 * 1024
        task.cancel()
    finally:
        await client.close()
        await server.close()
