"""Node-side and SSH CA commands: ``tunneld bootstrap`` and ``tunneld ssh init|sign-host``."""

from __future__ import annotations

from pathlib import Path

import click

from certs.sshca import DEFAULT_VALIDITY, SSHCA, SSHCAError


@click.group()
def ssh() -> None:
    """The cluster SSH CA: sign nodes' host keys so the gateway trusts them without trust-on-first-use."""


@ssh.command("init")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where ssh_ca (0600) and ssh_ca.pub are written.")
@click.option("--algorithm", type=click.Choice(["ed25519", "ecdsa", "rsa"]), default="ed25519", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing CA (every host certificate it signed stops working).")
def ssh_init(directory: Path, algorithm: str, force: bool) -> None:
    """Create the SSH CA and print the known_hosts line the gateway needs."""
    try:
        ca = SSHCA.create(directory, force=force, algorithm=algorithm)
    except SSHCAError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"SSH CA written: {ca.path} (private, 0600) and {directory / 'ssh_ca.pub'}", err=True)
    click.echo("Add this line to the gateway's known_hosts ([ssh] known_hosts):", err=True)
    click.echo(ca.known_hosts_line())


@ssh.command("sign-host")
@click.option("--ca-key", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The SSH CA private key.")
@click.option("--host-key", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The node's host public key, e.g. /etc/ssh/ssh_host_ed25519_key.pub.")
@click.option("--principal", "principals", multiple=True, required=True,
              help="A name the gateway dials the node by: its node name and each address (repeat).")
@click.option("--validity", default=f"{DEFAULT_VALIDITY // (7 * 86400)}w", show_default=True,
              help="How long the certificate is valid (s, m, h, d, w units; at most 260w).")
@click.option("--key-id", help="Certificate key ID (default: the first principal).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the certificate (default: <host-key without .pub>-cert.pub).")
@click.option("--pattern", default="*", show_default=True, help="Host pattern of the printed known_hosts line.")
def ssh_sign_host(ca_key: Path, host_key: Path, principals: tuple[str, ...], validity: str, key_id: str | None,
                  out: Path | None, pattern: str) -> None:
    """Sign a node's SSH host key; write the certificate and print the gateway's @cert-authority line."""
    from certs.files import write_public

    try:
        ca = SSHCA.load(ca_key)
        cert = ca.sign_host(host_key.read_bytes()[: 64 * 1024 + 1], list(principals), validity, key_id=key_id)
        line = ca.known_hosts_line(pattern)
    except (SSHCAError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    if out is None:
        stem = host_key.name[:-4] if host_key.name.endswith(".pub") else host_key.name
        out = host_key.with_name(f"{stem}-cert.pub")
    write_public(out, cert.text)
    days = (cert.valid_before - cert.valid_after) / 86400
    click.echo(f"host certificate written: {out} (key ID {cert.key_id!r}, serial {cert.serial}, principals "
               f"{', '.join(cert.principals)}, valid {days:.1f} days)", err=True)
    click.echo("sshd_config on the node: HostCertificate " + str(out), err=True)
    click.echo("known_hosts line for the gateway:", err=True)
    click.echo(line)
