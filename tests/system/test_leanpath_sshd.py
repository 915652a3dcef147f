"""The lean SSH packet path (tunneld/tunnels/leanpath.py) against real OpenSSH sshd: active for each AEAD cipher,
byte-exact both ways with it on and off, through key re-exchanges forced mid-stream by sshd's RekeyLimit (by bytes
and by time), with one packet on the wire per data packet (no per-packet SSH_MSG_IGNORE)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import replace

import pytest

from proxy.dialer import Stream
from tests.sshbed import SshBed
from tunneld.app import Gateway
from tunneld.tunnels import leanpath

from .conftest import config_for, wait_for
from .test_tunnels_sshd import _pump_round_trip

pytestmark = pytest.mark.system

MiB = 1024 * 1024
AEAD = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com")
MAX_PACKET = 32768  # the data per packet sshd asks for (its channel's maximum packet size)


async def _paced_round_trip(stream: Stream, chunks: int, pause: float) -> tuple[str, str, int]:
    """1 MiB of random bytes every ``pause`` seconds, echoed back: a stream that lasts past sshd's rekey time."""
    sent, got = hashlib.sha256(), hashlib.sha256()
    received = 0

    async def writer() -> None:
        for _ in range(chunks):
            chunk = os.urandom(MiB)
            sent.update(chunk)
            await stream.write(chunk)
            await asyncio.sleep(pause)  # the stream must span the rekey interval: time is the point here
        await stream.write_eof()

    async def reader() -> None:
        nonlocal received
        while data := await stream.read():
            got.update(data)
            received += len(data)

    await asyncio.wait_for(asyncio.gather(writer(), reader()), 120)
    return sent.hexdigest(), got.hexdigest(), received


async def _transfer(bed: SshBed, cipher: str, *, lean: bool, size: int, rekey: str = "",
                    pace: float = 0.0) -> dict[str, object]:
    node = bed.add_node(f"n-{len(bed.nodes)}", extra_sshd_config=f"Ciphers {cipher}\n{rekey}")
    cfg = config_for(bed, [node.name])
    gw = Gateway(replace(cfg, health=replace(cfg.health, enabled=False), ssh=replace(cfg.ssh, lean_packet_path=lean)))
    await gw.start()
    try:
        tunnel = gw.pool.tunnels[node.name]
        await wait_for(lambda: tunnel.state.value == "up", what="tunnel up")
        assert tunnel.link is not None
        conn = tunnel.link._conn
        before = leanpath.counts(conn)
        host = node.address if bed.node_local_host == "@node" else bed.node_local_host
        stream = await tunnel.open_stream(host, node.echo_port, 10)
        try:
            if pace:
                sent, got, received = await _paced_round_trip(stream, size // MiB, pace)
            else:
                sent, got, received = await _pump_round_trip(stream, size)
        finally:
            await stream.close()
        after = leanpath.counts(conn)
        return {"path": tunnel.link.packet_path, "cipher": tunnel.link.cipher, "exact": sent == got,
                "received": received, "sent_packets": after["sent"] - before["sent"],
                "received_packets": after["received"] - before["received"], "rekeys": after["keys"] - before["keys"],
                "snapshot": tunnel.snapshot(), "metrics": gw.metrics.exposition().decode()}
    finally:
        await gw.stop()


@pytest.mark.parametrize("cipher", AEAD)
async def test_lean_path_is_active_and_byte_exact_for_each_aead_cipher(bed: SshBed, cipher: str) -> None:
    r = await _transfer(bed, cipher, lean=True, size=16 * MiB)
    assert r["path"] == "lean" and r["cipher"] == cipher
    assert r["exact"] and r["received"] == 16 * MiB
    assert r["snapshot"]["packet_path"] == "lean"  # type: ignore[index]
    assert 'tunneld_ssh_packet_path{node="n-0",path="lean"} 1.0' in r["metrics"]  # type: ignore[operator]
    # Packets on the wire: what we send is one packet per 32 KiB of data plus a few window adjusts, no IGNORE before
    # each (asyncssh's own path would send twice as many); what sshd sends follows the echo's reads, at most 32 KiB.
    data_packets = 16 * MiB // MAX_PACKET
    assert data_packets <= r["sent_packets"] <= data_packets * 1.05, r  # type: ignore[operator]
    assert data_packets <= r["received_packets"] <= data_packets * 3, r  # type: ignore[operator]


async def test_switched_off_asyncssh_carries_the_bytes(bed: SshBed) -> None:
    r = await _transfer(bed, "aes128-gcm@openssh.com", lean=False, size=16 * MiB)
    assert r["path"] == "asyncssh" and r["exact"] and r["received"] == 16 * MiB
    assert r["sent_packets"] == r["received_packets"] == 0
    assert r["snapshot"]["packet_path"] == "asyncssh"  # type: ignore[index]


@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"])
@pytest.mark.parametrize("lean", [True, False])
async def test_rekeys_by_bytes_mid_stream(bed: SshBed, cipher: str, lean: bool) -> None:
    r = await _transfer(bed, cipher, lean=lean, size=48 * MiB, rekey="RekeyLimit 4M none\n")
    assert r["exact"] and r["received"] == 48 * MiB
    assert r["path"] == ("lean" if lean else "asyncssh")
    if lean:
        assert r["rekeys"] >= 10, r  # sshd rekeys every 4 MiB it sends or receives: 96 MiB through it


async def test_rekeys_by_time_mid_stream(bed: SshBed) -> None:
    r = await _transfer(bed, "aes256-gcm@openssh.com", lean=True, size=30 * MiB, rekey="RekeyLimit default 1\n",
                        pace=0.1)
    assert r["exact"] and r["received"] == 30 * MiB and r["path"] == "lean"
    assert r["rekeys"] >= 2, r  # sshd rekeys once a second; the stream lasts over 3 s
