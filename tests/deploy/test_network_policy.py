"""What deploy/k8s/network-policy.yaml allows, pod by pod and port by port.

There is no cluster here: tests/support/network_policy.py evaluates the policies by the
Kubernetes NetworkPolicy semantics (selectors, rules, default-deny once a policy selects
a pod). So this checks the policies' meaning, not a CNI's enforcement of them. The pods
are those the manifests' workloads run, labelled as their templates label them, plus the
clients around a cluster: an ingress controller, Prometheus and its NATS exporter, KEDA,
another app in the namespace, a pod in another namespace, and the internet.
"""

from __future__ import annotations

import pytest

from tests.support.deploy_files import k8s_by_kind, k8s_documents
from tests.support.network_policy import Cluster, External, Namespace, Pod, template_pods

NS = "jetserve"
CLIENT, ROUTES, MONITOR, METRICS, HTTP = 4222, 6222, 8222, 8001, 8000
MONITORING = {"jetserve.io/monitoring": "true"}


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    namespaces = {
        NS: Namespace(NS),
        "monitoring": Namespace("monitoring", MONITORING),  # Prometheus + the NATS exporter
        "keda": Namespace("keda", MONITORING),
        "ingress-nginx": Namespace("ingress-nginx"),
        "default": Namespace("default"),
    }
    return Cluster(namespaces, [d.doc for d in k8s_by_kind("NetworkPolicy")])


@pytest.fixture(scope="module")
def pods() -> dict[str, Pod | External]:
    workloads = template_pods(d.doc for d in k8s_documents())
    return {
        "api": workloads["api"],
        "worker": workloads["worker-jetserve-demo"],
        "nats": workloads["nats"],
        "model-push": workloads["model-push-jetserve-demo"],
        "prometheus": Pod("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}),
        "nats-exporter": Pod("nats-exporter", "monitoring", {"app": "prometheus-nats-exporter"}),
        "keda": Pod("keda-operator", "keda", {"app": "keda-operator"}),
        # An exporter run beside jetserve, labelled as the policy asks.
        "local-exporter": Pod("exporter", NS, {"app": "exporter", **MONITORING}),
        "ingress": Pod("ingress-nginx-controller", "ingress-nginx", {"app": "ingress-nginx"}),
        "stranger": Pod("other-app", NS, {"app.kubernetes.io/name": "other-app"}),
        "elsewhere": Pod("some-pod", "default", {"app": "x"}),
        "internet": External("203.0.113.7"),
    }


EVERYONE = [
    "api", "worker", "nats", "model-push", "prometheus", "nats-exporter", "keda",
    "local-exporter", "ingress", "stranger", "elsewhere", "internet",
]  # fmt: skip

# (destination, port) -> who may connect; everyone else is refused.
MATRIX = {
    ("nats", CLIENT): {"api", "worker", "model-push"},
    ("nats", ROUTES): {"nats"},
    ("nats", MONITOR): {"prometheus", "nats-exporter", "keda", "local-exporter"},
    ("nats", 9999): set(),  # a port nobody opened
    ("worker", METRICS): {"prometheus", "nats-exporter", "keda", "local-exporter"},
    ("worker", 9999): set(),
    ("api", HTTP): set(EVERYONE),  # it authenticates every request itself
}


@pytest.mark.parametrize("dest,port", list(MATRIX), ids=[f"{d}:{p}" for d, p in MATRIX])
def test_who_reaches_what(cluster: Cluster, pods: dict, dest: str, port: int) -> None:
    allowed = {name for name in EVERYONE if cluster.allowed(pods[name], pods[dest], port)}
    assert allowed == MATRIX[(dest, port)]


def test_the_pods_ports_are_the_ones_the_matrix_covers(pods: dict) -> None:
    """A new container port on NATS or the workers needs a row above (and a policy)."""
    assert {n for n, _ in pods["nats"].ports.values()} == {CLIENT, ROUTES, MONITOR}
    assert {n for n, _ in pods["worker"].ports.values()} == {METRICS}
    assert {n for n, _ in pods["api"].ports.values()} == {HTTP}


def test_udp_is_not_let_through_the_tcp_rules(cluster: Cluster, pods: dict) -> None:
    assert not cluster.allowed(pods["api"], pods["nats"], CLIENT, "UDP")


def test_no_egress_rules_so_sources_are_unrestricted(cluster: Cluster, pods: dict) -> None:
    """The policies only fence what reaches NATS and the workers; outbound traffic (the
    workers fetching a model from a hub, the API's fallback upstream) is not limited."""
    assert cluster.egress_allowed(pods["worker"], pods["internet"], 443)
    assert cluster.egress_allowed(pods["api"], pods["internet"], 443)


# -- the evaluator's own semantics, on small policies -------------------------------------


def _policy(spec: dict, namespace: str = "a") -> dict:
    return {
        "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": namespace},
        "spec": spec,
    }


