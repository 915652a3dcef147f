"""Approval policies and node binding, on real CSRs."""

from __future__ import annotations

import pytest

from certs.approval import APPROVE, DENY, PENDING, Context, make_policy
from certs.signers import APISERVER_CLIENT, KUBELET_SERVING, NodeInventory, check
from certs.tokens import Identity
from tests.certs_util import make_csr

INV = NodeInventory.of([("node-1", ["192.0.2.11"]), ("node-2", ["192.0.2.12"])])
CTX = Context(INV, frozenset({"node-2"}))
SHARED = Identity("system:bootstrap:aaaaaa", groups=("system:bootstrappers",), method="bootstrap", token_id="aaaaaa")
PER_NODE = Identity("system:bootstrap:bbbbbb", groups=("system:bootstrappers",), method="bootstrap",
                    token_id="bbbbbb", node="node-1")
NODE1_CERT = Identity("system:node:node-1", groups=("system:nodes",), method="cert")
ADMIN = Identity("admin", groups=("system:masters",))
OUTSIDER = Identity("jane", groups=("devs",))


def decide(policy: str, caller: Identity, group: str = "system:bootstrappers", **kw: object):
    csr = make_csr(caller, **kw)  # type: ignore[arg-type]
    return make_policy(policy, group).decide(csr, check(csr, INV), CTX)


def test_auto_approve_group_approves_shared_token_for_inventory_node_without_cert() -> None:
    d = decide("auto-approve-group", SHARED)
    assert d.outcome == APPROVE and d.reason == "AutoApproved"
    assert "node-1" in d.message and "system:bootstrap:aaaaaa" in d.message


@pytest.mark.parametrize("policy", ["auto-approve-group", "queue"])
@pytest.mark.parametrize(("caller", "kw", "why"), [
    (SHARED, {"cn": "system:node:node-2"}, "already has a valid client certificate"),
    (SHARED, {"cn": "system:node:node-9"}, "not in the inventory"),
    (PER_NODE, {"cn": "system:node:node-2"}, "bound to node 'node-1' (its bootstrap token)"),
    (NODE1_CERT, {"cn": "system:node:node-2"}, "bound to node 'node-1' (its certificate)"),
    (OUTSIDER, {"cn": "root", "orgs": ("system:masters",), "signer": APISERVER_CLIENT,
                "usages": ("client auth",)}, "may not request a certificate for group system:masters"),
    (OUTSIDER, {"signer": APISERVER_CLIENT, "usages": ("client auth",)}, "may not request a node identity"),
])
def test_binding_violations_are_denied_with_reason(policy: str, caller: Identity, kw: dict, why: str) -> None:
    d = decide(policy, caller, **kw)
    assert d.outcome == DENY and d.reason == "NodeBindingViolation"
    assert why in d.message


def test_auto_approve_group_other_cases() -> None:
    assert decide("auto-approve-group", PER_NODE).outcome == APPROVE
    # A node renewing its own client certificate, even though it already has one.
    renew = decide("auto-approve-group", Identity("system:node:node-2", groups=("system:nodes",), method="cert"),
                   cn="system:node:node-2")
    assert renew.outcome == APPROVE and "renewal" in renew.message
    serving = decide("auto-approve-group", NODE1_CERT, signer=KUBELET_SERVING,
                     usages=("digital signature", "server auth"), ips=("192.0.2.11",))
    assert serving.outcome == APPROVE
    # Not in the approval group: left for an administrator.
    assert decide("auto-approve-group", SHARED, group="system:bootstrappers:other").outcome == PENDING
    # Admin-requested generic client certs wait for a decision too.
    admin = decide("auto-approve-group", ADMIN, cn="ops", orgs=("system:masters",), signer=APISERVER_CLIENT,
                   usages=("client auth",))
    assert admin.outcome == PENDING


def test_queue_always_reject_and_insecure() -> None:
    q = decide("queue", SHARED)
    assert q.outcome == PENDING and "tunneld csr approve csr-" in q.message
    assert decide("always-reject", SHARED).outcome == DENY
    insecure = decide("insecure-always-approve", SHARED, cn="system:node:node-2")
    assert insecure.outcome == APPROVE
    with pytest.raises(ValueError, match="unknown approval policy"):
        make_policy("yolo")
