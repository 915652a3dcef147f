"""Node-side and SSH CA commands: ``tunneld bootstrap`` and ``tunneld ssh init|sign-host|sign-node``."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from pathlib import Path

import click


def _progress(line: str) -> None:
    click.echo(f"bootstrap: {line}", err=True)


@click.command()
@click.option("--bootstrap-kubeconfig", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Kubeconfig with the bootstrap token (written here when --server/--token/--ca-cert-hash are given).")
@click.option("--kubeconfig", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The node kubeconfig to write (it references the client certificate in --cert-dir).")
@click.option("--cert-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where kubelet-client-current.pem (certificate + key, 0600) goes.")
@click.option("--node-name", default=lambda: socket.gethostname().lower(), show_default="the host name",
              help="The node's name; the certificate is for system:node:<name>.")
@click.option("--timeout", default=300.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds to wait for approval and the certificate.")
@click.option("--rotate", is_flag=True,
              help="Keep running; renew at a random point between 70% and 90% of the certificate's lifetime.")
@click.option("--server", help="API server URL for discovery (https://host:port).")
@click.option("--token", envvar="TUNNELD_BOOTSTRAP_TOKEN", show_envvar=True,
              help="Bootstrap token <id>.<secret> for discovery (prefer the environment variable).")
@click.option("--ca-cert-hash", "pins", multiple=True,
              help="Pin of the cluster CA: sha256:<hex of its SubjectPublicKeyInfo> (repeatable).")
@click.option("--expiration-seconds", type=click.IntRange(min=600), help="Ask for this certificate lifetime.")
@click.option("--ssh-key", type=click.Path(dir_okay=False, path_type=Path),
              help="Dial-in nodes: also keep this SSH key (made if missing) and its certificate <key>-cert.pub from "
                   "the SSH user CA (renewed with --rotate).")
@click.option("--poll-interval", default=1.0, hidden=True, type=click.FloatRange(min=0.01))
def bootstrap(bootstrap_kubeconfig: Path, kubeconfig: Path, cert_dir: Path, node_name: str, timeout: float,
              rotate: bool, server: str | None, token: str | None, pins: tuple[str, ...],
              expiration_seconds: int | None, ssh_key: Path | None, poll_interval: float) -> None:
    """Obtain (and with --rotate, keep renewing) this node's client certificate through the CSR flow.

    Does nothing when KUBECONFIG already holds a valid certificate. Discovery (--server, --token, --ca-cert-hash)
    fetches cluster-info, checks its signature with the token and the CA against the pin, then writes
    BOOTSTRAP_KUBECONFIG.
    """
    from certs import bootstrap as boot
    from certs import nodesshboot
    from certs.discovery import DiscoveryError, discover
    from certs.files import write_secret

    discovery = (server, token, pins)
    if any(discovery) and not all(discovery):
        raise click.UsageError("discovery needs all of --server, --token and --ca-cert-hash")
    opts = boot.Options(bootstrap_kubeconfig, kubeconfig, cert_dir, node_name, timeout, poll_interval,
                        expiration_seconds)

    async def discover_if_needed() -> None:
        if not all(discovery):
            return
        current = boot.current_certificate(kubeconfig)
        if current is not None and boot.is_valid(current[0], time.time()):
            return  # the token is not needed
        assert server and token
        info = await discover(server, token, list(pins))
        write_secret(bootstrap_kubeconfig, info.bootstrap_kubeconfig(token).dumps().encode())
        _progress(f"discovery: cluster CA verified against the pin; bootstrap kubeconfig written to "
                  f"{bootstrap_kubeconfig}")

    async def main_() -> None:
        await discover_if_needed()
        if not rotate:
            outcome = await boot.obtain(opts, _progress)
            if not outcome.issued:
                _progress(f"{kubeconfig} already has a valid certificate for system:node:{node_name} (until "
                          f"{outcome.not_after:%Y-%m-%d %H:%M:%S} UTC); nothing to do")
            if ssh_key is not None:
                await nodesshboot.obtain(kubeconfig, node_name, ssh_key, _progress)
            return
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        sleep = boot.event_sleep(stop)
        if ssh_key is None:
            renewals = await boot.rotate(opts, _progress, sleep)
        else:
            await boot.obtain(opts, _progress)  # the SSH certificate is asked for with this one
            renewals, _ = await asyncio.gather(boot.rotate(opts, _progress, sleep),
                                               nodesshboot.rotate(kubeconfig, node_name, ssh_key, _progress, sleep))
        _progress(f"stopping after {renewals} renewal(s)")

    try:
        asyncio.run(main_())
    except DiscoveryError as exc:
        raise click.ClickException(f"discovery refused: {exc}") from exc
    except (boot.BootstrapError, nodesshboot.NodeSSHError) as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
def ssh() -> None:
    """The cluster SSH CA: sign nodes' host keys so the gateway trusts them without trust-on-first-use."""


