"""Orbax checkpoints of a training run: params, optimiser state and a JSON record
(step, data position, seed, last metrics), saved with `ocp.args.Composite`.

Checkpoint N holds the state after N completed steps; restoring into an abstract tree of
`jax.ShapeDtypeStruct(shape, dtype, sharding=...)` places every array directly on its shard.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxdefense.errors import CheckpointError

CHECKPOINT_SUBDIR = "checkpoints"


def abstract_tree(tree: Any, shardings: Any | None = None) -> Any:
    """ShapeDtypeStructs for `tree`, carrying `shardings` (or each array's own sharding)."""
    if shardings is None:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            tree,
        )
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` for (params, opt_state, meta).

    Saves are synchronous: the next jitted step donates the param buffers, so the arrays
    must be on disk (or copied) before it runs.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                enable_async_checkpointing=False,
                cleanup_tmp_directories=True,
            ),
        )

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, params: Any, opt_state: Any, meta: dict) -> None:
        args = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
        if opt_state is not None:
            args["opt_state"] = ocp.args.StandardSave(opt_state)
        self._manager.save(step, args=ocp.args.Composite(**args), force=True)
        self._manager.wait_until_finished()

    def restore(
        self, step: int | None, params_target: Any, opt_state_target: Any | None = None
    ) -> tuple[Any, Any, dict]:
        """Restore step (latest if None) into abstract targets; returns (params, opt_state, meta)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if step not in self._manager.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}")
        args = {
            "params": ocp.args.StandardRestore(params_target),
            "meta": ocp.args.JsonRestore(),
        }
        if opt_state_target is not None:
            args["opt_state"] = ocp.args.StandardRestore(opt_state_target)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**args))
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            raise CheckpointError(f"cannot restore {self.directory} step {step}: {e}") from e
        return out["params"], out.get("opt_state") if opt_state_target is not None else None, out["meta"]

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return out["meta"]

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_params(run_dir: str | os.PathLike, params_target: Any, step: int | None = None) -> Any:
    """Params from a run directory's checkpoints (latest step by default).

    `params_target`: a pytree of arrays or ShapeDtypeStructs giving shapes, dtypes and shardings
    (e.g. `jax.eval_shape(lambda: init_params(cfg, key))`, placed on one device)."""
    directory = Path(run_dir) / CHECKPOINT_SUBDIR
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoints directory in {run_dir}")
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape,
            x.dtype,
            sharding=getattr(x, "sharding", None)
            or jax.sharding.SingleDeviceSharding(jax.devices()[0]),
        ),
        params_target,
    )
    with Checkpointer(directory, max_to_keep=None) as ckpt:
        params, _, _ = ckpt.restore(step, target)
    return params
