"""The kubelet's streaming protocols over WebSocket, as the simulated kubelet speaks them.

Exec, attach and port-forward multiplex numbered channels over one WebSocket (the subprotocol names the framing):

* binary protocols (none offered, ``v4.channel.k8s.io``, ``channel.k8s.io``): every message is binary; its first
  byte is the channel, the rest is data;
* base64 protocols (``base64.channel.k8s.io``, ``v4.base64.channel.k8s.io``): every message is text; its first
  character is the channel digit, the rest is the data in base64;
* ``v5.channel.k8s.io`` (``[255, ch]``: the client closed channel ``ch``) is not a kubelet protocol: kube-apiserver
  (and the gateway) translate it to SPDY. Over these protocols stdin ends only with the WebSocket.

Exec/attach channels: 0 stdin, 1 stdout, 2 stderr, 3 error (the final metav1.Status as JSON), 4 resize.
Port-forward: the i-th requested port uses data channel ``2i`` and error channel ``2i+1``; the server first sends on
both a message whose data is the port as 2 bytes little-endian.

The commands the simulated containers understand are in :mod:`tunneld.dev.commands`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web

log = logging.getLogger("tunneld.dev.kubelet")

STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4
CLOSE_SIGNAL = 255
EXEC_PROTOCOLS = ("", "channel.k8s.io", "base64.channel.k8s.io", "v4.channel.k8s.io", "v4.base64.channel.k8s.io")
"""WebSocket subprotocols a kubelet 1.32 (default feature gates) accepts for exec and attach ("" = none offered);
``v5.channel.k8s.io`` is the apiserver's (it translates to SPDY), not the kubelet's."""
PORTFORWARD_PROTOCOLS = ("", "v4.channel.k8s.io", "v4.base64.channel.k8s.io")
"""WebSocket subprotocols a kubelet 1.32 accepts for port-forward."""
BASE64_PROTOCOLS = frozenset({"base64.channel.k8s.io", "v4.base64.channel.k8s.io"})
MAX_MESSAGE = 16 * 1024 * 1024
READ = 64 * 1024


class ProtocolError(Exception):
    """The peer broke the channel protocol (bad channel byte, bad base64...)."""


def offered_protocols(headers: Any) -> list[str]:
    """The subprotocols a WebSocket client offers (``Sec-WebSocket-Protocol``, possibly repeated)."""
    return [p.strip() for value in headers.getall("Sec-WebSocket-Protocol", []) for p in value.split(",") if p.strip()]


def negotiate(offered: list[str], supported: tuple[str, ...]) -> str | None:
    """The first protocol the client offers (in the client's order, as the kubelet's handshake picks) that is
    ``supported``; offering none counts as offering ``""``. None: no match (the kubelet answers 403)."""
    return next((p for p in offered or [""] if p in supported), None)


@dataclass(frozen=True)
class Frame:
    """One message from the client: data on a channel, or (v5) the client closing that channel."""

    channel: int
    data: bytes = b""
    close: bool = False


class ChannelConn:
    """A prepared WebSocket speaking one of the channel protocols."""

    def __init__(self, ws: web.WebSocketResponse, protocol: str) -> None:
        self.ws = ws
        self.protocol = protocol
        self.base64 = protocol in BASE64_PROTOCOLS

    async def send(self, channel: int, data: bytes) -> bool:
        """Send ``data`` on ``channel`` (waits while the client is slow). False when the socket is gone."""
        if self.ws.closed:
            return False
        try:
            if self.base64:
                await self.ws.send_str(str(channel) + base64.b64encode(data).decode("ascii"))
            else:
                await self.ws.send_bytes(bytes([channel]) + data)
        except (ConnectionError, RuntimeError):
            return False
        return True

    async def receive(self) -> Frame | None:
        """The next frame; None once the client has closed the WebSocket (or it broke)."""
        while True:
            msg = await self.ws.receive()
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return None
            if msg.type == WSMsgType.BINARY and not self.base64:
                raw: bytes = msg.data
                if not raw:
                    continue
                return Frame(raw[0], raw[1:])
            if msg.type == WSMsgType.TEXT and self.base64:
                text: str = msg.data
                if not text:
                    continue
                if not text[0].isdigit():
                    raise ProtocolError(f"invalid channel {text[0]!r}")
                try:
                    return Frame(int(text[0]), base64.b64decode(text[1:], validate=True))
                except binascii.Error as exc:
                    raise ProtocolError(f"invalid base64 data: {exc}") from exc
            raise ProtocolError(f"unexpected {msg.type.name.lower()} message for protocol {self.protocol}")

    async def close(self) -> None:
        """Close the WebSocket normally (1000)."""
        with contextlib.suppress(ConnectionError, RuntimeError, asyncio.TimeoutError):
            await self.ws.close()


async def _pump_to_client(conn: ChannelConn, channel: int, reader: asyncio.StreamReader) -> None:
    while data := await reader.read(READ):
        if not await conn.send(channel, data):
            return


Connect = Callable[[int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


async def portforward_session(conn: ChannelConn, ports: list[int], connect: Connect, describe: str) -> None:
    """Forward each of ``ports`` over its channel pair; ``connect(port)`` opens the pod-side TCP connection.

    Ends when the client closes the WebSocket or every pod-side connection has ended (then it closes the socket).
    """
    for i, port in enumerate(ports):
        prefix = port.to_bytes(2, "little")
        await conn.send(2 * i, prefix)
        await conn.send(2 * i + 1, prefix)
    writers: dict[int, asyncio.StreamWriter] = {}
    pumps: list[asyncio.Task[None]] = []
    for i, port in enumerate(ports):
        try:
            reader, writer = await connect(port)
        except OSError as exc:
            await conn.send(2 * i + 1, f"error forwarding port {port} to pod {describe}: {exc}".encode())
            continue
        writers[2 * i] = writer
        pumps.append(asyncio.create_task(_pump_to_client(conn, 2 * i, reader)))

    async def close_when_pods_done() -> None:
        if pumps:
            await asyncio.gather(*pumps, return_exceptions=True)
        await conn.close()

    closer = asyncio.create_task(close_when_pods_done())
    try:
        while (frame := await conn.receive()) is not None:
            target = writers.get(frame.channel)
            if target is None or target.is_closing():
                continue
            try:
                if frame.close:
                    if target.can_write_eof():
                        target.write_eof()
                    continue
                target.write(frame.data)
                await target.drain()
            except ConnectionError:
                target.close()
    except ProtocolError as exc:
        log.info("port-forward stream protocol error: %s", exc)
    finally:
        for writer in writers.values():
            writer.close()
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        await asyncio.gather(closer, return_exceptions=True)  # closes the WebSocket (a no-op if it is closed)
