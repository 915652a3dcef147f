"""``tunneld check-config`` names the file and the line or key of every mistake; ``serve`` refuses with the same words.

One case per kind of mistake an operator makes. Each runs the real CLI twice (check-config, then serve).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tunneld.dev.pki import DevCA

BASE = """\
[ssh]
user = "tunneld"
private_key = "id_ed25519"
known_hosts = "known_hosts"

[status]
socket = ""

[[nodes]]
name = "node-1"
address = "192.0.2.11"
pod_cidr = "10.244.1.0/24"
"""

NODE2 = '\n[[nodes]]\nname = "node-2"\naddress = "192.0.2.12"\n'

# (name, config text, expected message after "error: <file>: ")
CASES = [
    ("toml-syntax", BASE.replace('[status]', '[status'), "invalid TOML: Expected ']' at the end of a table "
                                                          "declaration (at line 6, column 8)"),
    ("unknown-key", BASE.replace('user = "tunneld"', 'usr = "tunneld"'), "ssh.usr: unknown key"),
    ("wrong-type", BASE + '\n[health]\nperiod = "10s"\n', "health.period: expected a number, got str '10s'"),
    ("missing-required", BASE.replace('private_key = "id_ed25519"\n', ''),
     "ssh.private_key: required (the key the gateway logs in to nodes with)"),
    ("bad-address", BASE.replace("192.0.2.11", "192.0.2.256"),
     "nodes[0] (node-1).address: '192.0.2.256' is neither an IP address nor a host name"),
    ("bad-cidr", BASE.replace("10.244.1.0/24", "10.244.1.1/24"),
     "nodes[0] (node-1).pod_cidr: '10.244.1.1/24': 10.244.1.1/24 has host bits set"),
    ("duplicate-node", BASE + NODE2.replace("node-2", "node-1"),
     "nodes[1] (node-1).name: 'node-1' is already the name of nodes[0] (node-1)"),
    ("duplicate-address", BASE + NODE2.replace("192.0.2.12", "192.0.2.11"),
     "nodes[1] (node-2).address: 192.0.2.11 is already the address of nodes[0] (node-1)"),
    ("out-of-range", BASE.replace('pod_cidr', 'ssh_port = 70000\npod_cidr'),
     "nodes[0] (node-1).ssh_port: 70000 is not between 1 and 65535"),
    ("same-pod-cidr", BASE + NODE2 + 'pod_cidr = "10.244.1.0/24"\n',
     "node 'node-2': pod_cidr 10.244.1.0/24 is the same as node 'node-1''s 10.244.1.0/24"),
    ("overlapping-pod-cidr", BASE + NODE2 + 'pod_cidr = "10.244.0.0/16"\n',
     "node 'node-1': pod_cidr 10.244.1.0/24 overlaps node 'node-2''s 10.244.0.0/16"),
    ("socket-twice", BASE.replace('socket = ""', 'socket = "/run/x.sock"') + '\n[egress]\nsocket = "/run/x.sock"\n',
     "egress.socket: /run/x.sock is also status.socket: each listener needs its own"),
    ("key-does-not-parse", BASE, "ssh.private_key: {dir}/id_ed25519: does not parse: Invalid private key",
     "id_ed25519", "not a key\n"),
    ("known-hosts-does-not-parse", BASE,
     "ssh.known_hosts: {dir}/known_hosts: line 2: not a public key: Invalid public key",
     "known_hosts", "# the cluster's SSH CA\n@cert-authority * ssh-ed25519 AAAA\n"),
    ("cert-not-for-key",
     BASE.replace("[status]", '[kubelet]\nclient_certificate = "a.crt"\nclient_key = "b.key"\n\n[status]'),
     "kubelet.client_key: {dir}/b.key: does not load with kubelet.client_certificate {dir}/a.crt: "
     "the key does not belong to the certificate"),
    ("ca-does-not-parse", BASE.replace("[status]", '[kubelet]\ncertificate_authority = "id_ed25519.pub"\n\n[status]'),
     "kubelet.certificate_authority: {dir}/id_ed25519.pub: not a PEM CA certificate: no certificate or crl found"),
    ("missing-key-file", BASE.replace('"id_ed25519"', '"gone_ed25519"'), "ssh.private_key: {dir}/gone_ed25519: "
                                                                        "file not found"),
    ("bad-log-format", BASE + '\n[log]\nformat = "xml"\n', "log.format: must be logfmt or json"),
    ("stream-idle-timeout", BASE + "\n[limits]\nstream_idle_timeout = 0\n",
     "limits.stream_idle_timeout: 0 is not greater than 0"),
    ("stream-max-lifetime", BASE + "\n[limits]\nstream_max_lifetime = -1\n",
     "limits.stream_max_lifetime: -1 is less than 0 (0: no limit)"),
]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tunneld", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def confdir(short_dir: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(short_dir / "id_ed25519")], check=True)
    ca = (short_dir / "id_ed25519.pub").read_text().split()
    (short_dir / "known_hosts").write_text(f"@cert-authority * {ca[0]} {ca[1]}\n")
    one, two = DevCA("one"), DevCA("two")
    one.issue_client("a").write(short_dir / "a.crt", short_dir / "a.key")
    two.issue_client("b").write(short_dir / "b.crt", short_dir / "b.key")
    return short_dir


def test_good_file_passes(confdir: Path) -> None:
    cfg = confdir / "tunneld.toml"
    cfg.write_text(BASE + NODE2)
    proc = run("check-config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{cfg}: ok (2 nodes)"
    (confdir / "kubeconfig").write_text("apiVersion: v1\nkind: Config\n")
    cfg.write_text(BASE + NODE2 + '[inventory]\nsource = "kubernetes"\nkubeconfig = "kubeconfig"\n')
    proc = run("check-config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{cfg}: ok (2 static nodes; the others come from the Kubernetes API at run time)"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_mistake_is_reported_by_check_config_and_serve(confdir: Path, case: tuple[str, ...]) -> None:
    _name, text, expected, *file = case
    if file:  # (file name, what it holds instead)
        (confdir / file[0]).write_text(file[1])
    cfg = confdir / "tunneld.toml"
    cfg.write_text(text)
    line = f"error: {cfg}: {expected.format(dir=confdir)}"
    check = run("check-config", str(cfg))
    assert check.returncode == 2 and check.stdout == ""
    assert line in check.stderr.splitlines(), check.stderr
    serve = run("serve", "--config", str(cfg))
    assert serve.returncode == 2
    assert serve.stderr == check.stderr, "serve refuses with the same messages"


def test_every_mistake_at_once_and_in_the_inventory_file(confdir: Path) -> None:
    inv = confdir / "nodes.toml"
    inv.write_text('[[nodes]]\nname = "Node_3"\naddress = "192.0.2.13"\nkubelet_prot = 10250\n')
    cfg = confdir / "tunneld.toml"
    cfg.write_text(BASE.replace('"id_ed25519"', '"gone"').replace("user =", "user = 1 #")
                   + '\n[inventory]\nfile = "nodes.toml"\n')
    proc = run("check-config", str(cfg))
    assert proc.returncode == 2
    errors = proc.stderr.splitlines()
    assert f"error: {cfg}: ssh.user: expected a string, got int 1" in errors
    assert f"error: {inv}: nodes[0] (Node_3).kubelet_prot: unknown key" in errors
    assert any(e.startswith(f"error: {inv}: nodes[0] (Node_3).name: 'Node_3' is not a valid node name") for e in errors)
    # A missing inventory file hides none of the other mistakes, file checks included.
    cfg.write_text(BASE.replace('"id_ed25519"', '"gone"').replace("user =", "user = 1 #")
                   + '\n[inventory]\nfile = "missing.toml"\n')
    errors = run("check-config", str(cfg)).stderr.splitlines()
    assert f"error: {cfg}: ssh.user: expected a string, got int 1" in errors
    assert any(e.startswith(f"error: {confdir / 'missing.toml'}: ") for e in errors), errors
    assert f"error: {cfg}: ssh.private_key: {confdir}/gone: file not found" in errors
    cfg.write_text(BASE.replace('"id_ed25519"', '"gone"').replace('"known_hosts"', '"nope"'))
    errors = run("check-config", str(cfg)).stderr.splitlines()
    assert errors == [f"error: {cfg}: ssh.private_key: {confdir}/gone: file not found",
                      f"error: {cfg}: ssh.known_hosts: {confdir}/nope: file not found"]
