"""Cutting or asking about a connection that is already closed is a no-op, under asyncio and uvloop alike.

uvloop's socket object raises ValueError ("negative file descriptor"), not OSError, once its connection is closed:
a reset at the end of a stream whose client had gone then escaped as "Task exception was never retrieved".
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest
import uvloop

from netnames import peer_cred
from proxy.spliceends import reset

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop,
                                                             "uvloop": uvloop.new_event_loop}


def _run(factory: Callable[[], asyncio.AbstractEventLoop], family: int, tmp_path: object) -> list[str]:
    async def main() -> list[str]:
        seen: list[str] = []
        if family == socket.AF_UNIX:
            path = f"{tmp_path}/s"
            server = await asyncio.start_unix_server(lambda r, w: None, path)
            _reader, writer = await asyncio.open_unix_connection(path)
        else:
            server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket")  # the front asks early (peer credentials); uvloop keeps that object
        writer.transport.abort()
        await asyncio.sleep(0)  # the abort completes on the next turn (closing the descriptor)
        await asyncio.sleep(0)
        reset(writer)  # must not raise
        seen.append("reset")
        seen.append(repr(peer_cred(writer.get_extra_info("socket"))))
        server.close()
        await server.wait_closed()
        return seen

    loop = factory()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_UNIX], ids=["tcp", "unix"])
def test_reset_and_peer_cred_of_a_closed_connection(loop_name: str, family: int, tmp_path: object) -> None:
    assert _run(LOOPS[loop_name], family, tmp_path) == ["reset", "None"]
