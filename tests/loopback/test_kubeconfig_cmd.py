"""``tunneld kubeconfig``: the file it writes works with the real kubectl on the first try, and what the user may do
is the rule table's decision (a user allowed pods/log but not pods/exec; a user no rule names)."""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from certs.ca import CertificateAuthority, cert_pem, key_pem
from certs.files import write_secret
from tests import kubectl
from tests.loopback.conftest import next_base, started
from tunneld.app import Gateway
from tunneld.config import load_config
from tunneld.dev.cluster import DevCluster

RULES = """
[[authz.rules]]
groups = ["system:masters"]
resources = ["*"]
verbs = ["*"]

[[authz.rules]]
groups = ["viewers"]
resources = ["nodes", "pods", "pods/log"]
verbs = ["get", "list"]
"""


@pytest.fixture
async def cluster(short_dir: Path) -> AsyncIterator[DevCluster]:
    c = DevCluster(nodes=2, base_address=next_base(), ssh_port=2222, workdir=short_dir / "dev", proxy_port=0,
                   proxy_tls=True)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


def _config_with_cluster_ca(cluster: DevCluster) -> Path:
    """The dev cluster's config with a cluster CA that signs the proxy front's certificate and its client CAs."""
    work = cluster.workdir
    ca = CertificateAuthority.create("test cluster CA", "ecdsa", dt.timedelta(days=2))
    (work / "ca.crt").write_bytes(cert_pem(ca.cert))
    write_secret(work / "ca.key", key_pem(ca.key))
    server_cert, server_key = ca.issue_server(["127.0.0.1", "localhost"])
    (work / "front.crt").write_bytes(cert_pem(server_cert))
    write_secret(work / "front.key", key_pem(server_key))
    assert cluster.config_path is not None
    text = cluster.config_path.read_text().replace('tls_cert = "proxy.crt"\ntls_key = "proxy.key"\n',
                                                   'tls_cert = "front.crt"\ntls_key = "front.key"\n'
                                                   'client_ca = "ca.crt"\n')
    path = work / "tunneld-ca.toml"
    path.write_text(text + '\n[ca]\ncert = "ca.crt"\nkey = "ca.key"\n' + RULES)
    return path


def _kubeconfig(config: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tunneld", "kubeconfig", "--config", str(config), "--out", str(out),
                           *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
async def gw(cluster: DevCluster) -> AsyncIterator[tuple[Gateway, Path]]:
    path = _config_with_cluster_ca(cluster)
    cfg = load_config(path)
    gateway = await started(replace(cfg, health=replace(cfg.health, period=0.3)))
    try:
        yield gateway, path
    finally:
        await gateway.stop(grace=1.0)


async def test_kubectl_works_with_the_written_kubeconfig_and_the_rules_decide(
        gw: tuple[Gateway, Path], short_dir: Path) -> None:
    _, config = gw
    viewer, nobody = short_dir / "alice.kubeconfig", short_dir / "bob.kubeconfig"
    made = await asyncio.to_thread(_kubeconfig, config, viewer, "--user", "alice", "--group", "viewers")
    assert made.returncode == 0, made.stderr
    assert viewer.stat().st_mode & 0o777 == 0o600 and "user 'alice'" in made.stdout
    assert (await asyncio.to_thread(_kubeconfig, config, nobody, "--user", "bob")).returncode == 0
    # alice may read pods and their logs...
    r = await kubectl.run([f"--kubeconfig={viewer}", "get", "pods", "-A", "-o", "name"])
    assert r.code == 0 and "pod/web-1" in r.text, r.err
    r = await kubectl.run([f"--kubeconfig={viewer}", "logs", "--tail=1", "web-1"])
    assert r.code == 0 and "web-1/nginx line" in r.text, r.err
    # ...but not exec into them: the front says 403, and kubectl prints the reason
    r = await kubectl.run([f"--kubeconfig={viewer}", "exec", "web-1", "--", "echo", "hi"])
    assert r.code != 0 and b"may not create pods/exec" in r.err, r.err
    # bob is authenticated (his certificate is good) but no rule names him
    r = await kubectl.run([f"--kubeconfig={nobody}", "get", "pods", "-A"])
    assert r.code != 0 and (b"Forbidden" in r.err or b"forbidden" in r.err), r.err


def test_refuses_when_the_front_would_not_accept_its_certificate(cluster: DevCluster, short_dir: Path) -> None:
    assert cluster.config_path is not None
    r = _kubeconfig(cluster.config_path, short_dir / "x.kubeconfig", "--user", "alice")  # no [ca] in the dev config
    assert r.returncode == 1 and "no [ca]" in r.stderr and not (short_dir / "x.kubeconfig").exists()
    path = _config_with_cluster_ca(cluster)
    path.write_text(path.read_text().replace('client_ca = "ca.crt"\n', 'client_ca = "pod-ca.crt"\n'))
    r = _kubeconfig(path, short_dir / "x.kubeconfig", "--user", "alice")
    assert r.returncode == 1 and "client_ca must be the cluster CA" in r.stderr, r.stderr
    r = _kubeconfig(_config_with_cluster_ca(cluster), short_dir / "x.kubeconfig", "--user", "al\nice")
    assert r.returncode == 1 and "is not a user or group name" in r.stderr, r.stderr
