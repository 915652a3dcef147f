"""`tunneld dev` never shows a traceback: a port in use or an address that cannot be bound is one line, exit 1, with
a hint; a client that stops following a log (Ctrl-C on `curl -N .../log?follow=true`) ends the follow quietly."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys

import pytest

from tests.loopback.conftest import next_base, started
from tests.waiting import wait_for
from tunneld.config import load_config
from tunneld.dev.cluster import DevCluster, free_port


def dev(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TUNNELD_LOOP="asyncio")
    return subprocess.run([sys.executable, "-m", "tunneld", "dev", "--check", "--nodes", "1", *args],
                          capture_output=True, text=True, timeout=60, env=env)


def test_proxy_port_in_use_is_one_line_with_a_hint() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = dev("--proxy-port", str(port), "--base-address", next_base(), "--ssh-port", str(free_port()))
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        f"error: cannot serve the proxy URLs on 127.0.0.1:{port}: address already in use "
        "(choose another port with --proxy-port, or --proxy-port 0 for any free one)"], out.stderr


def test_address_that_cannot_be_bound_is_one_line_with_a_hint() -> None:
    out = dev("--base-address", "192.0.2.1", "--proxy-port", "0")
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("error: cannot start the simulated nodes on 192.0.2.1 (ssh port 2222")
    assert lines[0].endswith("(--base-address must be a loopback address such as 127.0.1.1)")


async def test_client_leaving_a_followed_log_is_no_error(cluster: DevCluster,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tunneld.dev.kubelet")
    assert cluster.config_path is not None
    gw = await started(load_config(cluster.config_path))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", cluster.proxy_port)
        target = b"/api/v1/nodes/node-1/proxy/containerLogs/default/web-1/nginx?follow=true"
        writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + ": ".join(cluster.auth_header).encode()
                     + b"\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        await asyncio.wait_for(reader.read(100), 10)
        writer.transport.abort()  # Ctrl-C on curl
        await wait_for(lambda: "ended by the client" in caplog.text, what="the follow to end")
    finally:
        await gw.stop()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
