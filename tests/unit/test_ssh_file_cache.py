"""Key and known_hosts files are parsed once per version of the file, not once per connection (a restart with
thousands of nodes connects thousands of times at once), and a file replaced on disk is read again."""

from __future__ import annotations

import os
from pathlib import Path

import asyncssh

from tunneld.config import Node, SSHSettings
from tunneld.tunnels import ssh


def _write_key(path: Path) -> asyncssh.SSHKey:
    key = asyncssh.generate_private_key("ssh-ed25519")
    tmp = path.with_suffix(".tmp")
    key.write_private_key(str(tmp))
    os.replace(tmp, path)  # a new inode, as an editor or a config manager replaces the file
    return key


def test_a_file_is_parsed_once_until_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text("node-1 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPqF0nM0VbqC9Yc1q0yW0KZQ0lP7x3gq7wTl6d0qjWbL\n")
    calls: list[str] = []

    def parse(p: str) -> object:
        calls.append(p)
        return object()

    first = ssh._parsed("test", path, parse)
    assert ssh._parsed("test", path, parse) is first and len(calls) == 1
    path.write_text(path.read_text() + "# another line\n")
    assert ssh._parsed("test", path, parse) is not first and len(calls) == 2


def test_the_client_key_is_shared_until_replaced(tmp_path: Path) -> None:
    path = tmp_path / "id"
    old = _write_key(path)
    settings = SSHSettings(private_key=path)
    a, b = ssh._client_keys(settings), ssh._client_keys(settings)
    assert a[0] is b[0] and a[0].public_data == old.public_data
    new = _write_key(path)
    assert ssh._client_keys(settings)[0].public_data == new.public_data != old.public_data


def test_known_hosts_read_per_path(tmp_path: Path) -> None:
    ca = asyncssh.generate_private_key("ssh-ed25519")
    shared, own = tmp_path / "kh", tmp_path / "kh-own"
    shared.write_text(f"@cert-authority * {ca.export_public_key().decode().strip()}\n")
    own.write_text(f"@cert-authority node-2 {ca.export_public_key().decode().strip()}\n")
    settings = SSHSettings(known_hosts=shared)
    n1, n2 = Node("node-1", "127.0.0.1"), Node("node-2", "127.0.0.2", known_hosts=own)
    assert ssh._known_hosts(n1, settings) is ssh._known_hosts(n1, settings)
    assert ssh._known_hosts(n2, settings) is not ssh._known_hosts(n1, settings)
