"""The KubeRay manifests against the real KubeRay v1.7.0 CRD schemas (vendored in tests/schemas), with
unknown fields rejected as ``kubectl apply --validate=strict`` would."""

from __future__ import annotations

import functools
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO / "tests" / "schemas" / "kuberay-v1.7.0"  # KubeRay's files, Apache-2.0 (LICENSE there)
MANIFESTS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def to_json_schema(node):
    """OpenAPI v3 (Kubernetes flavour) to JSON Schema: int-or-string, strict unknown fields."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if ("properties" in out and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schema(kind: str) -> dict:
    crd = yaml.safe_load((SCHEMAS / MANIFESTS[kind]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return to_json_schema(version["schema"]["openAPIV3Schema"])


def manifests():
    return [pytest.param(p, id=p.name) for p in sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))]


@pytest.mark.parametrize("path", manifests())
def test_manifest_matches_the_kuberay_crd(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    jsonschema.validate(doc, crd_schema(doc["kind"]))


def test_schema_check_catches_a_misspelled_field():
    doc = yaml.safe_load((REPO / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    doc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        jsonschema.validate(doc, crd_schema("RayCluster"))


@pytest.mark.parametrize("path", manifests())
def test_nothing_public_nothing_privileged(path):
    doc = yaml.safe_load(path.read_text())
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            context = container.get("securityContext", {})
            assert not context.get("privileged") and context.get("allowPrivilegeEscalation") is False
            assert "RAY_AUTH_TOKEN" in {e["name"] for e in container.get("env", [])}
    gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]
    assert spec["enableInTreeAutoscaling"] is True


def test_ray_up_config_matches_rays_own_schema():
    import json

    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    for path in sorted((REPO / "cluster" / "ray-up").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        jsonschema.validate(config, schema)
        types = config["available_node_types"]
        assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
        assert all(t.get("min_workers", 0) == 0 for name, t in types.items() if name != "head")


def _scratch_mounts(spec: dict) -> set[str]:
    """Where each worker group mounts its local-disk (not in-memory) scratch volume."""
    paths = set()
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        disks = {v["name"] for v in pod["volumes"]
                 if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"}
        (container,) = pod["containers"]
        mounts = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in disks]
        assert len(mounts) == 1, group["groupName"]
        assert {"name": "RAY_ALIGN_CACHE", "value": f"{mounts[0]}/cache"} in container["env"]
        paths.add(mounts[0])
    return paths


@pytest.mark.parametrize("path", manifests())
def test_workers_stage_checkpoints_on_a_local_disk_at_one_path(path):
    """Checkpoint staging, restores and model downloads need a big local disk on every worker,
    at the same path (train.scratch_dir is one setting for all of them)."""
    doc = yaml.safe_load(path.read_text())
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    (scratch,) = _scratch_mounts(spec)
    if doc["kind"] == "RayJob":
        assert f"train.scratch_dir={scratch}" in doc["spec"]["entrypoint"].split()
    else:  # a long-lived cluster: the jobs submitted to it say so
        assert f"train.scratch_dir={scratch}" in path.read_text()
