"""Dial-in tunnels with the real OpenSSH client on loopback: the node's ``ssh -N -R`` exactly as
``tunneld node ssh-command`` prints it, the gateway's ``[dialin]`` listener, channels through forwarded-tcpip and
SOCKS5; every refusal (with its audit line); the faults (ssh killed mid-stream, a replaced connection, a restart)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from proxy.dialer import ChannelRefused, DialTimeout, TunnelUnavailable
from proxy.errors import StreamError
from tests.dialinbed import SSH, DialinBed, keygen, wait_exit
from tests.waiting import wait_for
from tunneld.app import Gateway
from tunneld.config import load_checked
from tunneld.tunnels.state import State

pytestmark = pytest.mark.skipif(not os.access(SSH, os.X_OK), reason="the OpenSSH client is missing")

NODE_ADDR = "127.0.0.1"


@pytest.fixture
def bed() -> Iterator[DialinBed]:
    workdir = Path(tempfile.mkdtemp(prefix="tddi", dir="/tmp"))
    b = DialinBed(workdir)
    try:
        yield b
    finally:
        b.close()
        shutil.rmtree(workdir, ignore_errors=True)


class Targets:
    """Servers on the node's side (here: loopback): an echo on a node port, a port nobody listens on."""

    def __init__(self) -> None:
        self.servers: list[asyncio.base_events.Server] = []
        self.echo_port = 0
        self.closed_port = 0

    async def start(self) -> None:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(256 * 1024):
                    writer.write(data)
                    await writer.drain()
                writer.write_eof()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        for port in range(7000, 7011):  # inside policy.node_ports of the bed's config
            try:
                server = await asyncio.start_server(echo, NODE_ADDR, port)
            except OSError:
                continue
            if not self.echo_port:
                self.echo_port = port
                self.servers.append(server)
            elif not self.closed_port:
                server.close()
                await server.wait_closed()
                self.closed_port = port
                break
        assert self.echo_port and self.closed_port, "no free ports in 7000-7010"

    async def close(self) -> None:
        for server in self.servers:
            server.close()
            await server.wait_closed()


@pytest.fixture
async def targets() -> AsyncIterator[Targets]:
    t = Targets()
    await t.start()
    yield t
    await t.close()


async def start_gateway(bed: DialinBed, nodes: list[tuple[str, str, str]]) -> tuple[Gateway, Path]:
    path = bed.write_config(bed.config_text(nodes))
    gw = Gateway(load_checked(path))
    await gw.start()
    assert gw.dialin is not None
    return gw, path


async def up_node(bed: DialinBed, gw: Gateway, config: Path, name: str, key: Path | None = None) -> object:
    assert gw.dialin is not None
    key = key or bed.node_key(name)
    argv, line = bed.ssh_command(config, name, gw.dialin.port, key)
    proc = bed.start_ssh(argv, line, name)
    await wait_for(lambda: gw.pool.tunnels[name].state is State.UP, 20, f"{name} up; ssh said: {bed.ssh_log(name)}")
    return proc


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tunneld.audit"]


async def test_the_printed_command_brings_the_tunnel_up_and_carries_bytes_both_ways(
        bed: DialinBed, targets: Targets) -> None:
    gw, config = await start_gateway(bed, [("node-1", NODE_ADDR, "dial-in")])
    try:
        assert gw.pool.tunnels["node-1"].state is State.WAITING
        with pytest.raises(TunnelUnavailable, match="waiting"):
            await gw.dialer.dial(NODE_ADDR, targets.echo_port)
        await up_node(bed, gw, config, "node-1")
        snap = gw.pool.snapshot()[0]
        assert snap["mode"] == "dial-in" and snap["state"] == "up" and snap["peer"].startswith("127.0.0.1:")
        stream = await gw.dialer.dial(NODE_ADDR, targets.echo_port)  # through the policy
        payload = os.urandom(8 * 1024 * 1024)
        got = bytearray()

        async def reader() -> None:
            while len(got) < len(payload):
                data = await stream.read()
                assert data, "the echo ended early"
                got.extend(data)

        task = asyncio.create_task(reader())
        for i in range(0, len(payload), 256 * 1024):
            await stream.write(payload[i:i + 256 * 1024])
        await asyncio.wait_for(task, 60)
        assert bytes(got) == payload
        await stream.write_eof()
        assert await stream.read() == b""
        await stream.close()
        assert gw.pool.tunnels["node-1"].counters.open_channels == 0
    finally:
        await gw.stop(1)


