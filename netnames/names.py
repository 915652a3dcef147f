"""Host names, DNS subdomain names and IP literals: what is valid, and the one normal form of a host.

Validators take any object (a value read from TOML or JSON may be a number or a list) and accept only strings.
Patterns are matched with ``fullmatch``: ``"node-1\\n"`` is not ``"node-1"``.
"""

from __future__ import annotations

import functools
import ipaddress
import re

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_NAME_LENGTH = 253
MAX_LABEL_LENGTH = 63

_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_SUBDOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_HOST_LABEL = r"[A-Za-z0-9](?:[-A-Za-z0-9]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_dns_label(value: object) -> bool:
    """An RFC 1123 label as Kubernetes uses it (namespaces): lower-case letters, digits and '-', 1-63 characters."""
    return isinstance(value, str) and len(value) <= MAX_LABEL_LENGTH and "." not in value and is_dns_subdomain(value)


def is_dns_subdomain(value: object) -> bool:
    """An RFC 1123 subdomain as Kubernetes uses it (node, pod, service and CSR names): dot-separated labels of
    lower-case letters, digits and '-', each 1-63 characters, at most 253 in all."""
    return isinstance(value, str) and len(value) <= MAX_NAME_LENGTH and _SUBDOMAIN.fullmatch(value) is not None


def parse_ip(value: object) -> IPAddress:
    """An IP literal (IPv6 without brackets) in its parsed form; no IPv6 zone id (``fe80::1%eth0``). Raises
    ValueError."""
    if not isinstance(value, str):
        raise ValueError(f"{_show(value)} is not an IP address (not a string)")
    if "%" in value:
        raise ValueError(f"{_show(value)}: IPv6 zone identifiers are not allowed")
    if not value.isascii():
        raise ValueError(f"{_show(value)} is not an IP address")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{_show(value)} is not an IP address") from None


def parse_network(value: object, *, strict: bool = True) -> IPNetwork:
    """A CIDR such as ``10.244.1.0/24``; with ``strict`` no host bits may be set. Raises ValueError."""
    if not isinstance(value, str) or "%" in value or not value.isascii():
        raise ValueError(f"{_show(value)} is not a network in CIDR notation")
    try:
        return ipaddress.ip_network(value, strict=strict)
    except ValueError as exc:
        raise ValueError(f"{_show(value)}: {exc}") from None


def is_ip(value: object) -> bool:
    """Whether ``value`` is an IP literal :func:`parse_ip` accepts."""
    try:
        parse_ip(value)
    except ValueError:
        return False
    return True


def is_host_name(value: object) -> bool:
    """A DNS host name (any case, no trailing dot, labels of letters, digits and '-'), and not a mistyped IPv4
    address: a top-level label is never all digits, so ``10.0.0.256`` is refused."""
    return (isinstance(value, str) and len(value) <= MAX_NAME_LENGTH and _HOST_NAME.fullmatch(value) is not None
            and not value.rsplit(".", 1)[-1].isdigit())


def parse_host(value: object) -> str:
    """A host as a peer or a config file may write it -- an IP literal (IPv6 optionally in brackets) or a host name
    (optionally with one trailing dot, as may an IPv4 address have) -- in its normal form (:func:`normalize_host`).
    Raises ValueError."""
    if not isinstance(value, str):
        raise ValueError(f"{_show(value)} is not a host (not a string)")
    if value.startswith("[") and value.endswith("]"):
        ip = parse_ip(value[1:-1])
        if ip.version != 6:
            raise ValueError(f"{_show(value)}: only IPv6 addresses are written in brackets")
        return str(ip)
    name = value[:-1] if value.endswith(".") else value
    if is_ip(name) and ":" not in name:  # "127.0.0.1." is the address, as a resolver reads it
        return str(parse_ip(name))
    if is_ip(value):
        return str(parse_ip(value))
    if is_host_name(name):
        return name.lower()
    if "%" in value:
        raise ValueError(f"{_show(value)}: IPv6 zone identifiers are not allowed")
    raise ValueError(f"{_show(value)} is neither an IP address nor a host name")


@functools.lru_cache(maxsize=4096)
def host_key(host: str) -> tuple[str, IPAddress | None]:
    """A host as lookups key it, without validating it: ``[v6]`` brackets dropped, one trailing dot dropped, an IP
    literal in its canonical form (and parsed), a name lower-cased. A zone id makes it no IP at all.

    A pure function of the string, remembered for the last few thousand hosts: each dial keys its host several times
    (policy, owner lookup, the channel request), and parsing an IP literal is most of what a dial costs in Python."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if bare.endswith("."):
        bare = bare[:-1]
    try:
        ip = parse_ip(bare)
    except ValueError:
        return bare.lower(), None
    return str(ip), ip


def normalize_host(host: str) -> str:
    """The normal form of a host: canonical IP literal (no brackets), or a lower-case name without a trailing dot.
    Two spellings of one host have one normal form; this is what policy checks and what a node is asked for."""
    return host_key(host)[0]
