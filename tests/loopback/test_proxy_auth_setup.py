"""Setting up the proxy front's authentication: no silent downgrade, the explicit insecure switch and its warnings,
and ``tunneld dev``'s printed commands, run verbatim as a user would paste them."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from certs.files import write_secret
from tunneld.app import Gateway
from tunneld.cli import render
from tunneld.config import AuthSettings, ProxySettings, StatusSettings
from tunneld.dev.cluster import DevCluster

from ..curl import curl
from .conftest import fast_config, next_base, started

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
NODE = "/api/v1/nodes/node-1/proxy/healthz"


async def test_serve_refuses_a_tcp_proxy_listener_without_authentication(cluster: DevCluster) -> None:
    cfg = replace(fast_config(cluster), auth=AuthSettings(), proxy=ProxySettings(listen="127.0.0.1:0"))
    gw = Gateway(cfg)
    with pytest.raises(RuntimeError, match=r"no authentication is configured for this TCP listener.*token_file"):
        await gw.start()
    await gw.stop(0.0)
    assert gw.proxy.ports == []


def test_check_config_names_the_fixes_and_warns_about_the_insecure_switch(short_dir: Path) -> None:
    base = '[ssh]\nprivate_key = "id"\nknown_hosts = "kh"\n\n[status]\nsocket = ""\n\n'
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(short_dir / "id")], check=True)
    (short_dir / "kh").write_text("")
    cfg = short_dir / "tunneld.toml"
    cfg.write_text(base + '[proxy]\nlisten = "127.0.0.1:8001"\n')
    r = subprocess.run([sys.executable, "-m", "tunneld", "check-config", str(cfg)], capture_output=True, env=ENV,
                       timeout=60)
    assert r.returncode != 0 and b"proxy.listen: no authentication" in r.stderr, r
    assert b"[auth] token_file" in r.stderr and b"client_ca" in r.stderr and b"[proxy] socket" in r.stderr
    r = subprocess.run([sys.executable, "-m", "tunneld", "serve", "-c", str(cfg)], capture_output=True, env=ENV,
                       timeout=60)
    assert r.returncode != 0 and b"proxy.listen: no authentication" in r.stderr, r
    cfg.write_text(base + '[proxy]\nlisten = "127.0.0.1:8001"\ninsecure_anonymous_loopback = true\n')
    r = subprocess.run([sys.executable, "-m", "tunneld", "check-config", str(cfg)], capture_output=True, env=ENV,
                       timeout=60)
    assert r.returncode == 0 and b"warning: proxy.insecure_anonymous_loopback = true" in r.stderr, r


async def test_insecure_anonymous_loopback_serves_anonymous_callers_and_says_so(
        cluster: DevCluster, short_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    status_sock = short_dir / "st.sock"
    cfg = fast_config(cluster, socket=status_sock)
    cfg = replace(cfg, auth=AuthSettings(), status=StatusSettings(socket=status_sock),
                  proxy=ProxySettings(listen="127.0.0.1:0", insecure_anonymous_loopback=True))
    gw = await started(cfg)
    try:
        assert any("insecure_anonymous_loopback = true" in r.getMessage() for r in caplog.records
                   if r.name == "tunneld" and r.levelno == logging.WARNING), "no warning at start"
        r = await curl("-i", f"http://127.0.0.1:{gw.proxy.ports[0]}{NODE}")
        assert r.stdout.startswith(b"HTTP/1.1 200") and r.stdout.endswith(b"ok"), r.stdout
        r = await curl("-i", "-H", "Authorization: Bearer forged", f"http://127.0.0.1:{gw.proxy.ports[0]}{NODE}")
        assert r.stdout.startswith(b"HTTP/1.1 401"), r.stdout  # credentials, when sent, must still be valid
        assert any("insecure_anonymous_loopback" in w for w in gw.info()["warnings"])
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tunneld", "status", "--socket", str(status_sock), "--color", "never",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err
        assert out.startswith(b"WARNING: proxy.insecure_anonymous_loopback = true"), out
        assert b"node-1" in out
    finally:
        await gw.stop(0.0)


def test_status_shows_no_warning_when_nothing_insecure_is_set() -> None:
    text = render.to_text(render.overview({"gateway": {"warnings": []}, "tunnels": []}))
    assert "WARNING" not in text


async def test_dev_prints_commands_that_work_verbatim(short_dir: Path) -> None:
    """``tunneld dev`` never runs anonymous: the commands it prints carry the token it wrote, and work as printed."""
    argv = [sys.executable, "-m", "tunneld", "dev", "--nodes", "2", "--base-address", next_base(),
            "--proxy-port", "0", "--workdir", str(short_dir / "w")]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    assert proc.stdout is not None
    try:
        printed: list[str] = []
        async with asyncio.timeout(90):
            while (line := (await proc.stdout.readline()).decode()) and not line.startswith("Ctrl-C"):
                printed.append(line.rstrip("\n"))
        commands = [line.strip() for line in printed[printed.index(next(p for p in printed if p.startswith("Try"))):]
                    if line.startswith("  ")]
        assert commands, printed
        workdir = short_dir / "w"
        token = (workdir / "proxy.token").read_text().strip()
        for name in ("proxy.token", "tokens.csv", "kubeconfig"):
            assert (workdir / name).stat().st_mode & 0o777 == 0o600, name
        assert "insecure_anonymous_loopback" not in (workdir / "tunneld.toml").read_text()
        assert all(token not in c for c in commands), "the token itself is printed"
        kinds = {"curl": 0, "kubectl": 0}
        for command in commands:
            program = "kubectl" if "kubectl" in command else command.split()[0]
            if program == "kubectl" and shutil.which("kubectl") is None:
                continue
            kinds[program] += 1
            run = await asyncio.create_subprocess_exec("timeout", "5", "bash", "-c", command, stdout=subprocess.PIPE,
                                                       stderr=subprocess.PIPE)
            out, err = await run.communicate()
            follow = "follow=true" in command
            assert run.returncode in ((0, 124) if follow else (0,)), (command, out[:300], err[:300])
            assert out and b"Unauthorized" not in out and b"Forbidden" not in out, (command, out[:300])
            if command.endswith("/healthz"):
                assert out == b"ok", (command, out)
            if " exec " in command:
                expected = b"typed into stdin\n" if command.endswith("-- cat") else b"hello from web-1\n"
                assert out == expected, (command, out)
            if " port-forward " in command:
                assert b"hello" in out, (command, out)
            if follow:
                assert out.decode().splitlines()[0].startswith("node-1/web-1/nginx line"), out
        assert kinds["curl"] >= 6 and (kinds["kubectl"] >= 6 or shutil.which("kubectl") is None), kinds
        # without the token the same URL is refused
        url = next(c for c in commands if c.endswith(NODE)).split()[-1]
        r = await curl("-i", "--cacert", str(workdir / "proxy-ca.crt"), url)
        assert r.stdout.startswith(b"HTTP/1.1 401"), r.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def test_sighup_applies_a_new_rule_table_and_token_file(cluster: DevCluster) -> None:
    assert cluster.config_path is not None
    gw = await started(fast_config(cluster))
    await gw.api_front.pods.refresh()
    try:
        url = f"http://127.0.0.1:{gw.proxy.ports[0]}{NODE}"
        old = ": ".join(cluster.auth_header)
        r = await curl("-i", "-H", old, url)
        assert r.stdout.startswith(b"HTTP/1.1 200"), r.stdout
        with cluster.config_path.open("a") as fh:
            fh.write('\n[[authz.rules]]\ngroups = ["system:masters"]\nresources = ["pods/log"]\nverbs = ["get"]\n')
        await gw.reload()
        r = await curl("-i", "-H", old, url)
        assert r.stdout.startswith(b"HTTP/1.1 403"), r.stdout
        assert f"no rule in [[authz.rules]] of {cluster.config_path} allows it".encode() in r.stdout
        write_secret(cluster.workdir / "tokens.csv", b'fresh-token-5d1c,someone,1,"system:masters"\n')
        await gw.reload()
        r = await curl("-i", "-H", old, url)
        assert r.stdout.startswith(b"HTTP/1.1 401"), r.stdout  # the old token is gone
        r = await curl("-i", "-H", "Authorization: Bearer fresh-token-5d1c",
                       f"http://127.0.0.1:{gw.proxy.ports[0]}/api/v1/namespaces/default/pods/web-1/log")
        assert r.stdout.startswith(b"HTTP/1.1 200"), r.stdout
    finally:
        await gw.stop(0.0)
