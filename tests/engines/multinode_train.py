"""Run by test_training.py in its own process (``python -m tests.engines.multinode_train``
from the repository root): a 3-node Ray cluster on one machine
(ray.cluster_utils.Cluster), two training workers spread over the worker nodes (the head
hosts none), one node lost mid-training and replaced. Prints one JSON line with what
happened."""

import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from lion_ray import storage
from lion_ray.config import StudentConfig, TrainConfig
from lion_ray.engines.training import train_student
from tests.helpers import registered_checkpoints

COMPACT = StudentConfig(prompt_format="compact")  # the tiny students' text template

base_model, table_path, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head hosts no workers
nodes = [cluster.add_node(num_cpus=3) for _ in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address, logging_level="ERROR")
import pyarrow.parquet as pq  # noqa: E402

answers = pq.read_table(table_path)
train = TrainConfig(
    zero_stage=2,
    lr=3e-3,
    epochs=3,
    max_length=96,
    micro_batch_size=4,
    effective_batch_size=8,
    workers=2,
    checkpoint_every_steps=4,
    max_failures=3,
)
out: dict = {"node_ids": [n.node_id for n in nodes]}

result: dict = {}


def run():
    result.update(
        train_student(
            answers,
            # Ray's default pacing (each checkpoint waits up to 2 s): the node is lost mid-way
            train.model_copy(update={"epochs": 12, "poll_interval_s": 2.0}),
            base_model=base_model,
            out_uri=str(work / "m2"),
            storage_path=str(work / "s"),
            name="node-loss",
            student=COMPACT,
            placement_strategy="STRICT_SPREAD",
            show_progress=False,
        )
    )


thread = threading.Thread(target=run)
thread.start()
deadline = time.time() + 240


train_dir = work / "s" / "node-loss"
while time.time() < deadline and registered_checkpoints(train_dir) < 1:
    time.sleep(0.2)
out["checkpoint_seen_before_loss"] = registered_checkpoints(train_dir) >= 1
cluster.remove_node(nodes[0])  # a worker node is lost mid-training ...
cluster.add_node(num_cpus=3)  # ... and the autoscaler brings a replacement
thread.join(timeout=400)
out["finished"] = not thread.is_alive()
out["resumed_from_step"] = result.get("resumed_from_step")
out["final_step"] = result.get("step")
out["total_steps"] = result.get("total_steps")
out["node_loss_worker_nodes"] = result.get("worker_nodes")
out["exported"] = storage.exists(str(work / "m2" / "model.safetensors"))
print("RESULT " + json.dumps(out), flush=True)
ray.shutdown()
cluster.shutdown()
