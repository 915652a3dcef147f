"""The read-only Kubernetes API surface kubectl needs before it streams: discovery, nodes and pods.

    GET /version                                  tunneld, and the Kubernetes API shapes it serves
    GET /api, /api/v1, /apis                      discovery (legacy JSON; kubectl falls back to it from aggregated)
    GET /api/v1/nodes[/{name}]                    the inventory; condition Ready = the node's tunnel is up
    GET /api/v1/pods, /api/v1/namespaces/{ns}/pods[/{name}]   the kubelets' pod lists (``fieldSelector=
                                                  spec.nodeName=N`` filters; other selectors are refused)

Answers are JSON (``application/json``) whatever is asked first (protobuf, aggregated discovery); a caller whose
``Accept`` names ``as=Table`` gets a ``meta.k8s.io/v1`` Table with the rows kubectl prints. Other methods on these
paths are a 405 ``Status``; watches are refused (405). There is no apiserver behind this: a Node's ``Ready`` says
whether the gateway's SSH tunnel to it is up, not what the kubelet reports. Pure answers from the directory, the pod
cache and a node-state callable given by the daemon (the proxy never imports the daemon).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

from netnames import is_dns_subdomain
from proxy.directory import Directory, NodeInfo, PodInfo
from proxy.errors import RouteError

API_SHAPES = "1.32"
"""The Kubernetes API version whose object shapes (core/v1 Node, Pod, discovery) these answers follow."""


@dataclass(frozen=True)
class NodeTunnel:
    """What the daemon says about one node's tunnel."""

    up: bool
    state: str
    since: float | None = None
    """Wall-clock seconds since the epoch of the last state change, if known."""
    error: str | None = None


NodeStates = Callable[[], Mapping[str, NodeTunnel]]


@dataclass(frozen=True)
class ReadRoute:
    """A read of the API surface: ``resource`` ("" for discovery and version), ``verb`` get or list."""

    kind: str  # version, discovery, nodes, pods
    resource: str = ""
    verb: str = "get"
    namespace: str | None = None
    name: str | None = None
    query: str = ""
    path: str = ""


def read_route(target: str) -> ReadRoute | None:
    """The read ``target`` names, or None when it is not part of this surface (proxy URLs, subresources...)."""
    raw_path, _, query = target.partition("?")
    segs = [unquote(s) for s in raw_path.rstrip("/").split("/")[1:]] if raw_path != "/" else []
    if segs in (["version"], ["api"], ["apis"], ["api", "v1"]):
        return ReadRoute("version" if segs == ["version"] else "discovery", query=query, path="/".join(segs))
    if segs[:2] != ["api", "v1"]:
        return None
    rest = segs[2:]
    if rest == ["nodes"]:
        return ReadRoute("nodes", "nodes", "list", query=query)
    if len(rest) == 2 and rest[0] == "nodes":
        return ReadRoute("nodes", "nodes", "get", name=_name(rest[1]), query=query)
    if rest == ["pods"]:
        return ReadRoute("pods", "pods", "list", query=query)
    if len(rest) == 3 and rest[0] == "namespaces" and rest[2] == "pods":
        return ReadRoute("pods", "pods", "list", namespace=_name(rest[1]), query=query)
    if len(rest) == 4 and rest[0] == "namespaces" and rest[2] == "pods":
        return ReadRoute("pods", "pods", "get", namespace=_name(rest[1]), name=_name(rest[3]), query=query)
    return None


def _name(value: str) -> str:
    if not is_dns_subdomain(value):
        raise RouteError(400, f"invalid name {value[:100]!r}")
    return value


def _time(ts: float | None) -> str | None:
    if ts is None or ts < 1e9:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _resource(name: str, kind: str, namespaced: bool, verbs: list[str], **extra: Any) -> dict[str, Any]:
    return {"name": name, "singularName": "" if "/" in name else name.rstrip("s"), "namespaced": namespaced,
            "kind": kind, "verbs": verbs, **extra}


