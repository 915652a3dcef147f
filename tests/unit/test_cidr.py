"""The pod-CIDR table: longest-prefix match, same answers as testing every network, IPv4 and IPv6 kept apart."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from proxy.cidr import NetworkTable


def test_most_specific_network_wins_and_versions_stay_apart() -> None:
    table = NetworkTable([
        (ipaddress.ip_network("10.0.0.0/8"), "wide"),
        (ipaddress.ip_network("10.1.2.0/24"), "narrow"),
        (ipaddress.ip_network("fd00::/64"), "v6"),
    ])
    assert table.lookup(ipaddress.ip_address("10.1.2.3")) == "narrow"
    assert table.lookup(ipaddress.ip_address("10.1.3.3")) == "wide"
    assert table.lookup(ipaddress.ip_address("11.0.0.1")) is None
    assert table.lookup(ipaddress.ip_address("fd00::5")) == "v6"
    assert table.lookup(ipaddress.ip_address("::ffff:10.1.2.3")) is None  # a v4-mapped v6 is not the v4 address
    assert table and not NetworkTable()


def test_an_equal_network_keeps_its_first_owner() -> None:
    table = NetworkTable([(ipaddress.ip_network("10.2.0.0/24"), "a"), (ipaddress.ip_network("10.2.0.0/24"), "b")])
    assert table.lookup(ipaddress.ip_address("10.2.0.9")) == "a"


networks = st.builds(lambda a, p: ipaddress.ip_network((a, p), strict=False),
                     st.integers(0, 2**32 - 1), st.integers(8, 32))


@given(st.lists(networks, max_size=40), st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=20))
def test_lookup_matches_testing_every_network(nets: list[ipaddress.IPv4Network], addresses: list[int]) -> None:
    table = NetworkTable((net, i) for i, net in enumerate(nets))
    for a in addresses:
        ip = ipaddress.IPv4Address(a)
        holders = [(net.prefixlen, -i, i) for i, net in enumerate(nets) if ip in net]
        want = None
        if holders:
            best = max(p for p, _, _ in holders)
            want = min(i for p, _, i in holders if p == best)  # the first of the most specific
        assert table.lookup(ip) == want
