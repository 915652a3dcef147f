"""sd_notify over a real datagram socket (path and abstract), and the watchdog interval rules."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tunneld.ops.notify import Notifier, watchdog_interval


def _fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, str(path)
    sock.close()


def test_ready_reloading_stopping_watchdog(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("serving")
    assert _fields(sock.recv(4096)) == {"READY": "1", "STATUS": "serving"}
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    got = _fields(sock.recv(4096))
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert got["RELOADING"] == "1" and before <= int(got["MONOTONIC_USEC"]) <= after
    n.stopping()
    assert _fields(sock.recv(4096)) == {"STOPPING": "1"}
    n.watchdog()
    assert _fields(sock.recv(4096)) == {"WATCHDOG": "1"}
    n.close()


def test_abstract_socket() -> None:
    name = f"tunneld-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert sock.recv(4096) == b"READY=1"
        n.close()
    finally:
        sock.close()


def test_disabled_without_socket_and_failures_do_not_raise(tmp_path: Path) -> None:
    assert not Notifier({}).enabled and Notifier({}).ready() is False
    assert not Notifier({"NOTIFY_SOCKET": "relative/path"}).enabled
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert gone.enabled and gone.ready() is False


def test_newline_in_value_is_refused(listener: tuple[socket.socket, str]) -> None:
    with pytest.raises(ValueError):
        Notifier({"NOTIFY_SOCKET": listener[1]}).status("two\nlines")


def test_watchdog_interval() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
