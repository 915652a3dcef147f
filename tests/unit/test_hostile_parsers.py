"""Property-based tests (hypothesis) of what parses hostile input: the CONNECT authority, the proxy URL router and
the static token file. Each property is what a protection promises: an input either is refused with a typed error,
or it yields exactly the target it names -- never a different node, a traversal, or a crash.
"""

from __future__ import annotations

import ipaddress
import string
import tempfile
from urllib.parse import quote, unquote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from certs.tokens import TokenFileError, parse_token_file
from netnames import normalize_host
from proxy.connect import parse_authority
from proxy.routes import RouteError, parse

# Nothing of hypothesis' (example database, caches, patches) is written into the repository.
set_hypothesis_home_dir(tempfile.mkdtemp(prefix="tdhyp"))
SETTINGS = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

NAMES = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,8}[a-z0-9])?){0,3}\Z",
                      fullmatch=True).filter(lambda name: not name.rsplit(".", 1)[-1].isdigit())
PORTS = st.integers(1, 65535)
HOSTILE_PIECES = st.sampled_from([
    "..", ".", "%2e%2e", "%2E%2E", ".%2e", "%2e.", "%2F", "%2f", "%5c", "\\", "%00", "%0d%0a", "%252e%252e", "%c0%ae",
    "%", "%zz", "//", "a", "b", "index.html", ":", "@", ";", "?", "#", "~", "%20", " ", "\t", "\r\n", "\u00e9",
    "%e2%80%ae", "node-2", "..;", "%2e%2e%2f",
])
HOSTILE_PATHS = st.lists(st.one_of(HOSTILE_PIECES, st.text(max_size=6)), max_size=8).map("/".join)


# --- CONNECT authority -------------------------------------------------------------------------------------------


@SETTINGS
@given(st.text(max_size=80))
@example("a:\u0661\u0662")  # Arabic-Indic digits: int() takes them
@example("\u0661.\u0662.\u0663.\u0664:80")
@example("[fe80::1%eth0]:80")
@example("host:80\r\nX-Injected: 1")
@example("[::1]:80:80")
@example("::1:80")
@example("user@host:80")
@example("host:0")
@example("host:65536")
@example("host:0000080")
@example("NODE-1.:80")
@example("127.0.0.1.:80")
@example("node-1\n:80")
@example("a..b:80")
def test_connect_authority_is_refused_or_names_exactly_one_ascii_target(target: str) -> None:
    try:
        host, port = parse_authority(target)
    except ValueError:
        return
    assert 1 <= port <= 65535
    assert target.isascii() and host.isascii()
    assert not set(host) & set(" \t\r\n/\\@?#%[],;\"'"), host
    # What was checked is what gets dialed: the authority is exactly host and port, nothing left over; the host comes
    # back in its one normal form (lower case, no trailing dot, canonical IP), which is what policy and sshd see.
    raw_host, raw_port = target.rsplit(":", 1)
    assert int(raw_port) == port and normalize_host(host) == host
    if ":" in host:
        assert raw_host.startswith("[") and ipaddress.IPv6Address(raw_host[1:-1]) == ipaddress.IPv6Address(host)
    else:
        assert raw_host.lower().removesuffix(".") == host


@SETTINGS
@given(st.ip_addresses(v=6), PORTS)
def test_ipv6_literals_round_trip(addr: ipaddress.IPv6Address, port: int) -> None:
    assert parse_authority(f"[{addr}]:{port}") == (str(addr), port)
    with pytest.raises(ValueError):
        parse_authority(f"{addr}:{port}")  # unbracketed: ambiguous, refused


@SETTINGS
@given(NAMES, PORTS)
def test_plain_authorities_parse(host: str, port: int) -> None:
    assert parse_authority(f"{host}:{port}") == (host, port)


# --- proxy URL router --------------------------------------------------------------------------------------------


