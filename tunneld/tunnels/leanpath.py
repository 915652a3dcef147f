"""The lean SSH packet path: AEAD packets (aes*-gcm@openssh.com, chacha20-poly1305@openssh.com) sealed and opened
here, with asyncssh kept for key exchange, authentication, host keys, rekeying and every other packet.

asyncssh builds each packet through about ten copies, a new AES-GCM context per packet, a ``getrandom`` call per
packet and a log call; it parses received packets by re-slicing its input buffer. Here, for a connection whose
negotiated cipher is AEAD:

* the cipher objects asyncssh installs at every NEWKEYS are replaced by :class:`LeanGCM` / :class:`LeanChacha`
  (same keys and nonces, the AES-GCM context kept per key, the ChaCha20 stream reused for the Poly1305 key and the
  payload), so asyncssh's own path and this one share one nonce state;
* connection-layer packets after authentication are sealed with one join and one encryption (padding from a pool of
  random bytes refilled from ``os.urandom``), and asyncssh's per-packet empty ``SSH_MSG_IGNORE`` is dropped (it
  protects CBC's predictable IVs; AEAD ciphers have none, and OpenSSH sends no such packets);
* received packets are parsed by offset in one buffer, the tag checked before anything of the packet is used, and
  ``CHANNEL_DATA`` / ``CHANNEL_WINDOW_ADJUST`` handed straight to their channel; every other packet goes on to
  asyncssh's own processing with its plaintext.

A packet longer than OpenSSH's 256 KiB, a tag that does not verify, a padding that does not fit, or a sequence
number that would wrap under the same keys (chacha20-poly1305 uses it as the nonce) closes the connection with a
log line before any of that packet's payload is delivered; so does an end of the connection inside a packet.

It relies on asyncssh internals (the connection's buffer, sequence numbers, cipher objects and handlers), so it is
used only with the asyncssh versions in :data:`TESTED_VERSIONS` (pinned in ``constraints.txt``) and after
:func:`check` found them as expected; otherwise asyncssh's own path is used and why is logged once.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import asyncssh
from asyncssh import encryption as _enc
from asyncssh.packet import SSHPacket
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.ciphers.algorithms import ChaCha20
from cryptography.hazmat.primitives.poly1305 import Poly1305

log = logging.getLogger("tunneld.ssh.lean")

TESTED_VERSIONS = frozenset({"2.24.1"})
MAX_PACKET = 256 * 1024  # OpenSSH's PACKET_MAX_SIZE
SEQ_LIMIT = 1 << 32  # packets under one set of keys before a sequence number would repeat
TAG = 16
MSG_IGNORE, MSG_USERAUTH_LAST, MSG_CHANNEL_WINDOW_ADJUST, MSG_CHANNEL_DATA = 2, 79, 93, 94
_EMPTY_STRING = b"\x00\x00\x00\x00"
_MASK32, _MASK64 = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF
_ZERO8 = bytes(8)
_BLOCK0 = bytes(64)
# What the connection must hold for the lean path to drive it (checked on each connection before switching).
_CONNECTION_FIELDS = ("_send_encryption", "_recv_encryption", "_inpbuf", "_packet", "_send_seq", "_recv_seq",
                      "_channels", "_compressor", "_decompressor", "_rekey_bytes_sent", "_rekey_bytes",
                      "_rekey_seconds", "_rekey_time", "_kex_complete", "_auth_complete", "_recv_blocksize",
                      "_recv_handler", "_transport", "_auth_final")
_CONNECTION_METHODS = ("send_packet", "_recv_pkthdr", "_recv_packet", "_send", "eof_received", "data_received",
                       "create_tcp_channel", "_update_recv_pktlen")


class _Padding:
    """Random padding bytes, drawn from a pool refilled from ``os.urandom`` (one system call per ~200 packets)."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._pool = os.urandom(size)
        self._at = 0

    def take(self, n: int) -> bytes:
        if self._at + n > self._size:
            self._pool, self._at = os.urandom(self._size), 0
        self._at += n
        return self._pool[self._at - n:self._at]


_PADDING = _Padding()


