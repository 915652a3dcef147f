"""Dial-in connections that lose their right to exist while connected, with the real OpenSSH client: a certificate
revoked in ``[dialin] revoked_keys`` (an ``ssh-keygen -k`` KRL) and re-read on reload (SIGHUP), and a certificate
that expires. The connection is closed, its open streams end as broken, and the other nodes are untouched."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import pytest

from proxy.errors import StreamError
from tests.dialinbed import SSH, DialinBed, keygen, wait_exit
from tests.loopback.test_dialin import NODE_ADDR, Targets, audit_lines, bed, targets, up_node  # noqa: F401
from tests.waiting import wait_for
from tunneld.app import Gateway
from tunneld.config import load_checked
from tunneld.tunnels.state import State

pytestmark = pytest.mark.skipif(not os.access(SSH, os.X_OK), reason="the OpenSSH client is missing")


def write_krl(b: DialinBed, *key_ids: str) -> None:
    """``revoked_keys``: a KRL from ``ssh-keygen -k`` revoking the user CA's certificates with these key ids."""
    spec = b.dir / "krl.spec"
    spec.write_text("".join(f"id: {k}\n" for k in key_ids))
    keygen("-k", "-f", str(b.dir / "krl"), "-s", str(b.dir / "ssh_user_ca.pub"), str(spec))


async def expect_broken(stream: object) -> None:
    with pytest.raises(StreamError):
        for _ in range(100):
            if not await asyncio.wait_for(stream.read(), 15):  # type: ignore[attr-defined]
                pytest.fail("a stream of a closed connection looked like a clean end")


async def test_a_certificate_revoked_while_connected_is_disconnected_on_reload(
        bed: DialinBed, targets: Targets, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    caplog.set_level(logging.INFO)
    write_krl(bed, "somebody-else")
    path = bed.write_config(bed.config_text([("node-1", NODE_ADDR, "dial-in"), ("node-2", "127.0.0.2", "dial-in")],
                                            extra=f'revoked_keys = "{bed.dir / "krl"}"'))
    gw = Gateway(load_checked(path))
    await gw.start()
    try:
        first = await up_node(bed, gw, path, "node-1")
        second = await up_node(bed, gw, path, "node-2")
        stream = await gw.dialer.dial(NODE_ADDR, targets.echo_port)
        await stream.write(b"before")
        assert await stream.read() == b"before"
        await gw.reload()  # nothing new is revoked: nobody is disconnected
        assert gw.pool.tunnels["node-1"].state is State.UP and first.poll() is None  # type: ignore[attr-defined]

        write_krl(bed, "somebody-else", "node-1-cert")
        await gw.reload()
        await expect_broken(stream)
        await stream.close()
        assert await wait_exit(first) == 255  # type: ignore[arg-type]
        await wait_for(lambda: gw.pool.tunnels["node-1"].state is State.WAITING, 10, "node-1 waiting again")
        assert any("node-1-cert" in m and "revoked" in m and "closed" in m for m in audit_lines(caplog))
        assert gw.pool.tunnels["node-2"].state is State.UP and second.poll() is None  # type: ignore[attr-defined]
        assert gw.pool.tunnels["node-1"].counters.open_channels == 0

        caplog.clear()  # and the same certificate cannot log in again
        argv, line = bed.ssh_command(path, "node-1", gw.dialin.port, bed.dir / "node_node-1")  # type: ignore[union-attr]
        again = bed.start_ssh(argv, line, "node-1")
        assert await wait_exit(again) == 255
        await wait_for(lambda: any("is revoked" in m for m in audit_lines(caplog)), 5, "the refusal's audit line")
        assert gw.pool.tunnels["node-1"].state is State.WAITING
        assert len(gw.dialin.connections) == 1  # type: ignore[union-attr]  # node-2's
    finally:
        await gw.stop(1)


async def test_a_connection_is_closed_when_its_certificate_expires(
        bed: DialinBed, targets: Targets, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    caplog.set_level(logging.INFO)
    path = bed.write_config(bed.config_text([("node-1", NODE_ADDR, "dial-in"), ("node-2", "127.0.0.2", "dial-in")]))
    gw = Gateway(load_checked(path))
    await gw.start()
    try:
        other = await up_node(bed, gw, path, "node-2")
        key = bed.node_key("node-1", validity="-5m:+8s")
        valid_before = int(time.time()) + 8
        proc = await up_node(bed, gw, path, "node-1", key)
        stream = await gw.dialer.dial(NODE_ADDR, targets.echo_port)
        await stream.write(b"while valid")
        assert await stream.read() == b"while valid"
        await expect_broken(stream)
        assert time.time() >= valid_before - 1  # not before the certificate's end (ssh-keygen rounds to seconds)
        await stream.close()
        assert await wait_exit(proc) == 255  # type: ignore[arg-type]
        await wait_for(lambda: gw.pool.tunnels["node-1"].state is State.WAITING, 10, "node-1 waiting again")
        assert any("certificate expired" in m for m in audit_lines(caplog))
        assert gw.pool.tunnels["node-2"].state is State.UP and other.poll() is None  # type: ignore[attr-defined]
        assert gw.pool.tunnels["node-1"].counters.open_channels == 0
    finally:
        await gw.stop(1)