async def test_socks_refusals_map_to_dial_errors(bed: DialinBed, targets: Targets) -> None:
    gw, config = await start_gateway(bed, [("node-1", NODE_ADDR, "dial-in")])
    try:
        await up_node(bed, gw, config, "node-1")
        # allowed by PermitRemoteOpen (a node port) but nothing listens: 502
        with pytest.raises(ChannelRefused) as refused:
            await gw.dialer.dial(NODE_ADDR, targets.closed_port)
        assert refused.value.status == 502
        # not in PermitRemoteOpen (the gateway's policy is bypassed here to reach the node's own check): 502
        with pytest.raises(ChannelRefused):
            await gw.unchecked_dialer.dial(NODE_ADDR, 9999)
        assert gw.pool.tunnels["node-1"].counters.open_channels == 0
    finally:
        await gw.stop(1)


async def test_a_socks_answer_that_never_comes_is_a_504(bed: DialinBed) -> None:
    """A fake node (asyncssh is not needed: the gateway's own link is driven) whose SOCKS side never answers."""
    from tunneld.tunnels.socks import handshake

    class Silent:
        async def write(self, data: bytes) -> None:
            pass

        async def read(self, n: int = 65536) -> bytes:
            await asyncio.sleep(30)
            return b""

    with pytest.raises(DialTimeout) as err:
        await handshake(Silent(), "10.0.0.1", 80, 0.2, "node-1")
    assert err.value.status == 504


@pytest.mark.parametrize("case", ["other-ca", "expired", "other-node", "not-in-inventory", "dial-out-node"])
async def test_refused_certificates(bed: DialinBed, caplog: pytest.LogCaptureFixture, case: str) -> None:
    caplog.set_level(logging.INFO)
    gw, config = await start_gateway(bed, [("node-1", NODE_ADDR, "dial-in"), ("node-2", "127.0.0.2", "dial-in"),
                                           ("node-3", "127.0.0.3", "dial-out")])
    try:
        assert gw.dialin is not None
        name, expect = "node-1", ""
        if case == "other-ca":
            keygen("-t", "ed25519", "-N", "", "-f", str(bed.dir / "rogue_ca"))
            key = bed.node_key("node-1", ca="rogue_ca")
            expect = "not signed by the SSH user CA"
        elif case == "expired":
            key = bed.node_key("node-1", validity="-2d:-1d")
            expect = "expired"
        elif case == "other-node":
            key = bed.node_key("node-1", principal="node:node-2")
            expect = "must name exactly node:node-1"
        elif case == "not-in-inventory":
            name = "node-9"
            key = bed.node_key("node-9")
            expect = "node node-9: not in the inventory"
            # the command is printed for node-1; the login name is then changed to the stranger's
        else:
            name = "node-3"
            key = bed.node_key("node-3")
            expect = "not dial-in"
        argv, line = bed.ssh_command(config, "node-1", gw.dialin.port, key)
        argv = [a.replace("User=node:node-1", f"User=node:{name}") for a in argv]
        proc = bed.start_ssh(argv, line, "node-1")  # the known_hosts file the printed command names
        assert await wait_exit(proc) == 255
        assert "Permission denied" in bed.ssh_log("node-1")
        await wait_for(lambda: any(expect in m for m in audit_lines(caplog)), 5, f"audit line {expect!r}")
        assert all(t.state is not State.UP for t in gw.pool.tunnels.values())
    finally:
        await gw.stop(1)


@pytest.mark.parametrize("case", ["shell", "direct-tcpip", "second-forward"])
async def test_refused_requests(bed: DialinBed, caplog: pytest.LogCaptureFixture, targets: Targets,
                                case: str) -> None:
    caplog.set_level(logging.INFO)
    gw, config = await start_gateway(bed, [("node-1", NODE_ADDR, "dial-in")])
    try:
        assert gw.dialin is not None
        argv, line = bed.ssh_command(config, "node-1", gw.dialin.port, bed.node_key("node-1"))
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        local_port = free.getsockname()[1]
        free.close()
        if case == "shell":
            argv = [a for a in argv if a not in ("-N", "-T")]
            argv.insert(-1, "-tt")
            expect = "session (shell, exec or subsystem) requested"
        elif case == "direct-tcpip":
            argv = [argv[0], "-L", f"127.0.0.1:{local_port}:127.0.0.1:{targets.echo_port}", *argv[1:]]
            expect = "direct-tcpip"
        else:
            argv = [*argv[:-1], "-R", "1081", argv[-1]]
            expect = "a second forward"
        proc = bed.start_ssh(argv, line, "node-1")
        if case == "direct-tcpip":
            await wait_for(lambda: gw.pool.tunnels["node-1"].state is State.UP, 20, "up")
            reader, writer = await asyncio.open_connection("127.0.0.1", local_port)
            writer.write(b"x")
            try:
                answer = await asyncio.wait_for(reader.read(10), 10)
            except ConnectionResetError:
                answer = b""
            assert answer == b""  # refused: closed without a byte of the echo
            writer.close()
        else:
            assert await wait_exit(proc, 20) == 255  # ExitOnForwardFailure / the shell refused
        await wait_for(lambda: any(expect in m for m in audit_lines(caplog)), 5, f"audit line {expect!r}")
    finally:
        await gw.stop(1)