class LeanGCM(_enc.Encryption):
    """aes128/256-gcm@openssh.com (RFC 5647): 4 fixed IV bytes and a 64-bit invocation counter, +1 per packet."""

    blocksize = 16

    def __init__(self, key: bytes, iv: bytes) -> None:
        self._aead = AESGCM(key)
        self._fixed = bytes(iv[:4])
        self._counter = int.from_bytes(iv[4:12], "big")
        self.packets = 0
        self.pre: bytes | None = None

    def nonce(self) -> bytes:
        """The next nonce; advances the invocation counter."""
        n = self._fixed + self._counter.to_bytes(8, "big")
        self._counter = (self._counter + 1) & _MASK64
        self.packets += 1
        return n

    def seal(self, seq: int, header: bytes, plain: bytes) -> bytes:
        """The packet as sent: length, ciphertext, tag."""
        return header + self._aead.encrypt(self.nonce(), plain, header)

    def length(self, seq: int, buf: Any, off: int) -> int:
        return int.from_bytes(buf[off:off + 4], "big")

    def open(self, seq: int, header: Any, body: Any) -> bytes | None:
        """The plaintext of ``body`` (ciphertext and tag), or None if the tag does not verify."""
        try:
            return self._aead.decrypt(self.nonce(), body, header)
        except InvalidTag:
            return None

    # asyncssh's interface, for the packets it still sends and receives itself
    def encrypt_packet(self, seq: int, header: bytes, packet: bytes) -> tuple[bytes, bytes]:
        wire = self.seal(seq, header, packet)
        return wire[:-TAG], wire[-TAG:]

    def decrypt_header(self, seq: int, first_block: bytes, header_len: int) -> tuple[bytes, bytes]:
        return first_block, first_block[:header_len]

    def decrypt_packet(self, seq: int, first: bytes, rest: bytes, header_len: int, mac: bytes) -> bytes | None:
        if self.pre is not None:  # opened here already, handed over for asyncssh's processing
            plain, self.pre = self.pre, None
            return plain
        return self.open(seq, first[:header_len], first[header_len:] + rest + mac)


class LeanChacha(_enc.Encryption):
    """chacha20-poly1305@openssh.com: the length under the second key, the payload under the first from block 1,
    the Poly1305 key from block 0, the sequence number as the nonce."""

    blocksize = 8

    def __init__(self, key: bytes) -> None:
        self._main = bytes(key[:32])
        self._hdr = bytes(key[32:64])
        self.packets = 0
        self.pre: bytes | None = None

    def _header_stream(self, seq: int) -> Any:
        return Cipher(ChaCha20(self._hdr, _ZERO8 + seq.to_bytes(8, "big")), mode=None).encryptor()

    def _main_stream(self, seq: int) -> tuple[Any, bytes]:
        stream = Cipher(ChaCha20(self._main, _ZERO8 + seq.to_bytes(8, "big")), mode=None).encryptor()
        return stream, stream.update(_BLOCK0)[:32]

    def seal(self, seq: int, header: bytes, plain: bytes) -> bytes:
        self.packets += 1
        head = self._header_stream(seq).update(header)
        stream, poly_key = self._main_stream(seq)
        body = stream.update(plain)
        mac = Poly1305(poly_key)
        mac.update(head)
        mac.update(body)
        return b"".join((head, body, mac.finalize()))

    def length(self, seq: int, buf: Any, off: int) -> int:
        return int.from_bytes(self._header_stream(seq).update(bytes(buf[off:off + 4])), "big")

    def open(self, seq: int, header: Any, body: Any) -> bytes | None:
        self.packets += 1
        stream, poly_key = self._main_stream(seq)
        mac = Poly1305(poly_key)
        mac.update(header)
        mac.update(body[:-TAG])
        try:
            mac.verify(bytes(body[-TAG:]))
        except InvalidSignature:
            return None
        return stream.update(body[:-TAG])

    def encrypt_packet(self, seq: int, header: bytes, packet: bytes) -> tuple[bytes, bytes]:
        wire = self.seal(seq, header, packet)
        return wire[:-TAG], wire[-TAG:]

    def decrypt_header(self, seq: int, first_block: bytes, header_len: int) -> tuple[bytes, bytes]:
        return first_block, self._header_stream(seq).update(first_block[:header_len])

    def decrypt_packet(self, seq: int, first: bytes, rest: bytes, header_len: int, mac: bytes) -> bytes | None:
        if self.pre is not None:
            plain, self.pre = self.pre, None
            return plain
        return self.open(seq, first[:header_len], first[header_len:] + rest + mac)


