"""The egress front: HTTP CONNECT, as kube-apiserver's EgressSelectorConfiguration ``HTTPConnect`` transport uses it.

The apiserver opens a fresh connection per dial and sends ``CONNECT host:port HTTP/1.1`` with ``Host: 127.0.0.1``
(the target is the request line's authority, never the Host header). We check the destination policy, dial through
the owning node's tunnel, and only then answer ``HTTP/1.1 200 Connection established`` with no headers and nothing
after them (the apiserver refuses a 200 followed by unexpected bytes), then splice bytes both ways. A failure is a
status line with a one-line reason, then close: 403 not allowed, 503 no tunnel, 502 tunnel down or refused, 504 dial
timeout. Any other method gets 405. The dialer checks the destination policy; failures are typed errors the server
answers (:mod:`proxy.failures`).

Who may connect is decided by the listener: permissions on the unix socket, or a client certificate on TCP.
"""

from __future__ import annotations

import logging
import time

import h11

from netnames import split_authority
from proxy.dialer import Dialer
from proxy.errors import BadRequest, RouteError
from proxy.server import Exchange
from proxy.splice import StreamLimits, splice

log = logging.getLogger("proxy.connect")


def parse_authority(target: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host in its normal form, port); raises ValueError.

    ASCII only, no IPv6 zone identifier, and the host normalised (:func:`netnames.split_authority`): what the policy
    checks must be exactly what the node's sshd is asked to connect to.
    """
    return split_authority(target)


class ConnectFront:
    """Serves CONNECT requests through a :class:`Dialer` (a :class:`~proxy.policy.PolicyDialer` in the gateway)."""

    def __init__(self, dialer: Dialer) -> None:
        self.dialer = dialer

    async def __call__(self, ex: Exchange) -> None:
        request = await ex.request()
        if request is None:
            return
        if request.method != b"CONNECT":
            raise RouteError(405, "this endpoint only supports CONNECT", [("Allow", "CONNECT")])
        target = request.target.decode("ascii", "replace")
        try:
            host, port = parse_authority(target)
        except ValueError as exc:
            raise BadRequest(f"invalid CONNECT target {target[:200]!r}: {exc}") from exc
        started = time.monotonic()
        stream = await self.dialer.dial(host, port)
        try:
            await ex.send(h11.Response(status_code=200, headers=[], reason=b"Connection established"))
        except BaseException:
            await stream.close()
            raise
        limits = StreamLimits(ex.limits.stream_idle_timeout, ex.limits.stream_max_lifetime)
        result = await splice(ex.reader, ex.writer, stream, to_stream=ex.switched(), limits=limits,
                              peer=str(ex.peer), target=target)
        log.info(
            "connect closed", extra={"peer": str(ex.peer), "target": target, "up": result.upstream_bytes,
                                     "down": result.downstream_bytes, "seconds": round(time.monotonic() - started, 3),
                                     "error": result.broken},
        )
