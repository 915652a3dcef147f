"""Every front authenticates and authorises its callers, tried as a real other uid (``nobody``) with real curl.

The gateway runs over the dev cluster with the proxy front on TLS TCP (client CA and bearer tokens) and on a unix
socket owned by group ``nogroup`` (mode 0660, so ``nobody`` can connect and is known as ``uid:65534``), the egress and
status sockets beside it, and a rule table: ``system:masters`` everything, ``logger`` pods/log, ``execer`` pods/exec,
group ``viewers`` nodes/proxy.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from certs.files import write_secret
from proxy.authn import Authenticator
from proxy.authz import Rule
from tunneld.app import Gateway
from tunneld.config import (
    AuthSettings,
    AuthzSettings,
    EgressSettings,
    ProxySettings,
    StatusSettings,
    TLSServerSettings,
)
from tunneld.dev.cluster import DevCluster
from tunneld.dev.pki import DevCA
from tunneld.dev.podapps import ECHO_PORT

from ..certs_api_env import ADMIN_TOKEN, api_env
from ..wsclient import read_channel
from .conftest import fast_config, started

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
TOKENS = {"admin": "admin-token-7c1f0e9a", "logger": "logger-token-4b2d", "execer": "execer-token-9e8f",
          "stranger": "stranger-token-1a2b"}
RULES = (
    Rule(groups=frozenset({"system:masters"}), resources=frozenset({"*"}), verbs=frozenset({"*"})),
    Rule(users=frozenset({"logger"}), resources=frozenset({"pods/log"}), verbs=frozenset({"get"})),
    Rule(users=frozenset({"execer"}), resources=frozenset({"pods/exec"}), verbs=frozenset({"create"})),
    Rule(groups=frozenset({"viewers"}), resources=frozenset({"nodes/proxy"}), verbs=frozenset({"get"})),
)
SOURCE = "[[authz.rules]] of the test"
NS = "/api/v1/namespaces"
# Every resource the proxy front serves: (resource, method, path).
REQUESTS = [
    ("nodes/proxy", "GET", "/api/v1/nodes/node-1/proxy/healthz"),
    ("pods/proxy", "GET", f"{NS}/default/pods/web-1/proxy/hello"),
    ("pods/proxy", "POST", f"{NS}/default/pods/web-1/proxy/echo"),
    ("services/proxy", "GET", f"{NS}/default/services/web:http/proxy/hello"),
    ("pods/log", "GET", f"{NS}/default/pods/web-1/log?tailLines=1"),
    ("pods/exec", "POST", f"{NS}/default/pods/web-1/exec?command=cat&stdin=true&stdout=true"),
    ("pods/attach", "POST", f"{NS}/default/pods/web-1/attach?stdin=true&stdout=true"),
    ("pods/portforward", "POST", f"{NS}/default/pods/web-1/portforward?ports={ECHO_PORT}"),
]
SPDY = ["-H", "Connection: Upgrade", "-H", "Upgrade: SPDY/3.1", "-H", "X-Stream-Protocol-Version: v4.channel.k8s.io"]
SPDY_PORTFORWARD = ["-H", "Connection: Upgrade", "-H", "Upgrade: SPDY/3.1", "-H",
                    "X-Stream-Protocol-Version: portforward.k8s.io"]  # what a kubelet accepts for port-forward
WEBSOCKET = ["-H", "Connection: Upgrade", "-H", "Upgrade: websocket", "-H", "Sec-WebSocket-Version: 13",
             "-H", f"Sec-WebSocket-Key: {base64.b64encode(b'0123456789abcdef').decode()}",
             "-H", "Sec-WebSocket-Protocol: v4.channel.k8s.io"]


@dataclass
class Bed:
    gw: Gateway
    pub: Path

    @property
    def https(self) -> str:
        return f"https://127.0.0.1:{self.gw.proxy.ports[0]}"

    def channels(self) -> int:
        return sum(t.counters.channels_total for t in self.gw.pool.tunnels.values())

    def client_tls(self, cert: str | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pub / "server-ca.crt"))
        if cert:
            ctx.load_cert_chain(self.pub / f"{cert}.crt", self.pub / f"{cert}.key")
        return ctx


async def curl(*args: str, nobody: bool = True, timeout: float = 10) -> subprocess.CompletedProcess[bytes]:
    """Real curl, as uid 65534 with no groups unless ``nobody`` is False; ``-i`` so the status line is kept."""
    argv = [*(NOBODY if nobody else []), "curl", "-sS", "-i", "--max-time", str(timeout), *args]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def status(r: subprocess.CompletedProcess[bytes]) -> int:
    """The final status of a curl -i output (0: none)."""
    heads = [line for line in r.stdout.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]
    return int(heads[-1].split()[1]) if heads else 0


def bearer(user: str) -> list[str]:
    return ["-H", f"Authorization: Bearer {TOKENS[user]}"]


def field(record: logging.LogRecord, name: str) -> object:
    """An ``extra`` field of a log record."""
    return record.__dict__.get(name)


def audited(caplog: pytest.LogCaptureFixture, status_code: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "proxy.audit" and field(r, "status") == status_code]


@pytest.fixture
async def bed(cluster: DevCluster, short_dir: Path) -> AsyncIterator[Bed]:
    short_dir.chmod(0o711)
    pub = short_dir / "pub"  # what nobody may read: sockets, CA certificates, the test users' client keys
    pub.mkdir(mode=0o755)
    pub.chmod(0o755)
    server_ca, client_ca = DevCA("proxy server CA"), DevCA("proxy client CA")
    (pub / "server-ca.crt").write_bytes(server_ca.cert_pem)
    (pub / "client-ca.crt").write_bytes(client_ca.cert_pem)
    server_ca.issue_serving("127.0.0.1", ["127.0.0.1"]).write(pub / "proxy.crt", short_dir / "proxy.key")
    for cn, orgs in (("carol", ("viewers",)), ("dave", ("nobodys-group",))):
        client_ca.issue_client(cn, orgs).write(pub / f"{cn}.crt", pub / f"{cn}.key")
        (pub / f"{cn}.key").chmod(0o644)
    tokens = short_dir / "tokens.csv"
    write_secret(tokens, "".join(f'{t},{u},{u},"{"system:masters" if u == "admin" else ""}"\n'
                                 for u, t in TOKENS.items()).encode())
    cfg = fast_config(cluster)
    cfg = replace(
        cfg, health=replace(cfg.health, enabled=False),
        egress=EgressSettings(socket=pub / "egress.sock"), status=StatusSettings(socket=pub / "status.sock"),
        proxy=ProxySettings(listen="127.0.0.1:0", tls=TLSServerSettings(pub / "proxy.crt", short_dir / "proxy.key",
                                                                          pub / "client-ca.crt"),
                            socket=pub / "proxy.sock", socket_mode=0o660, socket_group="nogroup",
                            target_certificate_authority=cluster.workdir / "pod-ca.crt", pods_refresh=3600),
        auth=AuthSettings(token_file=tokens), authz=AuthzSettings(RULES, SOURCE),
    )
    gw = await started(cfg)
    await gw.api_front.pods.refresh()
    try:
        yield Bed(gw, pub)
    finally:
        await gw.stop(0.0)


async def test_the_client_really_runs_as_another_uid() -> None:
    proc = await asyncio.create_subprocess_exec(*NOBODY, "id", "-u", stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    assert out.strip() == b"65534" and os.geteuid() != 65534


async def test_nobody_is_refused_on_every_front_and_every_resource(bed: Bed,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "proxy.audit")
    before = bed.channels()
    for resource, method, path in REQUESTS:
        r = await curl("--cacert", str(bed.pub / "server-ca.crt"), "-X", method, bed.https + path)
        assert status(r) == 401 and b"bearer token or client certificate is required" in r.stdout, (resource, r)
        r = await curl("--unix-socket", str(bed.pub / "proxy.sock"), "-X", method, "http://localhost" + path)
        assert status(r) == 403, (resource, r)
        assert b"user 'uid:65534' may not" in r.stdout and resource.encode() in r.stdout, r.stdout
        assert SOURCE.encode() in r.stdout
    # The egress front and the status API: their sockets' permissions refuse nobody before a byte is read.
    r = await curl("--unix-socket", str(bed.pub / "egress.sock"), "-X", "CONNECT", "--request-target",
                   "10.244.1.10:8080", "http://localhost/")
    assert r.returncode == 7 and status(r) == 0, r  # couldn't connect
    r = await curl("--unix-socket", str(bed.pub / "status.sock"), "http://localhost/tunnels")
    assert r.returncode == 7 and status(r) == 0, r
    assert bed.channels() == before, "a refused request reached a node"
    refusals = audited(caplog, 403)
    assert len(refusals) == len(REQUESTS) and all(field(a, "user") == "uid:65534" for a in refusals)
    assert {field(a, "groups") for a in refusals} == {"tunneld:proxy"}  # its group owns the socket: not enough
    assert {field(a, "rules") for a in refusals} == {SOURCE}
    assert len(audited(caplog, 401)) == len(REQUESTS)


async def test_nobody_with_an_allowed_token_or_certificate_gets_through(bed: Bed) -> None:
    ca = ["--cacert", str(bed.pub / "server-ca.crt")]
    for resource, method, path in REQUESTS:
        extra = SPDY_PORTFORWARD if resource == "pods/portforward" else SPDY if resource in (
            "pods/exec", "pods/attach") else []
        r = await curl(*ca, *bearer("admin"), *extra, "-X", method, "-d", "x", bed.https + path, timeout=3)
        assert status(r) in (101, 200), (resource, r.stdout[:300])
        assert b"HTTP/1.1 101" in r.stdout if extra else b"HTTP/1.1 200" in r.stdout
    r = await curl(*ca, *bearer("admin"), bed.https + REQUESTS[0][2])
    assert r.stdout.endswith(b"\r\n\r\nok")
    # a client certificate: carol is in group viewers, which may get nodes/proxy and nothing else
    carol = ["--cert", str(bed.pub / "carol.crt"), "--key", str(bed.pub / "carol.key")]
    r = await curl(*ca, *carol, bed.https + REQUESTS[0][2])
    assert status(r) == 200 and r.stdout.endswith(b"ok"), r
    r = await curl(*ca, *carol, bed.https + REQUESTS[4][2])
    assert status(r) == 403 and b"user 'carol' may not get pods/log default/web-1" in r.stdout, r.stdout


async def test_log_but_not_exec_and_exec_but_not_log_over_websocket_and_spdy(bed: Bed,
                                                                               caplog: pytest.LogCaptureFixture
                                                                               ) -> None:
    caplog.set_level(logging.INFO, "proxy.audit")
    ca = ["--cacert", str(bed.pub / "server-ca.crt")]
    log_path, exec_path = f"{NS}/default/pods/web-1/log?tailLines=1", REQUESTS[5][2]
    before = bed.channels()
    # logger: logs yes; exec no, whether asked with SPDY (POST), a WebSocket upgrade (GET) or a plain request
    r = await curl(*ca, *bearer("logger"), bed.https + log_path)
    assert status(r) == 200 and b"web-1/nginx line" in r.stdout, r.stdout
    for method, upgrade in (("POST", SPDY), ("GET", WEBSOCKET), ("GET", [])):
        r = await curl(*ca, *bearer("logger"), *upgrade, "-X", method, bed.https + exec_path, timeout=3)
        assert status(r) == 403 and b"may not create pods/exec" in r.stdout, (method, r.stdout)
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"wss://127.0.0.1:{bed.gw.proxy.ports[0]}{exec_path}", ssl=bed.client_tls(),
                           subprotocols=["v4.channel.k8s.io"],  # type: ignore[list-item]
                           additional_headers={"Authorization": f"Bearer {TOKENS['logger']}"}, open_timeout=10):
            pass
    assert refused.value.response.status_code == 403
    assert bed.channels() == before + 1, "only the allowed log request dialled"
    # execer: exec yes (SPDY and WebSocket, bytes flow); logs and port-forward no
    r = await curl(*ca, *bearer("execer"), *SPDY, "-X", "POST", bed.https + exec_path, timeout=3)
    assert b"HTTP/1.1 101" in r.stdout, r.stdout
    async with connect(f"wss://127.0.0.1:{bed.gw.proxy.ports[0]}{exec_path}", ssl=bed.client_tls(),
                       subprotocols=["v4.channel.k8s.io"],  # type: ignore[list-item]
                       additional_headers={"Authorization": f"Bearer {TOKENS['execer']}"}, open_timeout=10) as conn:
        await conn.send(b"\x00hello")
        assert await read_channel(conn, 1, 5) == b"hello"
    r = await curl(*ca, *bearer("execer"), bed.https + log_path)
    assert status(r) == 403 and b"may not get pods/log" in r.stdout, r.stdout
    r = await curl(*ca, *bearer("execer"), *WEBSOCKET, bed.https + REQUESTS[7][2].replace("POST", "GET"), timeout=3)
    assert status(r) == 403 and b"may not create pods/portforward" in r.stdout, r.stdout
    refusals = audited(caplog, 403)
    assert [field(a, "user") for a in refusals] == ["logger"] * 4 + ["execer"] * 2
    assert all(field(a, "rules") == SOURCE and field(a, "auth") == "token" for a in refusals)


async def test_a_user_no_rule_names_is_forbidden_and_audited(bed: Bed, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "proxy.audit")
    ca = ["--cacert", str(bed.pub / "server-ca.crt")]
    r = await curl(*ca, *bearer("stranger"), bed.https + REQUESTS[0][2])
    assert status(r) == 403 and b"user 'stranger' may not get nodes/proxy node-1" in r.stdout, r.stdout
    r = await curl(*ca, "--cert", str(bed.pub / "dave.crt"), "--key", str(bed.pub / "dave.key"),
                   bed.https + REQUESTS[1][2])
    assert status(r) == 403 and b"user 'dave' may not get pods/proxy default/web-1" in r.stdout, r.stdout
    who = [(field(a, "user"), field(a, "auth"), field(a, "request")) for a in audited(caplog, 403)]
    assert who == [("stranger", "token", "get nodes/proxy node-1"), ("dave", "cert", "get pods/proxy default/web-1")]
    assert all(TOKENS["stranger"] not in r.getMessage() + str(r.__dict__) for r in caplog.records)


async def test_a_destination_the_policy_refuses_is_a_proxy_audit_line(bed: Bed,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "proxy")
    r = await curl("--cacert", str(bed.pub / "server-ca.crt"), *bearer("admin"),
                   bed.https + "/api/v1/nodes/node-1:22/proxy/")
    assert status(r) == 403, r.stdout
    refusals = audited(caplog, 403)
    assert len(refusals) == 1 and refusals[0].levelno == logging.WARNING
    assert "node-1:22" in str(field(refusals[0], "target")) and "not allowed" in refusals[0].getMessage()


@pytest.mark.parametrize("header", [
    b"Authorization: Bearer \xff\xfe\xfd\r\n",
    b"Authorization: \r\n",
    b"Authorization: Basic YWRtaW46YWRtaW4=\r\n",
    b"Authorization: Bearer\r\n",
    b"Authorization: Bearer    \r\n",
    b"Authorization: Bearer a b\r\n",
    b"Authorization: Bearer " + b"x" * 5000 + b"\r\n",
    b"Authorization: Bearer admin-token-7c1f0e9b\r\n",
    ("Authorization: Bearer " + TOKENS["admin"] + "\r\nAuthorization: Bearer " + TOKENS["admin"] + "\r\n").encode(),
], ids=["non-utf8", "empty", "basic", "no-token", "blank-token", "space", "huge", "wrong-token", "twice"])
async def test_malformed_authorization_is_401_and_audited_never_500(bed: Bed, caplog: pytest.LogCaptureFixture,
                                                                     header: bytes) -> None:
    caplog.set_level(logging.INFO, "proxy.audit")
    reader, writer = await asyncio.open_connection("127.0.0.1", bed.gw.proxy.ports[0], ssl=bed.client_tls())
    try:
        writer.write(b"GET " + REQUESTS[0][2].encode() + b" HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n")
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:300]
    assert answer.count(b"\n") == 7 and b"Unauthorized: " in answer  # head + a one-line reason
    assert len(audited(caplog, 401)) == 1
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)


async def test_a_token_wins_over_a_certificate_and_must_be_valid(bed: Bed) -> None:
    carol = bed.client_tls("carol")
    for token, expected in ((TOKENS["admin"], b"HTTP/1.1 200 "), ("not-a-token", b"HTTP/1.1 401 ")):
        reader, writer = await asyncio.open_connection("127.0.0.1", bed.gw.proxy.ports[0], ssl=carol)
        try:
            writer.write(f"GET {REQUESTS[4][2]} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                         f"Authorization: Bearer {token}\r\n\r\n".encode())
            async with asyncio.timeout(10):
                answer = await reader.read()
        finally:
            writer.close()
        assert answer.startswith(expected), answer[:300]


def test_unix_peers_are_known_by_the_kernel_s_credentials() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        me, gid = os.geteuid(), os.getegid()
        ident = Authenticator().unix(a)
        assert ident.user == f"uid:{me}" and ident.method == "local"
        assert "system:masters" in ident.groups  # the daemon's own user
        ident = Authenticator(system_uids=frozenset(), socket_gid=gid).unix(a)
        assert ident.groups == ("tunneld:proxy",)  # the socket's group is the peer's group
        ident = Authenticator(system_uids=frozenset(), socket_gid=gid + 1).unix(a)
        assert ident.groups == ()
    finally:
        a.close()
        b.close()


async def test_nobody_is_refused_by_the_certificates_api_and_an_admin_token_works(short_dir: Path) -> None:
    short_dir.chmod(0o711)
    pub = short_dir / "api"
    pub.mkdir(mode=0o755)
    pub.chmod(0o755)
    async with api_env(pub, "127.0.0.1") as env:
        (pub / "ca.crt").chmod(0o644)
        url = f"{env.url}/apis/certificates.k8s.io/v1/certificatesigningrequests"
        r = await curl("--cacert", str(env.ca_file), url)
        assert status(r) == 401, r
        r = await curl("--cacert", str(env.ca_file), "-H", "Authorization: Bearer not-a-token", url)
        assert status(r) == 401, r
        r = await curl("--cacert", str(env.ca_file), "-H", f"Authorization: Bearer {ADMIN_TOKEN}", url)
        assert status(r) == 200 and b'"kind": "CertificateSigningRequestList"' in r.stdout.replace(b'":"', b'": "')
