"""SIGHUP's certificate rotation: the proxy front's TLS listener serves a renewed certificate to new connections;
a broken pair is refused and the current one stays."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from certs.files import write_secret
from netnames import split_host_port
from tunneld.app import Gateway
from tunneld.config import load_config
from tunneld.dev.cluster import DevCluster
from tunneld.dev.pki import DevCA
from tunneld.errors import ConfigError


async def served_serial(host: str, port: int) -> int:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx), 10)
    try:
        ssl_obj = writer.get_extra_info("ssl_object")
        der = ssl_obj.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        writer.close()


async def test_sighup_reloads_listener_certificate(cluster: DevCluster) -> None:
    assert cluster.config_path is not None
    ca = DevCA()
    cert, key = cluster.workdir / "proxy.crt", cluster.workdir / "proxy.key"

    def issue() -> int:
        issued = ca.issue_serving("proxy", ["127.0.0.1"])
        cert.write_bytes(issued.cert_pem)
        write_secret(key, issued.key_pem)
        return x509.load_pem_x509_certificate(issued.cert_pem).serial_number

    first = issue()
    text = cluster.config_path.read_text()
    assert text.count("[proxy]\n") == 1
    cfg_path: Path = cluster.workdir / "tls.toml"
    cfg_path.write_text(text.replace("[proxy]\n", '[proxy]\ntls_cert = "proxy.crt"\ntls_key = "proxy.key"\n')
                        .replace(f'socket = "{cluster.workdir / "tunneld.sock"}"', 'socket = ""'))
    cfg = load_config(cfg_path)
    assert cfg.proxy.listen is not None and cfg.proxy.tls is not None
    host, port = split_host_port(cfg.proxy.listen)
    gw = Gateway(cfg)
    await gw.start()
    try:
        assert await served_serial(host, port) == first
        second = issue()
        assert second != first
        assert await served_serial(host, port) == first, "nothing changes before the reload"
        await gw.reload()
        assert await served_serial(host, port) == second

        good_cert = cert.read_bytes()
        issue()
        cert.write_bytes(good_cert)  # a certificate that does not match the key now on disk
        assert gw.tls.reload() and "proxy listener: certificates not reloaded" in gw.tls.reload()[0]
        assert await served_serial(host, port) == second, "a broken pair is refused; the current one stays"

        key.unlink()  # reload refuses a config naming a missing file, like check-config and serve do
        with pytest.raises(ConfigError) as exc:
            await gw.reload()
        assert exc.value.problems == [f"{cfg_path}: proxy.tls_key: {key}: file not found"]
        assert await served_serial(host, port) == second
    finally:
        await gw.stop()