LEAN = (LeanGCM, LeanChacha)


def lean_cipher(encryption: Any) -> Any:
    """The lean equivalent of a fresh asyncssh AEAD cipher object (same keys and nonce state), else it unchanged."""
    if type(encryption) is _enc.GCMEncryption:
        gcm = encryption._cipher
        return LeanGCM(gcm._key, gcm._iv)
    if type(encryption) is _enc.ChachaEncryption:
        chacha = encryption._cipher
        return LeanChacha(chacha._key + chacha._adkey)
    return encryption


class LeanPathError(asyncssh.ProtocolError):
    """A received packet the lean path refuses (the connection closes; nothing of the packet was delivered)."""


def _refuse(conn: Any, why: str) -> None:
    log.warning("ssh connection to %s:%s closed by the lean packet path: %s", conn._peer_addr, conn._peer_port, why)
    raise LeanPathError(why)


class LeanTCPChannel(asyncssh.SSHTCPChannel):  # type: ignore[type-arg]  # bytes channels, as ssh.py opens
    """A ``direct-tcpip`` channel whose open does not start a Task just to begin reading (asyncssh starts one per
    channel to flip a flag): reading begins from a plain callback on the next loop turn, so a caller that pauses
    reading right after the open still can."""

    async def _open_forward(self, session_factory: Any, chantype: bytes, *args: bytes) -> Any:
        packet = await self._open(chantype, *args)
        packet.check_end()  # a forward channel's open confirmation carries nothing more
        session = self._session = session_factory()
        session.connection_made(self)
        session.session_started()
        self._loop.call_soon(self._begin_reading)
        return session

    def _begin_reading(self) -> None:
        if self._recv_paused == "starting":
            self._recv_paused = False
            self._flush_recv_buf()


