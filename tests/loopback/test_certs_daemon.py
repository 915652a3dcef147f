"""The daemon with the certificates API (real `tunneld serve`), administered with the real CLI: token create,
queue -> `tunneld csr approve` -> certificate issued, deny, errors with exit codes, restart keeps a pending CSR."""

from __future__ import annotations

import base64
import re
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from certs.api import CSR_PATH
from tests.certs_daemon import Daemon, acli, cli, session, wait_for, write_config
from tests.certs_util import body, make_request

from .conftest import next_base


async def test_queue_cli_approve_deny_and_restart(short_dir: Path) -> None:
    cfg = write_config(short_dir / "m", next_base())
    init = cli("ca", "init", "--config", str(cfg.path))
    assert init.returncode == 0, init.stderr
    assert re.search(r"CA pin:\s+sha256:[0-9a-f]{64}", init.stdout)
    made = cli("token", "create", "--config", str(cfg.path), "--ttl", "1h", "--node", "node-1",
               "--description", "for node-1")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert re.fullmatch(r"[a-z0-9]{6}\.[a-z0-9]{16}", token), made.stdout  # only the token is printed
    listed = cli("token", "list", "--config", str(cfg.path))
    assert token.split(".")[0] in listed.stdout and "node-1" in listed.stdout
    assert token.split(".")[1] not in listed.stdout  # never the secret

    daemon = Daemon(cfg)
    await daemon.start()
    try:
        pem, key = make_request("system:node:node-1")
        async with session(cfg, token) as s:
            async with s.post(CSR_PATH, json=body(pem, name="node-1-csr")) as r:
                assert r.status == 201, await r.text()
        out = await acli("csr", "list", "--config", str(cfg.path))
        assert out.returncode == 0, out.stderr
        header, row = out.stdout.splitlines()
        assert header.split() == ["NAME", "AGE", "SIGNERNAME", "REQUESTOR", "REQUESTEDDURATION", "CONDITION"]
        assert row.split()[0] == "node-1-csr" and row.split()[-1] == "Pending"
    finally:
        assert await daemon.stop() == 0

    # Restart: the pending CSR is still there, still pending, and can be approved now.
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        out = await acli("csr", "list", "--config", str(cfg.path))
        assert out.stdout.splitlines()[1].split()[-1] == "Pending", out.stdout
        ok = await acli("csr", "approve", "node-1-csr", "--config", str(cfg.path), "--message", "known machine")
        assert ok.returncode == 0, ok.stderr
        assert "node-1-csr approved: known machine (by uid=0)" in ok.stdout
        async with session(cfg, token) as s:
            obj = await wait_for(s, "node-1-csr", lambda o: o["status"].get("certificate"))
        cert = x509.load_pem_x509_certificate(base64.b64decode(obj["status"]["certificate"]))
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(cfg.ca_cert.read_bytes()))
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "system:node:node-1"
        assert cert.public_key() == key.public_key()  # type: ignore[attr-defined]

        show = await acli("csr", "show", "node-1-csr", "--config", str(cfg.path))
        assert show.returncode == 0, show.stderr
        assert "Approved" in show.stdout and "known machine (by uid=0)" in show.stdout
        assert re.search(r"approved\s+by uid=0", show.stdout) and re.search(r"issued\s+by signer", show.stdout)
        assert "Certificate:  serial" in show.stdout

        again = await acli("csr", "approve", "node-1-csr", "--config", str(cfg.path))
        assert again.returncode != 0 and "already approved" in again.stderr
        missing = await acli("csr", "deny", "nope", "--reason", "x", "--config", str(cfg.path))
        assert missing.returncode != 0 and "'nope' not found" in missing.stderr

        # Deny: a second request from the same node is refused with the administrator's reason, never issued.
        pem2, _ = make_request("system:node:node-1")
        async with session(cfg, token) as s:
            async with s.post(CSR_PATH, json=body(pem2, name="second")) as r:
                assert r.status == 201
            no = await acli("csr", "deny", "second", "--reason", "one certificate is enough",
                            "--config", str(cfg.path))
            assert no.returncode == 0, no.stderr
            obj = await wait_for(s, "second", lambda o: o["status"].get("conditions"))
            assert [c["type"] for c in obj["status"]["conditions"]] == ["Denied"]
            assert "one certificate is enough" in obj["status"]["conditions"][0]["message"]
            assert "certificate" not in obj["status"]
        rows = {line.split()[0]: line.split()[-1] for line in
                (await acli("csr", "list", "--config", str(cfg.path))).stdout.splitlines()[1:]}
        assert rows == {"node-1-csr": "Approved,Issued", "second": "Denied"}
    finally:
        assert await daemon.stop() == 0
    assert token.split(".")[1] not in daemon.log.decode()  # the secret never reaches the logs
    down = cli("csr", "list", "--config", str(cfg.path))
    assert down.returncode != 0 and "cannot reach the daemon" in down.stderr
