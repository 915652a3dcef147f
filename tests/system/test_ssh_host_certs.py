"""Host certificates from ``tunneld ssh sign-host`` presented by a real OpenSSH sshd, checked by the gateway.

The gateway's known_hosts holds only the line ``tunneld ssh sign-host`` printed. A node whose sshd presents a
certificate from that CA naming it comes up; a node with a certificate from another CA, or with one from our CA that
names another host, is refused before the gateway authenticates.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.sshbed import SSH_KEYGEN, SshBed, SshNode
from tunneld.app import Gateway

from .conftest import config_for, wait_for

pytestmark = pytest.mark.system

TUNNELD = [sys.executable, "-m", "tunneld"]


def tunneld(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TUNNELD, *args], capture_output=True, text=True, timeout=60, check=False)


def sign(ca_key: Path, node: SshNode, *principals: str, validity: str = "52w") -> str:
    """Sign the node's host key with our CLI, restart its sshd to present the new certificate; return the line."""
    argv = ["ssh", "sign-host", "--ca-key", str(ca_key), "--host-key", str(node.host_key_pub), "--validity", validity]
    for p in principals:
        argv += ["--principal", p]
    cp = tunneld(*argv)
    assert cp.returncode == 0, cp.stderr
    # The default output path is where sshd's HostCertificate points (<key>-cert.pub, as ssh-keygen writes it).
    assert node.host_cert == node.host_key_pub.with_name("ssh_host_ed25519_key-cert.pub")
    assert f"host certificate written: {node.host_cert}" in cp.stderr
    node.kill_sshd()
    node.start_sshd()
    return cp.stdout.strip()


def keygen_list(cert: Path | None) -> str:
    """``ssh-keygen -L -f cert``: OpenSSH's own reading of the certificate."""
    assert cert is not None
    return subprocess.run([SSH_KEYGEN, "-L", "-f", str(cert)], capture_output=True, text=True, timeout=30,
                          check=True).stdout


async def test_gateway_accepts_our_host_certificates_and_refuses_others(bed: SshBed, tmp_path: Path) -> None:
    cp = tunneld("ssh", "init", "--dir", str(tmp_path / "sshca"))
    assert cp.returncode == 0, cp.stderr
    ca_key = tmp_path / "sshca" / "ssh_ca"
    assert ca_key.stat().st_mode & 0o777 == 0o600
    init_line = cp.stdout.strip()
    assert init_line == "@cert-authority * " + (tmp_path / "sshca" / "ssh_ca.pub").read_text().strip()
    again = tunneld("ssh", "init", "--dir", str(tmp_path / "sshca"))
    assert again.returncode != 0 and "refusing to overwrite" in again.stderr
    assert "@cert-authority * " + (tmp_path / "sshca" / "ssh_ca.pub").read_text().strip() == init_line, "untouched"

    good = bed.add_node("good")
    foreign = bed.add_node("foreign")  # keeps the certificate of the bed's own CA, which the gateway does not trust
    wrong = bed.add_node("wrong")
    line = sign(ca_key, good, "good", good.address)
    assert line == init_line
    sign(ca_key, wrong, "somebody-else", "192.0.2.77")

    listing = keygen_list(good.host_cert)
    assert "host certificate" in listing
    principals = re.search(r"Principals:\s*\n((?:\s+\S+\n)+)", listing)
    assert principals and principals.group(1).split() == ["good", good.address]
    valid = re.search(r"Valid: from (\S+) to (\S+)", listing)
    assert valid, listing
    start, end = (time.mktime(time.strptime(v, "%Y-%m-%dT%H:%M:%S")) for v in valid.groups())
    assert 52 * 7 * 86400 <= end - start <= 52 * 7 * 86400 + 3600  # 52 weeks plus the few minutes of backdating
    assert start <= time.time() <= end

    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(line + "\n")
    cfg = config_for(bed, ["good", "foreign", "wrong"])
    cfg = replace(cfg, ssh=replace(cfg.ssh, known_hosts=known_hosts))
    gw = Gateway(cfg)
    await gw.start()
    try:
        await wait_for(lambda: gw.pool.tunnels["good"].state.value == "up", what="the signed node's tunnel up")
        for name in ("foreign", "wrong"):
            tunnel = gw.pool.tunnels[name]
            await wait_for(lambda t=tunnel: t.state.value == "refused", what=f"{name} refused")
            assert tunnel.machine.connects == 0 and tunnel.machine.connect_failures == 1
            assert "host key" in (tunnel.machine.last_error or ""), tunnel.machine.last_error
        assert good.accepted_logins() == 1
        assert foreign.accepted_logins() == 0 and wrong.accepted_logins() == 0, "no login to an untrusted host"
    finally:
        await gw.stop()


def keygen_ca(path: Path) -> Path:
    """A host CA made by ``ssh-keygen`` (``path`` and ``path.pub``)."""
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "host-ca", "-f", str(path)], check=True,
                   capture_output=True, timeout=30)
    return path


def keygen_sign(ca: Path, node: SshNode, principals: str | None) -> None:
    """Certify the node's host key with OpenSSH's own ``ssh-keygen -s CA -h`` (``-n`` only when ``principals``), then
    restart its sshd so it presents that certificate."""
    argv = [SSH_KEYGEN, "-q", "-s", str(ca), "-h", "-I", f"{node.name}-host", "-V", "-5m:+1d"]
    if principals is not None:
        argv += ["-n", principals]
    subprocess.run([*argv, str(node.host_key_pub)], check=True, capture_output=True, timeout=30)
    node.kill_sshd()
    node.start_sshd()


async def test_host_certificate_must_name_the_address_dialled(bed: SshBed, tmp_path: Path) -> None:
    ca = keygen_ca(tmp_path / "host_ca")
    named = bed.add_node("named")
    anyhost = bed.add_node("anyhost")   # no -n: OpenSSH reads an empty principal list as "any host"
    misnamed = bed.add_node("misnamed")  # names only the node name, not the address the gateway dials
    keygen_sign(ca, named, f"named,{named.address}")
    keygen_sign(ca, anyhost, None)
    keygen_sign(ca, misnamed, "misnamed")
    assert "Principals: (none)" in keygen_list(anyhost.host_cert)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"@cert-authority * {(tmp_path / 'host_ca.pub').read_text().strip()}\n")
    cfg = config_for(bed, ["named", "anyhost", "misnamed"])
    cfg = replace(cfg, ssh=replace(cfg.ssh, known_hosts=known_hosts))
    gw = Gateway(cfg)
    await gw.start()
    try:
        await wait_for(lambda: gw.pool.tunnels["named"].state.value == "up", what="the correctly named node up")
        # (asyncssh itself refuses a non-empty list without the address; the empty list is ours to refuse)
        for name, why in (("anyhost", "names no principals"), ("misnamed", "principal mismatch")):
            tunnel = gw.pool.tunnels[name]
            await wait_for(lambda t=tunnel: t.state.value == "refused", what=f"{name} refused")
            assert tunnel.machine.connects == 0 and tunnel.machine.connect_failures == 1
            assert why in (tunnel.machine.last_error or ""), tunnel.machine.last_error
        assert named.accepted_logins() == 1
        assert anyhost.accepted_logins() == 0 and misnamed.accepted_logins() == 0, "refused before logging in"
    finally:
        await gw.stop()
