"""Requests the cluster can never grant are refused before Ray is asked."""

import pytest

from lion_ray.logic.resources import Capacity, Request, ResourcesUnavailable, check, shortfall

ONE_NODE_8_CPU = Capacity(nodes=[{"CPU": 8.0, "memory": 1e10}])
GPU_NODES = Capacity(nodes=[{"CPU": 8.0}] + [{"CPU": 8.0, "GPU": 1.0}] * 8)


def test_six_two_cpu_workers_do_not_fit_eight_cpus_and_the_message_says_why():
    request = Request(
        "imitation.train: Ray Train workers",
        {"CPU": 2.0},
        6,
        fix="Lower train.workers or train.cpus_per_worker.",
    )
    problem = shortfall(request, ONE_NODE_8_CPU)
    assert problem is not None
    assert "6 x {2 CPU} = 12 CPU in all" in problem
    assert "at most 4 of them: 8 CPU over 1 node(s)" in problem
    assert problem.endswith("Lower train.workers or train.cpus_per_worker.")
    with pytest.raises(ResourcesUnavailable, match="12 CPU"):
        check(request, ONE_NODE_8_CPU)
    assert shortfall(Request("x", {"CPU": 2.0}, 4), ONE_NODE_8_CPU) is None


def test_bundles_do_not_split_across_nodes():
    two_small = Capacity(nodes=[{"CPU": 3.0}, {"CPU": 3.0}])  # 6 CPUs, but 1 per node fits 2
    assert shortfall(Request("x", {"CPU": 2.0}, 2), two_small) is None
    assert "at most 2 of them" in shortfall(Request("x", {"CPU": 2.0}, 3), two_small)


def test_the_scarce_resource_is_named():
    problem = shortfall(Request("vLLM engines", {"CPU": 1.0, "GPU": 1.0}, 9), GPU_NODES)
    assert "= 9 GPU in all" in problem and "8 GPU over 9 node(s)" in problem
    assert shortfall(Request("vLLM engines", {"CPU": 1.0, "GPU": 1.0}, 8), GPU_NODES) is None


def test_strict_spread_needs_a_node_per_bundle():
    assert shortfall(Request("x", {"CPU": 1.0}, 2, "STRICT_SPREAD"), ONE_NODE_8_CPU)
    assert shortfall(Request("x", {"CPU": 1.0}, 2, "PACK"), ONE_NODE_8_CPU) is None


def test_what_the_run_holds_is_not_available_to_its_stages():
    """The paper's cluster: a serving replica holds one of the 8 GPUs, so 8 training workers
    can never start while it lives."""
    endpoint = Request("serving replicas", {"CPU": 1.0, "GPU": 1.0}, 1)
    held = Capacity(nodes=GPU_NODES.nodes, held={"the student endpoint": endpoint})
    workers = Request("imitation.train", {"CPU": 7.0, "GPU": 1.0}, 8)
    problem = shortfall(workers, held)
    assert "at most 7 of them" in problem
    assert "the student endpoint holds 1 x {1 CPU, 1 GPU}" in problem
    assert shortfall(Request("imitation.train", {"CPU": 7.0, "GPU": 1.0}, 7), held) is None


EIGHT_ONE_GPU_PODS = [{"CPU": 8.0, "GPU": 1.0}] * 8
COLOCATED_ENGINES = Request("student engines", {"CPU": 1.0, "GPU": 0.51}, 8)


def test_held_bundles_are_placed_one_by_one_leaving_room_beside_each():
    """Eight engines of 0.51 GPU on eight one-GPU pods leave 0.49 GPU on every pod, so eight
    colocated workers of 0.49 GPU fit (subtracting 4.08 GPUs from the largest nodes found
    room for 4); but a worker of 8 CPUs does not fit beside an engine's CPU on an 8-CPU pod."""
    capacity = Capacity(nodes=EIGHT_ONE_GPU_PODS, held={"the student engine": COLOCATED_ENGINES})
    assert shortfall(Request("workers", {"CPU": 7.0, "GPU": 0.49}, 8), capacity) is None
    problem = shortfall(Request("workers", {"CPU": 8.0, "GPU": 0.49}, 8), capacity)
    assert "at most 0 of them" in problem and "the student engine holds 8 x" in problem
    # a whole GPU per worker cannot fit beside the engines
    assert "at most 0" in shortfall(Request("w", {"CPU": 1.0, "GPU": 1.0}, 1), capacity)


def test_an_engine_that_fits_nowhere_is_named():
    capacity = Capacity(nodes=[{"CPU": 8.0, "GPU": 1.0}], held={"the engine": COLOCATED_ENGINES})
    assert "the engine holds 8 x {1 CPU, 0.51 GPU}, which this cluster cannot hold" in shortfall(
        Request("workers", {"CPU": 1.0}, 1), capacity
    )


def test_nodes_an_autoscaler_may_add_count_and_say_they_need_scaling():
    from lion_ray.logic.resources import needs_scaling

    head_only = Capacity(nodes=[{"CPU": 8.0}], pending=EIGHT_ONE_GPU_PODS)
    workers = Request("workers", {"CPU": 7.0, "GPU": 1.0}, 8)
    assert shortfall(workers, head_only) is None
    assert needs_scaling(workers, head_only)
    assert not needs_scaling(Request("api", {"CPU": 1.0}, 4), head_only)
    too_many = shortfall(Request("workers", {"CPU": 7.0, "GPU": 1.0}, 9), head_only)
    assert "counting 8 node(s) the autoscaler may still add" in too_many


def test_fractional_and_absent_resources():
    assert shortfall(Request("api", {"CPU": 0.25}, 32), ONE_NODE_8_CPU) is None
    assert shortfall(Request("api", {"CPU": 0.25}, 33), ONE_NODE_8_CPU)
    assert "0 GPU over 1 node(s)" in shortfall(Request("gpu", {"GPU": 1.0}, 1), ONE_NODE_8_CPU)
    assert shortfall(Request("nothing", {"GPU": 0.0}, 3), ONE_NODE_8_CPU) is None
