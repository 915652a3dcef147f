"""Bootstrap's SSH step end to end: ``tunneld bootstrap --ssh-key`` against a real ``tunneld serve`` (certificates
API with ``[ca] ssh_user_ca``, and the ``[dialin]`` listener) gets the node's SSH certificate with the kubelet
client certificate it just obtained; the real OpenSSH client logs in with it through the command
``tunneld node ssh-command`` prints; ``--rotate`` renews it before it expires (``ssh_node_validity = 60``) and the
renewed one logs in too."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import aiohttp
import pytest

from certs.nodesshboot import certificate_validity
from tests.certs_daemon import Daemon, DaemonConfig, free_port, write_config
from tests.dialinbed import SSH, DialinBed
from tests.loopback.test_bootstrap_e2e import PIN_RE, Node, Run, make_token, run_once
from tests.waiting import wait_value

from .conftest import next_base

pytestmark = pytest.mark.skipif(not os.access(SSH, os.X_OK), reason="the OpenSSH client is missing")


def cluster(d: Path) -> tuple[DaemonConfig, str, DialinBed, int]:
    """The daemon's config (auto-approval, node-1 dial-in, [dialin] on a fixed port), the CA pin, the SSH CAs."""
    host = next_base()
    (d / "ssh").mkdir()
    bed = DialinBed(d / "ssh")
    port = free_port("127.0.0.1")
    dialin = bed.config_text([]).split("[dialin]", 1)[1].replace('listen = "127.0.0.1:0"',
                                                                   f'listen = "127.0.0.1:{port}"')
    cfg = write_config(d / "m", host, approval="auto-approve-group", extra=f"[dialin]{dialin}\n")
    text = cfg.path.read_text()
    text = text.replace(f'[ca]\ncert = "{cfg.ca_cert}"\n',
                        f'[ca]\ncert = "{cfg.ca_cert}"\nssh_user_ca = "{bed.dir / "ssh_user_ca"}"\n'
                        "ssh_node_validity = 60\n")
    text = text.replace('name = "node-1"\n', 'name = "node-1"\nmode = "dial-in"\n')
    cfg.path.write_text(text)
    init = subprocess.run(["tunneld", "ca", "init", "--config", str(cfg.path), "--no-ssh"], capture_output=True,
                          text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    m = PIN_RE.search(init.stdout)
    assert m, init.stdout
    return cfg, m.group(1), bed, port


async def tunnel_state(cfg: DaemonConfig, node: str) -> str:
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(cfg.socket))) as s:
        async with s.get(f"http://localhost/tunnels/{node}", timeout=aiohttp.ClientTimeout(total=5)) as r:
            return str((await r.json())["state"])


def cert_facts(path: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-L", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


async def test_bootstrap_yields_an_ssh_certificate_that_logs_in_and_rotate_renews_it(short_dir: Path) -> None:
    cfg, pin, bed, port = cluster(short_dir)
    token = make_token(cfg, "--ttl", "1h", "--node", "node-1")
    daemon = Daemon(cfg)
    await daemon.start()
    rotating: Run | None = None
    try:
        assert await tunnel_state(cfg, "node-1") == "waiting"
        node = Node(short_dir / "n1", "node-1")
        key = node.dir / "ssh" / "id_ed25519"
        rc, err = await run_once(node.argv("--timeout", "20", "--ssh-key", str(key), *node.discovery(cfg, pin)),
                                 token)
        assert rc == 0, err
        cert = key.with_name("id_ed25519-cert.pub")
        assert f"SSH certificate for node:node-1 written to {cert}" in err, err
        assert (key.stat().st_mode & 0o777) == 0o600
        facts = cert_facts(cert)
        assert "node:node-1" in facts and "permit-port-forwarding" in facts and "permit-pty" not in facts, facts
        first_after, first_before = certificate_validity(cert.read_text())
        assert first_before - first_after <= 60 + 5 * 60  # ssh_node_validity, plus the CA's backdating

        argv, line = bed.ssh_command(cfg.path, "node-1", port, key)
        first = bed.start_ssh(argv, line, "node-1")
        await wait_value(lambda: tunnel_state(cfg, "node-1"), lambda s: s == "up", 20,
                         f"node-1 up with the bootstrapped certificate; ssh said {bed.ssh_log('node-1')}")

        # --rotate renews it at 70-90 % of its life (the bootstrap token is not needed any more)
        node.bootstrap_kubeconfig.unlink()
        rotating = await Run.start(node.argv("--rotate", "--ssh-key", str(key)))
        await rotating.wait_line(r"SSH certificate for node:node-1 written", timeout=60)
        _, before = certificate_validity(cert.read_text())
        assert before >= first_before and cert_facts(cert) != facts  # a new serial
        first.terminate()
        first.wait(10)
        await wait_value(lambda: tunnel_state(cfg, "node-1"), lambda s: s == "waiting", 20, "node-1 waiting")
        bed.start_ssh(argv, line, "node-1")  # the unit starts the same command again: it reads the renewed file
        await wait_value(lambda: tunnel_state(cfg, "node-1"), lambda s: s == "up", 20,
                         f"node-1 up with the renewed certificate; ssh said {bed.ssh_log('node-1')}")
        rotating.proc.terminate()
        rc, err = await rotating.result(timeout=10)
        rotating = None
        assert rc == 0, err
    finally:
        if rotating is not None and rotating.proc.returncode is None:
            rotating.proc.kill()
            await rotating.proc.wait()
        bed.close()
        assert await daemon.stop() == 0