async def test_the_node_refuses_a_gateway_host_key_the_ca_did_not_sign(bed: DialinBed) -> None:
    keygen("-t", "ed25519", "-N", "", "-f", str(bed.dir / "rogue_host_ca"))
    keygen("-s", str(bed.dir / "rogue_host_ca"), "-h", "-I", "rogue", "-n", bed.gateway_host, "-V", "-5m:+1d",
           str(bed.dir / "gw_host.pub"))  # the gateway now presents a certificate from another CA
    gw, config = await start_gateway(bed, [("node-1", NODE_ADDR, "dial-in")])
    try:
        assert gw.dialin is not None
        argv, line = bed.ssh_command(config, "node-1", gw.dialin.port, bed.node_key("node-1"))
        proc = bed.start_ssh(argv, line, "node-1")
        assert await wait_exit(proc) == 255
        assert "Host key verification failed" in bed.ssh_log("node-1")
        assert gw.pool.tunnels["node-1"].state is State.WAITING
    finally:
        await gw.stop(1)


async def test_ssh_killed_mid_stream_breaks_the_stream_and_a_restart_comes_back(
        bed: DialinBed, targets: Targets) -> None:
    gw, config = await start_gateway(bed, [("node-1", NODE_ADDR, "dial-in")])
    try:
        proc = await up_node(bed, gw, config, "node-1")
        stream = await gw.dialer.dial(NODE_ADDR, targets.echo_port)
        await stream.write(b"before")
        assert await stream.read() == b"before"
        proc.kill()  # type: ignore[attr-defined]
        with pytest.raises(StreamError):
            for _ in range(100):
                if not await asyncio.wait_for(stream.read(), 15):
                    pytest.fail("a broken stream looked like a clean end")
        await stream.close()
        await wait_for(lambda: gw.pool.tunnels["node-1"].state is State.WAITING, 15, "waiting again")
        await up_node(bed, gw, config, "node-1")  # supervision starts the same command again
        stream = await gw.dialer.dial(NODE_ADDR, targets.echo_port)
        await stream.write(b"after")
        assert await stream.read() == b"after"
        await stream.close()
        assert gw.pool.tunnels["node-1"].machine.connects == 2
    finally:
        await gw.stop(1)


async def test_a_second_connection_replaces_the_first(bed: DialinBed, targets: Targets,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    gw, config = await start_gateway(bed, [("node-1", NODE_ADDR, "dial-in")])
    try:
        first = await up_node(bed, gw, config, "node-1")
        old_stream = await gw.dialer.dial(NODE_ADDR, targets.echo_port)
        tunnel = gw.pool.tunnels["node-1"]
        old_link = tunnel.link
        second = await up_node(bed, gw, config, "node-1")
        await wait_for(lambda: tunnel.link is not old_link, 20, "the new connection in use")
        assert any("replaced" in r.getMessage() for r in caplog.records if r.name == "tunneld.pool")
        new_stream = await gw.dialer.dial(NODE_ADDR, targets.echo_port)  # through the new connection at once
        await new_stream.write(b"new")
        assert await new_stream.read() == b"new"
        await old_stream.write(b"old")  # the old one's stream still runs within replace_grace
        assert await old_stream.read() == b"old"
        with pytest.raises(StreamError):  # then it is ended as broken (replace_grace = 2 s)
            for _ in range(100):
                if not await asyncio.wait_for(old_stream.read(), 10):
                    pytest.fail("a replaced stream looked like a clean end")
        await old_stream.close()
        assert await wait_exit(first) == 255  # type: ignore[arg-type]
        assert second.poll() is None  # type: ignore[attr-defined]
        await new_stream.write(b"still")
        assert await new_stream.read() == b"still"
        await new_stream.close()
        assert tunnel.state is State.UP and tunnel.snapshot()["replacements"] == 1
    finally:
        await gw.stop(1)


async def test_a_node_leaving_the_inventory_is_disconnected(bed: DialinBed) -> None:
    gw, config = await start_gateway(bed, [("node-1", NODE_ADDR, "dial-in"), ("node-2", "127.0.0.2", "dial-in")])
    try:
        proc = await up_node(bed, gw, config, "node-1")
        config.write_text(bed.config_text([("node-2", "127.0.0.2", "dial-in")]))
        await gw.reload()
        assert await wait_exit(proc) == 255  # type: ignore[arg-type]
        assert "node-1" not in gw.pool.tunnels
    finally:
        await gw.stop(1)
