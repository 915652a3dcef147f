"""``POST /apis/tunneld.io/v1/nodesshcertificates``: a dial-in node obtains its SSH user certificate.

The caller must be a node authenticated by its kubelet client certificate (``system:node:<name>`` in
``system:nodes``, TLS-verified against the cluster CA; a token is not enough), may ask only for its own name, and
must be in the inventory as a node allowed to dial in. The body names the node and carries its SSH public key::

    {"apiVersion": "tunneld.io/v1", "kind": "NodeSSHCertificateRequest",
     "spec": {"nodeName": "node-1", "publicKey": "ssh-ed25519 AAAA... comment"}}

The answer is the same object with ``status.certificate`` (one OpenSSH line: principal ``node:<name>``, only
``permit-port-forwarding``, 24 h by default), ``serial``, ``validAfter`` and
``validBefore`` (seconds since the epoch). So the kubelet TLS bootstrap also yields the node's SSH identity, and
``--rotate`` renews both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from certs.csr import CSRInvalid
from certs.service import Forbidden
from certs.tokens import Identity

if TYPE_CHECKING:  # asyncssh is loaded only where a CA is (certs.sshca)
    from certs.sshca import SSHCA

PATH = "/apis/tunneld.io/v1/nodesshcertificates"
MAX_KEY = 16 * 1024
NODE_VALIDITY = 24 * 3600
audit = logging.getLogger("certs.audit")


class NodeSSHIssuer:
    """Signs nodes' SSH keys with the user CA, for the node itself only."""

    def __init__(self, ca: SSHCA, may_dial_in: Callable[[str], str | None], validity: int = NODE_VALIDITY) -> None:
        """``may_dial_in(name)`` returns None for a node of the inventory that may dial in, else why not."""
        self.ca = ca
        self.may_dial_in = may_dial_in
        self.validity = validity

    def issue(self, who: Identity, body: Any) -> dict[str, Any]:
        """The answer for ``body`` from ``who``; raises :class:`Forbidden` (403) or :class:`CSRInvalid` (422)."""
        node = who.node_name
        if who.method != "cert" or node is None:
            raise Forbidden(f"{who.user} may not obtain a node SSH certificate (a node's client certificate, "
                            "system:node:<name> in system:nodes, is required)")
        spec = body.get("spec") if isinstance(body, dict) else None
        if not isinstance(spec, dict):
            raise CSRInvalid("spec: required (nodeName and publicKey)")
        asked, key = spec.get("nodeName"), spec.get("publicKey")
        if not isinstance(asked, str) or not isinstance(key, str) or not 0 < len(key) <= MAX_KEY:
            raise CSRInvalid("spec.nodeName and spec.publicKey (an OpenSSH public key line) are required strings")
        if asked != node:
            raise Forbidden(f"system:node:{node} may only obtain a certificate for node:{node}, not for "
                            f"node:{asked[:64]!r}")
        why = self.may_dial_in(node)
        if why is not None:
            raise Forbidden(f"node {node}: {why}")
        from certs.sshca import SSHCAError

        try:
            cert = self.ca.sign_node(key, node, self.validity)
        except SSHCAError as exc:
            raise CSRInvalid(f"spec.publicKey: {exc}") from exc
        audit.info("node SSH certificate issued", extra={"node": node, "serial": cert.serial,
                                                         "valid_before": cert.valid_before})
        return {
            "apiVersion": "tunneld.io/v1", "kind": "NodeSSHCertificateRequest",
            "spec": {"nodeName": node, "publicKey": key.strip()},
            "status": {"certificate": cert.text.decode("ascii").strip(), "principal": cert.principals[0],
                       "serial": str(cert.serial), "validAfter": cert.valid_after,
                       "validBefore": cert.valid_before},
        }
