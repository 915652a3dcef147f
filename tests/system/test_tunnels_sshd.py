"""The pool and dialer against real OpenSSH sshd, one per node, each in its own network namespace."""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import replace

import pytest

from proxy.dialer import Stream, TunnelDown
from tests.sshbed import SshBed
from tunneld.app import Gateway

from .conftest import config_for, wait_for, write_config

pytestmark = pytest.mark.system

MiB = 1024 * 1024


def state(gw: Gateway, name: str) -> str:
    return gw.pool.tunnels[name].state.value


async def up(gw: Gateway, *names: str) -> None:
    await wait_for(lambda: all(n in gw.pool.tunnels and state(gw, n) == "up" for n in names), what=f"{names} up")


@pytest.mark.both_loops
async def test_tunnels_come_up_and_probe_healthz(bed: SshBed) -> None:
    for i in range(3):
        bed.add_node(f"node-{i}")
    gw = Gateway(config_for(bed, list(bed.nodes)))
    await gw.start()
    try:
        await up(gw, "node-0", "node-1", "node-2")
        await wait_for(lambda: all(t.last_probe and t.last_probe.ok for t in gw.pool.tunnels.values()), what="probes")
        for name, node in bed.nodes.items():
            assert gw.pool.tunnels[name].last_probe.detail == "ok"  # type: ignore[union-attr]
            assert node.accepted_logins() == 1
    finally:
        await gw.stop()


async def _pump_round_trip(stream: Stream, payload_size: int) -> tuple[str, str, int]:
    sent = hashlib.sha256()
    got = hashlib.sha256()
    received = 0

    async def writer() -> None:
        remaining = payload_size
        block = 0
        while remaining:
            chunk = os.urandom(min(remaining, 256 * 1024)) if block % 16 == 0 else bytes([block % 256]) * min(
                remaining, 256 * 1024
            )
            sent.update(chunk)
            await stream.write(chunk)
            remaining -= len(chunk)
            block += 1
        await stream.write_eof()

    async def reader() -> None:
        nonlocal received
        while data := await stream.read():
            got.update(data)
            received += len(data)

    await asyncio.wait_for(asyncio.gather(writer(), reader()), 120)
    return sent.hexdigest(), got.hexdigest(), received


@pytest.mark.both_loops
async def test_64mib_round_trip_is_byte_exact(bed: SshBed) -> None:
    node = bed.add_node("node-0")
    cfg = config_for(bed, ["node-0"])
    # No health probes: their channels would race with the open-channel count below.
    gw = Gateway(replace(cfg, health=replace(cfg.health, enabled=False)))
    await gw.start()
    try:
        await up(gw, "node-0")
        host = node.address if bed.node_local_host == "@node" else bed.node_local_host
        tunnel = gw.pool.tunnels["node-0"]
        before_out, before_in = tunnel.counters.bytes_out, tunnel.counters.bytes_in
        stream = await tunnel.open_stream(host, node.echo_port, 10)
        try:
            sent, got, received = await _pump_round_trip(stream, 64 * MiB)
        finally:
            await stream.close()
        assert received == 64 * MiB
        assert got == sent
        assert tunnel.counters.bytes_out - before_out >= 64 * MiB
        assert tunnel.counters.bytes_in - before_in >= 64 * MiB
        assert tunnel.counters.open_channels == 0
    finally:
        await gw.stop()


async def test_host_key_not_signed_by_ca_is_refused(bed: SshBed) -> None:
    bed.add_node("good")
    bad = bed.add_node("mitm", signed=False)
    gw = Gateway(config_for(bed, ["good", "mitm"]))
    await gw.start()
    try:
        await up(gw, "good")
        tunnel = gw.pool.tunnels["mitm"]
        await wait_for(lambda: state(gw, "mitm") == "refused", what="refused")
        assert tunnel.machine.connects == 0 and tunnel.machine.connect_failures == 1
        err = tunnel.machine.last_error or ""
        assert "host key" in err and "not trusted" in err, err
        assert tunnel.snapshot()["last_error"] == err
        assert bad.accepted_logins() == 0, "the gateway must not authenticate to an untrusted host"
        with pytest.raises(TunnelDown) as exc:
            await gw.unchecked_dialer.dial(bad.address, 22)
        assert exc.value.status == 502 and "host key" in str(exc.value)
    finally:
        await gw.stop()


@pytest.mark.both_loops
async def test_sshd_killed_tunnel_goes_down_and_comes_back(bed: SshBed) -> None:
    n0 = bed.add_node("node-0")
    bed.add_node("node-1")
    gw = Gateway(config_for(bed, ["node-0", "node-1"]))
    await gw.start()
    try:
        await up(gw, "node-0", "node-1")
        n0.kill_sshd()
        await wait_for(lambda: state(gw, "node-0") in ("down", "connecting"), what="node-0 down")
        assert gw.pool.tunnels["node-0"].machine.last_error
        await wait_for(lambda: gw.pool.tunnels["node-0"].machine.connect_failures >= 1, what="a failed reconnect")
        assert state(gw, "node-1") == "up"
        n0.start_sshd()
        await up(gw, "node-0")
        assert gw.pool.tunnels["node-0"].machine.connects == 2
        assert gw.pool.tunnels["node-1"].machine.connects == 1, "the other node's tunnel is untouched"
    finally:
        await gw.stop()


async def test_inventory_reload_adds_and_removes_without_touching_others(bed: SshBed) -> None:
    for name in ("node-0", "node-1", "node-2"):
        bed.add_node(name)
    gw = Gateway(config_for(bed, ["node-0", "node-1"]))
    await gw.start()
    try:
        await up(gw, "node-0", "node-1")
        link0 = gw.pool.tunnels["node-0"].link
        write_config(bed, ["node-0", "node-2"])
        change = await gw.reload()
        assert [n.name for n in change.added] == ["node-2"]
        assert [n.name for n in change.removed] == ["node-1"]
        assert change.unchanged == ("node-0",)
        await up(gw, "node-2")
        assert sorted(gw.pool.tunnels) == ["node-0", "node-2"]
        assert gw.pool.tunnels["node-0"].link is link0
        assert bed.nodes["node-0"].accepted_logins() == 1, "node-0 was not reconnected"
        assert bed.nodes["node-2"].accepted_logins() == 1
        # node-1's session is closed: sshd logs the disconnect of the gateway's connection.
        await wait_for(lambda: "Disconnected from user" in bed.nodes["node-1"].log_text()
                       or "Connection closed by" in bed.nodes["node-1"].log_text(), what="node-1 session closed")
    finally:
        await gw.stop()
