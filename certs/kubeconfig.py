"""Kubeconfig files (``apiVersion: v1``, ``kind: Config``) as kubectl and the kubelet read and write them.

Only what bootstrap needs is modelled: clusters (server, CA as a file or inline ``certificate-authority-data``),
users (bearer token, client certificate/key as files or inline data), contexts and ``current-context``. Inline data
is base64 of PEM, as in Kubernetes. Relative file paths are resolved against the kubeconfig's own directory, as
kubectl does. Parsing is strict about shapes (a clear :class:`KubeconfigError` naming the key) and bounded in size.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MAX_SIZE = 1024 * 1024


class KubeconfigError(ValueError):
    """A kubeconfig is unreadable, malformed or lacks what the caller needs."""


@dataclass(frozen=True)
class Cluster:
    """A ``clusters[]`` entry."""

    name: str
    server: str
    certificate_authority_data: bytes | None = None  # PEM
    certificate_authority: str | None = None  # a path
    insecure_skip_tls_verify: bool = False


@dataclass(frozen=True)
class User:
    """A ``users[]`` entry: a bearer token and/or a client certificate."""

    name: str
    token: str | None = None
    client_certificate: str | None = None  # paths
    client_key: str | None = None
    client_certificate_data: bytes | None = None  # PEM
    client_key_data: bytes | None = None

    def __repr__(self) -> str:
        """Never show the token or an inline key."""
        return f"User(name={self.name!r}, token={'<set>' if self.token else None}, cert={self.client_certificate!r})"


@dataclass(frozen=True)
class Context:
    """A ``contexts[]`` entry."""

    name: str
    cluster: str
    user: str = ""
    namespace: str | None = None


@dataclass(frozen=True)
class KubeConfig:
    """A whole kubeconfig; ``source`` is the file it was read from (for resolving relative paths)."""

    clusters: tuple[Cluster, ...] = ()
    users: tuple[User, ...] = ()
    contexts: tuple[Context, ...] = ()
    current_context: str = ""
    source: Path | None = field(default=None, compare=False)

    # -- lookups ------------------------------------------------------------------------------------------

    def resolve(self, path: str) -> Path:
        """A path from this kubeconfig, made absolute against the kubeconfig's directory."""
        p = Path(path).expanduser()
        if not p.is_absolute() and self.source is not None:
            p = self.source.parent / p
        return p

    def cluster(self, name: str) -> Cluster:
        """The cluster called ``name``."""
        for c in self.clusters:
            if c.name == name:
                return c
        raise KubeconfigError(f"{self._where()}: no cluster named {name!r}")

    def user(self, name: str) -> User:
        """The user called ``name``."""
        for u in self.users:
            if u.name == name:
                return u
        raise KubeconfigError(f"{self._where()}: no user named {name!r}")

    def current(self) -> tuple[Cluster, User | None]:
        """The cluster and user of the current context (or of the only cluster when there are no contexts)."""
        if not self.current_context:
            if len(self.clusters) == 1 and not self.contexts:
                return self.clusters[0], (self.users[0] if len(self.users) == 1 else None)
            raise KubeconfigError(f"{self._where()}: current-context is not set")
        for ctx in self.contexts:
            if ctx.name == self.current_context:
                return self.cluster(ctx.cluster), (self.user(ctx.user) if ctx.user else None)
        raise KubeconfigError(f"{self._where()}: current-context {self.current_context!r} names no context")

    def ca_pem(self, cluster: Cluster | None = None) -> bytes | None:
        """The PEM of ``cluster``'s (default: the current cluster's) CA, inline or read from its file."""
        c = cluster or self.current()[0]
        if c.certificate_authority_data:
            return c.certificate_authority_data
        if c.certificate_authority:
            return _read(self.resolve(c.certificate_authority), "certificate-authority")
        return None

    def _where(self) -> str:
        return str(self.source) if self.source else "kubeconfig"

    # -- serialisation ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The kubeconfig as plain data, keys spelled as in Kubernetes."""
        clusters = []
        for c in self.clusters:
            body: dict[str, Any] = {"server": c.server}
            if c.certificate_authority_data:
                body["certificate-authority-data"] = _b64(c.certificate_authority_data)
            if c.certificate_authority:
                body["certificate-authority"] = c.certificate_authority
            if c.insecure_skip_tls_verify:
                body["insecure-skip-tls-verify"] = True
            clusters.append({"name": c.name, "cluster": body})
        users = []
        for u in self.users:
            ubody: dict[str, Any] = {}
            if u.token:
                ubody["token"] = u.token
            if u.client_certificate:
                ubody["client-certificate"] = u.client_certificate
            if u.client_key:
                ubody["client-key"] = u.client_key
            if u.client_certificate_data:
                ubody["client-certificate-data"] = _b64(u.client_certificate_data)
            if u.client_key_data:
                ubody["client-key-data"] = _b64(u.client_key_data)
            users.append({"name": u.name, "user": ubody})
        contexts = []
        for x in self.contexts:
            cbody: dict[str, Any] = {"cluster": x.cluster}
            if x.user:
                cbody["user"] = x.user
            if x.namespace:
                cbody["namespace"] = x.namespace
            contexts.append({"name": x.name, "context": cbody})
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": clusters,
            "contexts": contexts,
            "current-context": self.current_context,
            "preferences": {},
            "users": users,
        }

    def dumps(self) -> str:
        """YAML text."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    @classmethod
    def from_dict(cls, data: Any, source: Path | None = None) -> KubeConfig:
        """Parse plain data; raises :class:`KubeconfigError` naming the offending key."""
        where = str(source) if source else "kubeconfig"
        if not isinstance(data, Mapping):
            raise KubeconfigError(f"{where}: not a mapping")
        kind = data.get("kind", "Config")
        if kind != "Config":
            raise KubeconfigError(f"{where}: kind is {kind!r}, expected 'Config'")
        api = data.get("apiVersion", "v1")
        if api != "v1":
            raise KubeconfigError(f"{where}: apiVersion is {api!r}, expected 'v1'")
        clusters = tuple(
            Cluster(
                name=name,
                server=_str(body, "server", f"{where}: clusters[{name!r}]", required=True) or "",
                certificate_authority_data=_data(body, "certificate-authority-data", f"{where}: clusters[{name!r}]"),
                certificate_authority=_str(body, "certificate-authority", f"{where}: clusters[{name!r}]"),
                insecure_skip_tls_verify=bool(body.get("insecure-skip-tls-verify", False)),
            )
            for name, body in _entries(data, "clusters", "cluster", where)
        )
        users = tuple(
            User(
                name=name,
                token=_str(body, "token", f"{where}: users[{name!r}]"),
                client_certificate=_str(body, "client-certificate", f"{where}: users[{name!r}]"),
                client_key=_str(body, "client-key", f"{where}: users[{name!r}]"),
                client_certificate_data=_data(body, "client-certificate-data", f"{where}: users[{name!r}]"),
                client_key_data=_data(body, "client-key-data", f"{where}: users[{name!r}]"),
            )
            for name, body in _entries(data, "users", "user", where)
        )
        contexts = tuple(
            Context(
                name=name,
                cluster=_str(body, "cluster", f"{where}: contexts[{name!r}]", required=True) or "",
                user=_str(body, "user", f"{where}: contexts[{name!r}]") or "",
                namespace=_str(body, "namespace", f"{where}: contexts[{name!r}]"),
            )
            for name, body in _entries(data, "contexts", "context", where)
        )
        current = data.get("current-context") or ""
        if not isinstance(current, str):
            raise KubeconfigError(f"{where}: current-context must be a string")
        return cls(clusters, users, contexts, current, source)

    @classmethod
    def loads(cls, text: str | bytes, source: Path | None = None) -> KubeConfig:
        """Parse YAML (or JSON) text."""
        if len(text) > MAX_SIZE:
            raise KubeconfigError(f"{source or 'kubeconfig'}: larger than {MAX_SIZE} bytes")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise KubeconfigError(f"{source or 'kubeconfig'}: not valid YAML: {exc}") from exc
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: str | Path) -> KubeConfig:
        """Read and parse a kubeconfig file."""
        p = Path(path)
        return cls.loads(_read(p, "kubeconfig"), p.absolute())


# -- builders ---------------------------------------------------------------------------------------------


def cluster_only(server: str, ca_pem: bytes, cluster_name: str = "") -> KubeConfig:
    """A kubeconfig with one cluster and nothing else: what ``cluster-info`` publishes (name "" as kubeadm)."""
    return KubeConfig(clusters=(Cluster(cluster_name, server, certificate_authority_data=ca_pem),))


def _single(server: str, ca_pem: bytes, user: User, cluster_name: str, context_name: str) -> KubeConfig:
    return KubeConfig(
        clusters=(Cluster(cluster_name, server, certificate_authority_data=ca_pem),),
        users=(user,),
        contexts=(Context(context_name, cluster_name, user.name),),
        current_context=context_name,
    )


def with_token(server: str, ca_pem: bytes, token: str, user_name: str = "tls-bootstrap-token-user") -> KubeConfig:
    """A bootstrap kubeconfig: the cluster and a bearer token (names as kubeadm writes them)."""
    return _single(server, ca_pem, User(user_name, token=token), "kubernetes", f"{user_name}@kubernetes")


def with_client_cert(server: str, ca_pem: bytes, cert_file: str | Path, key_file: str | Path) -> KubeConfig:
    """A kubeconfig using a client certificate and key from files (names as the kubelet writes them)."""
    user = User("default-auth", client_certificate=str(cert_file), client_key=str(key_file))
    return _single(server, ca_pem, user, "default-cluster", "default-context")


# -- helpers ----------------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _read(path: Path, what: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_SIZE + 1)
    except OSError as exc:
        raise KubeconfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_SIZE:
        raise KubeconfigError(f"{what} {path}: larger than {MAX_SIZE} bytes")
    return data


def _entries(data: Mapping[str, Any], key: str, inner: str, where: str) -> list[tuple[str, Mapping[str, Any]]]:
    items = data.get(key)
    if items is None:
        items = []
    if not isinstance(items, list):
        raise KubeconfigError(f"{where}: {key} must be a list")
    out: list[tuple[str, Mapping[str, Any]]] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or not isinstance(item.get(inner), Mapping):
            raise KubeconfigError(f"{where}: {key}[{i}] must be a mapping with a {inner!r} mapping")
        name = item.get("name", "")
        if not isinstance(name, str):
            raise KubeconfigError(f"{where}: {key}[{i}].name must be a string")
        if name in seen:
            raise KubeconfigError(f"{where}: {key} has two entries named {name!r}")
        seen.add(name)
        out.append((name, item[inner]))
    return out


def _str(body: Mapping[str, Any], key: str, where: str, required: bool = False) -> str | None:
    value = body.get(key)
    if value is None or value == "":
        if required:
            raise KubeconfigError(f"{where}: {key} is missing")
        return None
    if not isinstance(value, str):
        raise KubeconfigError(f"{where}: {key} must be a string")
    return value


def _data(body: Mapping[str, Any], key: str, where: str) -> bytes | None:
    value = _str(body, key, where)
    if value is None:
        return None
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KubeconfigError(f"{where}: {key} is not valid base64") from exc
