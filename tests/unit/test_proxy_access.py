"""The proxy front's access rules: what each request asks for, the rule table, and the config that may not leave a
listener open (no silent downgrade)."""

from __future__ import annotations

import hmac
from pathlib import Path

import h11
import pytest

from certs.tokens import Identity
from proxy.authn import Authenticator, Unauthenticated
from proxy.authz import ANY, DEFAULT_RULES, Authorizer, Rule, attributes
from proxy.routes import parse
from tunneld.config import load_config
from tunneld.errors import ConfigError

from ..proxyauth import TOKEN, admin_authenticator

NS = "/api/v1/namespaces/default"
BASE = '[ssh]\nprivate_key = "id"\nknown_hosts = "known_hosts"\n\n'


@pytest.mark.parametrize(("target", "method", "expected"), [
    ("/api/v1/nodes/node-1/proxy/healthz", b"GET", ("nodes/proxy", "get")),
    ("/api/v1/nodes/node-1:10255/proxy/x", b"HEAD", ("nodes/proxy", "get")),
    ("/api/v1/nodes/node-1/proxy/x", b"DELETE", ("nodes/proxy", "delete")),
    (f"{NS}/pods/web-1/proxy/x", b"POST", ("pods/proxy", "create")),
    (f"{NS}/pods/web-1/proxy/x", b"PATCH", ("pods/proxy", "create")),
    (f"{NS}/services/web:http/proxy/", b"GET", ("services/proxy", "get")),
    (f"{NS}/pods/web-1/log", b"GET", ("pods/log", "get")),
    # exec, attach and port-forward run something on the node: create, whether SPDY (POST) or WebSocket (GET)
    (f"{NS}/pods/web-1/exec?command=ls", b"POST", ("pods/exec", "create")),
    (f"{NS}/pods/web-1/exec?command=ls", b"GET", ("pods/exec", "create")),
    (f"{NS}/pods/web-1/attach", b"GET", ("pods/attach", "create")),
    (f"{NS}/pods/web-1/portforward", b"GET", ("pods/portforward", "create")),
])
def test_each_request_is_described_as_kubernetes_would(target: str, method: bytes,
                                                        expected: tuple[str, str]) -> None:
    assert attributes(parse(target), method) == expected


def test_the_default_is_system_masters_only() -> None:
    authz = Authorizer()
    admin = Identity("root", groups=("system:masters",))
    other = Identity("uid:1000", groups=("tunneld:proxy",))
    assert authz.allows(admin, "pods/exec", "create") and authz.allows(admin, "nodes/proxy", "delete")
    assert not authz.allows(other, "nodes/proxy", "get") and not authz.allows(Identity("system:masters"), "pods", "get")
    assert authz.rules == DEFAULT_RULES


def test_a_rule_needs_who_what_and_how() -> None:
    rule = Rule(users=frozenset({"alice"}), groups=frozenset({"ops"}), resources=frozenset({"pods/log"}),
                verbs=frozenset({"get"}))
    assert rule.matches(Identity("alice"), "pods/log", "get")
    assert rule.matches(Identity("bob", groups=("ops",)), "pods/log", "get")
    assert not rule.matches(Identity("bob", groups=("dev",)), "pods/log", "get")
    assert not rule.matches(Identity("alice"), "pods/exec", "create")
    assert not rule.matches(Identity("alice"), "pods/log", "delete")
    anyone = Rule(groups=frozenset({ANY}), resources=frozenset({ANY}), verbs=frozenset({"get"}))
    assert anyone.matches(Identity("x"), "nodes/proxy", "get") and not anyone.matches(Identity("x"), "pods", "list")


