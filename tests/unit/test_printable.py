"""The one sanitiser for text a peer chose, and the places that print such text without going through rich."""

from __future__ import annotations

from netnames.text import printable
from tunneld.cli import certs, render


def test_controls_bidi_and_separators_are_shown_as_escapes() -> None:
    assert printable("node-1 ok, café 10.0.0.1") == "node-1 ok, café 10.0.0.1"
    assert printable("a\x1b]0;t\x07b\x1b[2J") == "a\\x1b]0;t\\x07b\\x1b[2J"
    assert printable("x\u202ey\u2028z\x9b\x7f\n\t") == "x\\u202ey\\u2028z\\x9b\\x7f\\n\\t"
    assert printable("\U000e0041") == "\\U000e0041"  # a tag character: invisible, so escaped


def test_csr_table_and_status_render_escape_what_a_peer_sent() -> None:
    out = certs._table([["NAME", "REQUESTOR"], ["csr-1", "system:node:\x1b[31mevil"]])
    assert "\x1b" not in out and "system:node:\\x1b[31mevil" in out
    row = render.row({"node": "n\x1b", "address": "10.0.0.1\x07", "ssh_port": 22, "state": "down", "since": None,
                      "open_channels": 0, "bytes_in": 0, "bytes_out": 0, "last_error": "a\x1bb"})
    assert row[0] == "n\\x1b" and row[1] == "10.0.0.1\\x07:22" and row[-1] == "a\\x1bb"


def test_last_error_is_cut_between_words() -> None:
    text = "connect to 192.0.2.1:22: the node's sshd closed the connection during key exchange again"
    cut = render.shorten(text, 40)
    assert cut == "connect to 192.0.2.1:22: the node's..." and len(cut) <= 40
    assert render.shorten("x" * 100, 20) == "x" * 17 + "..."
    assert render.shorten("short", 20) == "short"
