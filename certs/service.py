"""The CSR service: what the HTTP API and the daemon call. Ties the store, the CA, the signer rules and the policy.

Life of a CSR here:

1. ``create``: the body becomes a CSR whose identity fields come from the caller; the signer's rules are checked at
   once (breaking them -> ``Failed``), then the approval policy decides (``Approved`` / ``Denied`` / left pending).
2. ``decide``: an administrator adds ``Approved`` or ``Denied`` (condition rules enforced, compare-and-swap write).
3. the signer loop (``run_signer``) finds approved CSRs without a certificate, issues them (or marks them
   ``Failed``) and writes the certificate; it also wakes at once after a local approval, and polls so that
   approvals made through another master sharing the store are signed too.

Every step appends an audit record (who, when, why); the conditions carry the same reason and message.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import datetime as dt
import logging
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from cryptography import x509

from certs import jws
from certs.approval import APPROVE, DENY, Context, Policy
from certs.ca import CertificateAuthority
from certs.csr import APPROVED, CONDITION_TYPES, CSR, DENIED, FAILED, ConditionConflict, CSRInvalid, from_request_body
from certs.kubeconfig import cluster_only
from certs.signers import DEFAULT_LIFETIME, KUBELET_CLIENT, NodeInventory, SignerRuleError, check, sign
from certs.store import AuditRecord, Contended, Fence, LockLost, NotFound, Store, StoreError, update_csr
from certs.tokens import Authenticator, Identity, StaticToken

log = logging.getLogger("certs.service")

STATES = ("Pending", "Approved", "Issued", "Denied", "Failed")
LOCK_TTL = 30.0
"""Seconds a master's lock on a node's first-certificate decision outlives the master if it dies or stalls holding it
(etcd: the lease TTL, timed by etcd; SQLite: by the host's clock). Whatever the master does after that, its writes
under the lock fail (they are fenced)."""
LOCK_WAIT = 5.0
"""How long a request waits for another master's decision about the same node before answering 503."""


DEFAULT_MAX_PENDING = 10
"""Pending CSRs one requester may have at once (``[csr] max_pending_per_requester``)."""


class Forbidden(PermissionError):
    """The caller may not do this (HTTP 403)."""


class QuotaExceeded(Exception):
    """The caller has too many pending CSRs already (HTTP 429)."""


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CertService:
    """CSR operations on behalf of authenticated callers, plus the signer loop."""

    def __init__(
        self,
        store: Store,
        ca: CertificateAuthority,
        policy: Policy,
        inventory: NodeInventory | None = None,
        static_tokens: Iterable[StaticToken] = (),
        max_lifetime: dt.timedelta = DEFAULT_LIFETIME,
        clock: Callable[[], dt.datetime] = _utcnow,
        max_pending: int = DEFAULT_MAX_PENDING,
        lock_ttl: float = LOCK_TTL,
    ) -> None:
        self.store = store
        self.lock_ttl = lock_ttl
        self.ca = ca
        self.policy = policy
        self.inventory = inventory or NodeInventory()
        self.max_lifetime = max_lifetime
        self.max_pending = max_pending
        """Pending CSRs per requester (user name); administrators are not limited."""
        self.clock = clock
        self.authenticator = Authenticator(static_tokens, store.get_token, clock)
        self.counts: dict[str, int] = dict.fromkeys(STATES, 0)
        """CSRs by state, refreshed by every signer pass (for metrics)."""
        self._wake = asyncio.Event()
        self._create_lock = asyncio.Lock()
        self._instance = secrets.token_hex(6)
        """Names this process as the owner of store locks."""

    def set_inventory(self, inventory: NodeInventory) -> None:
        """Replace the inventory (the daemon calls this on reload)."""
        self.inventory = inventory

    async def _audit(self, csr: str, action: str, actor: str, reason: str = "", message: str = "") -> None:
        await self.store.append_audit(AuditRecord.now(csr, action, actor, reason, message, self.clock()))
        log.info("csr %s", action, extra={"csr": csr, "actor": actor, "reason": reason})

    async def _context(self) -> Context:
        now = self.clock()
        have: set[str] = set()
        for other in await self.store.list_csrs():
            if other.signer_name != KUBELET_CLIENT or other.state not in ("Approved", "Issued"):
                continue
            node = _node_of(other)
            if node is None:
                continue
            if other.certificate is None:
                have.add(node)  # approved, about to be issued: counts as having one
                continue
            try:
                cert = x509.load_pem_x509_certificate(other.certificate)
            except ValueError:
                continue
            if now < cert.not_valid_after_utc:  # not yet valid by our clock counts too: clocks differ
                have.add(node)
        return Context(self.inventory, frozenset(have))

    async def create(self, caller: Identity, body: Any) -> CSR:
        """Create a CSR from a POST body; decide it per the signer's rules and the policy."""
        now = self.clock()
        csr = from_request_body(body, caller, now)
        async with self._create_lock:  # one decision at a time, so "no valid cert yet" stays true when decided
            await self._check_quota(caller)
            try:
                req = check(csr, self.inventory)
            except SignerRuleError as exc:
                csr.add_condition(FAILED, "SignerValidationFailure", str(exc), now)
                decision = None
                await self.store.create_csr(csr)
            else:
                async with self._first_certificate_lock(csr, req.node_name) as fence:
                    decision = self.policy.decide(csr, req, await self._context())
                    actor = f"policy:{self.policy.name}"
                    if decision.outcome == APPROVE:
                        csr.add_condition(APPROVED, decision.reason, f"{decision.message} (by {actor})", now)
                    elif decision.outcome == DENY:
                        csr.add_condition(DENIED, decision.reason, f"{decision.message} (by {actor})", now)
                    try:
                        await self.store.create_csr(csr, fence)
                    except LockLost:
                        log.warning("lost the lock for node %s while deciding %s: nothing stored", req.node_name,
                                    csr.name, extra={"csr": csr.name})
                        raise
        await self._audit(csr.name, "created", caller.user, "", f"signer {csr.signer_name} via {caller.method}")
        if decision is None:
            failed = csr.condition(FAILED)
            assert failed is not None
            await self._audit(csr.name, "failed", "signer", failed.reason, failed.message)
        else:
            action = {APPROVE: "approved", DENY: "denied"}.get(decision.outcome, "queued")
            await self._audit(csr.name, action, f"policy:{self.policy.name}", decision.reason, decision.message)
        if csr.state == APPROVED:
            self._wake.set()
        return csr

    async def _check_quota(self, caller: Identity) -> None:
        """Refuse a new CSR when ``caller`` already has :attr:`max_pending` pending ones (masters sharing a store
        each check under their own lock, so together they may overshoot by the number of masters)."""
        if caller.is_admin:
            return
        pending = sum(1 for c in await self.store.list_csrs() if c.username == caller.user and c.state == "Pending")
        if pending >= self.max_pending:
            raise QuotaExceeded(f"{caller.user} has {pending} pending certificate signing requests, the most allowed "
                                f"({self.max_pending}); wait for a decision or ask an administrator")

    @contextlib.asynccontextmanager
    async def _first_certificate_lock(self, csr: CSR, node: str | None, wait: float | None = None
                                      ) -> AsyncIterator[Fence | None]:
        """Around deciding and storing a kubelet client CSR from a shared credential (the node's first certificate),
        and around recording its certificate: hold the store's lock for that node, so masters sharing the store
        decide one at a time and a second request sees the first one's certificate. Yields the lock's fence, which
        the guarded writes carry (None for other CSRs, which need no lock)."""
        if not _first_certificate(csr) or node is None:
            yield None
            return
        name, owner = f"first-kubelet-client/{node}", f"{self._instance}/{csr.name}"
        deadline = asyncio.get_running_loop().time() + (LOCK_WAIT if wait is None else wait)
        while (fence := await self.store.acquire_lock(name, owner, self.lock_ttl)) is None:
            if asyncio.get_running_loop().time() > deadline:
                raise Contended(f"another master is deciding a certificate for node {node!r}; try again")
            await asyncio.sleep(0.05)
        try:
            yield fence
        finally:
            try:
                await self.store.release_lock(fence)
            except StoreError as exc:  # it expires by itself after lock_ttl
                log.warning("could not release the store lock %s: %s", name, exc)

    def store_check(self) -> str | None:
        """Readiness of the store (``/readyz/store``): a reason when no endpoint of it answered its last attempt.
        Passive: the signer loop reads the store every few seconds, which keeps this fresh."""
        health = self.store.endpoint_health()
        if health and not any(health.values()):
            return f"no store endpoint answered its last request ({', '.join(sorted(health))})"
        return None

    def _visible(self, caller: Identity, csr: CSR) -> bool:
        return caller.is_admin or csr.username == caller.user

    async def list(self, caller: Identity) -> list[CSR]:
        """Every CSR for administrators; a caller's own CSRs otherwise."""
        return [c for c in await self.store.list_csrs() if self._visible(caller, c)]

    async def list_page(self, caller: Identity, limit: int, continue_token: str = "") -> tuple[builtins.list[CSR], str]:
        """One page of :meth:`list` in name order (a page may hold fewer than ``limit`` of a non-admin's CSRs);
        (items, continuation or "")."""
        items, token = await self.store.list_csrs_page(limit, continue_token)
        return [c for c in items if self._visible(caller, c)], token

    async def get(self, caller: Identity, name: str) -> CSR:
        """One CSR; raises :class:`~certs.store.NotFound` also when the caller may not see it."""
        csr = await self.store.get_csr(name)
        if not self._visible(caller, csr):
            raise NotFound(f"certificatesigningrequests {name!r} not found")
        return csr

    async def decide(self, caller: Identity, name: str, kind: str, reason: str = "", message: str = "") -> CSR:
        """An administrator approves or denies ``name``. Raises Forbidden, NotFound or ConditionConflict."""
        if not caller.is_admin:
            raise Forbidden(f"{caller.user} may not approve or deny certificate signing requests")
        if kind not in (APPROVED, DENIED):
            raise CSRInvalid(f"status.conditions: only Approved or Denied may be added, not {kind!r}")
        verb = "approved" if kind == APPROVED else "denied"
        reason = reason or ("AdminApproved" if kind == APPROVED else "AdminDenied")
        message = message or f"{verb} by {caller.user}"
        if caller.user not in message:
            message = f"{message} (by {caller.user})"
        now = self.clock()
        csr = await update_csr(self.store, name, lambda c: c.add_condition(kind, reason, message, now))
        await self._audit(name, verb, caller.user, reason, message)
        if kind == APPROVED:
            self._wake.set()
        return csr

    async def delete(self, caller: Identity, name: str) -> CSR:
        """An administrator removes ``name`` (any state); its audit trail stays. Raises Forbidden or NotFound."""
        if not caller.is_admin:
            raise Forbidden(f"{caller.user} may not delete certificate signing requests")
        csr = await self.store.delete_csr(name)
        await self._audit(name, "deleted", caller.user, "", f"deleted in state {csr.state}")
        return csr

    async def approval_from_body(self, caller: Identity, name: str, body: Any) -> CSR:
        """``PUT .../{name}/approval``: the body is the object with one new Approved or Denied condition."""
        if not caller.is_admin:
            raise Forbidden(f"{caller.user} may not approve or deny certificate signing requests")
        if not isinstance(body, dict) or (body.get("metadata") or {}).get("name", name) != name:
            raise CSRInvalid("metadata.name: must match the name in the URL")
        conds = (body.get("status") or {}).get("conditions") or []
        if not isinstance(conds, list) or not all(isinstance(c, dict) for c in conds):
            raise CSRInvalid("status.conditions: expected a list of conditions")
        current = await self.store.get_csr(name)
        have = {c.type for c in current.conditions}
        sent = [str(c.get("type", "")) for c in conds]
        removed = have - set(sent)
        if removed:
            raise ConditionConflict(f"conditions may not be removed ({', '.join(sorted(removed))})")
        new = [c for c in conds if c.get("type") not in have]
        if len(new) != 1 or new[0].get("type") not in (APPROVED, DENIED):
            raise CSRInvalid("status.conditions: add exactly one Approved or Denied condition")
        if str(new[0].get("status", "True")) != "True":
            raise CSRInvalid("status.conditions: status must be \"True\"")
        unknown = [t for t in sent if t not in CONDITION_TYPES]
        if unknown:
            raise CSRInvalid(f"status.conditions: unknown type {unknown[0]!r}")
        return await self.decide(caller, name, str(new[0]["type"]), str(new[0].get("reason") or ""),
                                 str(new[0].get("message") or ""))

    async def sign_ready(self) -> int:
        """Issue certificates for approved CSRs that have none yet; returns how many were issued or failed.

        Each CSR is handled on its own: one that makes signing fail unexpectedly is marked ``Failed`` with the
        reason (``SigningError``) and the pass goes on to the next, so no single request can stop issuance.
        """
        done = 0
        csrs = await self.store.list_csrs()
        for csr in csrs:
            if csr.state != APPROVED:
                continue
            try:
                node = _node_of(csr) if _first_certificate(csr) else None
                async with self._first_certificate_lock(csr, node, wait=0.0) as fence:
                    done += await self._sign_one(csr.name, fence)
            except Contended as exc:  # another master is on it (or we lost the lock): the next pass looks again
                log.info("not signing %s now: %s", csr.name, exc, extra={"csr": csr.name})
            except (asyncio.CancelledError, StoreError):
                raise
            except Exception as exc:  # anything a hostile request provokes fails that request only
                why = f"signing failed: {type(exc).__name__}: {str(exc)[:200]}"
                log.error("csr %s: %s", csr.name, why, extra={"csr": csr.name})
                done += await self._fail(csr.name, "SigningError", why)
        self.counts = _count(await self.store.list_csrs() if done else csrs)
        return done

    async def _sign_one(self, name: str, fence: Fence | None) -> int:
        """Sign ``name`` if it is still approved without a certificate and record it, fenced by ``fence``. A
        certificate whose recording fails is discarded: it never leaves this process."""
        try:
            csr = await self.store.get_csr(name)
        except NotFound:
            return 0  # an administrator deleted it
        if csr.state != APPROVED:
            return 0
        now = self.clock()
        try:
            pem = sign(self.ca, csr, self.inventory, now, self.max_lifetime)
        except SignerRuleError as exc:
            return await self._fail(name, "SignerValidationFailure", str(exc), fence)
        try:
            await update_csr(self.store, name, _with_certificate(pem), fence=fence)
        except (ConditionConflict, NotFound):
            return 0  # another master issued it first, or an administrator deleted it
        except LockLost:
            log.warning("lost the lock before recording the certificate of %s: certificate discarded", name,
                        extra={"csr": name})
            raise
        serial = x509.load_pem_x509_certificate(pem).serial_number
        await self._audit(name, "issued", "signer", "Issued", f"serial {serial:x}")
        return 1

    async def _fail(self, name: str, reason: str, why: str, fence: Fence | None = None) -> int:
        """Add a ``Failed`` condition to ``name``; 0 when it changed meanwhile (already failed, issued, deleted)."""
        try:
            await update_csr(self.store, name, _add(FAILED, reason, why, self.clock()), fence=fence)
        except (ConditionConflict, NotFound):
            return 0
        await self._audit(name, "failed", "signer", reason, why)
        return 1

    async def run_signer(self, interval: float = 2.0) -> None:
        """Sign approved CSRs whenever woken (local approval) and every ``interval`` seconds; runs until cancelled."""
        while True:
            try:
                await self.sign_ready()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("signer pass failed; retrying")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
            except TimeoutError:
                pass

    async def cluster_info(self, server: str) -> dict[str, Any]:
        """The ``kube-public/cluster-info`` ConfigMap: the kubeconfig and one JWS per valid signing token."""
        kubeconfig = cluster_only(server, self.ca.pem).dumps()
        data = {"kubeconfig": kubeconfig}
        now = self.clock()
        for token in await self.store.list_tokens():
            if "signing" in token.usages and not token.expired(now):
                data[f"jws-kubeconfig-{token.token_id}"] = jws.sign_detached(kubeconfig.encode(), token.token_id,
                                                                            token.secret)
        return {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "cluster-info", "namespace": "kube-public"}, "data": data}


def _add(kind: str, reason: str, message: str, now: dt.datetime) -> Callable[[CSR], object]:
    return lambda c: c.add_condition(kind, reason, message, now)


def _first_certificate(csr: CSR) -> bool:
    """A kubelet client CSR from a shared credential (not from the node itself): the node's first certificate."""
    return csr.signer_name == KUBELET_CLIENT and csr.requester_node is None


def _node_of(csr: CSR) -> str | None:
    try:
        cns = csr.parsed().subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    except ValueError:
        return None
    cn = str(cns[0].value) if cns else ""
    return cn.removeprefix("system:node:") if cn.startswith("system:node:") else None


def _count(csrs: Iterable[CSR]) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    counts.update(Counter(c.state for c in csrs))
    return counts


def _with_certificate(pem: bytes) -> Callable[[CSR], None]:
    """The store update that records ``pem`` as the CSR's issued certificate."""

    def update(csr: CSR) -> None:
        csr.set_certificate(pem)

    return update
