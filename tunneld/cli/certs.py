"""Administrators' certificate commands: ``tunneld ca init``, ``tunneld token create|list|delete``,
``tunneld csr list|show|approve|deny|delete``.

``ca`` and ``token`` work on files and the store named by the config (no daemon needed, so tokens can be made before
the first start). ``csr`` talks to the running daemon over its local status socket, where the daemon identifies the
caller by ``SO_PEERCRED`` (root or the daemon's user) and records ``uid=N`` in every decision.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

import click

from netnames.text import printable
from tunneld.cli.localapi import DEFAULT_CONFIG, DEFAULT_SOCKET, UnixHTTPConnection, load_or_exit
from tunneld.config import Config

CSR_API = "/certs/apis/certificates.k8s.io/v1/certificatesigningrequests"

config_option = click.option("--config", "-c", "config_path", default=DEFAULT_CONFIG, show_default=True,
                             type=click.Path(dir_okay=False), help="The daemon's config file.")


# -- ca -------------------------------------------------------------------------------------------------------


@click.group()
def ca() -> None:
    """The cluster certificate authority."""


@ca.command("init")
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False),
              help="Take the paths from this config's [ca] section.")
@click.option("--cert", "cert_path", type=click.Path(dir_okay=False, path_type=Path), help="CA certificate file.")
@click.option("--key", "key_path", type=click.Path(dir_okay=False, path_type=Path), help="CA key file (0600).")
@click.option("--key-type", type=click.Choice(["ecdsa", "rsa"]), default="ecdsa", show_default=True)
@click.option("--common-name", default="tunneld-ca", show_default=True)
@click.option("--days", default=3650, show_default=True, type=click.IntRange(1, 36500))
@click.option("--ssh/--no-ssh", default=True, show_default=True, help="Also create the SSH CA (ssh_ca, ssh_ca.pub).")
@click.option("--force", is_flag=True, help="Overwrite existing CA files.")
def ca_init(config_path: str | None, cert_path: Path | None, key_path: Path | None, key_type: str, common_name: str,
            days: int, ssh: bool, force: bool) -> None:
    """Create the X.509 CA (ECDSA P-256 by default) and the SSH CA; existing keys are kept unless --force."""
    from certs.ca import CertificateAuthority

    ssh_dir: Path | None = None
    if config_path:
        cfg = load_or_exit(config_path, files=False)
        if cfg.ca is None:
            raise click.ClickException(f"{config_path}: [ca] cert and key are not set")
        cert_path, key_path = cert_path or cfg.ca.cert, key_path or cfg.ca.key
        if cfg.ca.ssh_key is not None:
            ssh_dir = cfg.ca.ssh_key.parent
    if cert_path is None or key_path is None:
        raise click.UsageError("give --cert and --key, or --config with a [ca] section")
    exists = Path(cert_path).exists() and Path(key_path).exists() and not force
    if exists:  # running init again is harmless: it shows the CA that is there (and its pin) and changes nothing
        authority = _load_ca(cert_path, key_path)
        click.echo(f"CA exists, kept (--force replaces it). Certificate: {cert_path}")
    else:
        authority = CertificateAuthority.create(common_name, key_type, dt.timedelta(days=days))
        try:
            authority.save(cert_path, key_path, force=force)
        except FileExistsError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"CA certificate: {cert_path}")
    click.echo(f"CA key:         {key_path} (0600)")
    click.echo(f"CA pin:         {authority.pin}")
    if ssh:
        from certs.sshca import PRIVATE_NAME, SSHCA, SSHCAError

        directory = ssh_dir or Path(cert_path).parent
        try:
            if (directory / PRIVATE_NAME).exists() and not force:
                sshca = SSHCA.load(directory / PRIVATE_NAME)
            else:
                sshca = SSHCA.create(directory, force=force)
        except SSHCAError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"SSH CA key:     {sshca.path} (0600)")
        click.echo(f"known_hosts:    {sshca.known_hosts_line()}")


def _load_ca(cert_path: Path, key_path: Path) -> Any:
    from certs.ca import CAError, CertificateAuthority

    try:
        return CertificateAuthority.load(Path(cert_path), Path(key_path))
    except CAError as exc:
        raise click.ClickException(str(exc)) from exc


@ca.command("pin")
@config_option
@click.option("--cert", "cert_path", type=click.Path(dir_okay=False, path_type=Path),
              help="CA certificate file (default: the config's [ca] cert).")
def ca_pin(config_path: str, cert_path: Path | None) -> None:
    """Print the CA's SPKI pin (sha256:...), what nodes pass to discovery."""
    from cryptography import x509

    from certs.ca import spki_pin

    if cert_path is None:
        cfg = load_or_exit(config_path, files=False)
        if cfg.ca is None:
            raise click.ClickException(f"{config_path}: [ca] cert and key are not set")
        cert_path = cfg.ca.cert
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"{cert_path}: cannot load the CA certificate: {exc}") from exc
    click.echo(spki_pin(cert))


