"""The unit under a real systemd (252, Debian's) in a booted container, driven with ``systemctl`` as a user would.

Inside: the shipped unit and sysusers file, the wheel installed offline at /usr/local/bin/tunneld, a real OpenSSH
sshd as the node (on the container's loopback) and the simulated kubelet behind it. Checked: READY only after the
listeners, every hardening option in force, ``systemctl reload`` that waits for the daemon and fails on a refused
file, watchdog kill and restart, drain on stop (status text, a stream kept until it ends, a stream cut at the end of
the grace period logged). With ``CI=true`` this module may not skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import nspawn
from tests.waiting import wait_sync
from tunneld.dev.pki import DevCA

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
CONFIG = """\
[ssh]
user = "root"
private_key = "/etc/tunneld/id_ed25519"
known_hosts = "/etc/tunneld/known_hosts"
keepalive_interval = 2
backoff_initial = 0.2
backoff_max = 1

[health]
period = 1

[status]
socket = "/run/tunneld/tunneld.sock"

[egress]
socket = "/run/tunneld/egress.sock"
socket_mode = "0660"

[inventory]
file = "/etc/tunneld/nodes.toml"
"""
NODE = '[[nodes]]\nname = "{name}"\naddress = "{address}"\n'
PROVISION = """\
pip install -q --no-index --find-links /wheels --break-system-packages /kit/own/*.whl
install -m 0644 /kit/systemd/tunneld.service /etc/systemd/system/tunneld.service
install -m 0644 /kit/systemd/tunneld.sysusers /usr/lib/sysusers.d/tunneld.conf
systemd-sysusers
install -d -m 0750 -o root -g tunneld /etc/tunneld
ssh-keygen -q -t ed25519 -N '' -f /etc/tunneld/id_ed25519
chgrp tunneld /etc/tunneld/id_ed25519 && chmod 0640 /etc/tunneld/id_ed25519
install -d -m 0700 /root/.ssh && cat /etc/tunneld/id_ed25519.pub >> /root/.ssh/authorized_keys
printf '127.0.0.1,127.0.0.2 %s\\n' "$(cut -d' ' -f1,2 /etc/ssh/ssh_host_ed25519_key.pub)" > /etc/tunneld/known_hosts
systemd-run -q --unit=kubelet-sim --property=Type=exec /usr/bin/python3 -m tunneld.dev.kubelet --node node-1 \
    --address 127.0.0.1 --cert /kit/kubelet.crt --key /kit/kubelet.key
systemctl daemon-reload
"""


@pytest.fixture(scope="module")
def box() -> Iterator[nspawn.Container]:
    why = nspawn.missing_tools()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the systemd container test cannot run: {why}")
        pytest.skip(why)
    kit = Path(tempfile.mkdtemp(prefix="tdkit", dir="/tmp"))
    try:
        nspawn.ensure_tree()
        nspawn.build_wheels(kit)
        (kit / "systemd").mkdir()
        for unit in ("tunneld.service", "tunneld.sysusers"):
            (kit / "systemd" / unit).write_text((SYSTEMD / unit).read_text())
        served = DevCA().issue_serving("node-1", ["127.0.0.1"])
        (kit / "kubelet.crt").write_bytes(served.cert_pem)
        (kit / "kubelet.key").write_bytes(served.key_pem)
        (kit / "kubelet.key").chmod(0o644)  # read inside the container by the simulated kubelet (root)
        with nspawn.booted(f"tdsys{os.getpid()}", {nspawn.WHEELS: "/wheels", kit: "/kit"}) as container:
            container.sh(PROVISION, timeout=300)
            container.write("/etc/tunneld/tunneld.toml", CONFIG, 0o640)
            container.write("/etc/tunneld/nodes.toml", NODE.format(name="node-1", address="127.0.0.1"), 0o640)
            container.run(["chgrp", "tunneld", "/etc/tunneld/tunneld.toml", "/etc/tunneld/nodes.toml"])
            yield container
    finally:
        shutil.rmtree(kit, ignore_errors=True)


def show(box: nspawn.Container, *props: str) -> dict[str, str]:
    out = box.run(["systemctl", "show", "tunneld", *(f"-p{p}" for p in props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def gateway(box: nspawn.Container, path: str = "/gateway") -> dict:
    """GET ``path`` from the daemon's status socket, from the host through /proc/<pid>/root."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(box.path("/run/tunneld/tunneld.sock")))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"200", head
    return json.loads(body)


def wait(cond, what: str, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    return wait_sync(cond, timeout, what, interval=0.1)


def stays(cond, seconds: float) -> None:  # type: ignore[no-untyped-def]
    """``cond`` holds every time it is checked for ``seconds`` (something that must NOT happen yet)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert cond()
        time.sleep(0.1)


def connect_node(box: nspawn.Container, target: str = "127.0.0.1:10250") -> socket.socket:
    """A CONNECT stream through the egress socket, answered 200."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(box.path("/run/tunneld/egress.sock")))
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return s


def journal(box: nspawn.Container, since: str = "") -> str:
    args = ["journalctl", "-u", "tunneld", "--no-pager", "-o", "cat"] + ([f"--since={since}"] if since else [])
    return box.run(args).stdout


def tunnel_up(box: nspawn.Container, node: str = "node-1") -> bool:
    return any(t["node"] == node and t["state"] == "up" for t in gateway(box, "/tunnels")["tunnels"])


def test_start_is_ready_only_after_the_listeners(box: nspawn.Container) -> None:
    box.run(["systemctl", "start", "tunneld"], timeout=90)  # Type=notify: returns once READY=1 arrived
    # Right away, without waiting: both sockets answer, so READY=1 came after they were bound.
    assert gateway(box)["reload"]["generation"] == 0
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(box.path("/run/tunneld/egress.sock")))
        s.sendall(b"CONNECT 192.0.2.1:22 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(64).startswith(b"HTTP/1.1 403")
    wait(lambda: tunnel_up(box), "the tunnel through the container's sshd")
    assert show(box, "ActiveState")["ActiveState"] == "active"
    assert "ConfigurationDirectory" not in journal(box)


def test_every_hardening_option_is_in_force(box: nspawn.Container) -> None:
    pid = show(box, "MainPID")["MainPID"]
    status = box.run(["cat", f"/proc/{pid}/status"]).stdout
    fields = dict(re.findall(r"^(\w+):\s*(.*)$", status, re.M))
    assert fields["NoNewPrivs"] == "1" and fields["Seccomp"] == "2"
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0
    uid = box.run(["id", "-u", "tunneld"]).stdout.strip()
    assert fields["Uid"].split()[0] == uid
    props = show(box, "NoNewPrivileges", "ProtectSystem", "MemoryDenyWriteExecute", "RestrictNamespaces",
                 "PrivateUsers", "PrivateDevices", "ProtectKernelTunables", "SystemCallArchitectures")
    assert props["ProtectSystem"] == "strict" and props["SystemCallArchitectures"] == "native"
    for key in ("NoNewPrivileges", "MemoryDenyWriteExecute", "RestrictNamespaces", "PrivateUsers",
                "PrivateDevices", "ProtectKernelTunables"):
        assert props[key] == "yes", key
    # W^X is enforced on the running daemon: a writable+executable mapping is refused inside its sandbox.
    probe = box.run(["systemd-run", "-q", "--wait", "--pipe", "-p", "MemoryDenyWriteExecute=yes", "-p",
                     "SystemCallArchitectures=native", "/usr/bin/python3", "-c",
                     "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_WRITE | mmap.PROT_EXEC)"], check=False)
    assert probe.returncode != 0 and "PermissionError" in probe.stderr + probe.stdout
    score = box.run(["systemd-analyze", "security", "--no-pager", "tunneld.service"]).stdout
    found = re.search(r"Overall exposure level for tunneld\.service: (\d+\.\d+)", score)
    assert found, score[-1500:]
    print(f"systemd-analyze security tunneld.service (systemd 252, running unit): {found.group(1)}")
    assert float(found.group(1)) <= 1.5, score


def test_reload_waits_for_the_daemon_and_fails_when_refused(box: nspawn.Container) -> None:
    wait(lambda: tunnel_up(box), "the tunnel")
    pid = show(box, "MainPID")["MainPID"]
    nodes = NODE.format(name="node-1", address="127.0.0.1")
    for i in range(5):  # each reload has been applied by the time systemctl returns
        name = f"extra-{i}"
        box.write("/etc/tunneld/nodes.toml", nodes + NODE.format(name=name, address="127.0.0.2"), 0o644)
        box.run(["systemctl", "reload", "tunneld"], timeout=120)
        info = gateway(box, "/tunnels")
        assert info["gateway"]["reload"]["outcome"] == "reloaded"
        assert {t["node"] for t in info["tunnels"]} == {"node-1", name}
    generation = gateway(box)["reload"]["generation"]
    box.write("/etc/tunneld/nodes.toml", nodes + '[[nodes]]\nname = "Bad Name"\naddress = "127.0.0.3"\n', 0o644)
    refused = box.run(["systemctl", "reload", "tunneld"], check=False, timeout=120)
    assert refused.returncode != 0
    last = gateway(box)["reload"]
    assert last["generation"] == generation + 1 and last["outcome"] == "refused"
    assert any("Bad Name" in p for p in last["problems"])
    assert "Bad Name" in journal(box)
    assert show(box, "ActiveState", "MainPID") == {"ActiveState": "active", "MainPID": pid}
    assert {t["node"] for t in gateway(box, "/tunnels")["tunnels"]} == {"node-1", "extra-4"}
    box.write("/etc/tunneld/nodes.toml", nodes, 0o644)
    box.run(["systemctl", "reload", "tunneld"], timeout=120)


def test_a_stuck_loop_is_killed_by_the_watchdog_and_restarted(box: nspawn.Container) -> None:
    box.run(["mkdir", "-p", "/etc/systemd/system/tunneld.service.d"])
    box.write("/etc/systemd/system/tunneld.service.d/watchdog.conf",
              "[Service]\nWatchdogSec=2s\nTimeoutAbortSec=3s\nRestartSec=1s\n")
    box.run(["systemctl", "daemon-reload"])
    box.run(["systemctl", "restart", "tunneld"], timeout=90)
    before = show(box, "MainPID", "NRestarts")
    box.run(["kill", "-STOP", before["MainPID"]])
    after = wait(lambda: (s := show(box, "MainPID", "NRestarts", "ActiveState"))["ActiveState"] == "active"
                 and s["MainPID"] not in ("0", before["MainPID"]) and s, "a restart by the watchdog", timeout=60)
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    assert "Watchdog timeout" in box.run(["journalctl", "--no-pager", "-o", "cat", "-u", "tunneld"]).stdout
    box.run(["rm", "/etc/systemd/system/tunneld.service.d/watchdog.conf"])
    box.run(["systemctl", "daemon-reload"])


def test_stop_drains_open_streams_then_cuts_them_at_the_grace(box: nspawn.Container) -> None:
    box.write("/etc/systemd/system/tunneld.service.d/grace.conf",
              "[Service]\nExecStart=\nExecStart=/usr/local/bin/tunneld serve --config /etc/tunneld/tunneld.toml "
              "--grace 4\n")
    box.run(["systemctl", "daemon-reload"])
    box.run(["systemctl", "restart", "tunneld"], timeout=90)
    wait(lambda: tunnel_up(box), "the tunnel")
    # A stream that ends during the drain: the daemon stops as soon as it has.
    stream = connect_node(box)
    box.run(["systemctl", "stop", "--no-block", "tunneld"])
    state = wait(lambda: (s := show(box, "ActiveState", "StatusText"))["ActiveState"] == "deactivating" and s,
                 "the drain")
    assert "draining" in state["StatusText"]
    stays(lambda: show(box, "ActiveState")["ActiveState"] == "deactivating", 1.0)  # open stream: no exit yet
    stream.close()
    wait(lambda: show(box, "ActiveState")["ActiveState"] == "inactive", "the stop after the stream ended",
         timeout=3.5)
    # A stream still open at the end of the grace period is cut, and the journal says so.
    box.run(["systemctl", "start", "tunneld"], timeout=90)
    wait(lambda: tunnel_up(box), "the tunnel")
    stream = connect_node(box)
    stream.settimeout(30)
    started = time.monotonic()
    box.run(["systemctl", "stop", "tunneld"], timeout=60)
    assert time.monotonic() - started >= 3.5
    try:
        assert stream.recv(1) == b""
    except ConnectionResetError:
        pass
    stream.close()
    assert re.search(r"1 connections still open after the 4 s grace period: cutting them", journal(box))
    box.run(["rm", "/etc/systemd/system/tunneld.service.d/grace.conf"])
    box.run(["systemctl", "daemon-reload"])
