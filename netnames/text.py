"""Remote text made safe to show: the one sanitiser for every string a peer chose (an sshd's DISCONNECT message, a
probe's answer, a node address read from an API) before it reaches a terminal or a log line.

A character that is not printable (C0/C1 controls such as ESC and BEL, DEL, bidi overrides and other format
characters, line separators) is shown as a Python-style escape (``\\x1b``, ``\\u202e``) instead of being obeyed, so
an ANSI/OSC sequence can neither recolour, retitle nor rewrite the operator's screen, nor forge a log line.
"""

from __future__ import annotations

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str) -> str:
    """``text`` with every non-printable character shown as an escape (unchanged when all of it is printable)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)