# -- token ----------------------------------------------------------------------------------------------------


def _with_store(cfg: Config, work: Any) -> Any:
    from tunneld.certsd import open_store

    async def run() -> Any:
        store = open_store(cfg.csr)
        try:
            return await work(store)
        finally:
            await store.close()

    from certs.store import StoreError

    try:
        return asyncio.run(run())
    except StoreError as exc:
        raise click.ClickException(f"certificate store: {exc}") from exc


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@click.group()
def token() -> None:
    """Bootstrap tokens (kept in the CSR store, so every master sharing it knows them)."""


@token.command("create")
@config_option
@click.option("--ttl", default="24h", show_default=True, help="Lifetime such as 24h, 90m, 7d; 0 never expires.")
@click.option("--groups", default="", help="Extra groups, comma-separated (each system:bootstrappers:...).")
@click.option("--usages", default="signing,authentication", show_default=True)
@click.option("--description", default="", help="Free text shown by 'token list'.")
@click.option("--node", default=None, help="Bind the token to this node: it can only get that node's certificate.")
def token_create(config_path: str, ttl: str, groups: str, usages: str, description: str, node: str | None) -> None:
    """Create a bootstrap token and print it (only the token, nothing else)."""
    from certs.tokens import TokenError, new_bootstrap_token, parse_duration

    cfg = load_or_exit(config_path, files=False)
    if node is not None and cfg.inventory_source == "file" and node not in {n.name for n in cfg.nodes}:
        click.echo(f"warning: node {node!r} is not in the inventory of {cfg.path}; the token can only get a "
                   "certificate once a node of that name is", err=True)
    try:
        tok = new_bootstrap_token(parse_duration(ttl), _split(usages), _split(groups), description, node)
    except (TokenError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc

    async def put(store: Any) -> None:
        await store.put_token(tok)

    _with_store(cfg, put)
    click.echo(tok.token)


@token.command("list")
@config_option
@click.option("--output", "-o", type=click.Choice(["table", "json"]), default="table", show_default=True)
def token_list(config_path: str, output: str) -> None:
    """List bootstrap tokens (ids, expiry, usages, groups; never secrets)."""
    cfg = load_or_exit(config_path, files=False)

    async def get(store: Any) -> Any:
        return await store.list_tokens()

    tokens = _with_store(cfg, get)
    rows = [{"id": t.token_id, "expires": t.expires.isoformat() if t.expires else None,
             "usages": list(t.usages), "groups": list(t.groups), "node": t.node, "description": t.description}
            for t in tokens]
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    now = dt.datetime.now(dt.UTC)
    table = [["ID", "TTL", "USAGES", "NODE", "EXTRA GROUPS", "DESCRIPTION"]]
    for t in tokens:
        ttl = "<forever>" if t.expires is None else ("expired" if t.expired(now) else _age(t.expires - now))
        table.append([t.token_id, ttl, ",".join(t.usages), t.node or "<any>", ",".join(t.groups) or "-",
                      t.description])
    click.echo(_table(table))


@token.command("delete")
@config_option
@click.argument("token_id")
def token_delete(config_path: str, token_id: str) -> None:
    """Delete a bootstrap token by id (the part before the dot)."""
    cfg = load_or_exit(config_path, files=False)
    token_id = token_id.split(".", 1)[0]

    async def delete(store: Any) -> bool:
        return bool(await store.delete_token(token_id))

    if not _with_store(cfg, delete):
        raise click.ClickException(f"no bootstrap token with id {token_id!r}")
    click.echo(f"bootstrap token {token_id} deleted")


# -- csr ------------------------------------------------------------------------------------------------------


def _socket_path(config_path: str, socket_path: str | None) -> str:
    if socket_path:
        return socket_path
    if os.path.exists(config_path) or config_path != DEFAULT_CONFIG:
        cfg = load_or_exit(config_path, files=False)
        if cfg.status.socket is None:
            raise click.ClickException(f"{config_path}: [status] socket is disabled; 'tunneld csr' needs it")
        return str(cfg.status.socket)
    return DEFAULT_SOCKET


def _call(sock: str, method: str, path: str, body: Any = None) -> Any:
    conn = UnixHTTPConnection(sock)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, json.dumps(body) if body is not None else None, headers)
        resp = conn.getresponse()
        raw = resp.read(16 * 1024 * 1024)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise click.ClickException(f"cannot reach the daemon at {sock}: {exc.strerror} (is it running?)") from exc
    except PermissionError as exc:
        raise click.ClickException(f"no permission to use {sock} (run as root or as the daemon's user)") from exc
    except OSError as exc:
        raise click.ClickException(f"talking to {sock}: {exc}") from exc
    finally:
        conn.close()
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if resp.status == 404 and not isinstance(data, dict):
        raise click.ClickException("the daemon does not serve the certificates API (is [api] configured?)")
    if resp.status >= 400:
        message = data.get("message") if isinstance(data, dict) else raw[:200].decode(errors="replace")
        raise click.ClickException(str(message))
    return data


