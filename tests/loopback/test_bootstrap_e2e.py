"""Node bootstrap end to end: the real daemon (``tunneld serve`` with the certificates API), the real CLIs
(``tunneld ca init``, ``token create``, ``csr approve|deny``, ``bootstrap``), real TLS on loopback.

Covered: discovery with the CA pin -> CSR -> queue (the daemon restarting meanwhile; the node keeps polling) ->
``tunneld csr approve`` -> certificate and kubeconfig written;
the issued kubeconfig calls the API with its client certificate; a second run does nothing; denial; a timeout; a
wrong pin, a wrong token secret and an expired token refused before anything is sent; auto-approval of a per-node
token and refusal of another node's name; rotation renewing with the current certificate; ``--rotate`` exiting
cleanly on SIGTERM; the issued client certificate accepted by a TLS server that requires cluster-CA client
certificates (the gateway's kubelet-client TLS), and a kubelet-serving certificate from the same flow verifying
against the CA with the gateway's kubelet TLS client.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ipaddress
import os
import random
import re
import stat
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certs import bootstrap as boot
from certs.apiclient import APIClient, APIError, tls_context
from certs.ca import CertificateAuthority, Usages, cert_pem, key_pem
from certs.kubeconfig import KubeConfig
from proxy.dialer import StreamError, TCPDialer
from proxy.tls import TLSStream, TLSVerifyError, client_context, server_context
from tests.certs_daemon import Daemon, DaemonConfig, acli, cli, write_config

from .conftest import next_base

PIN_RE = re.compile(r"CA pin:\s+(sha256:[0-9a-f]{64})")


def init_cluster(d: Path, approval: str = "queue") -> tuple[DaemonConfig, str]:
    cfg = write_config(d, next_base(), approval=approval)
    init = cli("ca", "init", "--config", str(cfg.path), "--no-ssh")
    assert init.returncode == 0, init.stderr
    m = PIN_RE.search(init.stdout)
    assert m, init.stdout
    return cfg, m.group(1)


def make_token(cfg: DaemonConfig, *extra: str) -> str:
    made = cli("token", "create", "--config", str(cfg.path), *extra)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


class Node:
    """A node's files and the ``tunneld bootstrap`` command line for it."""

    def __init__(self, d: Path, name: str) -> None:
        d.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.dir = d
        self.bootstrap_kubeconfig = d / "bootstrap-kubelet.conf"
        self.kubeconfig = d / "kubelet.conf"
        self.cert_dir = d / "pki"
        self.current = self.cert_dir / boot.CURRENT

    def argv(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "tunneld", "bootstrap", "--bootstrap-kubeconfig", str(self.bootstrap_kubeconfig),
                "--kubeconfig", str(self.kubeconfig), "--cert-dir", str(self.cert_dir), "--node-name", self.name,
                "--poll-interval", "0.1", *extra]

    def discovery(self, cfg: DaemonConfig, pin: str) -> list[str]:
        return ["--server", cfg.url, "--ca-cert-hash", pin]

    def options(self, timeout: float = 20) -> boot.Options:
        return boot.Options(self.bootstrap_kubeconfig, self.kubeconfig, self.cert_dir, self.name, timeout, 0.1)


