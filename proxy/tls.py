"""TLS over any :class:`~proxy.dialer.Stream` (an SSH channel has no socket to hand to ``ssl``).

The handshake and records run through :class:`ssl.SSLObject` with memory BIOs: ciphertext moves over the inner
stream, plaintext is what :class:`TLSStream` reads and writes. This works the same under asyncio and uvloop.

Peer verification is explicit: the chain must lead to the configured CA, and the certificate must name one of the
identities we expect for the target (for a kubelet: the node's address or name) as an IP or DNS SAN.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable

from cryptography import x509

from netnames import host_key, normalize_host
from proxy.dialer import DialError, Stream, StreamError

READ = 256 * 1024
CLOSE_WAIT = 1.0
"""Seconds :meth:`TLSStream.close` waits for a peer that does not read to take its close_notify."""


class TLSVerifyError(DialError):
    """The target's certificate is not trusted or names someone else."""

    status = 502


def certificate_names(der: bytes) -> list[str]:
    """The DNS and IP subject alternative names of a DER certificate."""
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names: list[str] = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return names


def _matches(names: list[str], wanted: Iterable[str]) -> bool:
    have = {normalize_host(n) for n in names}
    return any(normalize_host(w) in have for w in wanted)


class TLSStream:
    """A client-side TLS connection over an inner :class:`Stream`."""

    def __init__(self, inner: Stream, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
        self._inner = inner
        self._obj = obj
        self._in = incoming
        self._out = outgoing
        self._eof = False
        self._shut = False  # close_notify sent
        self._reading = asyncio.Lock()  # one reader of the inner stream at a time (read() and a rare write())

    @classmethod
    async def connect(
        cls, inner: Stream, context: ssl.SSLContext, server_hostname: str | None, identities: Iterable[str] = (),
        what: str = "target",
    ) -> TLSStream:
        """Handshake over ``inner``. When ``context`` verifies, the peer must also name one of ``identities``."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        sni = server_hostname if server_hostname and not _is_ip(server_hostname) else None
        obj = context.wrap_bio(incoming, outgoing, server_side=False, server_hostname=sni)
        self = cls(inner, obj, incoming, outgoing)
        try:
            while True:
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await self._flush()
                    if not await self._fill():
                        raise StreamError(f"{what} closed the connection during the TLS handshake") from None
            await self._flush()
        except ssl.SSLCertVerificationError as exc:
            await inner.close()
            raise TLSVerifyError(f"{what} certificate not trusted: {exc.verify_message or exc.reason}") from exc
        except ssl.SSLError as exc:
            await inner.close()
            raise TLSVerifyError(f"TLS handshake with {what} failed: {exc.reason or exc}") from exc
        except StreamError as exc:
            await inner.close()
            raise TLSVerifyError(str(exc)) from exc
        wanted = list(identities)
        if context.verify_mode == ssl.CERT_REQUIRED and wanted:
            der = obj.getpeercert(binary_form=True)
            names = certificate_names(der) if der else []
            if not _matches(names, wanted):
                await self.close()
                raise TLSVerifyError(
                    f"{what} certificate names {', '.join(names) or 'nothing'}; expected one of {', '.join(wanted)}"
                )
        return self

    async def _flush(self) -> None:
        data = self._out.read()
        if data:
            await self._inner.write(data)

    async def _fill(self) -> bool:
        async with self._reading:
            data = await self._inner.read(READ)
            if not data:
                self._in.write_eof()
                return False
            self._in.write(data)
            return True

    async def read(self, n: int = READ) -> bytes:
        while True:
            try:
                return self._obj.read(n)
            except ssl.SSLWantReadError:
                await self._flush()
                if self._eof:
                    return b""
                if not await self._fill():
                    self._eof = True
            except ssl.SSLZeroReturnError:
                return b""
            except ssl.SSLEOFError:
                # The peer closed without close_notify. Framing above TLS (Content-Length, chunked) still
                # detects a truncated body, so report the end of data and let it judge.
                return b""
            except ssl.SSLError as exc:
                raise StreamError(f"TLS error: {exc.reason or exc}") from exc

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = self._obj.write(view)
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
                continue
            except ssl.SSLError as exc:
                raise StreamError(f"TLS error: {exc.reason or exc}") from exc
            view = view[n:]
            await self._flush()

    async def write_eof(self) -> None:
        """Send ``close_notify``: the end of our data (TLS 1.3 keeps the other direction open; RFC 8446 6.1)."""
        if self._shut:
            return
        self._shut = True
        try:
            self._obj.unwrap()
        except ssl.SSLWantReadError:
            pass  # close_notify is written; the peer's own is not awaited
        except ssl.SSLError:
            return
        await self._flush()

    async def close(self) -> None:
        """``close_notify`` (when not sent yet), then close the inner stream.

        The close_notify is queued on the inner stream at once; waiting for a peer that does not read to take it is
        bounded by :data:`CLOSE_WAIT` (closing the inner stream still sends what was queued).
        """
        try:
            async with asyncio.timeout(CLOSE_WAIT):
                await self.write_eof()
        except (StreamError, TimeoutError):
            pass
        finally:
            await self._inner.close()


def _is_ip(host: str) -> bool:
    return host_key(host)[1] is not None


def client_context(
    ca_file: str | None, cert_file: str | None = None, key_file: str | None = None
) -> ssl.SSLContext:
    """A client context: verifies against ``ca_file`` when given (names are checked by :class:`TLSStream`),
    otherwise does not verify at all; presents ``cert_file``/``key_file`` when given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    if ca_file:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=ca_file)
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if cert_file and key_file:
        ctx.load_cert_chain(cert_file, key_file)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def server_context(cert_file: str, key_file: str, client_ca: str | None = None) -> ssl.SSLContext:
    """A listener's context; with ``client_ca``, callers must present a certificate that chains to it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=client_ca)
    return ctx
