"""A certificates master in its own process, for the multi-master fault tests: a real CertService on a real
EtcdStore, driven by lines on stdin, answering one JSON line per command on stdout.

Commands: ``create <csr-name> <node>`` (a first-certificate request from a shared credential), ``sign`` (one signer
pass), ``quit``. Commands are read while earlier ones run (each create is its own task). With ``--stop-in-decide``
the process sends itself SIGSTOP the first time its policy decides (that is, while it holds the node's lock, before
it stores anything): the test resumes it with SIGCONT when it likes. ``--hold S`` makes every decision take S s.
Run it under ``faketime`` to give it another clock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

from certs.approval import Context, Decision, Policy, Request, make_policy
from certs.ca import CertificateAuthority
from certs.csr import CSR
from certs.etcd_store import EtcdStore
from certs.service import CertService
from certs.signers import NodeInventory
from certs.store import StoreError
from certs.tokens import Identity
from tests.certs_util import body, make_request

SHARED = Identity("bootstrap-shared", groups=("system:bootstrappers",), method="token")


class HoldInDecide:
    """The auto-approve policy, but each decision blocks the whole process for ``hold`` seconds first (a slow
    decision: the node's lock is held meanwhile, so another master arrives while it is)."""

    def __init__(self, inner: Policy, hold: float) -> None:
        self.inner, self.name, self.hold = inner, inner.name, hold

    def decide(self, csr: CSR, req: Request, ctx: Context) -> Decision:
        print(json.dumps({"deciding": csr.name}), flush=True)
        time.sleep(self.hold)
        return self.inner.decide(csr, req, ctx)


class StopInDecide:
    """The auto-approve policy, but the first decision stops the whole process (SIGSTOP) before answering."""

    def __init__(self, inner: Policy) -> None:
        self.inner = inner
        self.name = inner.name
        self.stopped = False

    def decide(self, csr: CSR, req: Request, ctx: Context) -> Decision:
        if not self.stopped:
            self.stopped = True
            print(json.dumps({"stopping": csr.name}), flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
        return self.inner.decide(csr, req, ctx)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--etcd", required=True, help="comma-separated endpoints")
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--ca-dir", required=True, type=Path)
    parser.add_argument("--nodes", required=True, help="comma-separated node names")
    parser.add_argument("--lock-ttl", type=float, default=2.0)
    parser.add_argument("--stop-in-decide", action="store_true")
    parser.add_argument("--hold", type=float, default=0.0, help="seconds each decision blocks the process")
    args = parser.parse_args()
    ca = CertificateAuthority.load(args.ca_dir / "ca.crt", args.ca_dir / "ca.key")
    policy: Policy = make_policy("auto-approve-group")
    if args.hold:
        policy = HoldInDecide(policy, args.hold)
    if args.stop_in_decide:
        policy = StopInDecide(policy)
    inventory = NodeInventory.of([(n, ["192.0.2.1"]) for n in args.nodes.split(",")])
    store = EtcdStore(args.etcd.split(","), prefix=args.prefix, timeout=3.0)
    master = CertService(store, ca, policy, inventory, lock_ttl=args.lock_ttl)
    loop = asyncio.get_running_loop()
    print(json.dumps({"ready": os.getpid()}), flush=True)
    tasks: set[asyncio.Task[None]] = set()
    try:
        for _ in range(10_000):
            line = (await loop.run_in_executor(None, sys.stdin.readline)).split()
            if not line or line[0] == "quit":
                return
            if line[0] == "create":
                task = asyncio.create_task(create(master, line[1], line[2]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif line[0] == "sign":
                await asyncio.gather(*tasks)
                try:
                    print(json.dumps({"signed": await master.sign_ready()}), flush=True)
                except StoreError as exc:
                    print(json.dumps({"error": type(exc).__name__, "message": str(exc)}), flush=True)
    finally:
        await asyncio.gather(*tasks)
        await store.close()


async def create(master: CertService, name: str, node: str) -> None:
    """One first-certificate request; its outcome as a JSON line."""
    try:
        made = await master.create(SHARED, body(make_request(f"system:node:{node}")[0], name=name))
        print(json.dumps({"name": made.name, "state": made.state}), flush=True)
    except StoreError as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
