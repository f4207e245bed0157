"""The KubeRay manifests, offline: every rendered object validates against the vendored schemas
(Kubernetes v1.33 strict JSON schemas; KubeRay v1.7.0 CRDs, made strict like
`kubectl apply --validate=strict`), and the wiring the cluster depends on holds."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from vlm_ray.config import JobSpec, parse_spec

ROOT = Path(__file__).parent.parent
K8S = ROOT / "k8s"
SCHEMAS = K8S / "schemas"
OVERLAYS = ["gpu", "cpu-only"]
KUBE_SCHEMA_FILES = {
    ("v1", "ConfigMap"): "configmap-v1.json",
    ("v1", "ServiceAccount"): "serviceaccount-v1.json",
    ("batch/v1", "CronJob"): "cronjob-batch-v1.json",
    ("rbac.authorization.k8s.io/v1", "Role"): "role-rbac-v1.json",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebinding-rbac-v1.json",
}
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def _strict(node: Any) -> Any:
    """Reject unknown fields in CRD objects, as the API server's strict field validation does."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@functools.cache
def _validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    if api_version == "ray.io/v1":
        crd = yaml.safe_load((SCHEMAS / "kuberay-v1.7.0" / CRD_FILES[kind]).read_text())
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))
    kube = SCHEMAS / "kubernetes-v1.33.0"
    defs = json.loads((kube / "_definitions.json").read_text())
    registry = Registry().with_resource(defs["$id"], Resource.from_contents(defs))
    schema = json.loads((kube / KUBE_SCHEMA_FILES[(api_version, kind)]).read_text())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _errors(obj: dict[str, Any]) -> list[str]:
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key not in KUBE_SCHEMA_FILES and key[0] != "ray.io/v1":
        return [f"no vendored schema for {key}: vendor it under k8s/schemas/"]
    name = obj.get("metadata", {}).get("name") or obj.get("metadata", {}).get("generateName")
    return [
        f"{obj['kind']}/{name} at {'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in _validator(*key).iter_errors(obj)
    ]


