"""Approval policies: each decides, for a new CSR that passed its signer's rules, approve / deny / leave pending.

Policies (config ``[csr] approval``):

* ``always-reject``: deny everything.
* ``queue``: an administrator decides (``tunneld csr approve|deny``); requests that break the node binding below
  are denied at once, since no administrator should approve them by mistake.
* ``insecure-always-approve``: approve everything that passes the signer's rules (labs only).
* ``auto-approve-group``: approve kubelet client CSRs from members of a group (``approve_group``, by default
  ``system:bootstrappers``), renewals by a node of its own certificate, and kubelet serving CSRs a node makes for
  itself (the signer has checked the SANs against the inventory); everything else waits for an administrator.

Node binding (beyond Kubernetes), for every policy but ``insecure-always-approve``:

* a per-node bootstrap token, or a ``system:node:<name>`` client certificate, may only ask for ``<name>``;
* any other non-admin requester (a shared bootstrap token, a static token user) may only ask for a node that is in
  the inventory and has no valid certificate yet;
* only administrators may ask for ``system:masters``, and only nodes (or bootstrappers) for ``system:node:*``.

Decisions are pure functions of the CSR and a :class:`Context` the service prepares (no I/O here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from certs.csr import CSR
from certs.signers import APISERVER_CLIENT, KUBELET_CLIENT, KUBELET_SERVING, NodeInventory, Request
from certs.tokens import ADMIN_GROUP, BOOTSTRAP_GROUP, NODES_GROUP

APPROVE, DENY, PENDING = "approve", "deny", "pending"


@dataclass(frozen=True)
class Decision:
    """What a policy decided, and why (recorded in the CSR's condition and the audit log)."""

    outcome: str
    reason: str
    message: str


@dataclass(frozen=True)
class Context:
    """Facts a policy may use: the inventory and which nodes already hold a valid kubelet client certificate."""

    inventory: NodeInventory = field(default_factory=NodeInventory)
    nodes_with_valid_cert: frozenset[str] = frozenset()


class Policy(Protocol):
    """An approval policy."""

    name: str

    def decide(self, csr: CSR, req: Request, ctx: Context) -> Decision:
        """Approve, deny or leave ``csr`` pending."""
        ...


def is_admin(csr: CSR) -> bool:
    """Whether the requester was an administrator (``system:masters``)."""
    return ADMIN_GROUP in csr.groups


def binding_violation(csr: CSR, req: Request, ctx: Context) -> str | None:
    """Why ``csr`` asks for something its requester may not have, or None."""
    if is_admin(csr):
        return None
    if ADMIN_GROUP in req.organizations:
        return f"{csr.username} may not request a certificate for group {ADMIN_GROUP}"
    if csr.signer_name == APISERVER_CLIENT:
        if req.node_name is not None or NODES_GROUP in req.organizations:
            return f"{csr.username} may not request a node identity from {APISERVER_CLIENT}"
        return None
    if csr.signer_name not in (KUBELET_CLIENT, KUBELET_SERVING):
        return None
    node = req.node_name
    if csr.requester_node is not None:
        if node != csr.requester_node:
            how = "bootstrap token" if csr.requester_token_id else "certificate"
            return (f"{csr.username} is bound to node {csr.requester_node!r} (its {how}) "
                    f"and may not request a certificate for node {node!r}")
        return None
    if node not in ctx.inventory:
        return f"node {node!r} is not in the inventory"
    if csr.signer_name == KUBELET_CLIENT and node in ctx.nodes_with_valid_cert:
        return (f"node {node!r} already has a valid client certificate; a shared credential may only obtain the "
                f"first one (renewals use the node's own certificate)")
    return None


class AlwaysReject:
    """Deny every CSR."""

    name = "always-reject"

    def decide(self, csr: CSR, req: Request, ctx: Context) -> Decision:
        return Decision(DENY, "AlwaysReject", "the approval policy 'always-reject' denies every request")


class InsecureAlwaysApprove:
    """Approve every CSR that passes its signer's rules."""

    name = "insecure-always-approve"

    def decide(self, csr: CSR, req: Request, ctx: Context) -> Decision:
        return Decision(APPROVE, "AutoApproved", "approved by the policy 'insecure-always-approve'")


class Queue:
    """Leave CSRs for an administrator; deny those that break the node binding."""

    name = "queue"

    def decide(self, csr: CSR, req: Request, ctx: Context) -> Decision:
        why = binding_violation(csr, req, ctx)
        if why:
            return Decision(DENY, "NodeBindingViolation", why)
        return Decision(PENDING, "Queued", f"waiting for an administrator: tunneld csr approve {csr.name}")


class AutoApproveGroup:
    """Approve kubelet client CSRs from ``group`` members, and nodes' requests for themselves."""

    name = "auto-approve-group"

    def __init__(self, group: str = BOOTSTRAP_GROUP) -> None:
        self.group = group

    def decide(self, csr: CSR, req: Request, ctx: Context) -> Decision:
        why = binding_violation(csr, req, ctx)
        if why:
            return Decision(DENY, "NodeBindingViolation", why)
        node = req.node_name
        own_cert = csr.requester_node is not None and csr.requester_token_id is None and node == csr.requester_node
        if csr.signer_name == KUBELET_CLIENT:
            if own_cert:
                return Decision(APPROVE, "AutoApproved", f"renewal by node {node!r} of its own client certificate")
            if self.group in csr.groups:
                bound = "per-node token" if csr.requester_node else "shared credential, node without a certificate"
                return Decision(APPROVE, "AutoApproved",
                                f"kubelet client certificate for node {node!r} requested by {csr.username} "
                                f"in group {self.group} ({bound})")
        if csr.signer_name == KUBELET_SERVING and own_cert:
            return Decision(APPROVE, "AutoApproved",
                            f"serving certificate requested by node {node!r} for its inventory names")
        return Decision(PENDING, "Queued", f"not covered by auto-approval; an administrator decides: "
                                           f"tunneld csr approve {csr.name}")


POLICIES: dict[str, Callable[[str], Policy]] = {
    "always-reject": lambda group: AlwaysReject(),
    "queue": lambda group: Queue(),
    "insecure-always-approve": lambda group: InsecureAlwaysApprove(),
    "auto-approve-group": AutoApproveGroup,
}


def make_policy(name: str, approve_group: str = BOOTSTRAP_GROUP) -> Policy:
    """The policy configured as ``name``; raises ValueError for unknown names."""
    try:
        return POLICIES[name](approve_group)
    except KeyError:
        raise ValueError(f"unknown approval policy {name!r} (one of {', '.join(POLICIES)})") from None
