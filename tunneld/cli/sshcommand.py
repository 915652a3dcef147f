"""``tunneld node ssh-command``: the exact OpenSSH client command (or ssh_config) a dial-in node runs, and the
known_hosts line that makes its ssh trust only gateways whose host certificate the cluster SSH CA signed.

``PermitRemoteOpen`` (what the node's ssh will connect to when the gateway asks over SOCKS) is derived from the
gateway's config: the health probe's target, the node's kubelet port and ``[policy] node_ports`` on its name and
address, and ``[policy] pod_ports`` for its pods. OpenSSH matches a host exactly or ``*``, never a CIDR, so pod
destinations are allowed by port on any host (``*:<port>``), or not restricted at all (``any``) when the pod port
set is too large to list; the gateway's policy is the check on addresses either way, this is defence in depth.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from netnames import parse_port_range, split_host_port
from tunneld.config import Config, Node

MAX_LISTED_PORTS = 32
DEFAULT_KEY = Path("/var/lib/tunneld/ssh/id_ed25519")
DEFAULT_KNOWN_HOSTS = Path("/etc/tunneld/ssh_known_hosts")
FORWARD_PORT = 1080


def _ports(ranges: tuple[str, ...]) -> list[str] | None:
    """The ports of ``ranges`` as strings, or None when there are more than :data:`MAX_LISTED_PORTS`."""
    out: list[str] = []
    for item in ranges:
        low, high = parse_port_range(item)
        if high - low + 1 + len(out) > MAX_LISTED_PORTS:
            return None
        out += [str(p) for p in range(low, high + 1)]
    return out


def _hostport(host: str, port: str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def permit_remote_open(config: Config, node: Node) -> tuple[list[str], list[str]]:
    """``(PermitRemoteOpen entries, warnings)`` for ``node``."""
    warnings: list[str] = []
    entries: list[str] = []

    def add(entry: str) -> None:
        if entry not in entries:
            entries.append(entry)

    health = config.health
    if health.enabled:
        add(_hostport(node.address if health.host == "@node" else health.host, str(health.port)))
    node_ports = _ports(config.policy.node_ports)
    for host in (node.address, node.name):
        add(_hostport(host, str(node.kubelet_port)))
        if node_ports is None:
            warnings.append(f"policy.node_ports has more than {MAX_LISTED_PORTS} ports: any port on {host}")
            add(_hostport(host, "*"))
        else:
            for port in node_ports:
                add(_hostport(host, port))
    if node.pod_cidr is not None:
        pod_ports = _ports(config.policy.pod_ports)
        if pod_ports is None:
            warnings.append(f"policy.pod_ports has more than {MAX_LISTED_PORTS} ports: the node's ssh is not "
                            "restricted (PermitRemoteOpen any); the gateway's policy still is")
            return ["any"], warnings
        for port in pod_ports:
            add(f"*:{port}")
    return entries, warnings


def ssh_options(config: Config, node: Node, gateway: str, key: Path, known_hosts: Path,
                forward_port: int) -> tuple[str, int, list[tuple[str, str]], list[str]]:
    """``(host, port, [(option, value)], warnings)`` of the node's ssh towards ``gateway`` (``host[:port]``)."""
    host, port = split_host_port(gateway) if ":" in gateway.rsplit("]", 1)[-1] else (gateway, 2022)
    entries, warnings = permit_remote_open(config, node)
    keepalive = config.dialin.keepalive_interval if config.dialin is not None else 15.0
    options = [
        ("User", f"node:{node.name}"),
        ("Port", str(port)),
        ("IdentityFile", str(key)),
        ("CertificateFile", f"{key}-cert.pub"),
        ("IdentitiesOnly", "yes"),
        ("UserKnownHostsFile", str(known_hosts)),
        ("GlobalKnownHostsFile", "/dev/null"),
        ("StrictHostKeyChecking", "yes"),
        ("UpdateHostKeys", "no"),
        ("BatchMode", "yes"),
        ("ExitOnForwardFailure", "yes"),
        ("ServerAliveInterval", f"{max(1, round(keepalive))}"),
        ("ServerAliveCountMax", "3"),
        ("ConnectTimeout", "15"),
        ("PermitRemoteOpen", " ".join(entries)),
    ]
    return host, port, options, warnings


