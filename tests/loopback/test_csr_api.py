"""The certificates API on a real TLS listener (127.x) and a real unix socket: bootstrap tokens, client
certificates, the queue, refusals with reasons, cluster-info with its JWS, and errors as metav1.Status."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from certs import jws
from certs.api import CSR_PATH
from certs.ca import cert_pem, key_pem
from certs.kubeconfig import KubeConfig
from certs.signers import KUBELET_SERVING
from certs.tokens import new_bootstrap_token
from tests.certs_api_env import ADMIN_TOKEN, Env, api_env
from tests.certs_util import body, make_csr, make_request
from tests.store_contract import CALLER
from tests.waiting import wait_value

from .conftest import next_base


@pytest.fixture
async def env(short_dir: Path) -> AsyncIterator[Env]:
    async with api_env(short_dir, next_base()) as e:
        yield e


async def _post(session: aiohttp.ClientSession, payload: dict) -> tuple[int, dict]:
    async with session.post(CSR_PATH, json=payload) as resp:
        return resp.status, await resp.json()


async def _wait_cert(session: aiohttp.ClientSession, name: str, timeout: float = 10) -> dict:
    async def get() -> dict:
        async with session.get(f"{CSR_PATH}/{name}") as resp:
            return await resp.json()

    return await wait_value(get, lambda obj: bool(obj.get("status", {}).get("certificate")), timeout,
                            f"a certificate for {name}", interval=0.1)


def _curl_unix(sock: Path, method: str, path: str, data: dict | None = None,
               user: str | None = None) -> tuple[int, dict]:
    cmd = ["curl", "-sS", "--unix-socket", str(sock), "-X", method, "-w", "\n%{http_code}",
           f"http://localhost{path}"]
    if data is not None:
        cmd += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(data)]
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout
    text, _, code = out.rpartition("\n")
    return int(code), json.loads(text)


def _approval_body(obj: dict, kind: str = "Approved", reason: str = "Test", message: str = "") -> dict:
    obj = json.loads(json.dumps(obj))
    obj.setdefault("status", {}).setdefault("conditions", []).append(
        {"type": kind, "status": "True", "reason": reason, "message": message})
    return obj


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")


@needs_curl
async def test_queue_then_admin_approval_issues_usable_client_certificate(env: Env) -> None:
    tok = await env.token(node="node-1")
    pem, key = make_request("system:node:node-1")
    async with env.client(tok.token) as boot:
        # Identity fields in the body are ignored: the caller's identity is recorded.
        code, obj = await _post(boot, body(pem, name="node-1-client", username="admin", groups=["system:masters"]))
        assert code == 201, obj
        assert obj["spec"]["username"] == f"system:bootstrap:{tok.token_id}"
        assert obj["spec"]["groups"] == ["system:bootstrappers"]
        assert obj["status"] == {}  # pending: no condition yet
        # A bootstrapper cannot approve its own request.
        async with boot.put(f"{CSR_PATH}/node-1-client/approval", json=_approval_body(obj)) as resp:
            assert resp.status == 403 and (await resp.json())["reason"] == "Forbidden"
        assert await env.service.sign_ready() == 0  # a whole signer pass: nothing to sign while it is pending
        async with boot.get(f"{CSR_PATH}/node-1-client") as resp:
            assert "certificate" not in (await resp.json())["status"]  # still pending, nothing issued
        # The administrator, over the local socket (SO_PEERCRED: root), approves.
        code, approved = await asyncio.to_thread(_curl_unix, env.socket, "PUT", f"{CSR_PATH}/node-1-client/approval",
                                                 _approval_body(obj, message="looks right"))
        assert code == 200, approved
        cond = approved["status"]["conditions"][0]
        assert (cond["type"], cond["reason"]) == ("Approved", "Test") and "uid=0" in cond["message"]
        issued = await _wait_cert(boot, "node-1-client")
    cert = x509.load_pem_x509_certificate(base64.b64decode(issued["status"]["certificate"]))
    cert.verify_directly_issued_by(env.ca.cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "system:node:node-1"
    assert cert.public_key() == key.public_key()  # type: ignore[attr-defined]
    audit = [(r.action, r.actor) for r in await env.service.store.list_audit("node-1-client")]
    assert audit == [("created", f"system:bootstrap:{tok.token_id}"), ("queued", "policy:queue"),
                     ("approved", "uid=0"), ("issued", "signer")]

    # The issued certificate authenticates: the node sees its own CSRs only, and may renew for itself only.
    (env.dir / "node.crt").write_bytes(cert_pem(cert))
    (env.dir / "node.key").write_bytes(key_pem(key))  # type: ignore[arg-type]
    async with env.client(cert=(env.dir / "node.crt", env.dir / "node.key")) as node:
        async with node.get(CSR_PATH) as resp:
            assert resp.status == 200 and (await resp.json())["items"] == []
        other, _ = make_request("system:node:node-2")
        code, obj = await _post(node, body(other, name="steal-node-2"))
        assert code == 201
        assert obj["status"]["conditions"][0]["type"] == "Denied"
        assert "bound to node 'node-1'" in obj["status"]["conditions"][0]["message"]
        async with node.get(CSR_PATH) as resp:
            assert [i["metadata"]["name"] for i in (await resp.json())["items"]] == ["steal-node-2"]


async def test_expired_or_unknown_token_gets_401_status(env: Env) -> None:
    expired = new_bootstrap_token(dt.timedelta(minutes=1), now=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=2))
    await env.service.store.put_token(expired)
    pem, _ = make_request("system:node:node-1")
    for token in (expired.token, "abcdef.0123456789abcdef", None):
        async with env.client(token) as s:
            code, obj = await _post(s, body(pem))
        assert code == 401
        assert obj["kind"] == "Status" and obj["reason"] == "Unauthorized" and obj["code"] == 401
    assert await env.service.store.list_csrs() == []


async def test_token_holder_refusals_have_reasons(env: Env) -> None:
    shared = await env.token()
    bound = await env.token(node="node-1")
    masters, _ = make_request("system:node:node-1", orgs=("system:masters",))
    other, _ = make_request("system:node:node-2")
    extra_san, _ = make_request("system:node:node-1", dns=("node-1", "evil.example.com"))
    admin_client, _ = make_request("root", orgs=("system:masters",))
    async with env.client(shared.token) as s, env.client(bound.token) as b:
        cases = [
            (s, body(masters), "Failed", "organization exactly 'system:nodes', got system:masters"),
            (b, body(other), "Denied", "bound to node 'node-1' (its bootstrap token)"),
            (s, body(extra_san, signer=KUBELET_SERVING, usages=["digital signature", "server auth"]), "Failed",
             "evil.example.com are not among node 'node-1'"),
            (s, body(admin_client, signer="kubernetes.io/kube-apiserver-client", usages=["client auth"]), "Denied",
             "may not request a certificate for group system:masters"),
        ]
        for session, payload, kind, why in cases:
            code, obj = await _post(session, payload)
            assert code == 201, obj
            conds = obj["status"]["conditions"]
            assert [c["type"] for c in conds] == [kind], conds
            assert why in conds[0]["message"]
    assert await env.service.sign_ready() == 0  # a whole signer pass: none of them gets a certificate
    assert all(c.certificate is None for c in await env.service.store.list_csrs())
    actions = [r.action for r in await env.service.store.list_audit()]
    assert actions.count("failed") == 2 and actions.count("denied") == 2


async def test_admin_token_decisions_follow_condition_rules(env: Env) -> None:
    tok = await env.token()
    pem, _ = make_request("system:node:node-1")
    async with env.client(tok.token) as boot, env.client(ADMIN_TOKEN) as admin:
        _, obj = await _post(boot, body(pem, name="to-deny"))
        async with admin.put(f"{CSR_PATH}/to-deny/approval",
                             json=_approval_body(obj, "Denied", "Nope", "unknown machine")) as resp:
            denied = await resp.json()
            assert resp.status == 200
        assert denied["status"]["conditions"][0]["type"] == "Denied"
        async with admin.put(f"{CSR_PATH}/to-deny/approval", json=_approval_body(denied)) as resp:
            assert resp.status == 409 and "exclude each other" in (await resp.json())["message"]
        async with admin.put(f"{CSR_PATH}/to-deny/approval", json=_approval_body(obj)) as resp:
            assert resp.status == 409 and "may not be removed" in (await resp.json())["message"]
        async with admin.get(CSR_PATH) as resp:
            assert [i["metadata"]["name"] for i in (await resp.json())["items"]] == ["to-deny"]
        code, dup = await _post(boot, body(pem, name="to-deny"))
        assert code == 409 and dup["reason"] == "AlreadyExists"
        async with boot.post(CSR_PATH, data=b"{not json") as resp:
            assert resp.status == 400 and (await resp.json())["reason"] == "BadRequest"
        code, bad = await _post(boot, body(pem, expiration=60))
        assert code == 422 and bad["reason"] == "Invalid" and "600" in bad["message"]
        async with admin.get(f"{CSR_PATH}/missing") as resp:
            assert resp.status == 404 and (await resp.json())["reason"] == "NotFound"
    assert await env.service.sign_ready() == 0  # a whole signer pass: a denied request is never signed
    assert (await env.service.store.get_csr("to-deny")).certificate is None


@needs_curl
async def test_cluster_info_unauthenticated_with_jws_per_signing_token(env: Env) -> None:
    good = await env.token()
    auth_only = await env.token(usages=["authentication"])
    expired = new_bootstrap_token(dt.timedelta(minutes=1), now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    await env.service.store.put_token(expired)
    proc = await asyncio.to_thread(
        subprocess.run, ["curl", "-sS", "--cacert", str(env.ca_file),
                         env.url + "/api/v1/namespaces/kube-public/configmaps/cluster-info"],
        capture_output=True, text=True, timeout=20, check=True)
    out = proc.stdout
    cm = json.loads(out)
    data = cm["data"]
    assert sorted(data) == ["jws-kubeconfig-" + good.token_id, "kubeconfig"]
    assert jws.verify_detached(data["jws-kubeconfig-" + good.token_id], data["kubeconfig"].encode(),
                               good.token_id, good.secret)
    assert not jws.verify_detached(data["jws-kubeconfig-" + good.token_id], data["kubeconfig"].encode(),
                                   auth_only.token_id, auth_only.secret)
    kc = KubeConfig.loads(data["kubeconfig"])
    assert len(kc.clusters) == 1 and kc.clusters[0].certificate_authority_data == env.ca.pem


@pytest.mark.skipif(shutil.which("setpriv") is None or os.geteuid() != 0, reason="needs root and setpriv")
@needs_curl
async def test_local_socket_refuses_other_uids(env: Env) -> None:
    os.chmod(env.socket, 0o666)
    os.chmod(env.dir, 0o755)
    code, obj = await asyncio.to_thread(_curl_unix, env.socket, "GET", CSR_PATH, None, "65534")
    assert code == 403 and "uid=65534" in obj["message"]
    code, obj = await asyncio.to_thread(_curl_unix, env.socket, "GET", CSR_PATH)
    assert code == 200 and obj["kind"] == "CertificateSigningRequestList"



async def test_list_pages_with_limit_and_continue(env: Env) -> None:
    for name in ("p-c", "p-a", "p-e", "p-b", "p-d"):
        await env.service.store.create_csr(make_csr(CALLER, name=name))
    seen: list[str] = []
    token = ""
    async with env.client(ADMIN_TOKEN) as s:
        for _ in range(5):
            query = {"limit": "2", **({"continue": token} if token else {})}
            async with s.get(CSR_PATH, params=query) as r:
                assert r.status == 200, await r.text()
                page = await r.json()
            assert len(page["items"]) <= 2
            seen += [i["metadata"]["name"] for i in page["items"]]
            token = page["metadata"].get("continue", "")
            if not token:
                break
        assert seen == ["p-a", "p-b", "p-c", "p-d", "p-e"]  # name order, each once, last page without continue
        for query, why in (({"limit": "0"}, "limit"), ({"limit": "1001"}, "limit"), ({"limit": "x"}, "limit"),
                           ({"limit": "2", "continue": "bm9wZQ"}, "continue")):
            async with s.get(CSR_PATH, params=query) as r:
                assert r.status == 400 and why in (await r.json())["message"], await r.text()