socket_option = click.option("--socket", "socket_path", envvar="TUNNELD_SOCKET",
                             help="The daemon's status socket (default: [status] socket of --config).")


@click.group()
def csr() -> None:
    """Certificate signing requests of the running daemon."""


def _age(delta: dt.timedelta) -> str:
    s = int(delta.total_seconds())
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _table(rows: list[list[str]]) -> str:
    rows = [[printable(c) for c in r] for r in rows]  # names and reasons a requester chose
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _parse_time(text: str) -> dt.datetime | None:
    try:
        return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return None


def _condition(obj: dict[str, Any]) -> str:
    conds = [c["type"] for c in obj.get("status", {}).get("conditions", [])]
    if obj.get("status", {}).get("certificate"):
        conds.append("Issued")
    return ",".join(conds) or "Pending"


def _duration(obj: dict[str, Any]) -> str:
    seconds = obj["spec"].get("expirationSeconds")
    return _age(dt.timedelta(seconds=seconds)) if seconds else "<none>"


@csr.command("list")
@config_option
@socket_option
@click.option("--output", "-o", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--limit", type=click.IntRange(1, 1000), default=None,
              help="Show one page of at most this many CSRs (in name order) and how to get the next.")
@click.option("--continue", "continue_token", default="", help="The token a previous --limit page printed.")
def csr_list(config_path: str, socket_path: str | None, output: str, limit: int | None,
             continue_token: str) -> None:
    """List CSRs: name, age, signer, requestor, requested duration, condition."""
    sock = _socket_path(config_path, socket_path)
    items: list[dict[str, Any]] = []
    token = continue_token
    for _ in range(10_000):  # without --limit: every page, 500 at a time
        query = urllib.parse.urlencode({"limit": limit or 500, **({"continue": token} if token else {})})
        data = _call(sock, "GET", f"{CSR_API}?{query}")
        items += data["items"]
        token = str(data.get("metadata", {}).get("continue") or "")
        if limit or not token:
            break
    if output == "json":
        click.echo(json.dumps({**data, "items": items}, indent=2))
        return
    now = dt.datetime.now(dt.UTC)
    rows = [["NAME", "AGE", "SIGNERNAME", "REQUESTOR", "REQUESTEDDURATION", "CONDITION"]]
    for obj in items:
        created = _parse_time(obj["metadata"].get("creationTimestamp", ""))
        rows.append([obj["metadata"]["name"], _age(now - created) if created else "?", obj["spec"]["signerName"],
                     obj["spec"]["username"], _duration(obj), _condition(obj)])
    if len(rows) == 1:
        click.echo("No certificate signing requests.")
    else:
        click.echo(_table(rows))
    if limit and token:
        click.echo(f"more: tunneld csr list --limit {limit} --continue {token}", err=True)


def _subject_lines(obj: dict[str, Any]) -> list[str]:
    from cryptography import x509

    try:
        req = x509.load_pem_x509_csr(base64.b64decode(obj["spec"]["request"]))
    except ValueError:
        return ["Request:      (unreadable)"]
    lines = [f"Subject:      {req.subject.rfc4514_string()}"]
    try:
        san = req.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(v.value) for v in san]
        lines.append(f"SANs:         {', '.join(names)}")
    except x509.ExtensionNotFound:
        pass
    return lines


