"""The pure parts of dial-in tunnels: SOCKS5 framing and reply codes, node identity checks, revocation lists, the
WAITING state, the nodesshcertificates rules and the node's PermitRemoteOpen."""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
from pathlib import Path

import pytest

from certs.csr import CSRInvalid
from certs.nodessh import NodeSSHIssuer
from certs.service import Forbidden
from certs.sshca import SSHCA
from certs.tokens import Identity
from tunneld.cli.sshcommand import permit_remote_open
from tunneld.config import Config, HealthSettings, Node, PolicySettings
from tunneld.tunnels import krl
from tunneld.tunnels.dialin_identity import CertFacts, IdentityRefused, check_certificate, node_of_username
from tunneld.tunnels.socks import SocksRefused, SocksTimeout, SocksUnreachable, connect_request, handshake, parse_reply
from tunneld.tunnels.state import Event, InvalidTransition, State, TunnelStateMachine


def test_connect_request_carries_the_host_as_checked() -> None:
    assert connect_request("node-1", 10250) == b"\x05\x01\x00\x03\x06node-1\x28\x0a"
    assert connect_request("10.0.0.7", 80) == b"\x05\x01\x00\x01\x0a\x00\x00\x07\x00\x50"
    assert connect_request("fd00::1", 443) == b"\x05\x01\x00\x04" + ipaddress.ip_address("fd00::1").packed + b"\x01\xbb"
    with pytest.raises(ValueError):
        connect_request("x" * 256, 80)


def test_parse_reply_needs_the_whole_reply_and_refuses_garbage() -> None:
    ok = b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    assert parse_reply(ok[:9]) is None
    assert parse_reply(ok + b"data") == (0, 10)
    assert parse_reply(b"\x05\x05\x00\x03\x03abc\x00\x01") == (5, 10)
    for bad in (b"\x04\x00\x00\x01" + bytes(6), b"\x05\x00\x01\x01" + bytes(6), b"\x05\x00\x00\x09" + bytes(6)):
        with pytest.raises(ValueError):
            parse_reply(bad)