def known_hosts_line(host: str, port: int, ca_public: str) -> str:
    pattern = host if port == 22 else f"[{host}]:{port}"
    return f"@cert-authority {pattern} {ca_public.strip()}"


def api_node(name: str, address: str, kubelet_port: int) -> Node:
    """A dial-in node as the Kubernetes node source would make it (``tunneld.io/mode=dial-in``)."""
    from netnames import is_dns_subdomain, parse_ip

    if not is_dns_subdomain(name):
        raise click.ClickException(f"--node {name!r} is not a valid node name")
    try:
        ip = str(parse_ip(address))
    except ValueError as exc:
        raise click.ClickException(f"--address: {exc}") from exc
    return Node(name=name, address=ip, kubelet_port=kubelet_port, mode="dial-in")


@click.group()
def node() -> None:
    """Commands for dial-in nodes (nodes the gateway cannot reach; their OpenSSH client dials in)."""


@node.command("ssh-command")
@click.option("-c", "--config", "config_path", required=True, help="The gateway's config file.")
@click.option("--node", "node_name", required=True, help="The dial-in node (mode = \"dial-in\" in the inventory).")
@click.option("--gateway", required=True, help="host[:port] the node dials (the [dialin] listener; port 2022).")
@click.option("--host-ca", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The SSH host CA public key (default: [ca] ssh_key + .pub).")
@click.option("--key", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_KEY, show_default=True,
              help="The node's SSH key on the node (its certificate is <key>-cert.pub, from tunneld bootstrap).")
@click.option("--known-hosts", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_KNOWN_HOSTS,
              show_default=True, help="The known_hosts file on the node holding the printed line.")
@click.option("--forward-port", type=click.IntRange(1, 65535), default=FORWARD_PORT, show_default=True)
@click.option("--address", help="For a node of the Kubernetes node source (not in the config file): its InternalIP.")
@click.option("--kubelet-port", type=click.IntRange(1, 65535), default=10250, show_default=True,
              help="With --address: the node's kubelet port.")
@click.option("--format", "fmt", type=click.Choice(["command", "ssh-config"]), default="command", show_default=True,
              help="command: the ssh command line, then the known_hosts line; ssh-config: a config file for the "
                   "tunneld-node@ unit (host alias tunneld-gateway), the known_hosts line in a comment.")
def ssh_command(config_path: str, node_name: str, gateway: str, host_ca: Path | None, key: Path, known_hosts: Path,
                forward_port: int, address: str | None, kubelet_port: int, fmt: str) -> None:
    """Print the ssh command a dial-in node runs, and the known_hosts line it needs."""
    from tunneld.cli.localapi import load_or_exit

    config = load_or_exit(config_path, files=False)
    found = [n for n in config.nodes if n.name == node_name]
    if not found and address is not None and config.inventory_source == "kubernetes":
        found = [api_node(node_name, address, kubelet_port)]
    if not found:
        hint = " (a node of the Kubernetes node source: give --address)" if config.inventory_source == "kubernetes" \
            else ""
        raise click.ClickException(f"node {node_name!r} is not in the inventory of {config_path}{hint}")
    if found[0].mode != "dial-in":
        raise click.ClickException(f"node {node_name!r} has mode {found[0].mode}, not dial-in")
    if host_ca is None:
        if config.ca is None or config.ca.ssh_key is None:
            raise click.ClickException("--host-ca is required (no [ca] ssh_key in the config)")
        host_ca = config.ca.ssh_key.with_name(config.ca.ssh_key.name + ".pub")
    try:
        ca_public = host_ca.read_text()
        host, port, options, warnings = ssh_options(config, found[0], gateway, key, known_hosts, forward_port)
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    line = known_hosts_line(host, port, ca_public)
    if fmt == "ssh-config":
        click.echo(f"# tunneld dial-in node {node_name}; {known_hosts} holds:\n# {line}\nHost tunneld-gateway")
        click.echo(f"    HostName {host}")
        for option, value in options:
            click.echo(f"    {option} {value}")
        click.echo(f"    RemoteForward {forward_port}\n    SessionType none")
        return
    argv = ["ssh", "-F", "none", "-N", "-T"]
    for option, value in options:
        argv += ["-o", f"{option}={value}"]
    argv += ["-R", str(forward_port), host]
    click.echo(shlex.join(argv))
    click.echo(line)