def discovery(path: str) -> dict[str, Any]:
    """The legacy discovery documents."""
    if path == "api":
        return {"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]}
    if path == "apis":
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": []}
    resources = [
        _resource("nodes", "Node", False, ["get", "list"], shortNames=["no"]),
        _resource("nodes/proxy", "NodeProxyOptions", False, ["create", "delete", "get", "patch", "update"]),
        _resource("pods", "Pod", True, ["get", "list"], shortNames=["po"], categories=["all"]),
        _resource("pods/log", "Pod", True, ["get"]),
        _resource("pods/exec", "PodExecOptions", True, ["create", "get"]),
        _resource("pods/attach", "PodAttachOptions", True, ["create", "get"]),
        _resource("pods/portforward", "PodPortForwardOptions", True, ["create", "get"]),
        _resource("pods/proxy", "PodProxyOptions", True, ["create", "delete", "get", "patch", "update"]),
        _resource("services/proxy", "ServiceProxyOptions", True, ["create", "delete", "get", "patch", "update"]),
    ]
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1", "resources": resources}


def version(gateway_version: str) -> dict[str, Any]:
    major, minor = API_SHAPES.split(".")
    return {"major": major, "minor": minor, "gitVersion": f"v{API_SHAPES}.0+tunneld.{gateway_version}",
            "gitCommit": "", "gitTreeState": "", "buildDate": "", "goVersion": "", "compiler": "",
            "platform": "tunneld", "tunneld": gateway_version,
            "description": f"tunneld {gateway_version}: a read-only subset of the Kubernetes {API_SHAPES} API "
                           "(nodes, pods) and the pod and node subresources, through SSH tunnels"}


def node_object(node: NodeInfo, tunnel: NodeTunnel | None) -> dict[str, Any]:
    up = tunnel is not None and tunnel.up
    state = tunnel.state if tunnel is not None else "unknown"
    message = f"the gateway's SSH tunnel to this node is {state}"
    if tunnel is not None and tunnel.error and not up:
        message += f": {' '.join(tunnel.error.split())[:300]}"
    since = _time(tunnel.since if tunnel is not None else None)
    condition = {"type": "Ready", "status": "True" if up else ("Unknown" if tunnel is None else "False"),
                 "reason": "TunnelUp" if up else "TunnelNotUp", "message": message,
                 "lastHeartbeatTime": since, "lastTransitionTime": since}
    cidrs = [str(c) for c in node.pod_cidrs]
    return {"kind": "Node", "apiVersion": "v1",
            "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name}},
            "spec": {"podCIDR": cidrs[0] if cidrs else "", "podCIDRs": cidrs},
            "status": {"conditions": [condition],
                       "addresses": [{"type": "InternalIP", "address": node.address},
                                     {"type": "Hostname", "address": node.name}],
                       "daemonEndpoints": {"kubeletEndpoint": {"Port": node.kubelet_port}}}}


def pod_object(pod: PodInfo) -> dict[str, Any]:
    containers: list[dict[str, Any]] = [{"name": c, "stdin": True} for c in pod.containers]
    if containers and pod.ports:
        containers[0]["ports"] = [{"containerPort": p, "protocol": "TCP"} for p in pod.ports]
    return {"kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": pod.name, "namespace": pod.namespace},
            "spec": {"nodeName": pod.node, "containers": containers},
            "status": {"phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": ip} for ip in pod.ips or (pod.ip,)],
                       "containerStatuses": [{"name": c, "ready": True, "restartCount": 0,
                                              "state": {"running": {}}} for c in pod.containers]}}


def _column(name: str, kind: str = "string", fmt: str = "") -> dict[str, Any]:
    return {"name": name, "type": kind, "format": fmt, "description": "", "priority": 0}


def table(kind: str, objects: list[dict[str, Any]]) -> dict[str, Any]:
    """A ``meta.k8s.io/v1`` Table of the columns ``kubectl get`` shows for nodes or pods."""
    if kind == "nodes":
        columns = [_column("Name", fmt="name"), _column("Status"), _column("Roles"), _column("Age"),
                   _column("Version")]
        rows = [[o["metadata"]["name"],
                 "Ready" if o["status"]["conditions"][0]["status"] == "True" else "NotReady",
                 "<none>", "<unknown>", ""] for o in objects]
    else:
        columns = [_column("Name", fmt="name"), _column("Ready"), _column("Status"),
                   _column("Restarts", "string"), _column("Age"), _column("IP"), _column("Node")]
        rows = [[o["metadata"]["name"], f"{len(o['spec']['containers'])}/{len(o['spec']['containers'])}",
                 o["status"]["phase"], "0", "<unknown>", o["status"]["podIP"] or "<none>", o["spec"]["nodeName"]]
                for o in objects]
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": ""},
            "columnDefinitions": columns,
            "rows": [{"cells": cells, "object": obj} for cells, obj in zip(rows, objects, strict=True)]}


def node_selector(query: str) -> str | None:
    """The node a list is narrowed to (``fieldSelector=spec.nodeName=N``), or None. Raises :class:`RouteError`
    for anything this surface does not serve (other selectors, label selectors, watches)."""
    params = dict(parse_qsl(query, keep_blank_values=True))
    if params.get("watch", "") not in ("", "false", "0"):
        raise RouteError(405, "watch is not supported by tunneld's read-only API")
    if params.get("labelSelector"):
        raise RouteError(400, "labelSelector is not supported by tunneld's read-only API")
    selector = params.get("fieldSelector", "")
    if not selector:
        return None
    field, sep, value = selector.partition("=")
    if value.startswith("="):
        value = value[1:]
    if field != "spec.nodeName" or not sep or not (value == "" or is_dns_subdomain(value)):
        raise RouteError(400, f"unsupported fieldSelector {selector[:100]!r}: only spec.nodeName=NAME")
    return value


def listing(kind: str, objects: list[dict[str, Any]]) -> dict[str, Any]:
    return {"kind": "NodeList" if kind == "nodes" else "PodList", "apiVersion": "v1",
            "metadata": {"resourceVersion": ""}, "items": objects}


def body(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def nodes(directory: Directory, states: Mapping[str, NodeTunnel]) -> list[dict[str, Any]]:
    return [node_object(n, states.get(n.name)) for n in sorted(directory.nodes.values(), key=lambda n: n.name)]
