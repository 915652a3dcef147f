"""Kubeconfig parsing and writing."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml

from certs.kubeconfig import Cluster, KubeConfig, KubeconfigError, cluster_only, with_client_cert, with_token

CA = b"-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"

KUBELET_STYLE = f"""\
apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: {base64.b64encode(CA).decode()}
    server: https://10.0.0.1:6443
  name: default-cluster
contexts:
- context:
    cluster: default-cluster
    namespace: default
    user: default-auth
  name: default-context
current-context: default-context
kind: Config
preferences: {{}}
users:
- name: default-auth
  user:
    client-certificate: pki/kubelet-client-current.pem
    client-key: /var/lib/kubelet/pki/kubelet-client-current.pem
"""


def test_reads_a_kubelet_style_kubeconfig(tmp_path: Path) -> None:
    path = tmp_path / "kubelet.conf"
    path.write_text(KUBELET_STYLE)
    cfg = KubeConfig.load(path)
    cluster, user = cfg.current()
    assert cluster.server == "https://10.0.0.1:6443"
    assert cfg.ca_pem() == CA
    assert user is not None and user.token is None
    assert cfg.resolve(user.client_certificate or "") == tmp_path / "pki" / "kubelet-client-current.pem"
    assert cfg.resolve(user.client_key or "") == Path("/var/lib/kubelet/pki/kubelet-client-current.pem")
    assert cfg.contexts[0].namespace == "default"


@pytest.mark.parametrize(
    "build",
    [
        lambda: with_token("https://127.0.0.1:6443", CA, "abcdef.0123456789abcdef"),
        lambda: with_client_cert("https://[::1]:6443", CA, "/pki/c.pem", "/pki/k.pem"),
        lambda: cluster_only("https://example:6443", CA),
    ],
)
def test_round_trip(build: object) -> None:
    cfg = build()  # type: ignore[operator]
    text = cfg.dumps()
    data = yaml.safe_load(text)
    assert data["apiVersion"] == "v1" and data["kind"] == "Config"
    assert base64.b64decode(data["clusters"][0]["cluster"]["certificate-authority-data"]) == CA
    assert KubeConfig.loads(text) == cfg


def test_token_kubeconfig_shape_and_secret_not_in_repr() -> None:
    cfg = with_token("https://127.0.0.1:6443", CA, "abcdef.0123456789abcdef")
    cluster, user = cfg.current()
    assert user is not None and user.token == "abcdef.0123456789abcdef"
    assert "0123456789abcdef" not in repr(user) and "0123456789abcdef" not in repr(cfg)
    assert cluster.server == "https://127.0.0.1:6443"


def test_cluster_info_has_one_cluster_and_no_users() -> None:
    data = yaml.safe_load(cluster_only("https://x:6443", CA).dumps())
    assert data["users"] == [] and data["contexts"] == [] and len(data["clusters"]) == 1
    cluster, user = KubeConfig.from_dict(data).current()
    assert user is None and cluster.certificate_authority_data == CA


def test_ca_from_file_relative_to_kubeconfig(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_bytes(CA)
    cfg = KubeConfig(clusters=(Cluster("c", "https://x", certificate_authority="ca.crt"),), source=tmp_path / "k")
    assert cfg.ca_pem() == CA


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a list", "not a mapping"),
        ("kind: Pod", "kind is 'Pod'"),
        ("apiVersion: v2", "apiVersion is 'v2'"),
        ("clusters: {}", "clusters must be a list"),
        ("clusters:\n- name: a\n", "clusters[0] must be a mapping"),
        ("clusters:\n- name: a\n  cluster: {}\n", "server is missing"),
        ("clusters:\n- name: a\n  cluster: {server: x, certificate-authority-data: '!!'}\n", "not valid base64"),
        ("clusters:\n- {name: a, cluster: {server: x}}\n- {name: a, cluster: {server: y}}\n", "two entries"),
        ("users:\n- name: u\n  user: {token: 5}\n", "token must be a string"),
        ("{foo: [}", "not valid YAML"),
    ],
)
def test_malformed_is_refused_with_the_key(text: str, message: str) -> None:
    with pytest.raises(KubeconfigError) as exc:
        KubeConfig.loads(text)
    assert message in str(exc.value)


def test_current_context_must_exist() -> None:
    cfg = with_token("https://x", CA, "abcdef.0123456789abcdef")
    broken = KubeConfig(cfg.clusters, cfg.users, cfg.contexts, "nope")
    with pytest.raises(KubeconfigError, match="names no context"):
        broken.current()


def test_size_limit_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KubeconfigError, match="larger than"):
        KubeConfig.loads("#" * (1024 * 1024 + 1))
    with pytest.raises(KubeconfigError, match="cannot read kubeconfig"):
        KubeConfig.load(tmp_path / "missing")