class Run:
    """A running ``tunneld bootstrap``; stderr is collected line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    @classmethod
    async def start(cls, argv: list[str], token: str | None = None) -> Run:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("TUNNELD_BOOTSTRAP_TOKEN", None)
        if token is not None:
            env["TUNNELD_BOOTSTRAP_TOKEN"] = token
        proc = await asyncio.create_subprocess_exec(*argv, env=env, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        return cls(proc)

    async def wait_line(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        for line in self.lines:
            if m := re.search(pattern, line):
                return m
        while time.monotonic() < deadline:
            try:
                raw = await asyncio.wait_for(self.proc.stderr.readline(), max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                break
            if not raw:
                break
            self.lines.append(raw.decode().rstrip("\n"))
            if m := re.search(pattern, self.lines[-1]):
                return m
        raise AssertionError(f"no line matching {pattern!r} within {timeout}s:\n" + "\n".join(self.lines))

    async def result(self, timeout: float = 30) -> tuple[int, str]:
        """Wait for the exit; the whole stderr."""
        assert self.proc.stderr is not None
        try:
            out = await asyncio.wait_for(self.proc.stderr.read(), timeout)
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise
        self.lines += out.decode().splitlines()
        return int(self.proc.returncode or 0), "\n".join(self.lines)


async def run_once(argv: list[str], token: str | None = None, timeout: float = 30) -> tuple[int, str]:
    return await (await Run.start(argv, token)).result(timeout)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def csr_names(cfg: DaemonConfig) -> list[str]:
    out = await acli("csr", "list", "--config", str(cfg.path))
    assert out.returncode == 0, out.stderr
    return [line.split()[0] for line in out.stdout.splitlines()[1:] if line.strip()]


def node_client(node: Node) -> APIClient:
    cfg = KubeConfig.load(node.kubeconfig)
    cluster, user = cfg.current()
    assert user is not None and user.client_certificate and user.client_key and cluster.certificate_authority_data
    ctx = tls_context(cluster.certificate_authority_data, cfg.resolve(user.client_certificate),
                      cfg.resolve(user.client_key))
    return APIClient(cluster.server, ctx)


# -- the main flow ------------------------------------------------------------------------------------------------


async def test_bootstrap_queue_approve_then_kubeconfig_works(short_dir: Path) -> None:
    cfg, pin = init_cluster(short_dir / "m")
    token = make_token(cfg, "--ttl", "1h", "--node", "node-1")
    node = Node(short_dir / "n1", "node-1")
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        run = await Run.start(node.argv("--timeout", "30", *node.discovery(cfg, pin)), token)
        await run.wait_line(r"discovery: cluster CA verified against the pin")
        name = (await run.wait_line(r"submitted certificate signing request (\S+) for system:node:node-1")).group(1)
        await run.wait_line(r"waiting for approval of CSR", timeout=10)
        assert not node.current.exists()
        # The daemon restarts while the node waits: the node keeps polling, the pending CSR survives.
        assert await daemon.stop() == 0
        await run.wait_line(rf"polling CSR {name}: .*; retrying", timeout=10)
        daemon = Daemon(cfg)
        await daemon.start()
        assert await csr_names(cfg) == [name]
        ok = await acli("csr", "approve", name, "--config", str(cfg.path), "--message", "known machine")
        assert ok.returncode == 0, ok.stderr
        rc, err = await run.result()
        assert rc == 0, err
        assert re.search(rf"CSR {name} approved \(.*known machine", err), err
        assert f"written to {node.current}" in err
        assert token.split(".")[1] not in err

        # Files: the bootstrap kubeconfig holds the token (0600); credentials 0600 behind the current link.
        assert mode(node.bootstrap_kubeconfig) == 0o600
        boot_cfg = KubeConfig.load(node.bootstrap_kubeconfig)
        b_cluster, b_user = boot_cfg.current()
        assert b_cluster.server == cfg.url and b_user is not None and b_user.token == token
        assert b_cluster.certificate_authority_data == cfg.ca_cert.read_bytes()
        assert node.current.is_symlink() and mode(node.current.resolve()) == 0o600
        assert mode(node.kubeconfig) == 0o600
        cert = x509.load_pem_x509_certificates(node.current.read_bytes())[0]
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(cfg.ca_cert.read_bytes()))
        assert cert.subject.rfc4514_string() == "CN=system:node:node-1,O=system:nodes"
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]

        # The issued kubeconfig calls the API as system:node:node-1 with its client certificate.
        async with node_client(node) as api:
            assert isinstance(await api.list_csrs(), list)
        async with APIClient(cfg.url, tls_context(cfg.ca_cert.read_bytes())) as anonymous:
            with pytest.raises(APIError) as exc:
                await anonymous.list_csrs()
            assert exc.value.code == 401

        # Second run: valid certificate, nothing to do, no new CSR.
        target = os.readlink(node.current)
        rc, err = await run_once(node.argv("--timeout", "5"))
        assert rc == 0 and "nothing to do" in err, err
        assert os.readlink(node.current) == target and await csr_names(cfg) == [name]

        # Serving certificate through the same API, authenticated by the client certificate; then both
        # certificates meet the gateway's kubelet TLS (proxy.tls) on a real TLS connection.
        await serving_cert_and_tls(cfg, node)
    finally:
        assert await daemon.stop() == 0


async def serving_cert_and_tls(cfg: DaemonConfig, node: Node) -> None:
    address = cfg.host.rsplit(".", 1)[0] + ".11"  # node-1's inventory address (tests/certs_daemon.py)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:nodes"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "system:node:node-1")])
    san = x509.SubjectAlternativeName([x509.DNSName("node-1"), x509.IPAddress(ipaddress.ip_address(address))])
    req = (x509.CertificateSigningRequestBuilder().subject_name(subject).add_extension(san, critical=False)
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    async with node_client(node) as api:
        created = await api.create_csr(req, "kubernetes.io/kubelet-serving", ["digital signature", "server auth"],
                                       generate_name="csr-")
        name = created["metadata"]["name"]
        assert created["spec"]["username"] == "system:node:node-1"  # from the client certificate, not the body
        ok = await acli("csr", "approve", name, "--config", str(cfg.path))
        assert ok.returncode == 0, ok.stderr
        obj = created
        for _ in range(200):
            obj = await api.get_csr(name)  # the node reads back its own CSR with its client certificate
            if obj.get("status", {}).get("certificate"):
                break
            await asyncio.sleep(0.1)
    serving_pem = base64.b64decode(obj["status"]["certificate"])
    serving = node.dir / "kubelet-serving.pem"
    serving.write_bytes(serving_pem + key.private_bytes(serialization.Encoding.PEM,
                                                        serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    os.chmod(serving, 0o600)
    await kubelet_tls(cfg.ca_cert, serving, node.current)


async def kubelet_tls(ca_cert: Path, serving: Path, client: Path) -> None:
    """A kubelet-like TLS server (serving cert from the CSR flow; requires a client cert from the cluster CA) and
    the gateway's kubelet TLS client presenting the bootstrapped client certificate."""
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        seen.append(x509.load_der_x509_certificate(der).subject.rfc4514_string())
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    host = next_base()
    srv = await asyncio.start_server(handle, host, 0, ssl=server_context(str(serving), str(serving), str(ca_cert)))
    port = srv.sockets[0].getsockname()[1]
    address = None
    for name in x509.load_pem_x509_certificates(serving.read_bytes())[0].extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress):
        address = str(name)
    try:
        ctx = client_context(str(ca_cert), str(client), str(client))
        stream = await TLSStream.connect(await TCPDialer().dial(host, port), ctx, address, [address or "", "node-1"])
        assert await stream.read() == b"ok"
        await stream.close()
        assert seen == ["CN=system:node:node-1,O=system:nodes"]

        # The serving certificate does not name another node: the gateway refuses it.
        with pytest.raises(TLSVerifyError, match="expected one of node-2"):
            await TLSStream.connect(await TCPDialer().dial(host, port), ctx, "node-2", ["node-2"])
        # A client certificate from another CA is refused by the server.
        other = CertificateAuthority.create()
        okey = ec.generate_private_key(ec.SECP256R1())
        ocert = other.issue(okey.public_key(), x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]),
                            Usages(client_auth=True), dt.timedelta(hours=1))
        stranger = client.parent / "stranger.pem"
        stranger.write_bytes(cert_pem(ocert) + key_pem(okey))
        bad = client_context(str(ca_cert), str(stranger), str(stranger))
        try:
            s2 = await TLSStream.connect(await TCPDialer().dial(host, port), bad, address, [address or ""])
        except TLSVerifyError:
            pass
        else:  # TLS 1.3: the server's refusal arrives after the client's side of the handshake is done
            try:
                data = await s2.read()
            except StreamError:
                data = b""
            await s2.close()
            assert data != b"ok"
    finally:
        srv.close()
        await srv.wait_closed()
    # Two handshakes with the bootstrapped certificate completed (the second was refused by the client for the
    # name); the stranger's never reached the handler.
    assert seen == ["CN=system:node:node-1,O=system:nodes"] * 2


