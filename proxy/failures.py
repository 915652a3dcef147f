"""The one mapping from a failure to what the client gets, for every front.

:func:`answer` is called by the server core with whatever a handler raised:

- :class:`~proxy.errors.ClientGone`: nobody to answer; the connection is closed.
- any :class:`~proxy.errors.ProxyError` before a response started: its status and one-line message (as a Kubernetes
  ``Status`` object when the caller accepts JSON, else ``text/plain``), then close;
- after a response started (its head, or part of its body, is out): the connection is cut, never a second status
  line inside a body; a client reading the response sees it end short, or reset;
- anything else is a bug: logged with its traceback, answered 500 (or cut).

Refusals (4xx) are ``proxy.audit`` lines (warning for 401 and 403); failures on the way to a target (5xx) are
``proxy.audit`` info lines, so every request a front did not serve leaves one line saying why.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from proxy.errors import ClientGone, ProxyError

if TYPE_CHECKING:
    from proxy.server import Exchange

log = logging.getLogger("proxy.server")
audit = logging.getLogger("proxy.audit")

K8S_REASONS = {
    400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
    408: "Timeout", 409: "Conflict", 413: "RequestEntityTooLarge", 415: "UnsupportedMediaType", 422: "Invalid",
    429: "TooManyRequests", 431: "BadRequest", 503: "ServiceUnavailable", 504: "Timeout",
}
"""Kubernetes ``StatusReason`` for a status code (``InternalError`` for other 5xx, ``BadRequest`` for other 4xx)."""


def k8s_reason(status: int) -> str:
    return K8S_REASONS.get(status, "InternalError" if status >= 500 else "BadRequest")


def status_body(status: int, message: str, as_json: bool) -> tuple[str, bytes]:
    """(content type, body) of an error answer: a one-line text, or a Kubernetes ``Status`` object."""
    line = " ".join(message.split())  # one line, whatever the message held
    if not as_json:
        return "text/plain; charset=utf-8", (line + "\n").encode("utf-8", "replace")
    doc = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": line,
           "reason": k8s_reason(status), "code": status}
    return "application/json", (json.dumps(doc) + "\n").encode()


async def answer(ex: Exchange, exc: BaseException, front: str) -> None:
    """Answer (or cut) ``ex`` for ``exc`` raised by ``front``'s handler. The only place fronts' errors become
    responses."""
    if isinstance(exc, ClientGone):
        log.debug("%s: client gone: %s", front, exc, extra={"peer": str(ex.peer)})
        if ex.response_started:
            ex.abort()
        return
    if not isinstance(exc, ProxyError):
        log.error("%s: handler failed", front, exc_info=exc)
        exc = ProxyError("internal error")
    target = ex.current.target.decode("ascii", "replace")[:200] if ex.current is not None else ""
    extra = {**exc.details, "peer": str(ex.peer), "front": front, "target": target, "status": exc.status}
    level = logging.WARNING if exc.status in (401, 403) else logging.INFO
    what = "refused" if exc.status < 500 else "failed"
    if ex.response_started:
        audit.log(level, "%s: response cut short: %s", front, exc.message, extra=extra)
        ex.abort()
        return
    audit.log(level, "%s: %s: %s", front, what, exc.message, extra=extra)
    await ex.error(exc.status, exc.message, exc.headers)
