"""One validator per syntax (netnames), and every place that takes a name, an address or a port uses it: a trailing
newline, an empty label, an over-long name or label, a value that is not a string, or an IPv6 zone id is refused
everywhere -- as a node name, a node address, a CSR name, a service endpoint, a proxy URL name, a CONNECT target."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

import netnames
from certs.csr import CSRInvalid, from_request_body
from certs.tokens import Identity
from proxy.connect import parse_authority
from proxy.routes import RouteError, split_scheme_name_port
from tests.certs_util import body, make_request
from tunneld.config import load_config
from tunneld.errors import ConfigError

LONG_LABEL = "a" * 64
LONG_NAME = ".".join(["a" * 63] * 4)  # 255 characters
assert len(LONG_NAME) > 253
HOSTILE_NAMES: list[Any] = [
    "node-1\n", "node-1\r\n", "\nnode-1", "a..b", ".a", "a.", "-a", "a-", "", " node-1", "node-1 ", "node_1",
    f"{LONG_LABEL}.example", LONG_NAME, "node-1\x00", "nöde", 5, None, ["node-1"], b"node-1", True,
]
HOSTILE_HOSTS: list[Any] = [
    "node-1\n", "10.0.0.1\n", "a..b", f"{LONG_LABEL}.example", LONG_NAME, "fe80::1%eth0", "[fe80::1%eth0]",
    "fe80::1%25eth0", "[1.2.3.4]", "10.0.0.256", "1.2.3.4 ", "", "::1]", 5, 3232235777, None, ["10.0.0.1"],
]


@pytest.mark.parametrize("value", HOSTILE_NAMES)
def test_dns_subdomain_refuses(value: Any) -> None:
    assert not netnames.is_dns_subdomain(value)
    assert not netnames.is_dns_label(value)


def test_dns_subdomain_accepts_the_longest_names() -> None:
    longest = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(longest) == 253 and netnames.is_dns_subdomain(longest)
    assert netnames.is_dns_subdomain("node-1") and netnames.is_dns_subdomain("a.b-c.d")
    assert netnames.is_dns_label("a" * 63) and not netnames.is_dns_label("a.b")


@pytest.mark.parametrize("value", HOSTILE_HOSTS)
def test_host_refused(value: Any) -> None:
    with pytest.raises(ValueError):
        netnames.parse_host(value)
    assert not netnames.is_host_name(value)


@pytest.mark.parametrize(("value", "normal"), [
    ("NODE-1", "node-1"), ("node-1.", "node-1"), ("Node-1.Example.", "node-1.example"),
    ("127.0.11.1.", "127.0.11.1"), ("[2001:DB8::0001]", "2001:db8::1"), ("2001:DB8::1", "2001:db8::1"),
    ("10.0.0.1", "10.0.0.1"),
])
def test_host_normal_form(value: str, normal: str) -> None:
    assert netnames.parse_host(value) == normal
    assert netnames.normalize_host(value) == normal
    assert netnames.parse_host(normal) == normal  # the normal form is a fixed point


@pytest.mark.parametrize("value", ["10.0.0.1\n", "fe80::1%eth0", " 10.0.0.1", "", "10.0.0.1.", 5, 2**32 - 1, None,
                                   b"10.0.0.1", True])
def test_ip_refused(value: Any) -> None:
    with pytest.raises(ValueError):
        netnames.parse_ip(value)
    assert not netnames.is_ip(value)


def test_zone_id_is_never_an_ip_key() -> None:
    key, ip = netnames.host_key("fe80::1%eth0")
    assert ip is None and key == "fe80::1%eth0"


@pytest.mark.parametrize("value", ["10.244.0.0/16\n", "10.244.0.1/16", "fe80::%eth0/64", 5, None, ""])
def test_network_refused(value: Any) -> None:
    with pytest.raises(ValueError):
        netnames.parse_network(value)


@pytest.mark.parametrize("value", ["80\n", "0", "65536", "+80", " 80", "\uff18\uff10", "\u0661\u0662", "", "80.0",
                                   True, 0, 70000, None, 80.0, "1" * 6])
def test_port_refused(value: Any) -> None:
    with pytest.raises(ValueError):
        netnames.parse_port(value)


@pytest.mark.parametrize("value", ["1-2\n", "2-1", "0-5", "1-65536", "1--2", "-5", "5-", " 5", "1 - 2", True, None,
                                   [5], "\u0661-\u0662"])
def test_port_range_refused(value: Any) -> None:
    with pytest.raises(ValueError):
        netnames.parse_port_range(value)
    with pytest.raises(ValueError):
        netnames.PortSet.parse([value])


def test_port_range_and_portset() -> None:
    ports = netnames.PortSet.parse([10255, "30000-32767"])
    assert 10255 in ports and 30000 in ports and 32767 in ports and 32768 not in ports and "10255" not in ports


@pytest.mark.parametrize("value", ["http\n", "-http", "http-", "a" * 16, "123", "HTTP", "", 80, None])
def test_port_name_refused(value: Any) -> None:
    assert not netnames.is_port_name(value)


@pytest.mark.parametrize("value", ["node-1:80\n", "node-1\n:80", "a..b:80", f"{LONG_LABEL}:80", f"{LONG_NAME}:80",
                                   "[fe80::1%eth0]:80", "[fe80::1%25eth0]:80", "10.0.0.1:", "10.0.0.1:0"])
def test_split_authority_and_listen_refuse(value: str) -> None:
    with pytest.raises(ValueError):
        netnames.split_authority(value)
    if not value.endswith(":0"):
        with pytest.raises(ValueError):
            netnames.split_host_port(value)


def test_peer_uid_of_a_unix_socket_pair() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        import os
        cred = netnames.peer_cred(a)
        assert cred is not None and cred.uid == os.geteuid() and cred.pid == os.getpid()
        assert netnames.peer_uid(b) == os.geteuid()
    with socket.socket(socket.AF_INET) as tcp:
        assert netnames.peer_uid(tcp) is None
    assert netnames.peer_uid(None) is None


# --- every user of the validators --------------------------------------------------------------------------------


def _config_problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "tunneld.toml"
    path.write_text('[ssh]\nuser = "t"\nprivate_key = "k"\nknown_hosts = "kh"\n' + text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    return exc.value.problems


@pytest.mark.parametrize("name", ["node-1\n", "a..b", LONG_NAME, f"{LONG_LABEL}.x"])
def test_node_name_refused(tmp_path: Path, name: str) -> None:
    text = f'[[nodes]]\nname = "{name.encode("unicode_escape").decode()}"\naddress = "192.0.2.1"\n'
    assert any("name" in p and "not a valid node name" in p for p in _config_problems(tmp_path, text))


@pytest.mark.parametrize("address", ['"node-1\\n"', '"10.0.0.1\\n"', '"a..b"', f'"{LONG_NAME}"', '"fe80::1%eth0"',
                                    "5", "[\"10.0.0.1\"]"])
def test_node_address_refused(tmp_path: Path, address: str) -> None:
    text = f'[[nodes]]\nname = "node-1"\naddress = {address}\n'
    assert any(".address:" in p for p in _config_problems(tmp_path, text))


@pytest.mark.parametrize(("key", "value"), [
    ("endpoints", "[5]"), ("endpoints", '["10.0.0.1\\n"]'), ("endpoints", '["fe80::1%eth0"]'),
    ("endpoints", '["node-1"]'), ("endpoints", "[true]"), ("endpoints", '[["10.0.0.1"]]'), ("cluster_ip", "5"),
    ("cluster_ip", '"10.0.0.1\\n"'), ("cluster_ip", "3232235777"),
])
def test_service_address_refused(tmp_path: Path, key: str, value: str) -> None:
    text = (f'[[nodes]]\nname = "node-1"\naddress = "192.0.2.1"\n[[services]]\nname = "web"\n{key} = {value}\n'
            '[[services.ports]]\nport = 80\n')
    found = _config_problems(tmp_path, text)
    assert any(f"services[0] (default/web).{key}:" in p for p in found), found


def test_service_endpoints_are_canonical(tmp_path: Path) -> None:
    path = tmp_path / "tunneld.toml"
    path.write_text('[ssh]\nuser = "t"\nprivate_key = "k"\nknown_hosts = "kh"\n[[nodes]]\nname = "node-1"\n'
                    'address = "192.0.2.1"\n[[services]]\nname = "web"\nendpoints = ["2001:DB8::0001", "10.0.0.1"]\n'
                    '[[services.ports]]\nport = 80\n')
    (svc,) = load_config(path).services
    assert svc.endpoints == ("2001:db8::1", "10.0.0.1")


@pytest.mark.parametrize("ports", ['["80\\n"]', '["1-2-3"]', "[true]", '["\u0661"]', '[" 80"]'])
def test_policy_ports_refused(tmp_path: Path, ports: str) -> None:
    text = f'[[nodes]]\nname = "node-1"\naddress = "192.0.2.1"\n[policy]\nnode_ports = {ports}\n'
    found = _config_problems(tmp_path, text)
    assert any("policy.node_ports:" in p for p in found), found


@pytest.mark.parametrize("name", ["node-1\n", "a..b", LONG_NAME, f"{LONG_LABEL}.x", 5, ["x"]])
def test_csr_name_refused(name: Any) -> None:
    pem, _ = make_request("system:node:node-1")
    b = body(pem)
    b["metadata"] = {"name": name}
    with pytest.raises(CSRInvalid, match="not a valid name"):
        from_request_body(b, Identity("system:bootstrap:abcdef", "", ("system:bootstrappers",)))


@pytest.mark.parametrize("ident", ["node-1\n", "a..b", LONG_NAME, f"{LONG_LABEL}.x", "node-1:80\n", "node-1:-80",
                                   "node-1:\u0661"])
def test_proxy_url_name_refused(ident: str) -> None:
    with pytest.raises(RouteError):
        split_scheme_name_port(ident)


@pytest.mark.parametrize("target", ["node-1\n:10250", "a..b:10250", f"{LONG_LABEL}.x:10250", "[fe80::1%eth0]:10250"])
def test_connect_target_refused(target: str) -> None:
    with pytest.raises(ValueError):
        parse_authority(target)


def test_kubernetes_node_name_refused() -> None:
    from tunneld.tunnels.k8s_nodes import SkipNode, node_from_object
    for name in ("node-1\n", "a..b", LONG_NAME, 5):
        obj = {"metadata": {"name": name}, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]}}
        with pytest.raises(SkipNode):
            node_from_object(obj)
    for address in ("10.0.0.1\n", "fe80::1%eth0", 167772161):
        obj = {"metadata": {"name": "node-1"}, "status": {"addresses": [{"type": "InternalIP", "address": address}]}}
        with pytest.raises(SkipNode):
            node_from_object(obj)
