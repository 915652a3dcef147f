"""Log lines: one line per event, logfmt or JSON, with node/channel context from ``extra=``.

Never pass keys or tokens to a logger. As a second line of defence every formatted line goes through
:func:`redact`, which removes what a secret looks like (PEM/OpenSSH private key blocks, bootstrap tokens'
secret halves, ``Bearer`` credentials other than a short lower-case word), the values of context fields whose names
say they are secret (``token``, ``password``, ``secret``, ``private_key``, ``authorization``; not ``*_id``,
``*_file``, ``*_path``), and any literal value registered with :func:`add_secret` (the daemon registers every token
of the static token file when it reads it). Control characters
(newlines, ESC, ...) inside a message or a context value are escaped in both formats, so one event is always one
line and a peer's escape sequence is never obeyed.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Mapping

from netnames.text import printable

# Attributes every LogRecord has; anything else came in through ``extra=`` and is context worth printing.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


_SECRET_FIELD = re.compile(r"token|password|passwd|secret|private_key|privatekey|authorization|credential", re.I)
# ...unless the name says it holds an identifier or a location: ``token_id`` is public (kubeadm prints it),
# ``token_file`` is a path. Their values still go through :func:`redact`.
_PUBLIC_FIELD = re.compile(r"_(?:id|ids|file|path)$", re.I)
_PATTERNS = [
    (re.compile(r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)", re.S),
     "[redacted private key]"),
    # A bootstrap token is "<id>.<secret>": the id is public (kubeadm prints it), the secret is not.
    (re.compile(r"\b([a-z0-9]{6})\.[a-z0-9]{16}\b"), r"\1.[redacted]"),
    # A credential after "Bearer"/"Basic", but not a short lower-case word: the daemon's own sentences ("a valid
    # bearer token or client certificate") stay readable. Tokens from the token file are scrubbed as literals.
    (re.compile(r"(?i)\b(bearer|basic)(\s+)(?-i:(?![a-z]{1,15}(?![A-Za-z0-9._~+/=-])))[A-Za-z0-9._~+/=-]{4,}"),
     r"\1\2[redacted]"),
]
_secrets: set[str] = set()
_secrets_lock = threading.Lock()
MIN_SECRET_LENGTH = 6


def add_secret(value: str) -> None:
    """Never print ``value`` (e.g. a token read from a file) in a log line from now on."""
    if len(value) >= MIN_SECRET_LENGTH:
        with _secrets_lock:
            _secrets.add(value)


def redact(text: str) -> str:
    """``text`` without anything that is or looks like a secret."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    with _secrets_lock:
        known = sorted(_secrets, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, "[redacted]")
    return text


def _context(record: logging.LogRecord) -> dict[str, object]:
    return {
        k: "[redacted]" if _SECRET_FIELD.search(k) and not _PUBLIC_FIELD.search(k) else v
        for k, v in record.__dict__.items()
        if k not in _STANDARD and v is not None
    }


def _timestamp(record: logging.LogRecord) -> str:
    ms = int(record.msecs)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{ms:03d}Z"


def _fields(
    formatter: logging.Formatter, record: logging.LogRecord, context: Mapping[str, object]
) -> dict[str, object]:
    """The event's fields in order (time, level, logger, message, context, exception), each string redacted."""
    fields: dict[str, object] = {
        "ts": _timestamp(record),
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
        **context,
    }
    if record.exc_info:
        fields["exc"] = formatter.formatException(record.exc_info)
    return {k: redact(v) if isinstance(v, str) else v for k, v in fields.items()}


class LogfmtFormatter(logging.Formatter):
    """``ts=… level=… logger=… msg="…" node=…``"""

    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(self, record, _context(record))
        return redact(" ".join(f"{k}={_quote(v)}" for k, v in fields.items()))


def _quote(value: object) -> str:
    """A logfmt value: bare when it is printable and has nothing logfmt must quote, else a JSON string (so an escape
    sequence or a line break a peer put in a message is shown as ``\\u001b``/``\\n``, never obeyed or split)."""
    text = str(value)
    if text and printable(text) == text and not any(c in text for c in ' "=\\'):
        return text
    return json.dumps(text)


class JSONFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        context = {k: v if isinstance(v, int | float | bool) else str(v) for k, v in _context(record).items()}
        return redact(json.dumps(_fields(self, record, context)))


def setup(level: str = "info", fmt: str = "logfmt") -> None:
    """Send all ``tunneld`` (and library) logs to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in ("tunneld", "proxy", "certs"):
        logging.getLogger(name).setLevel(level.upper())
    # asyncssh logs every channel at INFO; its warnings are enough.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
