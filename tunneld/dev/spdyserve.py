"""Exec, attach and port-forward over SPDY/3.1, as the kubelet's streaming server serves them.

After the ``101`` the client opens one SPDY stream per channel, naming it in the ``streamtype`` header:

* exec/attach (``v4``/``v3``/``v2.channel.k8s.io``, ``channel.k8s.io``): ``error`` always, ``stdin`` (``input=1``),
  ``stdout`` (``output=1``), ``stderr`` (``error=1``, not with a tty), ``resize`` (``tty=1``). The server waits (at
  most :data:`STREAM_CREATION_TIMEOUT`) for exactly the streams the query asked for, runs the command, writes the
  final ``metav1.Status`` on ``error``, half-closes every stream and ends the session (GOAWAY). Stdin ends with the
  client's FIN on ``stdin``. Streams of an unknown type are ignored, as the kubelet does.
* port-forward (``portforward.k8s.io``): per forwarded connection a pair, ``error`` and ``data``, each with ``port``
  and ``requestid`` headers (without ``requestid`` the pair is guessed from the stream ids, as the kubelet does for
  old clients). A stream with a missing or bad ``port``/``streamtype`` is reset. Once both arrived the pod port is
  dialled; a failure is written on ``error``; bytes are copied both ways, a FIN on ``data`` half-closes the pod
  connection; a pair incomplete after :data:`STREAM_CREATION_TIMEOUT` gets an error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from proxy.spdy import Session, SPDYError, SPDYStream
from tunneld.dev.channels import ERROR, RESIZE, STDERR, STDIN, STDOUT, Frame
from tunneld.dev.commands import exec_session
from tunneld.dev.containerfs import ContainerFS

log = logging.getLogger("tunneld.dev.kubelet")

EXEC_SPDY = ("v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io")
"""X-Stream-Protocol-Version values a kubelet 1.32 accepts for exec and attach."""
PORTFORWARD_SPDY = ("portforward.k8s.io",)
"""X-Stream-Protocol-Version values a kubelet 1.32 accepts for port-forward."""
STREAM_CREATION_TIMEOUT = 10.0
READ = 64 * 1024


@dataclass
class ExecRequest:
    """What an exec or attach asked for (from the kubelet URL's query)."""

    argv: list[str]
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool
    fs: ContainerFS = field(default_factory=ContainerFS)

    def expected(self) -> set[str]:
        wanted = {"error"}
        wanted |= {"stdin"} if self.stdin else set()
        wanted |= {"stdout"} if self.stdout else set()
        wanted |= {"stderr"} if self.stderr and not self.tty else set()
        wanted |= {"resize"} if self.tty else set()
        return wanted


class SPDYProcess:
    """The :class:`~tunneld.dev.commands.ProcessIO` of an exec over SPDY streams."""

    def __init__(self, session: Session, streams: dict[str, SPDYStream], tty: bool) -> None:
        self.session = session
        self.streams = streams
        self.tty = tty
        self._frames: asyncio.Queue[Frame | None] = asyncio.Queue(maxsize=16)
        self._pumps = [asyncio.create_task(self._pump(streams[k], ch)) for k, ch in (("stdin", STDIN),
                                                                                      ("resize", RESIZE))
                       if k in streams]
        self._open = len(self._pumps)
        if not self._pumps:
            self._frames.put_nowait(None)

    async def _pump(self, stream: SPDYStream, channel: int) -> None:
        try:
            while data := await stream.read():
                await self._frames.put(Frame(channel, data))
            if channel == STDIN:
                await self._frames.put(Frame(STDIN, close=True))
        except SPDYError:
            pass
        except asyncio.CancelledError:
            self._open -= 1
            raise  # close() cancelled us: nobody reads frames any more, so no end marker (the queue may be full)
        self._open -= 1
        if self._open == 0:
            await self._frames.put(None)

    async def receive(self) -> Frame | None:
        return await self._frames.get()

    async def send(self, channel: int, data: bytes) -> bool:
        name = {STDOUT: "stdout", STDERR: "stdout" if self.tty else "stderr", ERROR: "error"}.get(channel)
        stream = self.streams.get(name or "")
        if stream is None:
            return True  # the client did not ask for this stream: the output goes nowhere
        try:
            await stream.write(data)
        except (SPDYError, ConnectionError, OSError):
            return False
        return True

    async def close(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):  # a client that reads nothing cannot hold the end up
                for name in ("stdout", "stderr", "error"):
                    if name in self.streams:
                        with contextlib.suppress(SPDYError, ConnectionError, OSError):
                            await self.streams[name].close()
        for task in self._pumps:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        await self.session.close()


async def serve_exec(session: Session, incoming: asyncio.Queue[SPDYStream | None], request: ExecRequest) -> None:
    """Collect the expected streams, run the command, end the session."""
    wanted = request.expected()
    streams: dict[str, SPDYStream] = {}
    try:
        async with asyncio.timeout(STREAM_CREATION_TIMEOUT):
            while not wanted <= streams.keys():
                stream = await incoming.get()
                if stream is None:
                    await session.close()
                    return
                kind = stream.header("streamtype")
                if kind in wanted and kind not in streams:
                    streams[kind] = stream
    except TimeoutError:
        missing = ", ".join(sorted(wanted - streams.keys()))
        log.info("exec: timed out waiting for client to create streams (%s)", missing)
        await session.close()
        return
    process = SPDYProcess(session, streams, request.tty)
    try:
        await exec_session(process, request.argv, request.stdin, request.fs)
    finally:
        for task in process._pumps:  # the session cut or cancelled mid-command: no pump outlives it
            task.cancel()


Connect = Callable[[int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@dataclass
class _Pair:
    data: SPDYStream | None = None
    error: SPDYStream | None = None
    task: asyncio.Task[None] | None = None


def _port(stream: SPDYStream) -> int | None:
    value = stream.header("port")
    return int(value) if value.isascii() and value.isdigit() and 0 < int(value) < 65536 else None


async def _forward_pair(pair: _Pair, connect: Connect, describe: str) -> None:
    assert pair.data is not None and pair.error is not None
    data, error = pair.data, pair.error
    port = _port(data) or 0
    writer: asyncio.StreamWriter | None = None
    try:
        try:
            reader, writer = await connect(port)
        except OSError as exc:
            await error.write(f"error forwarding port {port} to pod {describe}: {exc}".encode())
            return

        async def to_pod() -> None:
            assert writer is not None
            while chunk := await data.read():
                writer.write(chunk)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

        async def from_pod() -> None:
            while chunk := await reader.read(READ):
                await data.write(chunk)

        up = asyncio.create_task(to_pod())
        try:
            await from_pod()
            await asyncio.wait_for(up, STREAM_CREATION_TIMEOUT)  # the client's side ends soon after the pod's
        finally:
            up.cancel()
            await asyncio.gather(up, return_exceptions=True)
    except (SPDYError, ConnectionError, OSError, TimeoutError) as exc:
        log.debug("port-forward to %s port %d ended: %s", describe, port, exc)
    finally:
        if writer is not None:
            writer.close()
        for stream in (data, error):
            with contextlib.suppress(SPDYError, ConnectionError, OSError):
                await stream.close()


async def serve_portforward(session: Session, incoming: asyncio.Queue[SPDYStream | None], connect: Connect,
                            describe: str) -> None:
    """Serve stream pairs until the session ends."""
    pairs: dict[str, _Pair] = {}
    tasks: set[asyncio.Task[None]] = set()

    async def expire(request_id: str) -> None:
        await asyncio.sleep(STREAM_CREATION_TIMEOUT)
        pair = pairs.pop(request_id, None)
        if pair is not None and pair.task is None and pair.error is not None:
            with contextlib.suppress(SPDYError, ConnectionError, OSError):
                await pair.error.write(f"timed out waiting for streams of request {request_id}".encode())
                await pair.error.close()

    try:
        while (stream := await incoming.get()) is not None:
            kind = stream.header("streamtype")
            if _port(stream) is None or kind not in ("data", "error"):
                await stream.reset()
                continue
            request_id = stream.header("requestid") or str(stream.id if kind == "error" else stream.id - 2)
            pair = pairs.get(request_id)
            if pair is None:
                pair = pairs[request_id] = _Pair()
                tasks.add(asyncio.create_task(expire(request_id)))
            if getattr(pair, kind) is not None:
                if pair.error is not None:
                    await pair.error.write(f"error processing stream for request {request_id}: "
                                           f"{kind} stream already assigned".encode())
                await stream.reset()
                continue
            setattr(pair, kind, stream)
            if pair.data is not None and pair.error is not None:
                pairs.pop(request_id, None)
                pair.task = asyncio.create_task(_forward_pair(pair, connect, describe))
                tasks.add(pair.task)
            tasks = {t for t in tasks if not t.done()}
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()
