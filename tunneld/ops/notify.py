"""sd_notify: tell the service manager about the daemon's state, without libsystemd.

The protocol (systemd's ``sd_notify(3)``): when the service manager starts a ``Type=notify`` unit it sets
``NOTIFY_SOCKET`` to the path of a unix *datagram* socket (a leading ``@`` means the Linux abstract namespace, where
the ``@`` stands for a NUL byte). The daemon sends one datagram per update: newline-separated ``KEY=VALUE``
assignments such as ``READY=1``, ``RELOADING=1``, ``STOPPING=1``, ``STATUS=...``, ``WATCHDOG=1``. A reload is
announced as ``RELOADING=1`` plus ``MONOTONIC_USEC=<CLOCK_MONOTONIC in µs>`` and finished with ``READY=1``.

With ``WatchdogSec=`` the manager sets ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``); the daemon must send ``WATCHDOG=1``
more often than that, conventionally every half of it. :class:`Watchdog` pings from a task on the event loop, so a
loop that is stuck stops pinging and the manager restarts the service.

Everything is a no-op when ``NOTIFY_SOCKET`` is unset (not started by systemd), so callers never need to check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("tunneld.notify")

MAX_DATAGRAM = 4096


class Notifier:
    """Sends state updates to the service manager's notify socket (if there is one)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that asked for notifications."""
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; returns False (and logs once per call) if it could not."""
        if self.address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        if len(message) > MAX_DATAGRAM or any(b"\n" in str(v).encode() for v in fields.values()):
            raise ValueError("notify message too long or a value contains a newline")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, self.address)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: startup (or a reload) finished."""
        return self.send(READY=1, **({"STATUS": status} if status else {}))

    def reloading(self) -> bool:
        """``RELOADING=1`` with the monotonic timestamp systemd uses to match it to the reload request."""
        return self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown began (with a ``STATUS=`` line if given)."""
        return self.send(STOPPING=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> bool:
        """``STATUS=...``: a one-line status shown by ``systemctl status``."""
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the event loop is alive."""
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    log.warning("ignoring NOTIFY_SOCKET=%r: neither an absolute path nor an abstract (@) socket", value)
    return None


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None when no watchdog is configured.

    As in ``sd_watchdog_enabled(3)``, ``WATCHDOG_PID`` (when set) must name this process.
    """
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2 / 1_000_000


class Watchdog:
    """Pings ``WATCHDOG=1`` from the event loop every ``interval`` seconds while running."""

    def __init__(self, notifier: Notifier, interval: float | None) -> None:
        self._notifier = notifier
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.interval is None or not self._notifier.enabled or self._task is not None:
            return
        self._task = asyncio.create_task(self._run(self.interval), name="sd-watchdog")

    async def _run(self, interval: float) -> None:
        while True:
            self._notifier.watchdog()
            await asyncio.sleep(interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