class LeanConnection(asyncssh.SSHClientConnection):
    """asyncssh's client connection with the lean send and receive paths (installed by :func:`activate`)."""

    def create_tcp_channel(self, encoding: str | None = None, errors: str = "strict", window: int = 2 * 1024 * 1024,
                           max_pktsize: int = 32768) -> Any:
        self._update_recv_pktlen(max_pktsize)
        return LeanTCPChannel(self, self._loop, encoding, errors, window, max_pktsize)

    @property  # type: ignore[override]  # a property over asyncssh's plain attribute, to wrap each new key
    def _send_encryption(self) -> Any:
        return self.__dict__["_lean_send"]

    @_send_encryption.setter
    def _send_encryption(self, value: Any) -> None:
        self.__dict__["_lean_send"] = lean_cipher(value)
        self.__dict__["_lean_keys"] = self.__dict__.get("_lean_keys", 0) + 1

    @property  # type: ignore[override]  # a property over asyncssh's plain attribute, to wrap each new key
    def _recv_encryption(self) -> Any:
        return self.__dict__["_lean_recv"]

    @_recv_encryption.setter
    def _recv_encryption(self, value: Any) -> None:
        self.__dict__["_lean_recv"] = lean_cipher(value)

    def send_packet(self, pkttype: int, *args: bytes, handler: Any = None) -> None:
        enc = self.__dict__["_lean_send"]
        if type(enc) not in LEAN:
            return super().send_packet(pkttype, *args, handler=handler)
        if pkttype == MSG_IGNORE and args == (_EMPTY_STRING,):
            return None
        if (pkttype <= MSG_USERAUTH_LAST or not self._kex_complete or not self._auth_complete or self._compressor
                or self._rekey_bytes_sent >= self._rekey_bytes
                or (self._rekey_seconds and time.monotonic() >= self._rekey_time)):
            return super().send_packet(pkttype, *args, handler=handler)
        if enc.packets >= SEQ_LIMIT:
            log.warning("ssh connection to %s:%s closed: %d packets under one key without a rekey",
                        self._peer_addr, self._peer_port, enc.packets)
            self._force_close(asyncssh.ProtocolError("sequence number would wrap"))
            return None
        size = 1 + sum(map(len, args))
        padlen = -(1 + size) % enc.blocksize
        if padlen < 4:
            padlen += enc.blocksize
        plain = b"".join((bytes((padlen, pkttype)), *args, _PADDING.take(padlen)))
        seq = self._send_seq
        self._send(enc.seal(seq, len(plain).to_bytes(4, "big"), plain))
        self._send_seq = (seq + 1) & _MASK32
        self._rekey_bytes_sent += len(plain)
        self.__dict__["_lean_sent"] = self.__dict__.get("_lean_sent", 0) + 1
        return None

    def _recv_pkthdr(self) -> bool:
        enc = self.__dict__["_lean_recv"]
        if type(enc) not in LEAN:
            return super()._recv_pkthdr()  # type: ignore[no-any-return]  # asyncssh's is untyped
        buf: Any = self._inpbuf
        if type(buf) is not bytearray:
            buf = self._inpbuf = bytearray(buf)  # type: ignore[assignment]  # a bytearray parses in place
        off = self.__dict__.get("_lean_off", 0)
        avail = len(buf) - off
        seq = self._recv_seq
        if avail < 4:
            return self._lean_wait(buf, off)
        want = self.__dict__.get("_lean_want", 0)
        pktlen = want - 4 - TAG if want else enc.length(seq, buf, off)
        if pktlen > MAX_PACKET or pktlen < enc.blocksize or pktlen % enc.blocksize:
            _refuse(self, f"packet length {pktlen} (at most {MAX_PACKET}, a multiple of {enc.blocksize})")
        total = 4 + pktlen + TAG
        if avail < total:
            self.__dict__["_lean_want"] = total
            return self._lean_wait(buf, off)
        if enc.packets >= SEQ_LIMIT:
            _refuse(self, f"sequence number would wrap after {enc.packets} packets under one key")
        with memoryview(buf) as view:
            plain = enc.open(seq, view[off:off + 4], view[off + 4:off + total])
        if plain is None:
            _refuse(self, f"packet {seq}: the AEAD tag does not verify")
        assert plain is not None
        padlen = plain[0]
        end = pktlen - padlen
        if padlen < 4 or end < 2:
            _refuse(self, f"packet {seq}: padding of {padlen} bytes in a packet of {pktlen}")
        self.__dict__["_lean_want"] = 0
        self.__dict__["_lean_received"] = self.__dict__.get("_lean_received", 0) + 1
        kind = plain[1]
        if (kind == MSG_CHANNEL_DATA or kind == MSG_CHANNEL_WINDOW_ADJUST) and end >= 6 and self._auth_complete \
                and not self._decompressor:
            chan = self._channels.get(int.from_bytes(plain[2:6], "big"))
            if chan is not None:
                self.__dict__["_lean_off"] = off + total
                packet = SSHPacket(plain)
                packet._idx, packet._len = 6, end
                chan.process_packet(kind, seq, packet)
                self._recv_seq = (seq + 1) & _MASK32
                self._auth_final = True
                return True
        # Any other packet: asyncssh's own processing, with the plaintext opened here.
        block = self._recv_blocksize
        self._packet = bytes(buf[off:off + block])
        self._inpbuf = bytes(buf[off + block:])
        self.__dict__["_lean_off"] = 0
        self._pktlen = pktlen
        enc.pre = plain
        self._recv_handler = self._recv_packet
        return True

    def _lean_wait(self, buf: bytearray, off: int) -> bool:
        if off:
            del buf[:off]
            self.__dict__["_lean_off"] = 0
        return False

    def eof_received(self) -> None:
        buf, off = self._inpbuf, self.__dict__.get("_lean_off", 0)
        if type(self.__dict__.get("_lean_recv")) in LEAN and len(buf) > off:
            log.warning("ssh connection to %s:%s ended inside a packet (%d of %s bytes); nothing of it delivered",
                        self._peer_addr, self._peer_port, len(buf) - off, self.__dict__.get("_lean_want") or "?")
        super().eof_received()


