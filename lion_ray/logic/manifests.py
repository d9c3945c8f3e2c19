"""The node groups of a KubeRay manifest, as the nodes Ray would see: what ``lion-ray config
fit`` checks a run against before anyone launches it. Pure logic: a parsed YAML document in,
node shapes out.

A RayCluster's groups live under ``spec``; a RayJob's under ``spec.rayClusterSpec``; a
RayService's under ``spec.rayClusterConfig``. A node gives Ray what its ``rayStartParams``
say (``num-cpus``, ``num-gpus``), else what its container's limits say (``cpu``,
``nvidia.com/gpu``), as KubeRay itself derives them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lion_ray.errors import LionError

KINDS = {"RayCluster": ("spec",), "RayJob": ("spec", "rayClusterSpec")}
KINDS["RayService"] = ("spec", "rayClusterConfig")


@dataclass(frozen=True)
class NodeGroup:
    name: str  # KubeRay's groupName ("head" for the head)
    resources: dict[str, float]  # what one node gives Ray
    up: int  # nodes at the start (replicas; 1 for the head)
    most: int  # nodes at the most (maxReplicas; replicas without autoscaling)


def node_groups(doc: dict, source: str = "the manifest") -> list[NodeGroup]:
    """The head and worker groups of a RayCluster, RayJob or RayService document."""
    kind = doc.get("kind")
    if kind not in KINDS:
        raise LionError(
            f"{source}: kind {kind!r} is not a RayCluster, RayJob or RayService; give the "
            "manifest that holds the cluster's node groups"
        )
    spec = doc
    for key in KINDS[kind]:
        spec = (spec or {}).get(key)
    if not spec:
        where = ".".join(KINDS[kind])
        hint = (
            " (this RayJob names its cluster with clusterSelector: give that RayCluster's manifest)"
            if kind == "RayJob" and (doc.get("spec") or {}).get("clusterSelector")
            else ""
        )
        raise LionError(f"{source}: {kind} has no {where}{hint}")
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    head = spec.get("headGroupSpec")
    if not head:
        raise LionError(f"{source}: no headGroupSpec")
    groups = [NodeGroup("head", _resources(head, f"{source}: headGroupSpec"), 1, 1)]
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        name = group.get("groupName") or f"group{i}"
        where = f"{source}: workerGroupSpecs[{i}] ({name})"
        replicas = int(group.get("replicas", group.get("minReplicas", 0)) or 0)
        most = int(group.get("maxReplicas", replicas)) if autoscaling else replicas
        groups.append(NodeGroup(name, _resources(group, where), replicas, max(most, replicas)))
    return groups


def _resources(group: dict, where: str) -> dict[str, float]:
    params = group.get("rayStartParams") or {}
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or []
    if not containers:
        raise LionError(f"{where}: no containers in its pod template")
    limits = (containers[0].get("resources") or {}).get("limits") or {}
    requests = (containers[0].get("resources") or {}).get("requests") or {}
    out: dict[str, float] = {}
    cpu = params.get("num-cpus", limits.get("cpu", requests.get("cpu")))
    if cpu is None:
        raise LionError(f"{where}: neither rayStartParams num-cpus nor a CPU limit; set one")
    out["CPU"] = float(math.floor(_quantity(cpu, where)))
    gpu = params.get("num-gpus", limits.get("nvidia.com/gpu", requests.get("nvidia.com/gpu")))
    if gpu is not None and _quantity(gpu, where):
        out["GPU"] = _quantity(gpu, where)
    return out


def _quantity(value, where: str) -> float:
    """A Kubernetes quantity as a number: '8', 8, '500m' (0.5)."""
    text = str(value).strip()
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        raise LionError(f"{where}: {value!r} is not a number of CPUs or GPUs") from None


def cluster_nodes(groups: list[NodeGroup]) -> tuple[list[dict], list[dict]]:
    """(the nodes up at the start, the nodes the autoscaler may add up to each max)."""
    up = [dict(g.resources) for g in groups for _ in range(g.up)]
    more = [dict(g.resources) for g in groups for _ in range(g.most - g.up)]
    return up, more
