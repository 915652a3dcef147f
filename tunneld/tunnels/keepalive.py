"""SSH keepalives sent from the timer's callback, with no Task per keepalive.

asyncssh's keepalive timer starts a Task per keepalive (``_make_keepalive_request``), which sends
``keepalive@openssh.com`` as a global request, awaits the answer and logs twice on the way. With 10,000 tunnels and
30 s keepalives that is 333 Tasks a second for an idle gateway. Here the timer's callback sends the same request
itself and the answer resets the count from a callback on the request's future, so the rules stay asyncssh's:

* the timer is re-armed on every packet received (asyncssh's ``_recv_data`` does that, and it arms this callback);
* each time it fires without anything received since, the count goes up and a keepalive is sent;
* any answer (OpenSSH answers ``keepalive@openssh.com`` with a failure) sets the count back to zero;
* a count over ``keepalive_count_max`` closes the connection as asyncssh does (``not responding to keepalive``).

It relies on asyncssh internals, so it is installed only when the connection has them (:func:`install` says whether
it was); otherwise asyncssh's own keepalive runs, unchanged.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import asyncssh

REQUEST = b"keepalive@openssh.com"
_FIELDS = ("_keepalive_count", "_keepalive_count_max", "_global_request_waiters", "_loop", "_transport")
_METHODS = ("_keepalive_timer_callback", "_set_keepalive_timer", "_send_global_request", "connection_lost",
            "is_client")


def install(conn: Any) -> bool:
    """Send ``conn``'s keepalives from the timer's callback from now on; False (nothing changed) if ``conn`` lacks
    what that needs."""
    if any(f not in conn.__dict__ for f in _FIELDS) or any(not callable(getattr(conn, m, None)) for m in _METHODS):
        return False
    conn._keepalive_timer_callback = partial(_fire, conn)
    return True


def uninstall(conn: Any) -> None:
    """Drop what :func:`install` added (the callback refers to the connection: a cycle the collector need not find)."""
    conn.__dict__.pop("_keepalive_timer_callback", None)


def _fire(conn: Any) -> None:
    """The keepalive timer fired: nothing was received for a whole interval."""
    conn._keepalive_count += 1
    if conn._keepalive_count > conn._keepalive_count_max:
        side = "Server" if conn.is_client() else "Client"
        conn.connection_lost(asyncssh.ConnectionLost(f"{side} not responding to keepalive"))
        return
    conn._set_keepalive_timer()
    if not conn._transport:
        return
    answered = conn._loop.create_future()
    answered.add_done_callback(partial(_answered, conn))
    conn._global_request_waiters.append(answered)
    conn._send_global_request(REQUEST, want_reply=True)


def _answered(conn: Any, answered: Any) -> None:
    """The node answered (or the connection closed, which answers every request waiting with a failure)."""
    if not answered.cancelled():
        conn._keepalive_count = 0
