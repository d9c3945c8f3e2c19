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
from ..helpers import lion_cli

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


def _fit(config, doc: dict):
    from lion_ray.engines.plan import fit
    from lion_ray.logic.manifests import cluster_nodes, node_groups

    return fit(config, *cluster_nodes(node_groups(doc)))


def test_the_paper_config_fits_the_shipped_cluster_once_it_scales_up():
    """Every step of the paper's run fits raycluster.yaml at its largest (the GPU group
    starts at 0: they fit once scaled), with what the run holds at that step: 8 colocated
    workers of 7 CPUs beside 8 engines of 1 CPU on 8-CPU pods."""
    paper = load_config(ROOT / "configs" / "paper.yaml")
    results = _fit(paper, manifest("RayCluster"))
    assert [r.problem for r in results] == [None] * len(results)
    assert [r.step.name for r in results if r.scales] == [
        "imitation.train (round 1, before the engine)",
        "the student engine (all rounds)",
        "imitation.train (rounds 2+, beside the sleeping engine)",
    ]
    # the old worker size: 1 engine CPU + 8 worker CPUs do not fit an 8-CPU pod
    eight = load_config(ROOT / "configs" / "paper.yaml", ["train.cpus_per_worker=8"])
    short = [r.problem for r in _fit(eight, manifest("RayCluster")) if r.problem]
    assert len(short) == 1 and "at most 0 of them" in short[0] and "CPU" in short[0]


def test_config_fit_exits_0_when_it_fits_and_1_naming_gpus_when_it_does_not(tmp_path):
    ok = lion_cli("config", "fit", "paper", "--cluster", str(KUBERAY / "raycluster.yaml"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "yes, once scaled up" in ok.stdout
    small = manifest("RayCluster")
    small["spec"]["workerGroupSpecs"][0]["maxReplicas"] = 4  # 4 GPUs at most
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(small))
    short = lion_cli("config", "fit", "paper", "--cluster", str(path))
    assert short.returncode == 1, short.stdout + short.stderr
    assert "GPU" in short.stderr and "at most 4 of them" in short.stderr


def _one_node(cpus: int, gpus: int) -> dict:
    container = {"name": "ray-head", "image": "x", "resources": {"limits": {"cpu": str(cpus)}}}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "spec": {
            "headGroupSpec": {
                "rayStartParams": {"num-gpus": str(gpus)},
                "template": {"spec": {"containers": [container]}},
            }
        },
    }


def test_the_paper_config_on_one_eight_gpu_node():
    paper = load_config(ROOT / "configs" / "paper.yaml")
    assert [r.problem for r in _fit(paper, _one_node(96, 8))] == [None] * 6
    # 64 CPUs: 8 x 7 worker CPUs + 8 engine CPUs + the API workers' 5 are 69
    problems = [r.problem for r in _fit(paper, _one_node(64, 8)) if r.problem]
    assert len(problems) == 1 and "CPU" in problems[0]


def test_the_paper_configs_node_types_are_the_shipped_clusters_groups():
    """What the run counts on the autoscaler adding is what the manifest lets it add."""
    from lion_ray.logic.manifests import node_groups

    paper = load_config(ROOT / "configs" / "paper.yaml")
    groups = {g.name: g for g in node_groups(manifest("RayCluster"))}
    for node_type in paper.cluster.node_types:
        group = groups[node_type.name]
        assert node_type.resources == group.resources and node_type.max_count == group.most
    assert groups["gpu-workers"].up == 0  # the run asks the autoscaler for its GPUs


def test_the_rayservice_has_the_gpus_its_replicas_ask():
    serve_args = yaml.safe_load(manifest("RayService")["spec"]["serveConfigV2"])["applications"][0][
        "args"
    ]
    serve_group = manifest("RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    serve_worker = serve_group["template"]["spec"]["containers"][0]
    assert serve_args["num_replicas"] * serve_args["gpus_per_replica"] <= serve_group[
        "maxReplicas"
    ] * _gpus(serve_worker)


def test_a_manifest_without_node_groups_is_refused_by_name(tmp_path):
    from lion_ray.errors import LionError
    from lion_ray.logic.manifests import node_groups

    with pytest.raises(LionError, match="clusterSelector: give that RayCluster's manifest"):
        node_groups(manifest("RayJob"), "rayjob.yaml")
    with pytest.raises(LionError, match="kind 'Deployment' is not a RayCluster"):
        node_groups({"kind": "Deployment"})


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
