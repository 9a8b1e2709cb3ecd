"""Kubernetes manifests: schema-valid for built-in kinds (bundled schemas, offline), and
wired together: selectors, probes, GPU requests, disruption budgets, KEDA on the right
JetStream consumer."""

from __future__ import annotations

import pytest
import yaml

from shared.bus.subjects import JOBS_STREAM, consumer_name
from shared.metrics import api_metrics, new_registry
from tests.support.deploy_files import (
    K8S,
    NATS_CLUSTER_CONF,
    K8sDoc,
    k8s_by_kind,
    k8s_documents,
    pod_specs,
)

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="pip install kubernetes-validate (bundled k8s schemas)"
)

K8S_VERSION = "1.30.0"
CRD_KINDS = {"ScaledObject"}


def _id(d: K8sDoc) -> str:
    return f"{d.path.name}:{d.kind}/{d.name}"


@pytest.mark.parametrize(
    "resource", [d for d in k8s_documents() if d.kind not in CRD_KINDS], ids=_id
)
def test_builtin_kinds_match_the_kubernetes_schema(resource: K8sDoc) -> None:
    """CRDs (KEDA's ScaledObject) have no bundled schema: the KEDA test checks them."""
    kubernetes_validate.validate(resource.doc, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    namespaces = {d.doc["metadata"].get("namespace", d.name) for d in k8s_documents()}
    assert namespaces == {kustomization["namespace"]}


def _labels_match(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_services_and_budgets_select_pods() -> None:
    pod_labels = [
        d.doc["spec"]["template"]["metadata"]["labels"]
        for d in k8s_documents()
        if d.kind in ("Deployment", "StatefulSet")
    ]
    for d in k8s_by_kind("Service"):
        assert any(_labels_match(d.doc["spec"]["selector"], lbl) for lbl in pod_labels), _id(d)
    for d in k8s_by_kind("PodDisruptionBudget"):
        selector = d.doc["spec"]["selector"]["matchLabels"]
        assert any(_labels_match(selector, lbl) for lbl in pod_labels), _id(d)
    for d, _ in pod_specs():
        if d.kind == "Job":  # a Job's selector is generated
            continue
        selector = d.doc["spec"]["selector"]["matchLabels"]
        assert _labels_match(selector, d.doc["spec"]["template"]["metadata"]["labels"]), _id(d)


def test_every_workload_has_a_disruption_budget() -> None:
    budgets = [d.doc["spec"]["selector"]["matchLabels"] for d in k8s_by_kind("PodDisruptionBudget")]
    for d, _ in pod_specs():
        if d.kind == "Job":  # one-shot (model-push): nothing to keep available
            continue
        labels = d.doc["spec"]["template"]["metadata"]["labels"]
        assert any(_labels_match(b, labels) for b in budgets), f"{_id(d)} has no PDB"


def test_service_target_ports_exist_on_the_pods() -> None:
    named = {}
    for _, spec in pod_specs():
        for c in spec["containers"]:
            for p in c.get("ports", []):
                named[p["name"]] = p["containerPort"]
    for d in k8s_by_kind("Service"):
        for port in d.doc["spec"]["ports"]:
            assert port["targetPort"] in named, f"{_id(d)} targets unknown port {port}"


def _container(kind_name: str, container: str) -> dict:
    for d, spec in pod_specs():
        if d.name == kind_name:
            return next(c for c in spec["containers"] if c["name"] == container)
    raise AssertionError(f"no workload {kind_name}")


def _probe_target(container: dict, probe: str) -> tuple[str, int]:
    get = container[probe]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
    return get["path"], port


def test_api_probes_use_liveness_and_readiness_endpoints() -> None:
    api = _container("api", "api")
    assert _probe_target(api, "livenessProbe") == ("/health", 8000)
    assert _probe_target(api, "readinessProbe") == ("/ready", 8000)
    assert _probe_target(api, "startupProbe") == ("/health", 8000)


def test_worker_requests_a_gpu_and_probes_its_metrics_port() -> None:
    worker = _container("worker-jetserve-demo", "worker")
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _probe_target(worker, "startupProbe") == ("/health", 8001)
    assert _probe_target(worker, "readinessProbe") == ("/health", 8001)
    # /health is 503 while NATS reconnects or the worker drains: not a reason to restart.
    assert _probe_target(worker, "livenessProbe") == ("/metrics", 8001)


def test_workers_fetch_the_model_the_push_job_stores() -> None:
    """No shared model volume: the Job pushes the model to NATS, workers fetch it by name."""
    push = _container("model-push-jetserve-demo", "push")["args"]
    worker = _container("worker-jetserve-demo", "worker")
    name = push[push.index("--name") + 1]
    assert worker["args"] == ["worker", "--model", name]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    cache = next(m for m in worker["volumeMounts"] if m["mountPath"] == env["JETSERVE_MODEL_CACHE"])
    assert not cache.get("readOnly")


def test_pods_run_as_non_root() -> None:
    for d, spec in pod_specs():
        assert spec["securityContext"]["runAsNonRoot"] is True, _id(d)
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, _id(d)


def test_nats_statefulset_forms_a_three_node_cluster() -> None:
    (sts,) = [d for d in k8s_by_kind("StatefulSet") if d.name == "nats"]
    assert sts.doc["spec"]["replicas"] == 3
    headless = sts.doc["spec"]["serviceName"]
    (svc,) = [d for d in k8s_by_kind("Service") if d.name == headless]
    assert svc.doc["spec"]["clusterIP"] == "None"
    assert svc.doc["spec"]["publishNotReadyAddresses"] is True
    args = sts.doc["spec"]["template"]["spec"]["containers"][0]["args"]
    routes = args[args.index("--routes") + 1].split(",")
    assert routes == [f"nats://{sts.name}-{i}.{headless}:6222" for i in range(3)]
    (pdb,) = [d for d in k8s_by_kind("PodDisruptionBudget") if d.name == "nats"]
    assert pdb.doc["spec"]["maxUnavailable"] == 1, "R3 streams survive one node down, not two"


def test_nats_configmap_is_the_cluster_conf_file() -> None:
    (cm,) = [d for d in k8s_by_kind("ConfigMap") if d.name == "nats-config"]
    assert cm.doc["data"]["cluster.conf"] == NATS_CLUSTER_CONF.read_text()


def test_keda_scales_each_worker_deployment_on_its_whole_backlog() -> None:
    """The shared consumer's lag (NATS) and the API's queue_depth (shared + routed jobs)."""
    deployments = {d.name: d for d in k8s_by_kind("Deployment") if d.name.startswith("worker-")}
    scaled = k8s_by_kind("ScaledObject")
    assert {s.doc["spec"]["scaleTargetRef"]["name"] for s in scaled} == set(deployments)
    api_series = {m._name for m in vars(api_metrics(new_registry())).values()}
    for s in scaled:
        spec = s.doc["spec"]
        assert s.doc["apiVersion"] == "keda.sh/v1alpha1"
        assert spec["scaleTargetRef"]["kind"] == "Deployment"
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        triggers = {t["type"]: t["metadata"] for t in spec["triggers"]}
        assert set(triggers) == {"nats-jetstream", "prometheus"}
        for meta in triggers.values():
            assert all(isinstance(v, str) for v in meta.values()), (
                "KEDA metadata values are strings"
            )
        deployment = deployments[spec["scaleTargetRef"]["name"]]
        model = deployment.doc["metadata"]["labels"]["jetserve.io/model"]
        meta = triggers["nats-jetstream"]
        assert meta["stream"] == JOBS_STREAM
        assert meta["consumer"] == consumer_name(model)
        assert int(meta["lagThreshold"]) > 0
        host, port = meta["natsServerMonitoringEndpoint"].split(":")
        assert host.split(".")[0] == "nats-cluster" and port == "8222"
        # The whole backlog: the API's gauge (shared + routed), one value per replica.
        prom = triggers["prometheus"]
        series = "jetserve:queue_depth"
        assert series in api_series
        assert prom["query"] == f'max({series}{{model_name="{model}"}})'
        assert int(prom["threshold"]) == int(meta["lagThreshold"])
        assert prom["serverAddress"].startswith("http")
        env = {
            e["name"]: e["value"]
            for e in deployment.doc["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        assert env["JETSERVE_MODEL_NAME"] == model
