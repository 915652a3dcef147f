"""``tunneld kubeconfig``: a kubeconfig for the proxy front, so ``kubectl --kubeconfig FILE logs -f POD`` works.

The user is a client certificate issued by the cluster CA (``[ca]``): CN is the user name and each ``--group`` an O,
as Kubernetes reads them; the proxy front must take client certificates from that CA (``[proxy] client_ca``). The
front's own CA is pinned in the file (the cluster CA when it signed the front's certificate, else ``--server-ca``).
What the user may do is the ``[[authz.rules]]`` table's business, as for any other caller.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certs.ca import CAError, CertificateAuthority, Usages, cert_pem
from certs.files import write_secret
from certs.kubeconfig import Cluster, Context, KubeConfig, User
from netnames import split_host_port
from netnames.text import printable
from tunneld.cli.localapi import DEFAULT_CONFIG, load_or_exit
from tunneld.config import Config


@click.command("kubeconfig")
@click.option("--config", "config_path", default=DEFAULT_CONFIG, show_default=True, type=click.Path(dir_okay=False))
@click.option("--user", "user", required=True, help="The user name (the certificate's CN).")
@click.option("--group", "groups", multiple=True, help="A group (the certificate's O); repeatable.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the kubeconfig (0600; it holds the private key).")
@click.option("--server", help="The proxy front's URL (default: https://<[proxy] listen>).")
@click.option("--server-ca", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The CA of the proxy front's certificate, when the cluster CA did not sign it.")
@click.option("--days", default=30, show_default=True, type=click.IntRange(1, 365), help="Certificate lifetime.")
def kubeconfig(config_path: str, user: str, groups: tuple[str, ...], out: Path, server: str | None,
               server_ca: Path | None, days: int) -> None:
    """Write a kubeconfig for kubectl against the proxy front: a client certificate for USER from the cluster CA."""
    cfg = load_or_exit(config_path)
    for name in (user, *groups):
        if not name or not name.isprintable() or len(name) > 253 or name != name.strip():
            raise click.ClickException(f"{printable(name)!r} is not a user or group name")
    authority = _cluster_ca(cfg)
    url = server or _default_server(cfg)
    front_ca = server_ca.read_bytes() if server_ca is not None else _front_ca(cfg, authority)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([*(x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups),
                         x509.NameAttribute(NameOID.COMMON_NAME, user)])
    cert = authority.issue(key.public_key(), subject, Usages(client_auth=True), dt.timedelta(days=days))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    config = KubeConfig(
        clusters=(Cluster("tunneld", url, certificate_authority_data=front_ca),),
        users=(User(user, client_certificate_data=cert_pem(cert), client_key_data=key_pem),),
        contexts=(Context("tunneld", "tunneld", user),),
        current_context="tunneld",
    )
    write_secret(out, config.dumps().encode())
    click.echo(f"wrote {out} (0600): user {user!r}, groups {list(groups)}, server {url}, "
               f"valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


def _cluster_ca(cfg: Config) -> CertificateAuthority:
    if cfg.ca is None:
        raise click.ClickException("the config has no [ca] cert and key: they issue the client certificate")
    p = cfg.proxy
    if p.tls is None or p.listen is None:
        raise click.ClickException("the proxy front does not serve TLS ([proxy] listen, tls_cert, tls_key): kubectl "
                                   "sends client certificates and tokens over https only")
    try:
        authority = CertificateAuthority.load(cfg.ca.cert, cfg.ca.key)
        client_ca = x509.load_pem_x509_certificate(p.tls.client_ca.read_bytes()) if p.tls.client_ca else None
    except (CAError, OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if client_ca is None or client_ca != authority.cert:
        raise click.ClickException("[proxy] client_ca must be the cluster CA ([ca] cert), or the front would refuse "
                                   "the certificate this command issues")
    return authority


def _default_server(cfg: Config) -> str:
    assert cfg.proxy.listen is not None
    host, port = split_host_port(cfg.proxy.listen)
    if host in ("0.0.0.0", "::", ""):
        raise click.ClickException(f"[proxy] listen is {cfg.proxy.listen}: say which address clients use (--server)")
    return f"https://{f'[{host}]' if ':' in host else host}:{port}"


def _front_ca(cfg: Config, authority: CertificateAuthority) -> bytes:
    assert cfg.proxy.tls is not None
    try:
        front = x509.load_pem_x509_certificate(cfg.proxy.tls.cert.read_bytes())
        front.verify_directly_issued_by(authority.cert)
    except (OSError, ValueError, TypeError, InvalidSignature) as exc:
        raise click.ClickException("the proxy front's certificate is not signed by the cluster CA: give its CA "
                                   "with --server-ca") from exc
    return cert_pem(authority.cert)
