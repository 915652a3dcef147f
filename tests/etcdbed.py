"""A real etcd for tests: /usr/bin/etcd on 127.0.0.1 free ports, data in a temp dir, stopped by PID."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from certs.ca import CertificateAuthority, Usages, cert_pem, generate_key, key_pem
from certs.files import write_secret

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def _cn(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


@dataclass(frozen=True)
class EtcdTLS:
    """PEM files for an etcd that serves https and requires client certificates signed by ``ca``."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def create(cls, directory: Path) -> EtcdTLS:
        """A test CA, a server certificate for 127.0.0.1 and a client certificate, written under ``directory``."""
        ca = CertificateAuthority.create("etcd-test-ca")
        # etcd's JSON gateway dials etcd itself with the server certificate: it needs client auth too.
        server_key = generate_key()
        server = ca.issue(server_key.public_key(), _cn("etcd"), Usages(server_auth=True, client_auth=True),
                          dt.timedelta(days=1), ["localhost"], [ipaddress.ip_address("127.0.0.1")])
        client_key = generate_key()
        client = ca.issue(client_key.public_key(), _cn("tunneld"), Usages(client_auth=True), dt.timedelta(days=1))
        tls = cls(directory / "ca.crt", directory / "server.crt", directory / "server.key", directory / "client.crt",
                  directory / "client.key")
        tls.ca.write_bytes(ca.pem)
        tls.server_cert.write_bytes(cert_pem(server))
        write_secret(tls.server_key, key_pem(server_key))
        tls.client_cert.write_bytes(cert_pem(client))
        write_secret(tls.client_key, key_pem(client_key))
        return tls


@contextmanager
def running_etcd(timeout: float = 20.0, tls: EtcdTLS | None = None) -> Iterator[str]:
    """Start etcd, wait until it answers, yield its client URL; stop it (by PID) and remove its data.

    With ``tls``: clients must use https and present a certificate signed by ``tls.ca``.
    """
    data = Path(tempfile.mkdtemp(prefix="etcd-"))
    client, peer = _distinct_ports(2)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{client}"
    tls_args: list[str] = []
    context = None
    if tls is not None:
        tls_args = ["--cert-file", str(tls.server_cert), "--key-file", str(tls.server_key), "--trusted-ca-file",
                    str(tls.ca), "--client-cert-auth"]
        context = ssl.create_default_context(cafile=str(tls.ca))
        context.load_cert_chain(str(tls.client_cert), str(tls.client_key))
    log = open(data / "etcd.log", "wb")
    proc = subprocess.Popen(
        [ETCD, "--name", "t", "--data-dir", str(data / "d"), "--listen-client-urls", url,
         "--advertise-client-urls", url, "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"t=http://127.0.0.1:{peer}", "--log-level", "error", *tls_args],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                req = urllib.request.Request(url + "/v3/kv/range", data=json.dumps({"key": "eA=="}).encode(),
                                             method="POST")
                with urllib.request.urlopen(req, timeout=1, context=context) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"etcd did not start: {(data / 'etcd.log').read_text()[-2000:]}")
            time.sleep(0.1)
        yield url
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        log.close()
        shutil.rmtree(data, ignore_errors=True)


