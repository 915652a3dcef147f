"""Ports and port ranges: what is valid, as numbers, and sets of ranges."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_DIGITS = re.compile(r"[0-9]{1,5}")
_RANGE = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")
_PORT_NAME = re.compile(r"(?=.*[a-z])[a-z0-9](?:[-a-z0-9]{0,13}[a-z0-9])?")


def parse_port(value: object, *, allow_zero: bool = False) -> int:
    """A TCP port: an int (not a bool) or a string of ASCII digits, 1-65535 (0 too with ``allow_zero``).
    Raises ValueError."""
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise ValueError(f"{value!r} is not a port number")
    if not (0 if allow_zero else 1) <= number <= 65535:
        raise ValueError(f"{value!r} is not a port (1-65535)")
    return number


def is_port_name(value: object) -> bool:
    """An IANA service name as Kubernetes names ports: 1-15 lower-case letters, digits and '-', at least one
    letter, no leading or trailing '-'."""
    return isinstance(value, str) and _PORT_NAME.fullmatch(value) is not None


def parse_port_range(item: object) -> tuple[int, int]:
    """A port (``10250``, ``"10250"``) or an inclusive range (``"30000-32767"``) as (low, high). Raises ValueError."""
    if isinstance(item, int) and not isinstance(item, bool):
        port = parse_port(item)
        return port, port
    m = _RANGE.fullmatch(item) if isinstance(item, str) else None
    if m is None:
        raise ValueError(f"{item!r} is not a port (1-65535) or a range such as \"30000-32767\"")
    low, high = int(m[1]), int(m[2] or m[1])
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"{item!r} is not a port (1-65535) or a range such as \"30000-32767\"")
    return low, high


@dataclass(frozen=True)
class PortSet:
    """Ports as inclusive ranges."""

    ranges: tuple[tuple[int, int], ...] = ()

    @classmethod
    def parse(cls, items: Iterable[object]) -> PortSet:
        """From ``[10250, "30000-32767"]``; raises ValueError on a bad item."""
        return cls(tuple(parse_port_range(item) for item in items))

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and any(a <= port <= b for a, b in self.ranges)
