"""SIGHUP's certificate rotation: every TLS role (the kubelet client, https pod/service targets, the egress and proxy
listeners, the certificates API) is rebuilt from the files as they are now. A file name changed in the config and a
file overwritten with another CA both replace what is trusted -- the old CA is no longer accepted -- and a broken
pair is refused while the current one stays."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from certs.ca import CertificateAuthority, cert_pem, key_pem
from netnames import split_host_port
from tests.loopback.conftest import started
from tests.rawhttp import get
from tunneld.app import Gateway
from tunneld.config import load_config
from tunneld.dev.cluster import DevCluster, free_port
from tunneld.dev.pki import DevCA, Issued
from tunneld.errors import ConfigError


async def handshake(host: str, port: int, client: Issued | None = None, workdir: Path | None = None,
                    trust: Path | None = None) -> tuple[int, bool]:
    """The serial of the certificate a listener serves, and whether it accepted ``client``'s certificate (with TLS
    1.3 a refused client certificate shows on the first read, so a request is sent and an HTTP answer awaited)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if trust is None:
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cafile=str(trust))
    if client is not None and workdir is not None:
        client.write(workdir / "client.crt", workdir / "client.key")
        ctx.load_cert_chain(str(workdir / "client.crt"), str(workdir / "client.key"))
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx), 10)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        serial = x509.load_der_x509_certificate(der).serial_number
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        try:
            answer = await asyncio.wait_for(reader.read(16), 10)
        except (ssl.SSLError, ConnectionError):
            answer = b""
        return serial, answer.startswith(b"HTTP/1.1 ")
    finally:
        writer.close()