@dataclass
class Member:
    """One member of a test cluster: its name, client URL and process (stop/continue it by PID)."""

    name: str
    url: str
    peer: str
    data: Path
    proc: subprocess.Popen[bytes] | None = None

    def pause(self) -> None:
        """SIGSTOP: the member hangs (connections are accepted by the kernel, nothing answers)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)


def _answers(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        req = urllib.request.Request(url + "/v3/kv/range", data=json.dumps({"key": "eA=="}).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=1, context=context) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


class EtcdCluster:
    """``size`` real etcd members on 127.0.0.1 (see :func:`etcd_cluster`); members can be paused, stopped and
    started again."""

    def __init__(self, size: int, root: Path) -> None:
        self.root = root
        ports = _distinct_ports(2 * size)
        self.members = [Member(f"m{i}", f"http://127.0.0.1:{ports[2 * i]}", f"http://127.0.0.1:{ports[2 * i + 1]}",
                               root / f"m{i}") for i in range(size)]

    @property
    def urls(self) -> list[str]:
        """Every member's client URL."""
        return [m.url for m in self.members]

    def start(self, member: Member, state: str = "new") -> None:
        """Start ``member`` (its data dir is kept across stop/start)."""
        initial = ",".join(f"{m.name}={m.peer}" for m in self.members)
        log = open(self.root / f"{member.name}.log", "ab")
        member.proc = subprocess.Popen(
            [ETCD, "--name", member.name, "--data-dir", str(member.data), "--listen-client-urls", member.url,
             "--advertise-client-urls", member.url, "--listen-peer-urls", member.peer,
             "--initial-advertise-peer-urls", member.peer, "--initial-cluster", initial,
             "--initial-cluster-state", state, "--log-level", "error"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def stop(self, member: Member) -> None:
        """Stop ``member`` by PID (SIGKILL after 10 s)."""
        proc, member.proc = member.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGCONT)  # a paused member cannot handle SIGTERM
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every running member answers a (quorum) read."""
        deadline = time.monotonic() + timeout
        while not all(_answers(m.url) for m in self.members if m.proc is not None):
            dead = [m.name for m in self.members if m.proc is not None and m.proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "".join((self.root / f"{m.name}.log").read_text()[-800:] for m in self.members)
                raise RuntimeError(f"etcd cluster not ready (exited: {dead}): {logs}")
            time.sleep(0.1)


def _distinct_ports(n: int) -> list[int]:
    """``n`` different free ports (all bound at once while picking, so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@contextmanager
def etcd_cluster(size: int = 3, attempts: int = 3) -> Iterator[EtcdCluster]:
    """Start a ``size``-member etcd cluster on loopback (new ports if one was taken meanwhile); stop every member
    (by PID) and remove the data after."""
    for attempt in range(attempts):
        cluster = EtcdCluster(size, Path(tempfile.mkdtemp(prefix="etcdc-")))
        try:
            for m in cluster.members:
                cluster.start(m)
            cluster.wait_ready()
            break
        except RuntimeError as exc:
            for m in cluster.members:
                cluster.stop(m)
            shutil.rmtree(cluster.root, ignore_errors=True)
            if "address already in use" not in str(exc) or attempt == attempts - 1:
                raise
    try:
        yield cluster
    finally:
        for m in cluster.members:
            cluster.stop(m)
        shutil.rmtree(cluster.root, ignore_errors=True)


class EtcdRelay:
    """A TCP relay on 127.0.0.1 in front of one etcd member, with faults a test switches on and off:
    :meth:`stall` (requests are held until a moment: an etcd that answers late for a while), ``swallow`` (requests
    reach etcd, answers never come back: a timeout after the write was applied) and ``error`` (answer 503 itself
    without reaching etcd: a member that cannot serve). Use as ``async with EtcdRelay(url) as relay_url:``."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").rsplit(":", 1)
        self.target = (host, int(port))
        self.slow_until = 0.0
        self.swallow = False
        self.error = False
        self.error_answer = (503, "Service Unavailable", "etcdserver: no leader")
        """(status, reason phrase, etcd message) answered while ``error`` is set."""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool) -> None:
        try:
            while data := await reader.read(65536):
                if upstream and (wait := self.slow_until - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                if not upstream and self.swallow:
                    continue
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.error:
            await reader.read(65536)
            code, phrase, message = self.error_answer
            body = json.dumps({"error": message, "message": message, "code": 14}).encode()
            writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (code, phrase.encode(), len(body), body))
            with contextlib.suppress(ConnectionError, OSError):
                await writer.drain()
            writer.close()
            return
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        for t in (asyncio.create_task(self._pipe(reader, up_w, True)),
                  asyncio.create_task(self._pipe(up_r, writer, False))):
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    def cut(self) -> None:
        """Close every connection relayed now (clients must connect again, and then meet ``error`` if it is set)."""
        for t in list(self._tasks):
            t.cancel()

    @property
    def connections(self) -> int:
        """Relayed connections (their pipe tasks) still open."""
        return len(self._tasks)

    def stall(self, seconds: float) -> None:
        """Hold every request sent in the next ``seconds`` until they have passed (0: no more holding)."""
        self.slow_until = time.monotonic() + seconds if seconds > 0 else 0.0

    @property
    def stalled(self) -> bool:
        """Whether requests are being held now."""
        return self.slow_until > time.monotonic()

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def __aenter__(self) -> str:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            current = asyncio.current_task()
            if current is not None:
                self._track(current)  # type: ignore[arg-type]
            await self._serve(reader, writer)

        self._server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
