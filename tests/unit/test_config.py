"""Config loading: defaults, relative paths, and one clear message per mistake naming file and key."""

from pathlib import Path

import pytest

from tunneld.config import load_config
from tunneld.errors import ConfigError

GOOD = """
[ssh]
user = "tunnel"
private_key = "keys/id_ed25519"
known_hosts = "known_hosts"
keepalive_interval = 5

[[nodes]]
name = "node-1"
address = "192.0.2.10"
pod_cidr = "10.244.1.0/24"

[[nodes]]
name = "node-2"
address = "2001:DB8::2"
ssh_port = 2222
"""


def write(tmp_path: Path, text: str, name: str = "tunneld.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text))
    return exc.value.problems


def test_good_config(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.ssh.user == "tunnel"
    assert cfg.ssh.private_key == (tmp_path / "keys/id_ed25519").resolve()
    assert cfg.ssh.keepalive_interval == 5.0 and cfg.ssh.keepalive_count_max == 3
    assert [n.name for n in cfg.nodes] == ["node-1", "node-2"]
    assert cfg.nodes[0].ssh_port == 22 and cfg.nodes[0].kubelet_port == 10250
    assert str(cfg.nodes[0].pod_cidr) == "10.244.1.0/24"
    assert cfg.nodes[1].address == "2001:db8::2", "addresses are normalised"


def test_inventory_file(tmp_path: Path) -> None:
    write(tmp_path, '[[nodes]]\nname = "node-3"\naddress = "192.0.2.13"\n', "nodes.toml")
    cfg = load_config(write(tmp_path, GOOD + '\n[inventory]\nfile = "nodes.toml"\n'))
    assert [n.name for n in cfg.nodes] == ["node-1", "node-2", "node-3"]


def test_every_mistake_is_reported_with_file_and_key(tmp_path: Path) -> None:
    text = """
[ssh]
keepalive_interval = "soon"
backoff_jitter = 2.0
colour = "blue"

[[nodes]]
name = "Node_1"
address = "192.0.2.1"
ssh_port = 70000

[[nodes]]
name = "node-2"
pod_cidr = "10.244.1.1/24"
"""
    found = problems(tmp_path, text)
    path = str(tmp_path / "tunneld.toml")
    assert all(p.startswith(path + ": ") for p in found)
    joined = "\n".join(found)
    for expected in (
        "ssh.keepalive_interval: expected a number, got str 'soon'",
        "ssh.backoff_jitter: 2 is not between 0 and 1",
        "ssh.colour: unknown key",
        "ssh.private_key: required",
        "ssh.known_hosts: required",
        "'Node_1' is not a valid node name",
        "nodes[0] (Node_1).ssh_port: 70000 is not between 1 and 65535",
        "nodes[1] (node-2).address: required",
        "nodes[1] (node-2).pod_cidr: '10.244.1.1/24'",
    ):
        assert expected in joined, f"missing {expected!r} in:\n{joined}"


def test_duplicates(tmp_path: Path) -> None:
    text = GOOD + '\n[[nodes]]\nname = "node-1"\naddress = "192.0.2.10"\n'
    joined = "\n".join(problems(tmp_path, text))
    assert "nodes[2] (node-1).name: 'node-1' is already the name of nodes[0] (node-1)" in joined
    assert "nodes[2] (node-1).address: 192.0.2.10 is already the address of nodes[0] (node-1)" in joined


def test_syntax_error_names_line(tmp_path: Path) -> None:
    (found,) = problems(tmp_path, "[ssh]\nuser = \n")
    assert "invalid TOML" in found and "line 2" in found


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")


def test_insecure_skip_needs_no_known_hosts(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[ssh]\nprivate_key = "k"\ninsecure_skip_host_key_check = true\n'))
    assert cfg.ssh.insecure_skip_host_key_check and cfg.ssh.known_hosts is None


def test_inventory_problems_name_the_inventory_file(tmp_path: Path) -> None:
    write(tmp_path, '[[nodes]]\nname = "node-1"\naddress = "not an address"\n', "nodes.toml")
    found = problems(tmp_path, GOOD + '\n[inventory]\nfile = "nodes.toml"\n')
    assert any(p.startswith(str(tmp_path / "nodes.toml") + ": ") and "neither an IP" in p for p in found)


def test_node_in_both_files(tmp_path: Path) -> None:
    write(tmp_path, '[[nodes]]\nname = "node-1"\naddress = "192.0.2.99"\n', "nodes.toml")
    found = problems(tmp_path, GOOD + '\n[inventory]\nfile = "nodes.toml"\n')
    assert any("node 'node-1' is also defined in" in p for p in found)


def test_overlapping_pod_cidrs_found_in_one_sorted_pass() -> None:
    import ipaddress
    import time

    from tunneld.config.nodes import overlapping_pod_cidrs
    from tunneld.config.schema import Node

    def node(name: str, cidr: str | None) -> Node:
        return Node(name=name, address=f"192.0.2.{len(name)}",
                    pod_cidr=ipaddress.ip_network(cidr) if cidr else None)

    many = [node(f"n{i}", f"10.{i // 256}.{i % 256}.0/24") for i in range(5000)]
    started = time.monotonic()
    assert overlapping_pod_cidrs([*many, node("v6", "fd00::/64"), node("none", None)]) == []
    assert time.monotonic() - started < 1.0
    found = overlapping_pod_cidrs([node("a", "10.0.0.0/16"), node("b", "10.0.5.0/24"), node("c", "10.0.9.0/24"),
                                   node("d", "10.1.0.0/24"), node("e", "10.1.0.0/24"), node("f", "fd00::/48"),
                                   node("g", "fd00:0:0:1::/64"), node("h", "10.2.0.0/24")])
    assert found == ["node 'b': pod_cidr 10.0.5.0/24 overlaps node 'a''s 10.0.0.0/16",
                     "node 'c': pod_cidr 10.0.9.0/24 overlaps node 'a''s 10.0.0.0/16",
                     "node 'e': pod_cidr 10.1.0.0/24 is the same as node 'd''s 10.1.0.0/24",
                     "node 'g': pod_cidr fd00:0:0:1::/64 overlaps node 'f''s fd00::/48"]


def test_stream_limits(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert (cfg.limits.stream_idle_timeout, cfg.limits.stream_max_lifetime) == (14400.0, 0.0)  # 4 hours; no limit
    cfg = load_config(write(tmp_path, GOOD + "\n[limits]\nstream_idle_timeout = 1\nstream_max_lifetime = 2.5\n"))
    assert (cfg.limits.stream_idle_timeout, cfg.limits.stream_max_lifetime) == (1.0, 2.5)
