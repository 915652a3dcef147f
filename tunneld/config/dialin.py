"""``[dialin]``: the SSH listener that dial-in nodes' OpenSSH clients connect to (no table: no listener)."""

from __future__ import annotations

from pathlib import Path

from netnames import split_host_port
from tunneld.config.reader import Section
from tunneld.config.schema import DialinSettings


def dialin_section(d: Section, present: bool) -> DialinSettings | None:
    """Parse ``[dialin]``; None when the table is absent. ``listen``, ``host_key``, ``host_certificate`` and
    ``user_ca`` are required: a node must be able to verify the gateway, and the gateway the node."""
    if not present:
        return None
    listen = d.get("listen", str, "0.0.0.0:2022")
    try:
        split_host_port(listen)
    except ValueError as exc:
        d.problem("listen", str(exc))
    required: dict[str, Path] = {}
    for key, why in (("host_key", "the gateway's SSH host key"),
                     ("host_certificate", "its certificate from the cluster SSH CA (tunneld ssh sign-host)"),
                     ("user_ca", "the SSH user CA's public key that signs nodes' certificates (ssh_user_ca.pub)")):
        value = d.path(key, None)
        if value is None:
            d.problem(key, f"required ({why})")
            value = Path("/nonexistent")
        required[key] = value
    settings = DialinSettings(
        listen=listen,
        host_key=required["host_key"],
        host_certificate=required["host_certificate"],
        user_ca=required["user_ca"],
        revoked_keys=d.path("revoked_keys", None),
        max_connections=d.integer("max_connections", 10_000, minimum=1, maximum=1_000_000),
        max_concurrent_handshakes=d.integer("max_concurrent_handshakes", 64, minimum=1, maximum=100_000),
        login_grace=d.number("login_grace", 10.0),
        replace_grace=d.number("replace_grace", 30.0, above=None),
        socks_timeout=d.number("socks_timeout", 10.0),
        keepalive_interval=d.number("keepalive_interval", 15.0),
        keepalive_count_max=d.integer("keepalive_count_max", 3, minimum=1, maximum=100),
    )
    d.unknown()
    if settings.replace_grace < 0:
        d.problem("replace_grace", "must be 0 or more seconds")
    return settings