# -- refusals ------------------------------------------------------------------------------------------------------


async def test_denied_timeout_and_discovery_refusals(short_dir: Path) -> None:
    cfg, pin = init_cluster(short_dir / "m")
    token = make_token(cfg, "--ttl", "1h")
    short_lived = make_token(cfg, "--ttl", "1s")
    expired_at = time.monotonic() + 1.2
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        # Denied by the administrator: the node says why and writes nothing.
        node = Node(short_dir / "n1", "node-1")
        run = await Run.start(node.argv("--timeout", "30", *node.discovery(cfg, pin)), token)
        name = (await run.wait_line(r"submitted certificate signing request (\S+)")).group(1)
        no = await acli("csr", "deny", name, "--reason", "unknown machine", "--config", str(cfg.path))
        assert no.returncode == 0, no.stderr
        rc, err = await run.result()
        assert rc == 1 and f"CSR {name} was denied" in err and "unknown machine" in err, err
        assert not node.current.exists() and not node.kubeconfig.exists()

        # Nobody decides: bounded by --timeout, the CSR stays pending.
        rc, err = await run_once(node.argv("--timeout", "1.5"))
        assert rc == 1 and "still pending approval after 1.5s" in err, err
        names = await csr_names(cfg)
        assert len(names) == 2  # after the denial, a new key and so a new CSR
        pending = next(n for n in names if n != name)
        assert (node.cert_dir / "kubelet-client-pending.key").exists()  # written before the CSR was sent

        # The node gave up, the CSR was approved and issued afterwards: the retry asks with the same key and name
        # and gets that certificate (not a second CSR, not a denial).
        ok = await acli("csr", "approve", pending, "--config", str(cfg.path))
        assert ok.returncode == 0, ok.stderr
        rc, err = await run_once(node.argv("--timeout", "10"))
        assert rc == 0 and f"certificate signing request {pending} exists" in err, err
        assert node.current.exists() and not (node.cert_dir / "kubelet-client-pending.key").exists()
        assert await csr_names(cfg) == names

        # Discovery refusals happen before any CSR exists.
        other_pin = CertificateAuthority.create().pin
        fresh = Node(short_dir / "n2", "node-2")
        rc, err = await run_once(fresh.argv(*fresh.discovery(cfg, other_pin)), token)
        assert rc == 1 and "discovery refused" in err and "does not match the pin" in err, err
        assert pin in err and other_pin in err
        forged = token.split(".")[0] + ".0000000000000000"
        rc, err = await run_once(fresh.argv(*fresh.discovery(cfg, pin)), forged)
        assert rc == 1 and "does not verify with this token's secret" in err, err
        await asyncio.sleep(max(0.0, expired_at - time.monotonic()))  # the 1 s token has expired: the server
        # no longer signs cluster-info for it
        rc, err = await run_once(fresh.argv(*fresh.discovery(cfg, pin)), short_lived)
        assert rc == 1 and f"no signature for token ID '{short_lived.split('.')[0]}'" in err, err
        rc, err = await run_once(fresh.argv("--server", cfg.url), token)
        assert rc == 2 and "needs all of --server, --token and --ca-cert-hash" in err, err
        assert not fresh.bootstrap_kubeconfig.exists()
        assert await csr_names(cfg) == names
    finally:
        assert await daemon.stop() == 0


