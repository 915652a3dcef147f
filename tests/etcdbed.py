"""A real etcd for tests: /usr/bin/etcd on 127.0.0.1 free ports, data in a temp dir, stopped by PID."""

from __future__ import annotations

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    client, peer = _free_port(), _free_port()
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
