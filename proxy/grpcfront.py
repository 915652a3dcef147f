"""The egress front for Konnectivity's gRPC protocol (kube-apiserver ``proxyProtocol: GRPC`` over a unix socket).

konnectivity-client opens one ``/ProxyService/Proxy`` stream per dial and speaks :mod:`proxy.konnectivity_pb2`::

    client                          gateway
    DIAL_REQ{address, random} --->  parse, policy, dial through the owning node's tunnel (bounded in number and time)
                              <---  DIAL_RSP{random, connectID != 0}, or DIAL_RSP{random, error} and the stream ends
    DIAL_CLS{random}          --->  while the dial is pending: the dial is dropped and the stream ends
    DATA{connectID, data}    <--->  bytes both ways; gRPC's flow control is the only buffer on the client side and
                                    the SSH channel window on the node side, so a slow reader slows the other end
    CLOSE_REQ{connectID}      --->  the upstream is closed, CLOSE_RSP{connectID} answers and the stream ends
                              <---  CLOSE_RSP{connectID, error=""} when the upstream ended with the node's EOF;
                                    CLOSE_RSP{connectID, error="why"} when it broke (tunnel lost, channel failed,
                                    no EOF from the node): a broken stream never looks complete

All writes to the client come from one task (the upstream reader), so packets never interleave. Who may connect is
decided by the unix socket's permissions, as for the CONNECT socket; there is no TCP listener (kube-apiserver uses
gRPC only over a unix socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from proxy.connect import parse_authority
from proxy.dialer import Dialer, DialError, Stream, StreamError
from proxy.konnectivity_pb2 import (
    CLOSE_REQ,
    CLOSE_RSP,
    DATA,
    DIAL_CLS,
    DIAL_REQ,
    DIAL_RSP,
    CloseResponse,
    Data,
    DialResponse,
    Packet,
)
from proxy.unixsock import OwnedSocket, prepare_socket_path

log = logging.getLogger("proxy.grpc")
audit = logging.getLogger("proxy.audit")

METHOD = "/ProxyService/Proxy"
CHUNK = 64 * 1024
MAX_MESSAGE = 1024 * 1024 + 1024  # a DATA packet the client may send (it writes what its TLS layer hands it)


@dataclass(frozen=True)
class GRPCLimits:
    """Bounds on the gRPC front: concurrent streams, dials pending at once, and how long a client may take to send
    its DIAL_REQ."""

    max_streams: int = 1024
    max_pending_dials: int = 256
    first_packet_timeout: float = 10.0


class KonnectivityFront:
    """Serves ``ProxyService.Proxy`` streams through a :class:`Dialer` (a :class:`~proxy.policy.PolicyDialer` in the
    gateway, which checks the destination policy)."""

    def __init__(self, dialer: Dialer, limits: GRPCLimits | None = None) -> None:
        self.dialer = dialer
        self.limits = limits or GRPCLimits()
        self.streams = 0
        """``Proxy`` streams open now."""
        self.pending_dials = 0
        self._ids = itertools.count(1)
        self._server: grpc.aio.Server | None = None
        self._owned: OwnedSocket | None = None

    async def listen_unix(self, path: Path, mode: int) -> None:
        """Serve on a unix socket at ``path`` with file mode ``mode``."""
        prepare_socket_path(path)
        handler = grpc.stream_stream_rpc_method_handler(
            self._handle, request_deserializer=Packet.FromString, response_serializer=Packet.SerializeToString
        )
        service = grpc.method_handlers_generic_handler("ProxyService", {"Proxy": handler})
        server = grpc.aio.server(
            handlers=[service],
            maximum_concurrent_rpcs=self.limits.max_streams,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.http2.bdp_probe", 0),  # keep each stream's window at its default: bounded buffering
                ("grpc.so_reuseport", 0),
            ],
        )
        server.add_insecure_port(f"unix:{path}")
        old = os.umask(0o077)  # the socket exists with no access for others before the chmod below
        try:
            await server.start()
        finally:
            os.umask(old)
        os.chmod(path, mode)
        self._server, self._owned = server, OwnedSocket.of(path)
        log.info("grpc egress listening on %s", path)

    async def close(self, grace: float = 0.0) -> None:
        """Stop accepting; let open streams finish for up to ``grace`` seconds, then cut them."""
        if self._server is None:
            return
        open_streams = self.streams
        await self._server.stop(grace)
        if open_streams and self.streams:
            log.warning("grpc egress: %d streams still open after the %g s grace period: cut", self.streams, grace)
        if self._owned is not None:
            self._owned.remove()  # only the socket file we bound, never another daemon's
        self._server = None

    async def _handle(self, requests: AsyncIterator[Packet], context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.streams += 1
        try:
            await _Exchange(self, context).run()
        finally:
            self.streams -= 1


class _Exchange:
    """One ``Proxy`` stream: one dial, then the relay."""

    def __init__(self, front: KonnectivityFront, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.front = front
        self.context = context
        self.peer = context.peer() or "unix"
        self.client_closed = False

    async def run(self) -> None:
        first = await self._first_packet()
        if first is None:
            return
        request = first.dialRequest
        target = request.address[:200]
        if request.protocol != "tcp":
            await self._refuse(request.random, target, 400, f"protocol {request.protocol[:20]!r} is not supported")
            return
        try:
            host, port = parse_authority(request.address)
        except ValueError as exc:
            await self._refuse(request.random, target, 400, f"invalid address {target!r}: {exc}")
            return
        if self.front.pending_dials >= self.front.limits.max_pending_dials:
            await self._refuse(request.random, target, 503, "too many dials pending; retry later")
            return
        # One read of the client's packets stays outstanding from here on (gRPC allows one at a time, and a read
        # whose task is cancelled still holds its place): during the dial it watches for DIAL_CLS, then it is the
        # relay's first read.
        pending_read: asyncio.Task[Any] = asyncio.create_task(self.context.read())
        try:
            await self._dial_and_relay(host, port, request.random, target, pending_read)
        finally:
            pending_read.cancel()

    async def _dial_and_relay(self, host: str, port: int, random: int, target: str,
                              pending_read: asyncio.Task[Any]) -> None:
        stream = await self._dial(host, port, random, target, pending_read)
        if stream is None:
            return
        connect_id = next(self.front._ids)
        try:
            await self.context.write(Packet(type=DIAL_RSP, dialResponse=DialResponse(random=random,
                                                                                        connectID=connect_id)))
        except BaseException:
            await stream.close()
            raise
        await self._relay(stream, connect_id, target, pending_read)

    async def _first_packet(self) -> Packet | None:
        try:
            async with asyncio.timeout(self.front.limits.first_packet_timeout):
                packet = await self.context.read()
        except TimeoutError:
            audit.warning("grpc refused: no DIAL_REQ within %g s", self.front.limits.first_packet_timeout,
                          extra={"peer": self.peer, "status": 408})
            return None
        if packet is grpc.aio.EOF:
            return None
        assert isinstance(packet, Packet)
        if packet.type != DIAL_REQ or not packet.HasField("dialRequest"):
            audit.warning("grpc refused: the first packet is not a DIAL_REQ",
                          extra={"peer": self.peer, "status": 400, "type": int(packet.type)})
            return None
        return packet

    async def _refuse(self, random: int, target: str, status: int, message: str) -> None:
        level = logging.WARNING if status in (400, 403) else logging.INFO
        audit.log(level, "grpc dial refused: %s", message, extra={"peer": self.peer, "target": target,
                                                                   "status": status})
        await self.context.write(Packet(type=DIAL_RSP, dialResponse=DialResponse(random=random, error=message)))

    async def _dial(self, host: str, port: int, random: int, target: str,
                    watch: asyncio.Task[Any]) -> Stream | None:
        """Dial while watching the client: a DIAL_CLS (or the client leaving) drops the dial."""
        front = self.front
        front.pending_dials += 1
        dial = asyncio.create_task(self._checked_dial(host, port))
        try:
            await asyncio.wait({dial, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            front.pending_dials -= 1
            if not dial.done():
                dial.cancel()
                reason = self._why_left(watch)
                log.info("grpc dial dropped: %s", reason, extra={"peer": self.peer, "target": target})
                with contextlib.suppress(asyncio.CancelledError, DialError):
                    stream = await dial
                    await stream.close()  # it finished as it was cancelled
        if dial.cancelled():
            return None
        try:
            return dial.result()
        except DialError as exc:
            await self._refuse(random, target, exc.status, exc.message)
            return None

    @staticmethod
    def _why_left(watch: asyncio.Task[Any]) -> str:
        if not watch.done() or watch.cancelled() or watch.exception() is not None:
            return "the client left"
        packet = watch.result()
        if packet is grpc.aio.EOF:
            return "the client ended the stream"
        if packet.type == DIAL_CLS:
            return "DIAL_CLS from the client"
        return f"unexpected packet type {int(packet.type)} during the dial"

    async def _checked_dial(self, host: str, port: int) -> Stream:
        return await self.front.dialer.dial(host, port)

    async def _relay(self, stream: Stream, connect_id: int, target: str, first_read: asyncio.Task[Any]) -> None:
        started = time.monotonic()
        moved = {"up": 0, "down": 0}
        up = asyncio.create_task(self._client_to_node(stream, connect_id, moved, first_read))
        down = asyncio.create_task(self._node_to_client(stream, connect_id, moved))
        broken: str | None = "the client left"
        try:
            done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            if down in done:
                broken = down.result()
            elif self.client_closed:
                broken = await down  # CLOSE_REQ closed the upstream: the reader answers CLOSE_RSP
            else:
                broken = "the client left without CLOSE_REQ"
        except Exception as exc:  # writing to a client that is gone
            broken = f"the client left: {type(exc).__name__}"
        finally:
            for task in (up, down):
                task.cancel()
            try:
                await asyncio.gather(up, down, return_exceptions=True)
            finally:  # also when this handler is cancelled while it waits (the front stopping): the channel is freed
                await stream.close()
            log.info("grpc stream closed: %s", broken or "clean",
                     extra={"peer": self.peer, "target": target, "connect_id": connect_id, "up": moved["up"],
                            "down": moved["down"], "seconds": round(time.monotonic() - started, 3)})

    async def _client_to_node(self, stream: Stream, connect_id: int, moved: dict[str, int],
                              first_read: asyncio.Task[Any]) -> None:
        """Client packets to the node, until CLOSE_REQ (then the upstream is closed) or the client leaves."""
        next_read: asyncio.Task[Any] | None = first_read
        while True:
            packet = await (next_read if next_read is not None else self.context.read())
            next_read = None
            if packet is grpc.aio.EOF:
                return
            assert isinstance(packet, Packet)
            if packet.type == DATA:
                if packet.data.connectID != connect_id:
                    log.info("grpc: DATA for another connection dropped", extra={"peer": self.peer})
                    continue
                try:
                    await stream.write(packet.data.data)
                except StreamError:
                    return  # the node side broke: the reader reports it
                moved["up"] += len(packet.data.data)
            elif packet.type in (CLOSE_REQ, DIAL_CLS):
                self.client_closed = True
                await stream.close()  # ends the reader, which answers CLOSE_RSP
                return

    async def _node_to_client(self, stream: Stream, connect_id: int, moved: dict[str, int]) -> str | None:
        """Node bytes to the client; then CLOSE_RSP, with the reason when the stream broke. Returns that reason."""
        error = ""
        try:
            while data := await stream.read(CHUNK):
                await self.context.write(Packet(type=DATA, data=Data(connectID=connect_id, data=data)))
                moved["down"] += len(data)
        except StreamError as exc:
            error = "" if self.client_closed else (str(exc) or "the stream broke")
        await self.context.write(Packet(type=CLOSE_RSP, closeResponse=CloseResponse(connectID=connect_id,
                                                                                    error=error)))
        return error or None
