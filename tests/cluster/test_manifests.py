"""KubeRay manifests and the GPU image: valid against the CRD schemas, consistent with the
project (commands, configs, extras, resources), secrets only from Kubernetes Secrets."""

from __future__ import annotations

import gzip
import importlib
import json
import re
import shlex
import tomllib

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

from lion_ray.config import ServeConfig, load_config

from ..conftest import DATA, ROOT

KUBERAY = ROOT / "cluster" / "kuberay"
SHARED_CRDS = ROOT.parent / "shared" / "kuberay-crds"
MANIFESTS = {
    "RayCluster": "raycluster.yaml",
    "RayJob": "rayjob.yaml",
    "RayService": "rayservice.yaml",
}
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}


def schema(kind: str) -> dict:
    """The v1 openAPIV3Schema: from the full CRD when ../shared is there, else the vendored copy."""
    full = SHARED_CRDS / CRD_FILES[kind]
    if full.exists():
        crd = yaml.safe_load(full.read_text())
        return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"][
            "openAPIV3Schema"
        ]
    with gzip.open(DATA / "kuberay" / f"{kind}.v1.schema.json.gz", "rt") as f:
        return json.load(f)


def manifest(kind: str) -> dict:
    return yaml.safe_load((KUBERAY / MANIFESTS[kind]).read_text())


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_manifest_validates_against_the_crd_schema(kind):
    doc = manifest(kind)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    jsonschema.Draft7Validator(schema(kind)).validate(doc)


def test_schema_validation_catches_mistakes():
    doc = manifest("RayCluster")
    doc["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    with pytest.raises(jsonschema.ValidationError, match="eight"):
        jsonschema.Draft7Validator(schema("RayCluster")).validate(doc)
    del doc["spec"]["headGroupSpec"]
    assert not jsonschema.Draft7Validator(schema("RayCluster")).is_valid(doc)


def _containers(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _cluster_specs() -> list[dict]:
    return [manifest("RayCluster")["spec"], manifest("RayService")["spec"]["rayClusterConfig"]]


def test_secrets_come_from_secret_key_refs_only():
    for spec in _cluster_specs():
        for container in _containers(spec):
            for env in container.get("env", []):
                if re.search(r"KEY|TOKEN|SECRET|PASSWORD", env["name"]):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], env
    text = "".join(p.read_text() for p in KUBERAY.glob("*.yaml"))
    assert not re.search(r"sk-[A-Za-z0-9]{10,}", text)
    paper = load_config(ROOT / "configs" / "paper.yaml")
    head_env = {e["name"] for e in _containers(_cluster_specs()[0])[0]["env"]}
    assert paper.teacher.api_key_env in head_env  # the key the driver reads is provided


def test_rayjob_runs_the_project_driver_with_a_valid_config():
    job = manifest("RayJob")["spec"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["python", "jobs/distill.py"] and (ROOT / argv[1]).exists()
    config = argv[argv.index("--config") + 1]
    load_config(ROOT / config)  # validates
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == _dockerfile_workdir()
    assert job["clusterSelector"]["ray.io/cluster"] == manifest("RayCluster")["metadata"]["name"]


def test_rayservice_imports_the_serve_app_with_known_arguments():
    from ray.serve.schema import ServeDeploySchema

    from lion_ray.engines.serving import PROXY_READY_CHECK_TIMEOUT_S

    serve_config = yaml.safe_load(manifest("RayService")["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)  # as Serve reads it from KubeRay
    env = serve_config["controller_options"]["runtime_env"]["env_vars"]
    assert env["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] == str(PROXY_READY_CHECK_TIMEOUT_S)
    app = serve_config["applications"][0]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    args = app["args"]
    assert set(args) <= set(ServeConfig.model_fields) | {"run_dir", "model_dir", "prompt_format"}
    ServeConfig.model_validate({k: v for k, v in args.items() if k in ServeConfig.model_fields})
    paper = load_config(ROOT / "configs" / "paper.yaml")
    assert (
        args["run_dir"] == paper.storage.run_dir
        and args["prompt_format"] == paper.student.prompt_format
    )
    assert app["runtime_env"]["working_dir"] == f"local://{_dockerfile_workdir()}"


def _gpus(container: dict) -> int:
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


def _cpus(container: dict) -> float:
    return float(container["resources"]["requests"]["cpu"])


def test_gpu_workers_fit_the_paper_configs_training_and_inference():
    paper = load_config(ROOT / "configs" / "paper.yaml")
    group = manifest("RayCluster")["spec"]["workerGroupSpecs"][0]
    worker = group["template"]["spec"]["containers"][0]
    assert _gpus(worker) >= max(paper.train.gpus_per_worker, paper.student.tensor_parallel_size)
    assert _cpus(worker) >= paper.train.cpus_per_worker
    assert group["maxReplicas"] * _gpus(worker) >= paper.train.workers * paper.train.gpus_per_worker
    assert (
        group["maxReplicas"] * _gpus(worker)
        >= paper.student.num_engines * paper.student.tensor_parallel_size
    )
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    serve_args = yaml.safe_load(manifest("RayService")["spec"]["serveConfigV2"])["applications"][0][
        "args"
    ]
    serve_group = manifest("RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    serve_worker = serve_group["template"]["spec"]["containers"][0]
    assert serve_args["num_replicas"] * serve_args["gpus_per_replica"] <= serve_group[
        "maxReplicas"
    ] * _gpus(serve_worker)


def _dockerfile() -> str:
    return (ROOT / "cluster" / "docker" / "Dockerfile").read_text()


def _dockerfile_workdir() -> str:
    return re.search(r"^WORKDIR (\S+)", _dockerfile(), re.M).group(1)


def test_image_installs_what_the_manifests_expect():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    text = _dockerfile()
    base = re.search(r"^FROM rayproject/ray:(\S+)", text, re.M).group(1)
    ray_version = base.split("-")[0]
    ray_pin = Requirement(
        next(d for d in pyproject["project"]["dependencies"] if d.startswith("ray["))
    )
    assert ray_pin.specifier.contains(ray_version) and "gpu" in base
    extras = set(re.search(r'pip install [^"]*"\.\[([a-z,]+)\]"', text).group(1).split(","))
    assert extras <= set(pyproject["project"]["optional-dependencies"]) and "gpu" in extras
    assert any(
        dep.startswith("vllm") for dep in pyproject["project"]["optional-dependencies"]["gpu"]
    )
    tag = re.search(r"-t (\S+) \.", text).group(1)
    for spec in _cluster_specs():
        assert spec["rayVersion"] == ray_version
        assert {c["image"] for c in _containers(spec)} == {tag}
    serve_args = yaml.safe_load(manifest("RayService")["spec"]["serveConfigV2"])["applications"][0][
        "args"
    ]
    assert serve_args["backend"] == "vllm"  # which is what the gpu extra provides
    for path in re.findall(r"^COPY \S+ (\S+) ", text, re.M):
        for part in path.split():
            assert (ROOT / part).exists(), part
