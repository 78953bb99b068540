"""The Kubernetes manifests (deploy/kubernetes), as far as they can be proven
without a cluster: every overlay renders with `kubectl kustomize`; every core
resource validates strictly against Kubernetes' published schema
(`kubernetes-validate`); and the rendered pods carry what the routers and the
kubelet need (probes, ports, labels the InferencePool selects, the grace period
above the drain, /dev/shm, GPUs, the HF token from a Secret, the KV events topic
from the pod's IP). The InferencePool and PodMonitor are checked here field by
field: their CRDs' schemas are not vendored (see README, "Kubernetes")."""

from __future__ import annotations

import json
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from support import ROOT

KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ["engine-per-pod", "node-per-pod", "inference-pool", "monitoring"]
CORE = {"Deployment", "Service", "PersistentVolumeClaim"}


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None, "kubectl is needed to render the manifests (it carries kustomize)"
    out = subprocess.run([kubectl, "kustomize", str(KUBE / "overlays" / overlay)], capture_output=True, text=True,
                         check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def of_kind(docs: list[dict], kind: str) -> dict:
    [found] = [d for d in docs if d["kind"] == kind]
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_and_its_core_resources_validate(overlay):
    docs = render(overlay)
    assert CORE <= {d["kind"] for d in docs}
    for doc in docs:
        if doc["kind"] in CORE:
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pods_carry_what_routers_and_the_kubelet_need(overlay):
    docs = render(overlay)
    pod = of_kind(docs, "Deployment")["spec"]["template"]
    spec, [c] = pod["spec"], pod["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == int(env["PORT"]["value"]) == 8000 and env["HOST"]["value"] == "0.0.0.0"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 3600  # a model's load
    assert c["readinessProbe"]["httpGet"]["path"] == "/v1/models"
    assert c["livenessProbe"]["httpGet"]["path"] == "/metrics"
    assert spec["terminationGracePeriodSeconds"] > int(env["DRAIN_TIMEOUT_S"]["value"]) + 10
    shm = {v["name"]: v for v in spec["volumes"]}["shm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {m["mountPath"]: m["name"] for m in c["volumeMounts"]}["/dev/shm"] == "shm"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf-token"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    events = json.loads(env["KV_EVENTS_CONFIG"]["value"])
    assert events["topic"] == "kv@$(POD_IP):8000@$(MODEL_NAME)" and events["endpoint"] == "tcp://*:5557"
    names = list(env)
    assert names.index("POD_IP") < names.index("KV_EVENTS_CONFIG") and names.index("MODEL_NAME") < names.index(
        "KV_EVENTS_CONFIG")  # Kubernetes expands $(VAR) only from variables defined before
    gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus == int(env["NUM_ENGINES"]["value"]) * int(env.get("TENSOR_PARALLEL_SIZE", {}).get("value", 1))
    labels = pod["metadata"]["labels"]
    assert labels["llm-d.ai/engine-type"] == "vllm" and labels["llm-d.ai/inferenceServing"] == "true"
    service = of_kind(docs, "Service")
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())


def test_the_inference_pool_selects_the_pods_on_their_port():
    docs = render("inference-pool")
    pool = of_kind(docs, "InferencePool")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    pod = of_kind(docs, "Deployment")["spec"]["template"]
    selector = pool["spec"]["selector"]["matchLabels"]
    assert selector and all(pod["metadata"]["labels"].get(k) == v for k, v in selector.items())
    [port] = pool["spec"]["targetPorts"]
    assert port["number"] in [p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]]
    picker = pool["spec"]["endpointPickerRef"]
    assert picker["name"] and 0 < picker["port"]["number"] < 65536


def test_the_pod_monitor_scrapes_the_metrics_port():
    docs = render("monitoring")
    monitor = of_kind(docs, "PodMonitor")
    pod = of_kind(docs, "Deployment")["spec"]["template"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert all(pod["metadata"]["labels"].get(k) == v for k, v in selector.items())
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] in [p["name"] for p in pod["spec"]["containers"][0]["ports"]]
