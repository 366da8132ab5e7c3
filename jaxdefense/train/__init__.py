"""The one training loop, optimisers, orbax checkpoints, mesh + sharding rules, metrics."""

from jaxdefense.train.checkpoint import Checkpointer, abstract_tree, load_params
from jaxdefense.train.loop import TrainResult, make_step, sft_grad, train
from jaxdefense.train.metrics import read_metrics
from jaxdefense.train.sharding import (
    PARAM_AXES,
    RULES,
    batch_sharding,
    logical_to_spec,
    make_mesh,
    param_shardings,
    param_specs,
    replicated,
)

__all__ = [
    "Checkpointer", "PARAM_AXES", "RULES", "TrainResult", "abstract_tree", "batch_sharding",
    "load_params", "logical_to_spec", "make_mesh", "make_step", "param_shardings", "param_specs",
    "read_metrics", "replicated", "sft_grad", "train",
]
