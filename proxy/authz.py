"""What a caller of the proxy front may do: a rule table in the spirit of Kubernetes RBAC. Pure logic, no I/O.

A rule names ``users`` and/or ``groups`` (who), ``resources`` and ``verbs`` (what); ``"*"`` matches anything in its
list. A request is allowed when at least one rule matches the caller and the request; otherwise it is refused (403).
Without a configured table the default applies: members of ``system:masters`` may do everything, nobody else anything.

A request is described as Kubernetes' authorizer would describe it:

    /api/v1/nodes/{n}/proxy/...                     nodes/proxy       verb from the HTTP method
    /api/v1/namespaces/{ns}/pods/{p}/proxy/...      pods/proxy        verb from the HTTP method
    /api/v1/namespaces/{ns}/services/{s}/proxy/...  services/proxy    verb from the HTTP method
    /api/v1/namespaces/{ns}/pods/{p}/log            pods/log          get
    .../pods/{p}/exec | attach | portforward        pods/exec ...     create (a WebSocket GET upgrade too)

HTTP methods map to verbs as GET, HEAD, OPTIONS -> ``get``; POST, PUT, PATCH -> ``create``; DELETE -> ``delete``.
Exec, attach and port-forward are always ``create``: they run something on the node, whichever method (SPDY's POST or
WebSocket's GET) carries them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from certs.tokens import ADMIN_GROUP, Identity
from proxy.errors import Refused
from proxy.routes import Route

RESOURCES = ("nodes", "nodes/proxy", "pods", "pods/proxy", "pods/log", "pods/exec", "pods/attach",
             "pods/portforward", "services/proxy", "certificatesigningrequests")
VERBS = ("get", "list", "create", "delete")
ANY = "*"

_KIND_RESOURCE = {"node": "nodes/proxy", "pod": "pods/proxy", "service": "services/proxy", "log": "pods/log",
                  "exec": "pods/exec", "attach": "pods/attach", "portforward": "pods/portforward"}
_METHOD_VERB = {b"GET": "get", b"HEAD": "get", b"OPTIONS": "get", b"POST": "create", b"PUT": "create",
                b"PATCH": "create", b"DELETE": "delete"}


class Forbidden(Refused):
    """No rule allows the request (HTTP 403); the audit line names the user, the request and the rule set."""

    status = 403

    def __init__(self, identity: Identity, request: str, rules: str) -> None:
        super().__init__(f"Forbidden: user {identity.user!r} may not {request}: no rule in {rules} allows it")
        self.details = {"user": identity.user, "groups": ",".join(identity.groups), "auth": identity.method,
                        "request": request, "rules": rules}


@dataclass(frozen=True)
class Rule:
    """One ``[[authz.rules]]`` entry."""

    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    resources: frozenset[str] = frozenset()
    verbs: frozenset[str] = frozenset()

    def matches(self, identity: Identity, resource: str, verb: str) -> bool:
        who = (ANY in self.users or identity.user in self.users
               or ANY in self.groups or not self.groups.isdisjoint(identity.groups))
        return (who and (ANY in self.resources or resource in self.resources)
                and (ANY in self.verbs or verb in self.verbs))


def rule_problems(users: Iterable[str], groups: Iterable[str], resources: Iterable[str],
                  verbs: Iterable[str]) -> list[str]:
    """What is wrong with a rule, one message per mistake (empty when it is valid)."""
    problems = []
    users, groups, resources, verbs = list(users), list(groups), list(resources), list(verbs)
    if not users and not groups:
        problems.append("a rule needs users or groups")
    for name in (*users, *groups):
        if not name or not name.isprintable() or name != name.strip():
            problems.append(f"{name!r} is not a user or group name")
    if not resources:
        problems.append(f"resources: at least one of {', '.join(RESOURCES)} (or \"*\")")
    for r in resources:
        if r != ANY and r not in RESOURCES:
            problems.append(f"resources: {r!r} is not one of {', '.join(RESOURCES)} (or \"*\")")
    if not verbs:
        problems.append(f"verbs: at least one of {', '.join(VERBS)} (or \"*\")")
    for v in verbs:
        if v != ANY and v not in VERBS:
            problems.append(f"verbs: {v!r} is not one of {', '.join(VERBS)} (or \"*\")")
    return problems


DEFAULT_RULES = (Rule(groups=frozenset({ADMIN_GROUP}), resources=frozenset({ANY}), verbs=frozenset({ANY})),)
DEFAULT_SOURCE = "the default rules (system:masters only)"


class Authorizer:
    """Decides requests against a rule table; ``source`` names the table in refusals and audit lines."""

    def __init__(self, rules: Iterable[Rule] = DEFAULT_RULES, source: str = DEFAULT_SOURCE) -> None:
        self.rules = tuple(rules)
        self.source = source

    def allows(self, identity: Identity, resource: str, verb: str) -> bool:
        return any(rule.matches(identity, resource, verb) for rule in self.rules)


def attributes(route: Route, method: bytes) -> tuple[str, str]:
    """(resource, verb) of a request for ``route`` with HTTP ``method`` (see the module docstring)."""
    resource = _KIND_RESOURCE[route.kind]
    if route.kind in ("exec", "attach", "portforward"):
        return resource, "create"
    if route.kind == "log":
        return resource, "get"
    return resource, _METHOD_VERB.get(method, "create")


def describe(route: Route) -> str:
    """The object a request is about, for refusals: ``node-1``, ``default/web-1``."""
    return f"{route.namespace}/{route.name}" if route.namespace else route.name