@ssh.command("init")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where ssh_ca (0600) and ssh_ca.pub are written.")
@click.option("--algorithm", type=click.Choice(["ed25519", "ecdsa", "rsa"]), default="ed25519", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing CA (every host certificate it signed stops working).")
@click.option("--user-ca/--no-user-ca", default=True, show_default=True,
              help="Also create the separate SSH user CA (ssh_user_ca) that signs dial-in nodes' keys.")
def ssh_init(directory: Path, algorithm: str, force: bool, user_ca: bool) -> None:
    """Create the SSH CA and print the known_hosts line the gateway needs."""
    from certs.sshca import SSHCA, SSHCAError  # asyncssh: imported only by the commands that need it

    try:
        ca = SSHCA.create(directory, force=force, algorithm=algorithm)
        user = SSHCA.create(directory, force=force, algorithm=algorithm, comment="tunneld-ssh-user-ca",
                            user=True) if user_ca else None
    except SSHCAError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"SSH CA written: {ca.path} (private, 0600) and {directory / 'ssh_ca.pub'}", err=True)
    if user is not None:
        click.echo(f"SSH user CA (dial-in nodes) written: {user.path} and {directory / 'ssh_user_ca.pub'}; "
                   "[dialin] user_ca names the .pub", err=True)
    click.echo("Add this line to the gateway's known_hosts ([ssh] known_hosts):", err=True)
    click.echo(ca.known_hosts_line())


@ssh.command("sign-host")
@click.option("--ca-key", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The SSH CA private key.")
@click.option("--host-key", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The node's host public key, e.g. /etc/ssh/ssh_host_ed25519_key.pub.")
@click.option("--principal", "principals", multiple=True, required=True,
              help="A name the gateway dials the node by: its node name and each address (repeat).")
@click.option("--validity", default="52w", show_default=True,
              help="How long the certificate is valid (s, m, h, d, w units; at most 260w).")
@click.option("--key-id", help="Certificate key ID (default: the first principal).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the certificate (default: <host-key without .pub>-cert.pub).")
@click.option("--pattern", default="*", show_default=True, help="Host pattern of the printed known_hosts line.")
def ssh_sign_host(ca_key: Path, host_key: Path, principals: tuple[str, ...], validity: str, key_id: str | None,
                  out: Path | None, pattern: str) -> None:
    """Sign a node's SSH host key; write the certificate and print the gateway's @cert-authority line."""
    from certs.files import write_public
    from certs.sshca import SSHCA, SSHCAError

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


@ssh.command("sign-node")
@click.option("--ca-key", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The SSH *user* CA private key (ssh_user_ca).")
@click.option("--public-key", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The node's SSH public key (e.g. /var/lib/tunneld/ssh/id_ed25519.pub).")
@click.option("--node", "node_name", required=True, help="The node name; the principal is node:<name>.")
@click.option("--validity", default="24h", show_default=True, help="How long the certificate is valid (at most 30d).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the certificate (default: <public-key without .pub>-cert.pub).")
def ssh_sign_node(ca_key: Path, public_key: Path, node_name: str, validity: str, out: Path | None) -> None:
    """Sign a dial-in node's SSH key (principal node:<name>, only port forwarding) for its ssh -R to the gateway."""
    from certs.files import write_public
    from certs.sshca import SSHCA, SSHCAError

    try:
        cert = SSHCA.load(ca_key).sign_node(public_key.read_bytes()[: 64 * 1024 + 1], node_name, validity)
    except (SSHCAError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    if out is None:
        stem = public_key.name[:-4] if public_key.name.endswith(".pub") else public_key.name
        out = public_key.with_name(f"{stem}-cert.pub")
    write_public(out, cert.text)
    hours = (cert.valid_before - cert.valid_after) / 3600
    click.echo(f"node certificate written: {out} (principal {cert.principals[0]}, serial {cert.serial}, "
               f"valid {hours:.1f} h)", err=True)