def _load(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "tunneld.toml"
    path.write_text(BASE + text)
    try:
        load_config(path)
    except ConfigError as exc:
        return exc.problems
    return []


def test_a_tcp_proxy_listener_without_authentication_is_refused_naming_the_fixes(tmp_path: Path) -> None:
    found = _load(tmp_path, '[proxy]\nlisten = "127.0.0.1:8001"\n')
    assert len(found) == 1 and "proxy.listen: no authentication" in found[0], found
    for fix in ("[auth] token_file", "client_ca", "[proxy] socket", "insecure_anonymous_loopback = true"):
        assert fix in found[0]
    assert _load(tmp_path, '[proxy]\nlisten = "127.0.0.1:8001"\n[auth]\ntoken_file = "tokens.csv"\n') == []
    assert _load(tmp_path, '[proxy]\nlisten = "127.0.0.1:8001"\ntls_cert = "a"\ntls_key = "b"\nclient_ca = "c"\n') == []
    assert _load(tmp_path, '[proxy]\nsocket = "/run/p.sock"\n') == []  # unix peers are known by uid


def test_insecure_anonymous_loopback_is_explicit_and_loopback_only(tmp_path: Path) -> None:
    assert _load(tmp_path, '[proxy]\nlisten = "127.0.0.1:8001"\ninsecure_anonymous_loopback = true\n') == []
    found = _load(tmp_path, '[proxy]\nlisten = "0.0.0.0:8001"\ninsecure_anonymous_loopback = true\n'
                            '[auth]\ntoken_file = "t.csv"\n')
    assert any("insecure_anonymous_loopback: 0.0.0.0 is not a loopback address" in p for p in found), found
    assert any("needs tls_cert and tls_key" in p for p in found), found
    found = _load(tmp_path, '[proxy]\nsocket = "/run/p.sock"\ninsecure_anonymous_loopback = true\n')
    assert found and "only applies to a listen address" in found[0]
    # not loopback: TLS with tokens is enough (a client CA is not required when tokens authenticate)
    assert _load(tmp_path, '[proxy]\nlisten = "192.0.2.1:8443"\ntls_cert = "a"\ntls_key = "b"\n'
                           '[auth]\ntoken_file = "t.csv"\n') == []


def test_the_rule_table_is_validated(tmp_path: Path) -> None:
    found = _load(tmp_path, """
[proxy]
socket = "/run/p.sock"
socket_group = "no-such-group-here"
socket_mode = "0666"

[[authz.rules]]
users = ["alice"]
resources = ["pods/logs"]
verbs = ["get", "watch"]

[[authz.rules]]
resources = ["*"]
verbs = ["*"]
colour = "red"

[[authz.rules]]
groups = ["ops"]
""")
    expected = [
        "proxy.socket_mode: must not give access to others",
        "proxy.socket_group: no group named 'no-such-group-here'",
        "authz.rules[0]: resources: 'pods/logs' is not one of",
        "authz.rules[0]: verbs: 'watch' is not one of",
        "authz.rules[1].colour: unknown key",
        "authz.rules[1]: a rule needs users or groups",
        "authz.rules[2]: resources: at least one of",
        "authz.rules[2]: verbs: at least one of",
    ]
    for text in expected:
        assert any(text in p for p in found), (text, found)
    assert len(found) == len(expected), found


def test_a_valid_rule_table_is_loaded_and_named_after_its_file(tmp_path: Path) -> None:
    path = tmp_path / "tunneld.toml"
    path.write_text(BASE + '[[authz.rules]]\nusers = ["logger"]\nresources = ["pods/log"]\nverbs = ["get"]\n')
    cfg = load_config(path)
    assert cfg.authz.rules == (Rule(users=frozenset({"logger"}), resources=frozenset({"pods/log"}),
                                    verbs=frozenset({"get"})),)
    assert cfg.authz.source == f"[[authz.rules]] of {path}"
    assert load_config(tmp_path / "tunneld.toml").authz.rules is not None
    path.write_text(BASE)
    assert load_config(path).authz.rules is None  # no table: the default


class _Writer:
    """What :meth:`Authenticator.authenticate` reads of a connection: a TCP peer address and nothing else."""

    def __init__(self, peer: str = "127.0.0.1") -> None:
        self.peer = peer

    def get_extra_info(self, name: str, default: object = None) -> object:
        return (self.peer, 40000) if name == "peername" else default


def _request(*headers: tuple[bytes, bytes]) -> h11.Request:
    return h11.Request(method="GET", target="/", headers=[(b"Host", b"x"), *headers])


async def test_bearer_tokens_are_checked_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr("certs.tokens.hmac.compare_digest", spy)
    authn = admin_authenticator()
    ident = await authn.authenticate(_Writer(), _request((b"authorization", f"Bearer {TOKEN}".encode())))  # type: ignore[arg-type]
    assert (ident.user, ident.groups, ident.method) == ("admin", ("system:masters",), "token")
    assert compared == [(TOKEN.encode(), TOKEN.encode())]


@pytest.mark.parametrize(("value", "reason"), [
    (b"Bearer \xff\xfe", "not valid UTF-8"),
    (b"", "is empty"),
    (b"Basic YWRtaW46YWRtaW4=", "only the Bearer scheme"),
    (b"Bearer", "no bearer token"),
    (b"Bearer a\tb", "malformed"),
    (b"Bearer " + b"x" * 5000, "malformed"),
    (b"Bearer not-the-token", "not valid"),
])
async def test_malformed_or_unknown_credentials_are_unauthenticated(value: bytes, reason: str) -> None:
    with pytest.raises(Unauthenticated, match=reason):
        await admin_authenticator().authenticate(_Writer(), _request((b"authorization", value)))  # type: ignore[arg-type]


async def test_anonymous_only_on_loopback_and_only_when_asked() -> None:
    anonymous = Authenticator(anonymous_loopback=True)
    ident = await anonymous.authenticate(_Writer("127.0.0.1"), _request())  # type: ignore[arg-type]
    assert (ident.user, ident.groups) == ("system:anonymous", ("system:unauthenticated",))
    with pytest.raises(Unauthenticated):
        await anonymous.authenticate(_Writer("192.0.2.1"), _request())  # type: ignore[arg-type]
    with pytest.raises(Unauthenticated, match="bearer token or client certificate is required"):
        await Authenticator().authenticate(_Writer("127.0.0.1"), _request())  # type: ignore[arg-type]
    with pytest.raises(Unauthenticated, match="not accepted here"):  # no token file: a token is not a way in
        await anonymous.authenticate(_Writer(), _request((b"authorization", b"Bearer x")))  # type: ignore[arg-type]