class Scripted:
    """A stream answering with fixed bytes, one read at a time (as a channel may split them)."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.sent = b""

    async def write(self, data: bytes) -> None:
        self.sent += data

    async def read(self, n: int = 65536) -> bytes:
        out, self.answer = self.answer[:min(n, 1)], self.answer[min(n, 1):]
        return out


@pytest.mark.parametrize(("code", "error", "status"), [(5, SocksRefused, 502), (2, SocksRefused, 502),
                                                       (3, SocksUnreachable, 502), (4, SocksUnreachable, 502),
                                                       (6, SocksTimeout, 504)])
async def test_reply_codes_map_to_typed_dial_errors(code: int, error: type[Exception], status: int) -> None:
    stream = Scripted(b"\x05\x00" + bytes((5, code, 0, 1)) + bytes(6))
    with pytest.raises(error) as exc:
        await handshake(stream, "10.0.0.7", 80, 1.0, "node-1")
    assert getattr(exc.value, "status", None) == status


async def test_success_leaves_the_targets_bytes_unread() -> None:
    stream = Scripted(b"\x05\x00\x05\x00\x00\x03\x03abc\x00\x01HTTP/1.1")
    await handshake(stream, "node-1", 10250, 1.0, "node-1")
    assert stream.sent == b"\x05\x01\x00" + connect_request("node-1", 10250)
    assert await stream.read() + stream.answer == b"HTTP/1.1"


async def test_an_early_end_is_refused_and_silence_times_out() -> None:
    with pytest.raises(SocksRefused, match="closed the channel"):
        await handshake(Scripted(b"\x05\x00\x05"), "10.0.0.7", 80, 1.0, "node-1")
    with pytest.raises(SocksRefused, match="without authentication"):
        await handshake(Scripted(b"\x05\xff"), "10.0.0.7", 80, 1.0, "node-1")

    class Silent(Scripted):
        async def read(self, n: int = 65536) -> bytes:
            await asyncio.sleep(10)
            return b""

    with pytest.raises(SocksTimeout):
        await handshake(Silent(b""), "10.0.0.7", 80, 0.05, "node-1")


def facts(**kw: object) -> CertFacts:
    base: dict[str, object] = dict(key_id="k", serial=7, principals=("node:node-1",), valid_after=100,
                                   valid_before=200, ca_blob=b"ca", key_blob=b"key")
    base.update(kw)
    return CertFacts(**base)  # type: ignore[arg-type]


def check(username: str = "node:node-1", f: CertFacts | None = None, now: float = 150,
          node: str | None = None, revoked: str | None = None) -> str:
    return check_certificate(username, f or facts(), now=now, is_dialin_node=lambda n: node,
                             revoked=lambda _: revoked)


def test_identity_checks() -> None:
    assert check() == "node-1"
    for username in ("root", "node:", "node:Node-1", "node:a b", "node:-x", "node:x\n"):
        with pytest.raises(IdentityRefused):
            node_of_username(username)
    cases = [
        ({"f": facts(principals=())}, "names none"),
        ({"f": facts(principals=("node:node-1", "node:node-2"))}, "exactly node:node-1"),
        ({"f": facts(principals=("node:node-2",))}, "exactly node:node-1"),
        ({"now": 99}, "not valid yet"),
        ({"now": 200}, "expired"),
        ({"revoked": "its serial is listed"}, "revoked"),
        ({"node": "not in the inventory"}, "node node-1: not in the inventory"),
    ]
    for kwargs, message in cases:
        with pytest.raises(IdentityRefused, match=message):
            check(**kwargs)  # type: ignore[arg-type]


def test_krl_from_ssh_keygen(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ca)], check=True)
    spec = tmp_path / "spec"
    spec.write_text("serial: 5\nserial: 100-200\nid: bad-node\n")
    out = tmp_path / "krl"
    subprocess.run(["ssh-keygen", "-q", "-k", "-f", str(out), "-s", str(ca) + ".pub", str(spec)], check=True,
                   capture_output=True)
    import base64
    ca_blob = base64.b64decode((tmp_path / "ca.pub").read_text().split()[1])
    rev = krl.load(out)
    assert rev.revoked(facts(serial=5, ca_blob=ca_blob)) == "its serial is listed"
    assert rev.revoked(facts(serial=150, ca_blob=ca_blob)) == "its serial is listed"
    assert rev.revoked(facts(serial=6, key_id="bad-node", ca_blob=ca_blob)) == "its key id is listed"
    assert rev.revoked(facts(serial=6, ca_blob=ca_blob)) is None
    assert rev.revoked(facts(serial=5, ca_blob=b"another ca")) is None
    with pytest.raises(krl.KRLError):
        krl.parse_krl(out.read_bytes()[:30])


def test_waiting_state() -> None:
    m = TunnelStateMachine(lambda: 0.0)
    assert m.handle(Event.WAIT) is State.WAITING
    with pytest.raises(InvalidTransition):
        m.handle(Event.CONNECT_FAILED)
    assert m.handle(Event.CONNECTED) is State.UP and m.connects == 1
    assert m.handle(Event.LOST, "gone") is State.DOWN
    assert m.handle(Event.WAIT) is State.WAITING and not m.parked


def test_node_ssh_certificates_only_for_the_node_itself(tmp_path: Path) -> None:
    ca = SSHCA.create(tmp_path, user=True)
    allowed = {"node-1": None, "node-3": "its mode is dial-out, not dial-in"}
    issuer = NodeSSHIssuer(ca, lambda n: allowed.get(n, "not in the inventory"))
    key = SSHCA.create(tmp_path / "k").public_key_line()
    node1 = Identity("system:node:node-1", groups=("system:nodes",), method="cert")
    answer = issuer.issue(node1, {"spec": {"nodeName": "node-1", "publicKey": key}})
    assert answer["status"]["principal"] == "node:node-1"
    assert answer["status"]["validBefore"] - answer["status"]["validAfter"] == 24 * 3600 + 300
    with pytest.raises(Forbidden, match="only obtain a certificate for node:node-1"):
        issuer.issue(node1, {"spec": {"nodeName": "node-2", "publicKey": key}})
    with pytest.raises(Forbidden, match="client certificate"):
        issuer.issue(Identity("system:node:node-1", groups=("system:nodes",), method="token"),
                     {"spec": {"nodeName": "node-1", "publicKey": key}})
    with pytest.raises(Forbidden, match="not dial-in"):
        issuer.issue(Identity("system:node:node-3", groups=("system:nodes",), method="cert"),
                     {"spec": {"nodeName": "node-3", "publicKey": key}})
    with pytest.raises(CSRInvalid):
        issuer.issue(node1, {"spec": {"nodeName": "node-1", "publicKey": "-----BEGIN OPENSSH PRIVATE KEY-----"}})


def test_permit_remote_open_follows_the_policy() -> None:
    node = Node("node-1", "10.1.0.5", kubelet_port=10250, pod_cidr=ipaddress.ip_network("10.244.1.0/24"),
                mode="dial-in")
    config = Config(health=HealthSettings(host="127.0.0.1", port=10248),
                    policy=PolicySettings(node_ports=("9100",), pod_ports=("8080-8081",)))
    entries, warnings = permit_remote_open(config, node)
    assert entries == ["127.0.0.1:10248", "10.1.0.5:10250", "10.1.0.5:9100", "node-1:10250", "node-1:9100",
                       "*:8080", "*:8081"]
    assert not warnings
    wide = Config(policy=PolicySettings(pod_ports=("1-65535",)))
    entries, warnings = permit_remote_open(wide, node)
    assert entries == ["any"] and warnings
