"""One HTTP/1.1 GET over a :class:`~proxy.dialer.Stream`, framed by h11, with a bound on what it keeps.

Used where the gateway itself asks something of a node: the health probe and the kubelets' ``/pods`` listings.
"""

from __future__ import annotations

import h11

from proxy.dialer import Stream, StreamError

READ = 64 * 1024


async def get(stream: Stream, authority: str, path: str, *, max_body: int,
              headers: list[tuple[str, str]] | None = None) -> tuple[int, bytes, bool]:
    """GET ``path`` from ``authority`` over ``stream`` (left open); returns (status, body, complete).

    Reading stops once the body exceeds ``max_body`` bytes: ``complete`` is then False and the body is cut there.
    Raises :class:`StreamError` for an answer that is not HTTP or ends early.
    """
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target=path, headers=[("Host", authority), *(headers or [])])
    await stream.write(conn.send(request) + conn.send(h11.EndOfMessage()))
    status, body = 0, bytearray()
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.read(READ))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_body:
                    return status, bytes(body[:max_body]), False
            elif isinstance(event, h11.EndOfMessage):
                return status, bytes(body), True
            elif isinstance(event, h11.ConnectionClosed):
                raise StreamError("connection closed before the response was complete")
    except h11.RemoteProtocolError as exc:
        raise StreamError(f"not an HTTP response: {exc}") from exc