def rewrite(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


async def reload_ok(gw: Gateway) -> None:
    await gw.reload()
    assert gw.tls.reload() == [], "every role builds from the files on disk"


CLIENT_ROLES = {
    # role: (config key, the file the dev cluster writes, a URL path whose upstream is verified with it)
    "kubelet client": ("certificate_authority", "kubelet-ca.crt", "/api/v1/nodes/node-1/proxy/healthz"),
    "proxy targets": ("target_certificate_authority", "pod-ca.crt",
                      "/api/v1/namespaces/default/services/https:web:443/proxy/hello"),
}


@pytest.mark.parametrize("how", ["path", "content"])
@pytest.mark.parametrize("role", sorted(CLIENT_ROLES))
async def test_reload_replaces_client_trust(cluster: DevCluster, role: str, how: str) -> None:
    key, ca_file, target = CLIENT_ROLES[role]
    assert cluster.config_path is not None
    gw = await started(load_config(cluster.config_path))
    try:
        async def status() -> tuple[int, bytes]:
            r = await get("127.0.0.1", cluster.proxy_port, target, headers=[cluster.auth_header])
            return r.status, r.body

        assert (await status())[0] == 200
        original = (cluster.workdir / ca_file).read_bytes()
        other = DevCA("another CA").cert_pem
        if how == "path":
            (cluster.workdir / "other-ca.crt").write_bytes(other)
            rewrite(cluster.config_path, f'{key} = "{ca_file}"', f'{key} = "other-ca.crt"')
        else:
            (cluster.workdir / ca_file).write_bytes(other)
        await reload_ok(gw)
        code, body = await status()
        assert code == 502 and b"not trusted" in body, "the old CA is no longer trusted"
        if how == "path":
            rewrite(cluster.config_path, f'{key} = "other-ca.crt"', f'{key} = "{ca_file}"')
        else:
            (cluster.workdir / ca_file).write_bytes(original)
        await reload_ok(gw)
        assert (await status())[0] == 200, "and the new one is"
    finally:
        await gw.stop()


@pytest.mark.parametrize("how", ["path", "content"])
@pytest.mark.parametrize("front", ["egress", "proxy"])
async def test_reload_replaces_listener_certificate_and_client_ca(cluster: DevCluster, front: str, how: str) -> None:
    assert cluster.config_path is not None
    d = cluster.workdir
    server_ca, client_ca, next_ca = DevCA("server CA"), DevCA("client CA"), DevCA("next client CA")
    first = server_ca.issue_serving(front, ["127.0.0.1"])
    first.write(d / "front.crt", d / "front.key")
    (d / "clients.crt").write_bytes(client_ca.cert_pem)
    port = free_port()
    tls = 'tls_cert = "front.crt"\ntls_key = "front.key"\nclient_ca = "clients.crt"\n'
    if front == "egress":
        rewrite(cluster.config_path, "[egress]\n", f'[egress]\nlisten = "127.0.0.1:{port}"\n{tls}')
    else:
        text = cluster.config_path.read_text()
        port = cluster.proxy_port
        rewrite(cluster.config_path, "[proxy]\n", f"[proxy]\n{tls}")
        assert text != cluster.config_path.read_text()
    old_client, new_client = client_ca.issue_client("apiserver"), next_ca.issue_client("apiserver")
    gw = Gateway(load_config(cluster.config_path))
    await gw.start()
    try:
        serial = x509.load_pem_x509_certificate(first.cert_pem).serial_number
        assert await handshake("127.0.0.1", port, old_client, d) == (serial, True)
        assert await handshake("127.0.0.1", port, new_client, d) == (serial, False)

        second = server_ca.issue_serving(front, ["127.0.0.1"])
        if how == "path":
            second.write(d / "front2.crt", d / "front2.key")
            (d / "clients2.crt").write_bytes(next_ca.cert_pem)
            rewrite(cluster.config_path, tls, tls.replace("front.", "front2.").replace("clients.", "clients2."))
        else:
            second.write(d / "front.crt", d / "front.key")
            (d / "clients.crt").write_bytes(next_ca.cert_pem)
        assert await handshake("127.0.0.1", port, old_client, d) == (serial, True), "nothing changes before reload"
        await reload_ok(gw)
        serial2 = x509.load_pem_x509_certificate(second.cert_pem).serial_number
        assert await handshake("127.0.0.1", port, new_client, d) == (serial2, True)
        assert await handshake("127.0.0.1", port, old_client, d) == (serial2, False), "the old client CA is gone"
    finally:
        await gw.stop()


async def test_sighup_keeps_current_pair_when_files_are_broken(cluster: DevCluster) -> None:
    assert cluster.config_path is not None
    ca = DevCA()
    cert, key = cluster.workdir / "proxy.crt", cluster.workdir / "proxy.key"

    def issue() -> int:
        issued = ca.issue_serving("proxy", ["127.0.0.1"])
        issued.write(cert, key)
        return x509.load_pem_x509_certificate(issued.cert_pem).serial_number

    first = issue()
    rewrite(cluster.config_path, "[proxy]\n", '[proxy]\ntls_cert = "proxy.crt"\ntls_key = "proxy.key"\n')
    cfg = load_config(cluster.config_path)
    assert cfg.proxy.listen is not None and cfg.proxy.tls is not None
    host, port = split_host_port(cfg.proxy.listen)
    gw = Gateway(cfg)
    await gw.start()
    try:
        assert (await handshake(host, port))[0] == first
        second = issue()
        await gw.reload()
        assert (await handshake(host, port))[0] == second

        good_cert = cert.read_bytes()
        issue()
        cert.write_bytes(good_cert)  # a certificate that does not match the key now on disk
        problems = gw.tls.reload()
        assert len(problems) == 1 and problems[0].startswith("proxy listener: certificates not reloaded")
        assert (await handshake(host, port))[0] == second, "a broken pair is refused; the current one stays"

        key.unlink()  # reload refuses a config naming a missing file, like check-config and serve do
        with pytest.raises(ConfigError) as exc:
            await gw.reload()
        assert exc.value.problems == [f"{cluster.config_path}: proxy.tls_key: {key}: file not found"]
        assert (await handshake(host, port))[0] == second
    finally:
        await gw.stop()


@pytest.mark.parametrize("how", ["path", "content"])
async def test_reload_replaces_certificates_api_certificate(cluster: DevCluster, how: str) -> None:
    """The API's server certificate follows the files (its client trust is the CA the daemon loaded at start)."""
    assert cluster.config_path is not None
    d = cluster.workdir
    ca = CertificateAuthority.create()
    ca.save(d / "ca.crt", d / "ca.key")
    (d / "ca.pem").write_bytes(ca.pem)

    def issue(name: str) -> int:
        cert, key = ca.issue_server(["127.0.0.1"])
        Issued(cert_pem(cert), key_pem(key)).write(d / f"{name}.crt", d / f"{name}.key")
        return cert.serial_number

    first = issue("api")
    port = free_port()
    with (d / "tunneld.toml").open("a") as f:
        f.write(f'\n[ca]\ncert = "ca.crt"\nkey = "ca.key"\n\n[api]\nlisten = "127.0.0.1:{port}"\n'
                f'tls_cert = "api.crt"\ntls_key = "api.key"\n\n[csr]\nsqlite_path = "{d / "certs.db"}"\n')
    gw = Gateway(load_config(cluster.config_path))
    await gw.start()
    try:
        assert (await handshake("127.0.0.1", port, trust=d / "ca.pem"))[0] == first
        second = issue("api2" if how == "path" else "api")
        if how == "path":
            rewrite(cluster.config_path, 'tls_cert = "api.crt"\ntls_key = "api.key"',
                    'tls_cert = "api2.crt"\ntls_key = "api2.key"')
        await reload_ok(gw)
        assert (await handshake("127.0.0.1", port, trust=d / "ca.pem"))[0] == second
    finally:
        await gw.stop()
