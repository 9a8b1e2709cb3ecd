"""What Kubernetes NetworkPolicies (networking.k8s.io/v1) allow, evaluated in Python.

No cluster and no CNI here: this checks the policies' meaning as the API documents it,
not a network plugin's enforcement of it. The rules implemented:

- A policy applies to the pods of its namespace that `spec.podSelector` selects (an
  empty selector selects them all). `policyTypes` defaults to Ingress, plus Egress when
  the policy has an `egress` section.
- A pod that no policy of a direction selects is not isolated in that direction: all
  traffic is allowed. A pod that some policy selects for a direction accepts (or sends)
  only what one of those policies' rules allows: policies add up, none denies.
- A connection is allowed when the source's egress and the destination's ingress both
  allow it. A source outside the cluster (an IP) has no egress side.
- A rule allows a peer when its `from`/`to` is absent or empty, or one of its peers
  matches: `podSelector` alone (pods of the policy's namespace), `namespaceSelector`
  alone (every pod of the matching namespaces), both (matching pods in matching
  namespaces), or `ipBlock` (addresses outside the cluster; `except` carves out).
- A rule allows a port when its `ports` is absent or empty, or one entry matches:
  protocol (TCP when unset), number or the name of a container port of the destination
  pod, and `endPort` for ranges.
- Label selectors: `matchLabels` and `matchExpressions` (In, NotIn, Exists,
  DoesNotExist), all ANDed; an empty selector matches everything.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: dict[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    # container port name -> (number, protocol), for named ports in policies
    ports: dict[str, tuple[int, str]] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class External:
    """A client outside the cluster, by its address."""

    ip: str


Peer = Pod | External


def selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A LabelSelector against a label set (None: a selector that is absent)."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ValueError(f"unknown selector operator {op!r}")
    return True


@dataclass
class Cluster:
    namespaces: dict[str, Namespace]
    policies: list[dict[str, Any]]

    def __post_init__(self) -> None:
        for p in self.policies:
            if p.get("kind") != "NetworkPolicy":
                raise ValueError(f"not a NetworkPolicy: {p.get('kind')}")

    # -- which policies apply ------------------------------------------------------------
    @staticmethod
    def _types(policy: dict[str, Any]) -> set[str]:
        spec = policy["spec"]
        if "policyTypes" in spec:
            return set(spec["policyTypes"])
        return {"Ingress"} | ({"Egress"} if "egress" in spec else set())

    def _policies_for(self, pod: Pod, direction: str) -> list[dict[str, Any]]:
        return [
            p
            for p in self.policies
            if p["metadata"].get("namespace", "default") == pod.namespace
            and direction in self._types(p)
            and selector_matches(p["spec"].get("podSelector") or {}, pod.labels)
        ]

    # -- peers and ports -----------------------------------------------------------------
    def _peer_matches(self, peer: dict[str, Any], policy_ns: str, other: Peer) -> bool:
        if "ipBlock" in peer:
            if not isinstance(other, External):
                return False  # pod IPs against ipBlock: left to the implementation
            block = peer["ipBlock"]
            ip = ipaddress.ip_address(other.ip)
            if ip not in ipaddress.ip_network(block["cidr"]):
                return False
            return not any(ip in ipaddress.ip_network(c) for c in block.get("except") or [])
        if isinstance(other, External):
            return False  # pod and namespace selectors select pods only
        pod_sel, ns_sel = peer.get("podSelector"), peer.get("namespaceSelector")
        if ns_sel is None:
            in_namespace = other.namespace == policy_ns
        else:
            ns = self.namespaces.get(other.namespace, Namespace(other.namespace))
            in_namespace = selector_matches(ns_sel, ns.labels)
        return in_namespace and (pod_sel is None or selector_matches(pod_sel, other.labels))

    @staticmethod
    def _port_matches(entry: dict[str, Any], port: int, protocol: str, dest: Peer) -> bool:
        if entry.get("protocol", "TCP") != protocol:
            return False
        want = entry.get("port")
        if want is None:
            return True  # all ports of that protocol
        if isinstance(want, str):
            if not isinstance(dest, Pod) or want not in dest.ports:
                return False
            number, proto = dest.ports[want]
            return number == port and proto == protocol
        end = entry.get("endPort", want)
        return want <= port <= end

    def _rule_allows(
        self, rule: dict[str, Any], peer_key: str, policy_ns: str, other: Peer,
        port: int, protocol: str, dest: Peer,
    ) -> bool:  # fmt: skip
        peers = rule.get(peer_key) or []
        if peers and not any(self._peer_matches(p, policy_ns, other) for p in peers):
            return False
        ports = rule.get("ports") or []
        return not ports or any(self._port_matches(e, port, protocol, dest) for e in ports)

    # -- the answer ----------------------------------------------------------------------
    def ingress_allowed(self, src: Peer, dst: Pod, port: int, protocol: str = "TCP") -> bool:
        policies = self._policies_for(dst, "Ingress")
        if not policies:
            return True
        return any(
            self._rule_allows(rule, "from", dst.namespace, src, port, protocol, dst)
            for p in policies
            for rule in p["spec"].get("ingress") or []
        )

    def egress_allowed(self, src: Pod, dst: Peer, port: int, protocol: str = "TCP") -> bool:
        policies = self._policies_for(src, "Egress")
        if not policies:
            return True
        return any(
            self._rule_allows(rule, "to", src.namespace, dst, port, protocol, dst)
            for p in policies
            for rule in p["spec"].get("egress") or []
        )

    def allowed(self, src: Peer, dst: Pod, port: int, protocol: str = "TCP") -> bool:
        """Can `src` open a connection to `dst` on `port`? (Replies are allowed with it.)"""
        if isinstance(src, Pod) and not self.egress_allowed(src, dst, port, protocol):
            return False
        return self.ingress_allowed(src, dst, port, protocol)


def template_pods(documents: Iterable[dict[str, Any]]) -> dict[str, Pod]:
    """One pod per workload (Deployment, StatefulSet, Job), as its template labels it,
    with its containers' named ports; keyed by the workload's name."""
    pods = {}
    for doc in documents:
        if doc.get("kind") not in ("Deployment", "StatefulSet", "Job"):
            continue
        template = doc["spec"]["template"]
        ports = {
            p["name"]: (p["containerPort"], p.get("protocol", "TCP"))
            for c in template["spec"]["containers"]
            for p in c.get("ports") or []
            if "name" in p
        }
        name = doc["metadata"]["name"]
        namespace = doc["metadata"].get("namespace", "default")
        labels = dict(template["metadata"].get("labels") or {})
        pods[name] = Pod(name, namespace, labels, ports)
    return pods