@csr.command("show")
@config_option
@socket_option
@click.argument("name")
@click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text", show_default=True)
def csr_show(config_path: str, socket_path: str | None, name: str, output: str) -> None:
    """Show one CSR: what it asks for, its conditions and its decision trail."""
    sock = _socket_path(config_path, socket_path)
    obj = _call(sock, "GET", f"{CSR_API}/{name}")
    if output == "json":
        click.echo(json.dumps(obj, indent=2))
        return
    spec, st = obj["spec"], obj.get("status", {})
    lines = [f"Name:         {obj['metadata']['name']}",
             f"Created:      {obj['metadata'].get('creationTimestamp', '')}",
             f"Requestor:    {spec['username']} (groups: {', '.join(spec.get('groups', [])) or '-'})",
             f"Signer:       {spec['signerName']}",
             f"Usages:       {', '.join(spec.get('usages', []))}",
             f"Duration:     {_duration(obj)}",
             *_subject_lines(obj),
             f"State:        {_condition(obj)}"]
    conds = st.get("conditions", [])
    lines.append("Conditions:" if conds else "Conditions:   none (pending)")
    for c in conds:
        lines.append(f"  {c['type']:<9} {c.get('lastUpdateTime', '')}  {c.get('reason', '')}: {c.get('message', '')}")
    if st.get("certificate"):
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(base64.b64decode(st["certificate"]))
        lines.append(f"Certificate:  serial {cert.serial_number:x}, valid {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
                     f"to {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    audit = _call(sock, "GET", f"{CSR_API}/{name}/audit")
    lines.append("Audit:")
    for r in audit["items"]:
        lines.append(f"  {r['time']}  {r['action']:<8} by {r['actor']}" +
                     (f": {r['reason']} {r['message']}".rstrip() if r['reason'] or r['message'] else ""))
    click.echo("\n".join(printable(line) for line in lines))


def _decide(config_path: str, socket_path: str | None, name: str, kind: str, reason: str, message: str) -> None:
    sock = _socket_path(config_path, socket_path)
    obj = _call(sock, "GET", f"{CSR_API}/{name}")
    decided = [c for c in obj.get("status", {}).get("conditions", []) if c["type"] in ("Approved", "Denied")]
    if decided:
        raise click.ClickException(f"{name} is already {decided[0]['type'].lower()}: {decided[0]['message']}")
    obj.setdefault("status", {}).setdefault("conditions", []).append(
        {"type": kind, "status": "True", "reason": reason, "message": message})
    result = _call(sock, "PUT", f"{CSR_API}/{name}/approval", obj)
    cond = next(c for c in result["status"]["conditions"] if c["type"] == kind)
    click.echo(printable(f"{name} {kind.lower()}: {cond['message']}"))


@csr.command("approve")
@config_option
@socket_option
@click.argument("name")
@click.option("--reason", default="AdminApproved", show_default=True, help="A CamelCase reason.")
@click.option("--message", default="", help="Why (recorded in the condition and the audit log).")
def csr_approve(config_path: str, socket_path: str | None, name: str, reason: str, message: str) -> None:
    """Approve NAME; the daemon issues the certificate right after."""
    _decide(config_path, socket_path, name, "Approved", reason, message or "approved with tunneld csr approve")


@csr.command("deny")
@config_option
@socket_option
@click.argument("name")
@click.option("--reason", required=True, help="Why the request is denied (recorded).")
@click.option("--message", default="", help="More detail.")
def csr_deny(config_path: str, socket_path: str | None, name: str, reason: str, message: str) -> None:
    """Deny NAME, saying why."""
    _decide(config_path, socket_path, name, "Denied", "AdminDenied", f"{reason}{': ' + message if message else ''}")


@csr.command("delete")
@config_option
@socket_option
@click.argument("name")
def csr_delete(config_path: str, socket_path: str | None, name: str) -> None:
    """Delete NAME in any state (its audit trail is kept), as 'kubectl delete csr' does."""
    _call(_socket_path(config_path, socket_path), "DELETE", f"{CSR_API}/{name}")
    click.echo(f"{name} deleted")
