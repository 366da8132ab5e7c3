"""The training objective every defence and attack implements, and LoRA as a wrapper over any of them.

An objective is a frozen dataclass of hyperparameters (hashable, so its bound `grad` is a
stable `jax.jit` key) bound to the `ModelConfig` it runs on:

    streams()                      -> {name: StreamSpec}       what data it trains on
    prepare(tokenizer)             -> objective                 token ids it needs (e.g. CTRAP's "error")
    build_records(records, model_cfg, params, tokenizer) -> (records, report)
                                                                data-construction methods (SDD) make
                                                                their training records here; a
                                                                non-empty report is saved as
                                                                DIR/data_report.json
    init(params, key)              -> (trainable, frozen)       frozen: reference model, LoRA base, ...
    grad(trainable, batches, key, frozen) -> (grads, metrics)   a gradient estimate, not a loss
    export(trainable, frozen)      -> full params               what is saved as the HF checkpoint
    collect(trainable, batches, key, frozen) -> batches         host phase before each step, run
                                                                only when `collects` (RL rollouts)

The pipeline calls them in this order; only `streams` and `grad` have no default. An objective
with `trains = False` (post hoc, e.g. LoX) is exported right after `init`, without a training loop.

`frozen` enters the jitted step as an argument (never a closed-over constant) and is never
updated. `grad` returns gradients rather than a loss because some estimators (SEAM's finite
difference, CTRAP's first-order look-ahead) are the gradient of no scalar.

Two reserved keys connect `grad` to the loop (`train.loop.make_step`):
    batches[STEP]        the 0-based step (int32 scalar), for schedule-dependent objectives
                         (absent when `grad` is called outside the loop)
    metrics[UPDATE_MASK] optional pytree shaped like the grads whose boolean leaves broadcast
                         to each grad leaf: where False, the parameter and its optimiser state
                         stay bit-identical through the step (T-Vaccine's frozen layers). It is
                         consumed by the loop, not logged.

Two more connect `collect` to the loop (only for objectives that collect):
    batches[STATIC]      a `Static(value)` that `collect` may add: a leafless pytree node whose
                         hashable value is part of the batches' tree structure, so `jax.jit`
                         compiles one step per distinct value (cached) and `grad` reads
                         `batches[STATIC].value` as a Python value (T-Vaccine's layer set).
    batches[CARRY]       host state (JSON-able plain data, None at the first step) that
                         `collect` reads and returns updated; the loop hands it to the next
                         step's `collect` and saves it with each checkpoint, so a resumed run
                         sees the same state (T-Vaccine's probabilities and layer set). The
                         loop does not pass it to the jitted step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxdefense.config import check_bounds, field
from jaxdefense.errors import ConfigError, DataError

BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask")
STEP = "_step"
UPDATE_MASK = "_update_mask"
STATIC = "_static"
CARRY = "_carry"


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Static:
    """A hashable Python value carried in a pytree as structure, not as a leaf (`batches[STATIC]`)."""

    value: Any


def concat_rows(a: dict, b: dict, names: tuple[str, str] = ("a", "b")) -> dict:
    """One batch: the rows of `a`, then the rows of `b` (input_ids, attention_mask, loss_mask); the
    shorter one is right-padded with attention 0 and loss 0. DataError names a stream lacking a field."""
    for name, batch in zip(names, (a, b)):
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise DataError(f"stream {name!r}: batch lacks {missing}")
    length = max(a["input_ids"].shape[1], b["input_ids"].shape[1])

    def pad(x):
        return jnp.pad(jnp.asarray(x), ((0, 0), (0, length - x.shape[1])))

    return {k: jnp.concatenate([pad(a[k]), pad(b[k]).astype(jnp.asarray(a[k]).dtype)], axis=0) for k in BATCH_KEYS}


@dataclasses.dataclass(frozen=True)
class Objective:
    """Base of methods and attacks: hyperparameters as fields, `cfg` bound by `bind`."""

    cfg: Any = field(None, internal=True)
    registered_name: ClassVar[str] = ""
    trains: ClassVar[bool] = True  # False: post hoc (init computes the result; pipeline.fit skips training)
    collects: ClassVar[bool] = False  # True: the loop calls `collect` on the host before each step

    def __post_init__(self):
        """Choices and bounds of the fields (`config.field`) hold for directly built instances too."""
        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise ConfigError(f"{self.name}.{f.name}: {value!r} is not one of {list(choices)}")
            check_bounds(f"{self.name}.{f.name}", value, f.metadata.get("bounds") or {})

    @property
    def name(self) -> str:
        return self.registered_name or type(self).__name__

    def bind(self, cfg) -> Objective:
        """This objective on model config `cfg` (`dataclasses.replace(self, cfg=cfg)`)."""
        return dataclasses.replace(self, cfg=cfg)

    def require_cfg(self):
        if self.cfg is None:
            raise ConfigError(f"{self.name!r} is not bound to a model config: call .bind(cfg)")
        return self.cfg

    def hyperparameters(self) -> dict[str, Any]:
        """Hyperparameters as plain data (everything but `cfg`), for configs and reports."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "cfg"}

    def streams(self) -> dict:
        raise NotImplementedError

    def prepare(self, tokenizer) -> Objective:
        """This objective with what it needs from the tokenizer resolved (default: itself)."""
        del tokenizer
        return self

    def build_records(self, records: dict, model_cfg, params, tokenizer) -> tuple[dict, dict]:
        """(records of the streams to train on, report) from those loaded for `streams()` (default: as
        loaded, no report). A data-construction method returns new records; streams it leaves out
        are not batched; its report (e.g. a similarity distribution) is saved with the run."""
        del model_cfg, params, tokenizer
        return records, {}

    def init(self, params, key) -> tuple[Any, Any]:
        del key
        return params, None

    def grad(self, params, batches, key, frozen):
        raise NotImplementedError

    def collect(self, params, batches, key, frozen) -> dict:
        """The step's batches for `grad`, built on the host from the current params (e.g. rollouts
        added as new row arrays); batches[STEP] is the step and `key` the step's key (the loop's
        `train(collect=...)`). A pure function of its inputs; default: the batches unchanged."""
        del params, key, frozen
        return batches

    def export(self, params, frozen):
        del frozen
        return params


