"""An apiserver-shaped Konnectivity gRPC client for tests: one ``/ProxyService/Proxy`` stream per dial, as
konnectivity-client does it (DIAL_REQ with a random id, DIAL_RSP, DATA both ways, CLOSE_REQ / CLOSE_RSP)."""

from __future__ import annotations

import random as _random
from pathlib import Path
from typing import Any

import grpc

from proxy.konnectivity_pb2 import (
    CLOSE_REQ,
    CLOSE_RSP,
    DATA,
    DIAL_CLS,
    DIAL_REQ,
    DIAL_RSP,
    CloseDial,
    CloseRequest,
    Data,
    DialRequest,
    Packet,
)

METHOD = "/ProxyService/Proxy"


class DialFailed(Exception):
    """DIAL_RSP carried an error (or the stream ended without one)."""


class Closed(Exception):
    """CLOSE_RSP arrived: ``error`` is empty for a clean end, the reason for a broken stream."""

    def __init__(self, error: str) -> None:
        super().__init__(error or "closed")
        self.error = error


class Client:
    """One gRPC channel to the gateway's unix socket; a stream per dial."""

    def __init__(self, path: Path) -> None:
        self.channel = grpc.aio.insecure_channel(f"unix:{path}")
        self._proxy = self.channel.stream_stream(METHOD, request_serializer=Packet.SerializeToString,
                                                 response_deserializer=Packet.FromString)

    def call(self) -> Any:
        return self._proxy()

    async def dial(self, address: str, random: int | None = None) -> Conn:
        call = self.call()
        rid = random if random is not None else _random.getrandbits(62) + 1
        await call.write(Packet(type=DIAL_REQ, dialRequest=DialRequest(protocol="tcp", address=address, random=rid)))
        answer = await call.read()
        if answer is grpc.aio.EOF:
            raise DialFailed("the stream ended before DIAL_RSP")
        assert answer.type == DIAL_RSP, answer
        assert answer.dialResponse.random == rid
        if answer.dialResponse.error:
            raise DialFailed(answer.dialResponse.error)
        assert answer.dialResponse.connectID != 0
        return Conn(call, answer.dialResponse.connectID)

    async def dial_and_cancel(self, address: str, rid: int = 77) -> Any:
        """Send DIAL_REQ, then DIAL_CLS at once; return what the stream answers next (EOF expected)."""
        call = self.call()
        await call.write(Packet(type=DIAL_REQ, dialRequest=DialRequest(protocol="tcp", address=address, random=rid)))
        await call.write(Packet(type=DIAL_CLS, closeDial=CloseDial(random=rid)))
        return await call.read()

    async def close(self) -> None:
        await self.channel.close()


class Conn:
    """A dialled connection: bytes in DATA packets, ended by CLOSE_RSP."""

    def __init__(self, call: Any, connect_id: int) -> None:
        self.call = call
        self.connect_id = connect_id

    async def write(self, data: bytes) -> None:
        await self.call.write(Packet(type=DATA, data=Data(connectID=self.connect_id, data=data)))

    async def read(self) -> bytes:
        """The next DATA payload; raises :class:`Closed` at CLOSE_RSP."""
        packet = await self.call.read()
        if packet is grpc.aio.EOF:
            raise Closed("the stream ended without CLOSE_RSP")
        if packet.type == CLOSE_RSP:
            assert packet.closeResponse.connectID == self.connect_id
            raise Closed(packet.closeResponse.error)
        assert packet.type == DATA and packet.data.connectID == self.connect_id, packet
        return bytes(packet.data.data)

    async def read_all(self) -> tuple[bytes, str]:
        """Everything until CLOSE_RSP, and its error text."""
        chunks = []
        while True:
            try:
                chunks.append(await self.read())
            except Closed as end:
                return b"".join(chunks), end.error

    async def close(self) -> str:
        """CLOSE_REQ; returns CLOSE_RSP's error text (data still in flight is discarded)."""
        await self.call.write(Packet(type=CLOSE_REQ, closeRequest=CloseRequest(connectID=self.connect_id)))
        while True:
            try:
                await self.read()
            except Closed as end:
                return end.error