def check() -> str | None:
    """Why the lean path cannot be used with the installed asyncssh, or None if it can.

    The version must be one it was written for, the connection must have the methods it overrides, and its ciphers
    must produce and accept exactly what asyncssh's own produce and accept for the same keys (a round trip through
    each AEAD cipher both ways).
    """
    if asyncssh.__version__ not in TESTED_VERSIONS:
        return f"asyncssh {asyncssh.__version__} is not one it was written for ({', '.join(sorted(TESTED_VERSIONS))})"
    for name in _CONNECTION_METHODS:
        if not callable(getattr(asyncssh.SSHClientConnection, name, None)):
            return f"asyncssh's connection has no {name}"
    for name in ("_open_forward", "_open", "_flush_recv_buf", "_start_reading"):
        if not callable(getattr(asyncssh.SSHTCPChannel, name, None)):
            return f"asyncssh's TCP channel has no {name}"
    try:
        for alg, keylen, ivlen in ((b"aes128-gcm@openssh.com", 16, 12), (b"aes256-gcm@openssh.com", 32, 12),
                                   (b"chacha20-poly1305@openssh.com", 64, 0)):
            key, iv = os.urandom(keylen), os.urandom(ivlen)
            send, recv = (_enc.get_encryption(alg, key, iv) for _ in range(2))
            lean_send, lean_recv = (lean_cipher(_enc.get_encryption(alg, key, iv)) for _ in range(2))
            if type(lean_send) not in LEAN:
                return f"asyncssh's {alg.decode()} cipher object is not the one expected"
            for seq in (0, 1, _MASK32):
                header, plain = (32).to_bytes(4, "big"), os.urandom(32)
                body, mac = send.encrypt_packet(seq, header, plain)
                wire = lean_send.seal(seq, header, plain)
                if wire != body + mac:
                    return f"{alg.decode()}: a packet sealed here differs from asyncssh's"
                if lean_recv.length(seq, body, 0) != 32 or lean_recv.open(seq, body[:4], body[4:] + mac) != plain \
                        or recv.decrypt_packet(seq, wire[:4], wire[4:-TAG], 4, wire[-TAG:]) != plain:
                    return f"{alg.decode()}: a packet did not open as sealed"
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        return f"asyncssh's cipher objects are not as expected ({exc!r})"
    return None


_refusal: list[str | None] = []  # check()'s answer, computed (and logged) once per process


def usable() -> bool:
    """Whether the installed asyncssh passed :func:`check` (asked once; a refusal is logged once)."""
    if not _refusal:
        _refusal.append(check())
        if _refusal[0] is not None:
            log.warning("lean SSH packet path unavailable, using asyncssh's own: %s", _refusal[0])
    return _refusal[0] is None


def skip_ignore_padding(conn: Any, aead: frozenset[str]) -> None:
    """On asyncssh's own path, stop its per-packet empty ``SSH_MSG_IGNORE`` while an AEAD cipher protects what we
    send: the connection's ``send_packet`` is wrapped so that those packets are dropped while the negotiated cipher
    (looked up each time: a rekey may change it) is in ``aead``; everything else goes through."""
    send_packet = conn.send_packet

    def send_without_ignore(pkttype: int, *args: bytes, **kwargs: Any) -> None:
        if pkttype == MSG_IGNORE and args == (_EMPTY_STRING,) and conn.get_extra_info("send_cipher") in aead:
            return
        send_packet(pkttype, *args, **kwargs)

    conn.send_packet = send_without_ignore


def activate(conn: Any) -> str | None:
    """Switch a new, not yet keyed client connection to the lean path; returns why not, or None if switched."""
    missing = [f for f in _CONNECTION_FIELDS if f not in conn.__dict__]
    if type(conn) is not asyncssh.SSHClientConnection or missing:
        return f"the connection is not as expected (missing {missing})" if missing else "not a plain client connection"
    if conn._send_encryption is not None or conn._recv_encryption is not None:
        return "the connection is already keyed"
    conn.__dict__["_lean_send"] = conn.__dict__.pop("_send_encryption")
    conn.__dict__["_lean_recv"] = conn.__dict__.pop("_recv_encryption")
    conn.__class__ = LeanConnection
    return None


def path_of(conn: Any) -> str:
    """``lean`` when both directions run through this module now, else ``asyncssh``."""
    d = conn.__dict__
    return "lean" if type(d.get("_lean_send")) in LEAN and type(d.get("_lean_recv")) in LEAN else "asyncssh"


def counts(conn: Any) -> dict[str, int]:
    """Packets sent and received through the lean path's own code on this connection, and keys installed so far
    (1 after the first key exchange, +1 per rekey)."""
    d = conn.__dict__
    return {"sent": d.get("_lean_sent", 0), "received": d.get("_lean_received", 0), "keys": d.get("_lean_keys", 0)}
