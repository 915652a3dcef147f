"""Revoked dial-in certificates: an OpenSSH key revocation list (``ssh-keygen -k``), or a plain list of public keys.

The binary KRL format (OpenSSH's PROTOCOL.krl): a header (``SSHKRL\\n\\0`` magic, format version 1, KRL version,
date, flags, reserved, comment), then sections, each ``byte type, string data``:

- certificates (1): ``string ca_key`` (empty: any CA), ``string reserved``, then subsections ``byte type, string
  data``: serial list (0x20, uint64s), serial range (0x21, min and max), serial bitmap (0x22, ``uint64 offset,
  mpint bitmap``: bit *i* revokes serial offset+*i*), key ids (0x23, strings);
- explicit keys (2): public key blobs; SHA-1 (3) and SHA-256 (5) fingerprints of key blobs;
- signatures (4) end the list (a signed KRL's signature is not checked: the file is trusted like the config).

Parsing is bounded by the file's size (read at most :data:`MAX_SIZE`); a malformed file is an error, never
"nothing revoked".
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path

from tunneld.tunnels.dialin_identity import CertFacts

MAGIC = b"SSHKRL\n\0"
MAX_SIZE = 64 * 1024 * 1024


class KRLError(ValueError):
    """The revocation list cannot be read or parsed."""


@dataclass
class _CASection:
    serials: set[int] = field(default_factory=set)
    ranges: list[tuple[int, int]] = field(default_factory=list)
    bitmaps: list[tuple[int, int]] = field(default_factory=list)  # (offset, bitmap as an int)
    key_ids: set[str] = field(default_factory=set)


@dataclass
class Revocations:
    """What a KRL revokes."""

    by_ca: dict[bytes, _CASection] = field(default_factory=dict)
    keys: set[bytes] = field(default_factory=set)
    sha1: set[bytes] = field(default_factory=set)
    sha256: set[bytes] = field(default_factory=set)

    def revoked(self, facts: CertFacts) -> str | None:
        """Why ``facts``' certificate (or its key) is revoked, or None."""
        for blob in (facts.key_blob,):
            if blob in self.keys:
                return "its key is listed"
            if hashlib.sha1(blob).digest() in self.sha1 or hashlib.sha256(blob).digest() in self.sha256:
                return "its key's fingerprint is listed"
        for ca in (facts.ca_blob, b""):
            section = self.by_ca.get(ca)
            if section is None:
                continue
            serial = facts.serial
            if serial in section.serials or any(lo <= serial <= hi for lo, hi in section.ranges):
                return "its serial is listed"
            if any(serial >= off and (bits >> (serial - off)) & 1 for off, bits in section.bitmaps):
                return "its serial is listed"
            if facts.key_id in section.key_ids:
                return "its key id is listed"
        return None


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise KRLError("truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def string(self) -> bytes:
        return self.take(self.u32())

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)


def parse_krl(data: bytes) -> Revocations:
    """Parse a binary KRL. Raises :class:`KRLError`."""
    r = _Reader(data)
    if r.take(8) != MAGIC:
        raise KRLError("not an OpenSSH KRL (bad magic)")
    if r.u32() != 1:
        raise KRLError("unsupported KRL format version")
    r.u64(), r.u64(), r.u64()  # krl version, generated date, flags
    r.string(), r.string()  # reserved, comment
    out = Revocations()
    while not r.done:
        kind, body = r.u8(), _Reader(r.string())
        if kind == 1:
            _certificates(body, out)
        elif kind in (2, 3, 5):
            target = {2: out.keys, 3: out.sha1, 5: out.sha256}[kind]
            while not body.done:
                target.add(body.string())
        elif kind == 4:
            break  # signatures follow; everything revoked has been read
        else:
            raise KRLError(f"unknown section type {kind}")
    return out


def _certificates(body: _Reader, out: Revocations) -> None:
    ca = body.string()
    body.string()  # reserved
    section = out.by_ca.setdefault(ca, _CASection())
    while not body.done:
        kind, sub = body.u8(), _Reader(body.string())
        if kind == 0x20:
            while not sub.done:
                section.serials.add(sub.u64())
        elif kind == 0x21:
            lo, hi = sub.u64(), sub.u64()
            if lo > hi:
                raise KRLError("serial range with min > max")
            section.ranges.append((lo, hi))
        elif kind == 0x22:
            offset = sub.u64()
            section.bitmaps.append((offset, int.from_bytes(sub.string(), "big")))
        elif kind == 0x23:
            while not sub.done:
                section.key_ids.add(sub.string().decode("utf-8", errors="replace"))
        else:
            raise KRLError(f"unknown certificate subsection type {kind:#x}")


def parse_key_list(text: str) -> Revocations:
    """A plain list of OpenSSH public keys (``type base64 [comment]`` lines; ``#`` comments)."""
    out = Revocations()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 2:
            raise KRLError(f"line {number}: not a public key")
        try:
            out.keys.add(base64.b64decode(parts[1], validate=True))
        except (binascii.Error, ValueError) as exc:
            raise KRLError(f"line {number}: not a public key ({exc})") from None
    return out


def load(path: Path) -> Revocations:
    """Read ``path`` (a KRL or a public key list). Raises :class:`KRLError`."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_SIZE + 1)
    except OSError as exc:
        raise KRLError(f"{path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_SIZE:
        raise KRLError(f"{path}: larger than {MAX_SIZE} bytes")
    try:
        return parse_krl(data) if data.startswith(MAGIC) else parse_key_list(data.decode("ascii"))
    except (KRLError, UnicodeDecodeError) as exc:
        raise KRLError(f"{path}: {exc}") from exc