def _assert_no_traversal(path: str) -> None:
    assert path.startswith("/")
    for seg in path.split("/")[1:]:
        decoded = unquote(seg)
        assert decoded not in (".", ".."), path
        assert "/" not in decoded and "\\" not in decoded and "\x00" not in decoded, path
    assert all(c in string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@%/" for c in path), path


@SETTINGS
@given(NAMES, PORTS, HOSTILE_PATHS, st.text(max_size=20))
@example("node-1", 8080, "..", "")
@example("node-1", 8080, "%2e%2e/%2e%2e/api/v1/nodes/node-2/proxy", "")
@example("node-1", 8080, "a%2Fb", "")
@example("node-1", 8080, "..;/x", "")
@example("node-1", 8080, "\n", "")  # "$" in a regex matches before a trailing newline
@example("node-1", 8080, "%c0%ae%c0%ae/etc/passwd", "")
def test_node_proxy_paths_never_change_the_target(name: str, port: int, rest: str, query: str) -> None:
    target = f"/api/v1/nodes/{name}:{port}/proxy/{rest}"
    if query:
        target += "?" + quote(query, safe="=&")
    try:
        route = parse(target)
    except RouteError as exc:
        assert exc.status in (400, 404)
        return
    assert (route.kind, route.name, route.port, route.namespace) == ("node", name, str(port), None)
    _assert_no_traversal(route.path)


@SETTINGS
@given(st.text(max_size=40), HOSTILE_PATHS)
@example("node-1%2F..%2Fnode-2", "")
@example("node-1%2f..", "x")
@example("..", "")
@example("%2e%2e", "")
@example("node-1:80:80:80", "")
@example("https:node-1:x", "")
@example("node-1%00", "")
@example("NODE-1", "")
def test_hostile_node_ids_are_refused_or_are_plain_names(ident: str, rest: str) -> None:
    target = f"/api/v1/nodes/{ident}/proxy/{rest}"
    try:
        route = parse(target)
    except RouteError as exc:
        assert exc.status in (400, 404)
        return
    # The node the request goes to is the percent-decoded id segment, and it is a plain DNS-1123 name.
    assert route.kind == "node"
    decoded = unquote(ident)
    assert route.name == decoded.split(":")[0 if decoded.count(":") < 2 else 1]
    assert route.name and all(c in string.ascii_lowercase + string.digits + "-." for c in route.name)
    assert route.name not in (".", "..")
    _assert_no_traversal(route.path)


@SETTINGS
@given(NAMES, NAMES, st.sampled_from(["pods", "services"]), HOSTILE_PATHS)
def test_pod_and_service_paths_keep_namespace_and_name(ns: str, name: str, kind: str, rest: str) -> None:
    target = f"/api/v1/namespaces/{ns}/{kind}/{name}/proxy/{rest}"
    try:
        route = parse(target)
    except RouteError as exc:
        assert exc.status in (400, 404)
        return
    assert (route.kind, route.namespace, route.name) == (kind[:-1] if kind == "pods" else "service", ns, name)
    _assert_no_traversal(route.path)


@SETTINGS
@given(st.text(max_size=120))
def test_router_never_crashes(target: str) -> None:
    try:
        parse(target)
    except RouteError as exc:
        assert exc.status in (400, 404, 405)


# --- static token file ------------------------------------------------------------------------------------------

FIELD = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)


@SETTINGS
@given(st.text(max_size=400))
@example('tok,user,uid,"a,b"\n"unterminated')
@example("tok,user\n")
@example("\x00,\x00,\x00\n")
@example('tok,user,uid,"g1,g2"\ntok,other,uid2\n')
def test_token_file_parser_refuses_or_yields_well_formed_records(text: str) -> None:
    try:
        tokens = parse_token_file(text, "tokens.csv")
    except TokenFileError as exc:
        assert str(exc).startswith("tokens.csv:"), exc  # names the file and line
        return
    seen = set()
    for t in tokens:
        assert t.token and t.token == t.token.strip()
        assert t.token not in seen, "duplicate tokens must not both be accepted"
        seen.add(t.token)
        assert all(g and g == g.strip() and "," not in g for g in t.groups)
        assert t.token not in repr(t), "a token's secret must not show in its repr (logs)"


@SETTINGS
@given(st.lists(st.tuples(FIELD, FIELD, FIELD, st.lists(FIELD, max_size=3)), max_size=5))
def test_token_file_round_trips_csv_records(rows: list[tuple[str, str, str, list[str]]]) -> None:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
    for token, user, uid, groups in rows:
        writer.writerow([token, user, uid, ",".join(groups)])
    parsed = parse_token_file(buf.getvalue(), "tokens.csv")
    expected = []
    seen = set()
    for token, user, uid, groups in rows:
        if not token.strip() or token.strip() in seen:
            continue
        seen.add(token.strip())
        expected.append((token.strip(), user.strip(), uid.strip(),
                         tuple(g.strip() for g in ",".join(groups).split(",") if g.strip())))
    assert [(t.token, t.user, t.uid, t.groups) for t in parsed] == expected
