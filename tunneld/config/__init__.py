"""The daemon's configuration: the frozen schema (:mod:`.schema`), the TOML reader (:mod:`.reader`), one loader
per group of sections (:mod:`.sections`, :mod:`.fronts`, :mod:`.certauth`, :mod:`.nodes`), the file checks
(:mod:`.files`) and :func:`load_config` / :func:`load_checked` that put them together (:mod:`.load`)."""

from tunneld.config.files import check_files
from tunneld.config.load import load_checked, load_config
from tunneld.config.nodes import load_inventory_nodes, parse_nodes
from tunneld.config.schema import (
    APPROVAL_POLICIES,
    APISettings,
    AuthSettings,
    AuthzSettings,
    CASettings,
    Config,
    CSRSettings,
    DialinSettings,
    DialSettings,
    EgressSettings,
    HealthSettings,
    KubeletSettings,
    KubernetesInventorySettings,
    LimitSettings,
    Node,
    PolicySettings,
    ProxySettings,
    ServicePort,
    ServiceSettings,
    SSHSettings,
    StatusSettings,
    TLSServerSettings,
)
from tunneld.config.sections import in_cluster

__all__ = [
    "APPROVAL_POLICIES", "APISettings", "AuthSettings", "AuthzSettings", "CASettings", "CSRSettings", "Config",
    "DialSettings", "DialinSettings", "EgressSettings", "HealthSettings", "KubeletSettings",
    "KubernetesInventorySettings",
    "LimitSettings", "Node",
    "PolicySettings", "ProxySettings", "SSHSettings", "ServicePort", "ServiceSettings", "StatusSettings",
    "TLSServerSettings", "check_files", "in_cluster", "load_checked", "load_config", "load_inventory_nodes",
    "parse_nodes",
]