@dataclasses.dataclass(frozen=True)
class LoRA(Objective):
    """`inner` trained through low-rank adapters W + s·A B; the base weights are frozen.

    With W' = merge(W, A, B), the adapters' update direction is the VJP of the merge applied to
    the inner objective's update at W' (∂/∂A = s·G Bᵀ, ∂/∂B = s·Aᵀ G for G at W'): exact for a
    true gradient, and the same projection for a gradient estimate. No gradient or optimiser
    state exists for the base.
    """

    inner: Objective | None = None
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("wq", "wv")

    @property
    def name(self) -> str:
        return f"{self.inner.name}+lora"

    def bind(self, cfg) -> LoRA:
        return dataclasses.replace(self, cfg=cfg, inner=self.inner.bind(cfg))

    def streams(self) -> dict:
        return self.inner.streams()

    def prepare(self, tokenizer) -> LoRA:
        return dataclasses.replace(self, inner=self.inner.prepare(tokenizer))

    def build_records(self, records, model_cfg, params, tokenizer):
        return self.inner.build_records(records, model_cfg, params, tokenizer)

    @property
    def collects(self) -> bool:
        return self.inner.collects

    def collect(self, params, batches, key, frozen):
        return self.inner.collect(self.merged(params, frozen), batches, key, frozen["inner"])

    def init(self, params, key):
        from jaxdefense.models import lora_init

        k_inner, k_lora = jax.random.split(key)
        base, inner_frozen = self.inner.init(params, k_inner)
        dtype = jax.tree.leaves(base)[0].dtype
        adapters = lora_init(self.require_cfg(), k_lora, self.rank, self.alpha, tuple(self.targets), dtype=dtype)
        return adapters["layers"], {"base": base, "inner": inner_frozen}

    def merged(self, adapters, frozen):
        from jaxdefense.models import lora_merge

        return lora_merge(frozen["base"], {"layers": adapters, "scale": self.alpha / self.rank})

    def grad(self, params, batches, key, frozen):
        """The inner update pulled back to the adapters; an inner UPDATE_MASK over the stacked
        layer weights masks both adapter factors of each adapted weight."""
        merged, pullback = jax.vjp(lambda a: self.merged(a, frozen), params)
        g_full, metrics = self.inner.grad(merged, batches, key, frozen["inner"])
        (g_adapters,) = pullback(g_full)
        if UPDATE_MASK in metrics:
            layers = metrics[UPDATE_MASK]["layers"]
            metrics = {**metrics, UPDATE_MASK: {name: {"a": layers[name], "b": layers[name]} for name in params}}
        return g_adapters, metrics

    def export(self, params, frozen):
        return self.merged(params, frozen)


def with_lora(objective: Objective, section) -> Objective:
    """`objective` itself for `section.rank == 0`, else wrapped in `LoRA` (a `config.LoraSection`)."""
    if section.rank == 0:
        return objective
    return LoRA(cfg=objective.cfg, inner=objective, rank=section.rank, alpha=section.alpha,
                targets=tuple(section.targets))
