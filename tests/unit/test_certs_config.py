"""Config sections of the certificates part: [ca], [api], [auth], [csr] (validated, errors name key and file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunneld.config import load_config
from tunneld.errors import ConfigError

BASE = '[ssh]\nprivate_key = "k"\nknown_hosts = "kh"\n'


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "t.toml"
    p.write_text(BASE + text)
    return p


def test_certs_sections_parse_with_defaults_and_relative_paths(tmp_path: Path) -> None:
    p = _write(tmp_path, '[ca]\ncert = "pki/ca.crt"\nkey = "pki/ca.key"\n[api]\nlisten = "127.0.0.1:6443"\n'
                         'server_names = ["cp.example.com"]\n[auth]\ntoken_file = "tokens.csv"\n'
                         '[csr]\napproval = "auto-approve-group"\nsqlite_path = "state/certs.db"\n')
    cfg = load_config(p)
    assert cfg.ca is not None and cfg.ca.cert == tmp_path / "pki/ca.crt"
    assert cfg.api is not None and cfg.api.listen == "127.0.0.1:6443" and cfg.api.server_names == ("cp.example.com",)
    assert cfg.auth.token_file == tmp_path / "tokens.csv"
    assert cfg.csr.approval == "auto-approve-group" and cfg.csr.approve_group == "system:bootstrappers"
    assert cfg.csr.store == "sqlite" and cfg.csr.sqlite_path == tmp_path / "state/certs.db"
    plain = load_config(_write(tmp_path, ""))
    assert plain.api is None and plain.ca is None  # without [api] the daemon runs no certificates API


def test_certs_sections_errors_name_file_and_key(tmp_path: Path) -> None:
    p = _write(tmp_path, '[ca]\ncert = "ca.crt"\n[api]\nlisten = "nowhere"\nexternal_url = "http://x"\n'
                         '[csr]\napproval = "yolo"\nstore = "etcd"\netcd_prefix = "x"\ncolour = 1\n')
    with pytest.raises(ConfigError) as err:
        load_config(p)
    problems = err.value.problems
    for expected in [
        "ca.key: cert and key go together",
        "api.listen: 'nowhere' is not host:port",
        "api.listen: the certificates API needs the cluster CA",
        "api.external_url: 'http://x' must start with https://",
        "csr.approval: 'yolo' is not one of queue, always-reject, insecure-always-approve, auto-approve-group",
        "csr.etcd_endpoints: required with store = \"etcd\"",
        "csr.etcd_prefix: must start with /",
        "csr.colour: unknown key",
    ]:
        assert f"{p}: {expected}" in "\n".join(problems), (expected, problems)


def test_check_files_names_missing_ca_and_token_file(tmp_path: Path) -> None:
    from tunneld.config import check_files

    p = _write(tmp_path, '[ca]\ncert = "ca.crt"\nkey = "ca.key"\n[api]\nlisten = "127.0.0.1:6443"\n'
                         '[auth]\ntoken_file = "tokens.csv"\n')
    (tmp_path / "ca.crt").write_text("x")
    problems = "\n".join(check_files(load_config(p)))
    assert f"{p}: ca.key: {tmp_path / 'ca.key'}: file not found" in problems
    assert f"{p}: auth.token_file: {tmp_path / 'tokens.csv'}: file not found" in problems
    assert "ca.cert" not in problems


def test_etcd_endpoints_off_loopback_need_tls(tmp_path: Path) -> None:
    p = _write(tmp_path, '[csr]\nstore = "etcd"\netcd_endpoints = ["http://10.0.0.5:2379", "http://127.0.0.1:2379", '
                         '"http://[::1]:2379", "ftp://x"]\netcd_cert = "c.crt"\n')
    with pytest.raises(ConfigError) as err:
        load_config(p)
    problems = "\n".join(err.value.problems)
    assert f"{p}: csr.etcd_endpoints: 'http://10.0.0.5:2379' is plain http to another host: use https://" in problems
    assert "127.0.0.1:2379" not in problems and "[::1]" not in problems  # loopback may stay plain
    assert f"{p}: csr.etcd_endpoints: 'ftp://x' must be an http:// or https:// URL" in problems
    assert f"{p}: csr.etcd_key: etcd_cert and etcd_key go together" in problems
    assert f"{p}: csr.etcd_cert: only used with https:// etcd_endpoints" in problems


def test_etcd_tls_files_are_relative_and_checked(tmp_path: Path) -> None:
    from tunneld.config import check_files

    p = _write(tmp_path, '[csr]\nstore = "etcd"\netcd_endpoints = ["https://etcd-1.example:2379"]\n'
                         'etcd_ca = "pki/etcd-ca.crt"\netcd_cert = "pki/c.crt"\netcd_key = "pki/c.key"\n')
    cfg = load_config(p)
    assert (cfg.csr.etcd_ca, cfg.csr.etcd_cert, cfg.csr.etcd_key) == (
        tmp_path / "pki/etcd-ca.crt", tmp_path / "pki/c.crt", tmp_path / "pki/c.key")
    problems = "\n".join(check_files(cfg))
    assert f"{p}: csr.etcd_ca: {tmp_path / 'pki/etcd-ca.crt'}: file not found" in problems
    assert f"{p}: csr.etcd_key: {tmp_path / 'pki/c.key'}: file not found" in problems


def test_csr_quota_per_requester(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "")).csr.max_pending_per_requester == 10
    assert load_config(_write(tmp_path, "[csr]\nmax_pending_per_requester = 3\n")).csr.max_pending_per_requester == 3
    for bad, why in (("0", "0 is not between 1 and 100000"), ("true", "expected an integer, got a boolean"),
                     ('"10"', "expected an integer")):
        with pytest.raises(ConfigError) as err:
            load_config(_write(tmp_path, f"[csr]\nmax_pending_per_requester = {bad}\n"))
        assert any("csr.max_pending_per_requester" in p and why in p for p in err.value.problems), err.value.problems