# -- auto-approval and rotation -----------------------------------------------------------------------------------


async def test_auto_approval_rotation_and_sigterm(short_dir: Path) -> None:
    cfg, pin = init_cluster(short_dir / "m", approval="auto-approve-group")
    token = make_token(cfg, "--ttl", "1h", "--node", "node-2")
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        # A token bound to node-2 cannot get node-1's certificate.
        thief = Node(short_dir / "thief", "node-1")
        rc, err = await run_once(thief.argv("--timeout", "10", *thief.discovery(cfg, pin)), token)
        assert rc == 1 and re.search(r"CSR \S+ (was denied|failed)", err), err
        assert not thief.current.exists()

        node = Node(short_dir / "n2", "node-2")
        rc, err = await run_once(node.argv("--timeout", "20", "--expiration-seconds", "3600",
                                           *node.discovery(cfg, pin)), token)
        assert rc == 0, err
        assert "approved" in err and f"written to {node.current}" in err
        first = x509.load_pem_x509_certificates(node.current.read_bytes())[0]
        start, end = boot.lifetime(first)
        assert 3600 <= end - start <= 3600 + 600

        # Rotation with a fake clock: the first wait ends between 70 % and 90 % of the lifetime, then the
        # renewal authenticates with the current certificate (no token: the bootstrap kubeconfig is gone).
        node.bootstrap_kubeconfig.unlink()
        offset = 0.0
        waits: list[float] = []

        def clock() -> float:
            return time.time() + offset

        async def sleep(seconds: float) -> bool:
            nonlocal offset
            waits.append(seconds)
            if len(waits) > 1:
                return True  # stop after the first renewal
            offset += seconds
            return False

        lines: list[str] = []
        renewals = await boot.rotate(node.options(), lines.append, sleep, clock=clock, rng=random.Random(1))
        assert renewals == 1, lines
        assert any("already has a valid certificate" in line for line in lines)
        assert 0.7 * (end - start) - 5 <= waits[0] + (time.time() - start) <= 0.9 * (end - start) + 5
        second = x509.load_pem_x509_certificates(node.current.read_bytes())[0]
        assert second.serial_number != first.serial_number
        assert second.subject == first.subject
        assert any("authenticating with it" in line for line in lines), lines
        objs = {}
        async with node_client(node) as api:
            for item in await api.list_csrs():
                objs[item["metadata"]["name"]] = item
        assert [o["spec"]["username"] for o in objs.values()] == ["system:node:node-2"], "renewed by the node itself"

        # The CLI's --rotate: reports the schedule, then exits 0 on SIGTERM without renewing.
        run = await Run.start(node.argv("--rotate"))
        await run.wait_line(r"renewal at \d{4}-\d\d-\d\d")
        run.proc.terminate()
        rc, err = await run.result(timeout=10)
        assert rc == 0 and "stopping after 0 renewal(s)" in err, err
    finally:
        assert await daemon.stop() == 0