A = Namespace("a", {"team": "a"})
B = Namespace("b", {"team": "b"})
WEB = Pod("web", "a", {"app": "web"}, {"http": (80, "TCP")})
DB = Pod("db", "a", {"app": "db", "tier": "data"}, {"pg": (5432, "TCP")})
B_WEB = Pod("web", "b", {"app": "web"})


def _cluster(*specs: dict) -> Cluster:
    return Cluster({"a": A, "b": B}, [_policy(s) for s in specs])


def test_unselected_pods_are_open_and_selected_ones_default_deny() -> None:
    c = _cluster({"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"]})
    assert c.allowed(DB, WEB, 80)  # web is selected by nothing
    assert not c.allowed(WEB, DB, 5432)  # db is selected, no rule allows anything


def test_policy_types_default_and_egress_isolation() -> None:
    egress_only = {"podSelector": {}, "egress": [{"to": [{"podSelector": {}}]}]}
    c = _cluster(egress_only)  # policyTypes absent: Ingress and (egress present) Egress
    assert not c.allowed(WEB, DB, 5432)  # ingress isolated with no ingress rule
    c = _cluster({**egress_only, "policyTypes": ["Egress"]})
    assert c.allowed(WEB, DB, 5432)  # egress to pods of the namespace allowed
    assert not c.allowed(WEB, B_WEB, 80)  # another namespace: not in `to`
    assert c.allowed(External("198.51.100.1"), DB, 5432)  # ingress not isolated


def test_peer_selector_combinations() -> None:
    both = {"namespaceSelector": {"matchLabels": {"team": "b"}}, "podSelector": {"matchLabels": {"app": "web"}}}  # fmt: skip
    c = _cluster({"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [{"from": [both]}]})
    assert c.allowed(B_WEB, DB, 5432) and not c.allowed(WEB, DB, 5432)
    two_peers = [{"namespaceSelector": both["namespaceSelector"]}, {"podSelector": both["podSelector"]}]  # fmt: skip
    c = _cluster({"podSelector": {"matchLabels": {"app": "db"}}, "ingress": [{"from": two_peers}]})
    assert c.allowed(B_WEB, DB, 5432) and c.allowed(WEB, DB, 5432)  # either peer: OR
    assert c.allowed(Pod("x", "b", {}), DB, 5432)  # any pod of namespace b
    assert not c.allowed(Pod("x", "a", {}), DB, 5432)


def test_ports_named_ranges_and_ip_blocks() -> None:
    c = _cluster(
        {
            "podSelector": {"matchExpressions": [{"key": "tier", "operator": "Exists"}]},
            "ingress": [
                {"ports": [{"port": "pg"}]},
                {
                    "from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                    "ports": [{"port": 9000, "endPort": 9010, "protocol": "TCP"}],
                },
            ],
        }
    )
    assert c.allowed(WEB, DB, 5432)  # the named port, from anyone
    assert not c.allowed(WEB, DB, 5433)
    assert c.allowed(External("10.2.3.4"), DB, 9005)
    assert not c.allowed(External("10.1.3.4"), DB, 9005)  # except
    assert not c.allowed(External("10.2.3.4"), DB, 9011)  # past endPort
    assert not c.allowed(WEB, DB, 9005)  # ipBlock does not select pods here
    assert c.allowed(WEB, WEB, 80)  # web has no `tier`: Exists does not select it


def test_selector_operators() -> None:
    from tests.support.network_policy import selector_matches

    labels = {"app": "web", "tier": "front"}
    assert selector_matches({}, labels)
    assert selector_matches({"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "x"]}]}, labels)  # fmt: skip
    assert not selector_matches({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web"]}]}, labels)  # fmt: skip
    assert selector_matches({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["x"]}]}, labels)  # fmt: skip
    assert not selector_matches({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, labels)  # fmt: skip
    assert not selector_matches({"matchLabels": {"app": "web", "tier": "back"}}, labels)
