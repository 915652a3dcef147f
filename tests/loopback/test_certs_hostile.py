"""Attacks on the certificates API by a caller that holds a credential: requests built to break the signer, and the
administrators' way out (DELETE, ``tunneld csr delete``). Real TLS listener and unix socket on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509

from certs.api import CSR_PATH
from certs.csr import APPROVED, CSR
from certs.service import CertService
from certs.store import NotFound
from tests.certs_api_env import ADMIN_TOKEN, Env, api_env
from tests.certs_util import body, make_csr, make_request
from tests.store_contract import CALLER
from tests.waiting import wait_value

from .conftest import next_base


@pytest.fixture
async def env(short_dir: Path) -> AsyncIterator[Env]:
    async with api_env(short_dir, next_base(), policy="auto-approve-group") as e:
        yield e


async def _post(session: aiohttp.ClientSession, payload: dict) -> tuple[int, dict]:
    async with session.post(CSR_PATH, json=payload) as resp:
        return resp.status, await resp.json()


async def _until(service: CertService, name: str, done: Callable[[CSR], bool], timeout: float = 10.0) -> CSR:
    """Poll the store (bounded) until ``name`` satisfies ``done``."""
    return await wait_value(lambda: service.store.get_csr(name), done, timeout, f"{name} to change state")


async def _plant(env: Env, name: str, change: Callable[[CSR], None]) -> None:
    """Write an approved CSR straight into the store, as an older version (or another master) could have."""
    csr = make_csr(CALLER, name=name)
    change(csr)
    csr.add_condition(APPROVED, "Planted", "approved before the checks existed")
    await env.service.store.create_csr(csr)


@pytest.mark.parametrize("value", [10**30, 2**31, 599, -1, True, 600.0, "3600", [3600]])
async def test_out_of_range_expiration_is_422_at_create(env: Env, value: object) -> None:
    tok = await env.token(node="node-1")
    pem, _ = make_request("system:node:node-1")
    async with env.client(tok.token) as s:
        code, obj = await _post(s, body(pem, expiration=value))  # type: ignore[arg-type]
    assert code == 422, obj
    assert obj["kind"] == "Status" and obj["reason"] == "Invalid" and "spec.expirationSeconds" in obj["message"]
    assert await env.service.store.list_csrs() == []


async def test_largest_allowed_expiration_is_capped_at_one_year(env: Env) -> None:
    tok = await env.token(node="node-1")
    pem, _ = make_request("system:node:node-1")
    async with env.client(tok.token) as s:
        code, obj = await _post(s, body(pem, name="longest", expiration=2**31 - 1))
    assert code == 201, obj
    issued = await _until(env.service, "longest", lambda c: c.certificate is not None)
    assert issued.certificate is not None
    cert = x509.load_pem_x509_certificate(issued.certificate)
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=364) < lifetime <= dt.timedelta(days=365)


async def test_a_csr_that_breaks_signing_fails_alone_and_the_next_one_is_issued(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    # Stored before the create-time check existed: the number overflowed every signer pass (OverflowError).
    await _plant(env, "huge-expiry", lambda c: setattr(c, "expiration_seconds", 10**30))
    # A request whose PEM cannot be parsed makes the signer raise ValueError.
    await _plant(env, "broken-request", lambda c: setattr(
        c, "request", b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"))
    tok = await env.token(node="node-1")
    pem, _ = make_request("system:node:node-1")
    with caplog.at_level(logging.ERROR, logger="certs.service"):
        async with env.client(tok.token) as s:
            code, obj = await _post(s, body(pem, name="innocent"))
        assert code == 201 and obj["status"]["conditions"][0]["type"] == "Approved", obj
        good = await _until(env.service, "innocent", lambda c: c.certificate is not None)
        broken = await _until(env.service, "broken-request", lambda c: c.state == "Failed")
    assert good.state == "Issued"
    failed = broken.condition("Failed")
    assert failed is not None and failed.reason == "SigningError" and "ValueError" in failed.message
    huge = await env.service.store.get_csr("huge-expiry")
    assert huge.state == "Issued" and huge.certificate is not None  # clamped to one year, not an overflow
    assert x509.load_pem_x509_certificate(huge.certificate).not_valid_after_utc < (
        dt.datetime.now(dt.UTC) + dt.timedelta(days=366))
    trail = [(r.action, r.actor, r.reason) for r in await env.service.store.list_audit("broken-request")]
    assert ("failed", "signer", "SigningError") in trail
    assert any("broken-request" in r.getMessage() for r in caplog.records)


async def test_admin_deletes_a_csr_over_the_api_and_others_may_not(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    await _plant(env, "stuck", lambda c: None)
    tok = await env.token(node="node-1")
    with caplog.at_level(logging.WARNING, logger="certs.audit"):
        async with env.client(tok.token) as node:
            async with node.delete(f"{CSR_PATH}/stuck") as resp:
                refused = await resp.json()
                assert resp.status == 403, refused
    assert refused["kind"] == "Status" and "may not delete" in refused["message"]
    assert any("may not delete" in r.getMessage() and getattr(r, "method", "") == "DELETE" for r in caplog.records)
    await env.service.store.get_csr("stuck")  # still there
    async with env.client(ADMIN_TOKEN) as admin:
        async with admin.delete(f"{CSR_PATH}/stuck") as resp:
            done = await resp.json()
            assert resp.status == 200, done
        assert done["kind"] == "Status" and done["status"] == "Success" and done["details"]["name"] == "stuck"
        async with admin.get(f"{CSR_PATH}/stuck") as resp:
            assert resp.status == 404
        async with admin.delete(f"{CSR_PATH}/stuck") as resp:
            assert resp.status == 404 and (await resp.json())["reason"] == "NotFound"
    trail = [(r.action, r.actor) for r in await env.service.store.list_audit("stuck")]
    assert trail[-1] == ("deleted", "admin"), "the decision trail outlives the object"


async def test_tunneld_csr_delete_over_the_local_socket(env: Env) -> None:
    await _plant(env, "stuck", lambda c: None)
    argv = [sys.executable, "-m", "tunneld", "csr", "delete", "stuck", "--socket", str(env.socket)]
    done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "stuck deleted"
    assert await env.service.store.list_csrs() == []
    again = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "'stuck' not found" in again.stderr
    actors = [r.actor for r in await env.service.store.list_audit("stuck") if r.action == "deleted"]
    assert actors and actors[0].startswith("uid=")


async def _raw_tls(env: Env, request: bytes, timeout: float = 10.0) -> bytes:
    """Send ``request`` as is over TLS, read until the server closes (bounded); the raw response."""
    reader, writer = await asyncio.open_connection(env.host, env.port, ssl=env.tls_client_context(),
                                                   server_hostname=env.host)
    out = bytearray()
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                out += chunk
    except ConnectionResetError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return bytes(out)


def _status_and_body(response: bytes) -> tuple[int, dict]:
    head, _, payload = response.partition(b"\r\n\r\n")
    code = int(head.split(b" ", 2)[1])
    return code, json.loads(payload)


@pytest.mark.parametrize("credential", [b"Bearer \xff\xfe\x80abc", b"\xc3\x28 token",
                                        "Bearer t\u00f6k\u00e9n".encode()])
async def test_non_utf8_authorization_is_401_and_audited(
        env: Env, caplog: pytest.LogCaptureFixture, credential: bytes) -> None:
    payload = json.dumps(body(make_request("system:node:node-1")[0])).encode()
    request = (b"POST " + CSR_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: " + credential +
               b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(payload)).encode() +
               b"\r\nConnection: close\r\n\r\n" + payload)
    with caplog.at_level(logging.WARNING, logger="certs.audit"):
        code, obj = _status_and_body(await _raw_tls(env, request))
    assert code == 401, obj
    assert obj["kind"] == "Status" and obj["reason"] == "Unauthorized"
    audits = [r for r in caplog.records if r.name == "certs.audit"]
    assert len(audits) == 1 and getattr(audits[0], "status", None) == 401
    assert "Authorization" in audits[0].getMessage()
    assert await env.service.store.list_csrs() == []


async def test_deeply_nested_json_body_is_400_and_audited(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    payload = b"[" * 50_000 + b"]" * 50_000
    request = (b"POST " + CSR_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
               ADMIN_TOKEN.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: " +
               str(len(payload)).encode() + b"\r\nConnection: close\r\n\r\n" + payload)
    with caplog.at_level(logging.WARNING, logger="certs.audit"):
        code, obj = _status_and_body(await _raw_tls(env, request))
    assert code == 400, obj
    assert obj["kind"] == "Status" and obj["reason"] == "BadRequest" and "nested" in obj["message"]
    audits = [r for r in caplog.records if r.name == "certs.audit"]
    assert len(audits) == 1 and getattr(audits[0], "status", None) == 400
    # The listener is fine afterwards.
    async with env.client(ADMIN_TOKEN) as admin, admin.get(CSR_PATH) as resp:
        assert resp.status == 200


async def test_pending_csrs_per_requester_are_capped_with_429(short_dir: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    async with api_env(short_dir, next_base(), policy="queue", max_pending=3) as env:
        flooder, other = await env.token(), await env.token()
        pem, _ = make_request("system:node:node-1")
        async with env.client(flooder.token) as s, env.client(other.token) as o, env.client(ADMIN_TOKEN) as admin:
            for i in range(3):
                code, obj = await _post(s, body(pem, name=f"flood-{i}"))
                assert code == 201 and obj["status"] == {}, obj  # pending: queued for an administrator
            with caplog.at_level(logging.WARNING, logger="certs.audit"):
                code, obj = await _post(s, body(pem, name="flood-3"))
            assert code == 429, obj
            assert obj["kind"] == "Status" and obj["reason"] == "TooManyRequests" and obj["code"] == 429
            assert f"system:bootstrap:{flooder.token_id} has 3 pending" in obj["message"]
            audits = [r for r in caplog.records if r.name == "certs.audit"]
            assert len(audits) == 1 and getattr(audits[0], "status", None) == 429
            with pytest.raises(NotFound):
                await env.service.store.get_csr("flood-3")
            # Another requester is not affected, nor is an administrator.
            code, _ = await _post(o, body(pem, name="other-0"))
            assert code == 201
            code, _ = await _post(admin, body(make_request("admin-2", orgs=("system:masters",))[0],
                                              signer="kubernetes.io/kube-apiserver-client", usages=["client auth"]))
            assert code == 201
            # A decision frees a slot.
            async with admin.delete(f"{CSR_PATH}/flood-0") as resp:
                assert resp.status == 200
            code, obj = await _post(s, body(pem, name="flood-3"))
            assert code == 201, obj


async def test_header_bytes_the_parser_refuses_are_one_audit_line_without_the_bytes(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    request = (b"GET " + CSR_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cr\x7ft-Value-42\r\n"
               b"Connection: close\r\n\r\n")
    with caplog.at_level(logging.DEBUG):
        response = await _raw_tls(env, request)
    assert response.split(b" ", 2)[1] == b"400"
    audits = [r for r in caplog.records if r.name == "certs.audit"]
    assert len(audits) == 1 and getattr(audits[0], "status", None) == 400, [r.getMessage() for r in audits]
    assert "malformed request: Invalid header value char" in audits[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info], "no traceback"
    assert "Value-42" not in caplog.text