@functools.cache
def _render(overlay: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def _by_kind(objs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def _config_data(objs: tuple[dict[str, Any], ...], name: str) -> dict[str, str]:
    return next(o for o in _by_kind(objs, "ConfigMap") if o["metadata"]["name"] == name)["data"]


def _ray_containers(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    spec = cluster["spec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return [c for p in pods for c in p["spec"]["containers"]]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda o: f"overlays/{o}")
def test_every_rendered_object_matches_its_schema(overlay: str) -> None:
    objs = _render(overlay)
    kinds = {o["kind"] for o in objs}
    assert {"RayCluster", "RayJob", "CronJob", "ConfigMap", "Role"} <= kinds
    retrain_job = yaml.safe_load(_config_data(objs, "vlm-ray-retrain-rayjob")["rayjob.yaml"])
    errors = [e for o in (*objs, retrain_job) for e in _errors(o)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize(
    ("path", "value", "complaint"),
    [
        (("spec", "workerGroupSpecs", 0, "replica"), 1, "'replica' was unexpected"),
        (("spec", "workerGroupSpecs", 0, "minReplicas"), "one", "is not of type 'integer'"),
        (
            ("spec", "headGroupSpec", "template", "spec", "containers", 0, "ports", 0, "port"),
            6379,
            "'port' was unexpected",
        ),
    ],
)
def test_schema_validation_rejects_broken_manifests(
    path: tuple[Any, ...], value: Any, complaint: str
) -> None:
    base = K8S / "base" / "raycluster.yaml"
    cluster = yaml.safe_load(base.read_text())
    node = cluster
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    assert any(complaint in e for e in _errors(cluster)), _errors(cluster)


def test_ray_version_in_the_cluster_equals_the_pyproject_pin() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(re.search(r"==([\d.]+)", d).group(1) for d in deps if d.startswith("ray["))
    for overlay in OVERLAYS:
        (cluster,) = _by_kind(_render(overlay), "RayCluster")
        assert cluster["spec"]["rayVersion"] == pin, overlay


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda o: f"overlays/{o}")
def test_s3_credentials_come_from_a_secret_never_inline(overlay: str) -> None:
    objs = _render(overlay)
    assert not _by_kind(objs, "Secret"), "credentials must not be committed as a Secret"
    text = yaml.safe_dump_all(objs)
    assert not re.search(r"AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID)", text)
    (cluster,) = _by_kind(objs, "RayCluster")
    for c in _ray_containers(cluster):
        refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
        assert refs == ["vlm-ray-s3"], f"{c['name']} reads S3 credentials from {refs}"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda o: f"overlays/{o}")
def test_images_are_set_by_the_overlay_with_versioned_tags(overlay: str) -> None:
    objs = _render(overlay)
    images = re.findall(r"image: (\S+)", yaml.safe_dump_all(objs))
    assert images
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and "/" in name and tag and tag != "latest", f"{overlay}: image {image}"


def test_gpu_overlay_has_a_gpu_worker_group_and_cpu_only_has_none() -> None:
    (gpu_cluster,) = _by_kind(_render("gpu"), "RayCluster")
    assert gpu_cluster["spec"]["authOptions"] == {"mode": "token"}
    groups = {g["groupName"]: g for g in gpu_cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu-workers", "gpu-workers"}
    gpu_limits = groups["gpu-workers"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == "1"
    assert groups["gpu-workers"]["template"]["spec"]["containers"][0]["image"].endswith("-gpu")
    (cpu_cluster,) = _by_kind(_render("cpu-only"), "RayCluster")
    assert [g["groupName"] for g in cpu_cluster["spec"]["workerGroupSpecs"]] == ["cpu-workers"]
    assert "nvidia.com/gpu" not in yaml.safe_dump(cpu_cluster)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda o: f"overlays/{o}")
def test_the_job_spec_the_cluster_mounts_is_valid(overlay: str) -> None:
    objs = _render(overlay)
    spec = parse_spec(yaml.safe_load(_config_data(objs, "vlm-ray-job-spec")["job.yaml"]))
    assert isinstance(spec, JobSpec)
    assert spec.promote.root and spec.promote.root.startswith("s3://")
    (cluster,) = _by_kind(objs, "RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v.get("configMap", {}).get("name") for v in head["volumes"]}
    assert mounts["job-spec"] == "/etc/vlm-ray" and volumes["job-spec"] == "vlm-ray-job-spec"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda o: f"overlays/{o}")
def test_jobs_run_the_entry_points_on_the_cluster(overlay: str) -> None:
    objs = _render(overlay)
    (cluster,) = _by_kind(objs, "RayCluster")
    name = cluster["metadata"]["name"]
    retrain = yaml.safe_load(_config_data(objs, "vlm-ray-retrain-rayjob")["rayjob.yaml"])
    (pipeline,) = _by_kind(objs, "RayJob")
    for job, module in ((pipeline, "jobs.pipeline"), (retrain, "jobs.retrain")):
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": name}
        entry = job["spec"]["entrypoint"]
        assert f"python -m {module} --config /etc/vlm-ray/job.yaml" in entry
        assert "run.uri=s3://" in entry
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), f"{module} is missing"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda o: f"overlays/{o}")
def test_the_cronjob_creates_a_rayjob_with_just_the_rights_it_needs(overlay: str) -> None:
    objs = _render(overlay)
    (cron,) = _by_kind(objs, "CronJob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mount = container["volumeMounts"][0]["mountPath"]
    assert container["args"] == ["create", "-f", f"{mount}/rayjob.yaml"]
    assert pod["volumes"][0]["configMap"]["name"] == "vlm-ray-retrain-rayjob"
    (role,) = _by_kind(objs, "Role")
    assert role["rules"] == [
        {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list"]}
    ]
    (binding,) = _by_kind(objs, "RoleBinding")
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
