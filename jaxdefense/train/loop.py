"""The one training loop: alignment, immunisation, attacks and benign fine-tuning all run here.

Step i (0-based) reads `stream.batch_at(i)` from every stream and uses the key
`fold_in(key(seed), i)`, so the run is a pure function of (initial params, frozen, seed, steps):
a run resumed from checkpoint N (the state after N steps) reproduces the uninterrupted run
bit for bit. The jitted step

    grads, metrics = grad_fn(cast(params, compute_dtype), {**batches, STEP: i}, key, cast(frozen, compute_dtype))
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = params + updates           (where metrics[UPDATE_MASK] is False: params, opt_state kept)

is compiled once, with explicit in/out shardings (params, optimiser state and grads keep
their sharding; `frozen` — a reference model, a LoRA base — is sharded like params and is an
argument of the step, never a closed-over constant) and donated params/opt_state buffers. A non-finite metric, gradient or
updated parameter raises `NonFiniteError` naming the step (and the metric or leaf) before any
checkpoint of that step is written. Only one boolean per step crosses to the host, read one
step late so dispatch stays asynchronous; metrics are fetched every `log_every` steps.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdefense.errors import CheckpointError, ConfigError, NonFiniteError
from jaxdefense.objective import CARRY, STEP, UPDATE_MASK
from jaxdefense.train import sharding as shd
from jaxdefense.train.checkpoint import CHECKPOINT_SUBDIR, Checkpointer, abstract_tree
from jaxdefense.train.metrics import MetricsLog, progress_bar, to_json_value

GradFn = Callable[[Any, Mapping[str, Any], jax.Array, Any], tuple[Any, Mapping[str, jax.Array]]]


class Stream(Protocol):
    def batch_at(self, step: int) -> Mapping[str, Any]: ...


@dataclasses.dataclass
class TrainResult:
    params: Any
    opt_state: Any
    step: int
    metrics: dict[str, Any]
    history: list[dict]


def sft_grad(cfg, stream: str = "train") -> GradFn:
    """Plain SFT: grads of `lm_loss(cfg, params, batches[stream])`; metrics {"loss"}."""
    from jaxdefense.models import lm_loss

    def grad_fn(params, batches, key, frozen):
        del key, frozen
        loss, grads = jax.value_and_grad(lambda p: lm_loss(cfg, p, batches[stream]))(params)
        return grads, {"loss": loss}

    return grad_fn


def _canonical_dtype(dtype) -> jnp.dtype | None:
    if dtype is None:
        return None
    try:
        return jnp.dtype(dtype)
    except TypeError as e:
        raise ConfigError(f"compute_dtype: unknown dtype {dtype!r}") from e


def cast_floating(tree: Any, dtype) -> Any:
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def compute_grads(grad_fn: GradFn, params, batches, key, compute_dtype=None, grad_shardings=None, *, frozen=None):
    """grad_fn at params (and frozen) cast to `compute_dtype`; grads cast back to the params' dtype
    and constrained to `grad_shardings` (so FSDP grads are reduce-scattered, not replicated)."""
    inputs = params if compute_dtype is None else cast_floating(params, compute_dtype)
    frozen = frozen if compute_dtype is None else cast_floating(frozen, compute_dtype)
    grads, metrics = grad_fn(inputs, batches, key, frozen)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    if grad_shardings is not None:
        grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
    return grads, dict(metrics)


def keep_masked(mask, new, old, params):
    """`new` with the entries where `mask` (a params-shaped pytree of booleans broadcastable to
    each leaf) is False taken from `old`; `new`/`old` are params or optimiser states, whose
    params-shaped subtrees are masked and other leaves (a step count) taken from `new`."""
    treedef = jax.tree.structure(params)

    def is_params(node):
        try:
            return jax.tree.structure(node) == treedef
        except Exception:
            return False

    def select(n, o):
        if not is_params(n):
            return n
        return jax.tree.map(lambda m, a, b: jnp.where(m, a, b), mask, n, o)

    return jax.tree.map(select, new, old, is_leaf=is_params)


def make_step(grad_fn: GradFn, optimizer: optax.GradientTransformation, compute_dtype=None,
              grad_shardings=None, mesh=None):
    """The un-jitted step: (params, opt_state, batches, frozen, base_key, step) ->
    (params, opt_state, metrics, ok, finite) where `finite` flags every metric and grad leaf.
    grad_fn sees the step as batches[STEP]; a metrics[UPDATE_MASK] it returns is consumed here.
    With `mesh`, the step is traced under it, so the model's activation constraints apply."""
    compute_dtype = _canonical_dtype(compute_dtype)

    def step_fn(*args):
        with shd.activation_mesh(mesh):
            return step_body(*args)

    def step_body(params, opt_state, batches, frozen, base_key, step):
        key = jax.random.fold_in(base_key, step)
        batches = {**batches, STEP: jnp.asarray(step, jnp.int32)}
        grads, metrics = compute_grads(grad_fn, params, batches, key, compute_dtype, grad_shardings, frozen=frozen)
        mask = metrics.pop(UPDATE_MASK, None)
        updates, new_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if mask is not None:
            new_params = keep_masked(mask, new_params, params, params)
            new_state = keep_masked(mask, new_state, opt_state, params)
        params, opt_state = new_params, new_state
        # Per-leaf sums of squares give the grad norm and, for free, which grads are non-finite.
        grad_sq = jax.tree.map(lambda g: jnp.sum(jnp.square(g.astype(jnp.float32))), grads)
        finite = {
            "metrics": {k: jnp.all(jnp.isfinite(v)) for k, v in metrics.items()},
            "grads": jax.tree.map(jnp.isfinite, grad_sq),
            "params": jax.tree.map(lambda x: jnp.isfinite(jnp.sum(x, dtype=jnp.float32)), params),
        }
        leaves = jax.tree.leaves(finite)
        ok = jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
        metrics["grad_norm"] = jnp.sqrt(sum(jax.tree.leaves(grad_sq)))
        return params, opt_state, metrics, ok, finite

    return step_fn


_JIT_CACHE: collections.OrderedDict = collections.OrderedDict()
_JIT_CACHE_SIZE = 16


def _hashable(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(leaves)


def _fn_key(fn) -> Any:
    """A cache key for a grad function: a bound method of an equal (frozen, hashable) objective is
    the same function, though Python compares bound methods' `self` by identity."""
    self = getattr(fn, "__self__", None)
    if self is not None and getattr(self, "__hash__", None) is not None:
        try:
            hash(self)
            return (type(self), self, fn.__func__)
        except TypeError:
            pass
    return fn


def _cached_jit(key: tuple, make: Callable[[], Callable]) -> Callable:
    """One jitted function per key (LRU), so repeated `train` calls reuse compiled steps."""
    if key in _JIT_CACHE:
        _JIT_CACHE.move_to_end(key)
        return _JIT_CACHE[key]
    _JIT_CACHE[key] = fn = make()
    while len(_JIT_CACHE) > _JIT_CACHE_SIZE:
        _JIT_CACHE.popitem(last=False)
    return fn


def _nonfinite_message(step: int, finite: Any) -> str:
    finite = jax.tree.map(lambda x: bool(shd.to_host(x)), finite)
    bad_metrics = [k for k, v in finite["metrics"].items() if not v]
    parts = []
    if bad_metrics:
        parts.append("metric " + ", ".join(repr(k) for k in bad_metrics))
    for group, label in (("grads", "gradient of"), ("params", "updated params")):
        bad = [jax.tree_util.keystr(path)
               for path, v in jax.tree_util.tree_flatten_with_path(finite[group])[0] if not v]
        if bad:
            parts.append(f"{label} {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")
            break
    return f"non-finite {' and '.join(parts) or 'value'} at step {step}"


def _host_batches(streams: Mapping[str, Stream], step: int) -> dict[str, dict]:
    return {name: dict(s.batch_at(step)) for name, s in streams.items()}


def _tokens(batches: Mapping[str, Mapping[str, Any]]) -> int:
    return int(sum(np.size(b["input_ids"]) for b in batches.values() if isinstance(b, Mapping) and "input_ids" in b))


def _device_batches(batches, sharding):
    return jax.tree.map(lambda x: shd.put_global(np.asarray(x), sharding), batches)


def _check_batch_divisible(batches, divisor: int) -> None:
    for name, batch in batches.items():
        for field, x in batch.items():
            n = np.shape(x)[0] if np.ndim(x) else None
            if n is not None and n % divisor:
                raise ConfigError(
                    f"data.streams.{name}.batch_size: {n} ({field}) does not divide over "
                    f"mesh data*fsdp = {divisor}"
                )


def train(
    params: Any,
    grad_fn: GradFn,
    streams: Mapping[str, Stream],
    optimizer: optax.GradientTransformation,
    *,
    frozen: Any = None,
    steps: int,
    mesh: jax.sharding.Mesh | None = None,
    run_dir: str | os.PathLike | None = None,
    ckpt_every: int = 0,
    resume: bool = False,
    seed: int = 0,
    log_every: int = 10,
    compute_dtype=None,
    progress: bool | None = None,
    max_to_keep: int | None = 3,
    callbacks: Sequence[Callable[[dict], None]] = (),
    callback: Callable[[int, Any], None] | None = None,
    callback_every: int = 0,
    collect: Callable[[Any, dict, jax.Array, Any], dict] | None = None,
) -> TrainResult:
    """Run steps [start, steps) of `grad_fn` + `optimizer`; start = 0 or the latest checkpoint.

    params: fp32 master weights (copied, the caller's arrays stay valid). frozen: a pytree the
    step reads but never updates (placed with the params' sharding rules). streams: name →
    object with deterministic `batch_at(step)`. run_dir: where checkpoints/ and metrics.jsonl
    go (None: nothing is written). ckpt_every: save after every that many steps (0: only at the
    end). log_every: fetch and log metrics at steps i with i % log_every == 0 and the last.
    compute_dtype: e.g. "bfloat16" casts params inside the step; grads come back fp32.
    callback(n, params): called outside the jitted step with the params after n completed steps,
    for n = start, every n with n % callback_every == 0 (callback_every > 0) and n = steps (e.g.
    evaluation curves during an attack); it must not keep references to params.
    collect(params, host_batches, key, frozen) -> host_batches: a host phase before step i
    (`Objective.collect`, e.g. RL rollouts): it sees the params after i steps, the step's
    batches with batches[STEP] = i, the step's key fold_in(key(seed), i) and frozen, and returns
    the batches the jitted step gets (new fixed-shape row arrays may be added); it must be a
    pure function of its inputs so a resumed run stays bit-identical. It also reads
    batches[CARRY] (its own host state from the previous step, None at the first) and returns
    it updated: the loop saves it with each checkpoint and restores it on resume. A
    batches[STATIC] (`objective.Static`) it returns reaches the jitted step as tree structure:
    one compiled step per distinct value.
    Returns TrainResult(params, opt_state, step=completed steps, metrics=last logged, history).
    """
    if steps < 0:
        raise ConfigError(f"steps: must be >= 0, got {steps}")
    if log_every < 1:
        raise ConfigError(f"log_every: must be >= 1, got {log_every}")
    mesh = mesh if mesh is not None else shd.make_mesh()
    if steps > 0:
        _check_batch_divisible(_host_batches(streams, 0), shd.batch_divisor(mesh))
    is_main = jax.process_index() == 0
    bar_given = progress is not None and not isinstance(progress, bool)
    progress = is_main if progress is None else (progress if bar_given else (progress and is_main))

    p_shard = shd.param_shardings(params, mesh)
    params = _fresh_copy(params, p_shard)
    opt_abstract = jax.eval_shape(optimizer.init, params)
    o_shard = shd.state_shardings(opt_abstract, params, p_shard, mesh)
    init_fn = _cached_jit(
        ("init", optimizer, _hashable(p_shard), _hashable(o_shard)),
        lambda: jax.jit(optimizer.init, in_shardings=(p_shard,), out_shardings=o_shard),
    )
    opt_state = init_fn(params)
    f_shard = shd.param_shardings(frozen, mesh) if frozen is not None else None
    frozen = shd.shard_tree(frozen, f_shard) if frozen is not None else None
    b_shard = shd.batch_sharding(mesh)
    rep = shd.replicated(mesh)

    ckpt = None
    start = 0
    meta: dict = {}
    if run_dir is not None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = Checkpointer(run_dir / CHECKPOINT_SUBDIR, max_to_keep=max_to_keep)
        latest = ckpt.latest_step()
        if latest is not None:
            if not resume:
                raise CheckpointError(
                    f"{run_dir} already holds checkpoints (latest step {latest}); resume it or use a new run dir"
                )
            params, opt_state, meta = ckpt.restore(
                latest, abstract_tree(params, p_shard), abstract_tree(opt_state, o_shard)
            )
            if meta.get("seed") != seed:
                raise CheckpointError(
                    f"{run_dir}: checkpoint seed {meta.get('seed')} differs from seed {seed}"
                )
            start = int(meta["step"])
    log = MetricsLog(run_dir, start, enabled=is_main)
    carry = meta.get("collect_carry")

    dtype = _canonical_dtype(compute_dtype)
    step_fn = _cached_jit(
        ("step", _fn_key(grad_fn), optimizer, dtype, _hashable(p_shard), _hashable(o_shard), _hashable(f_shard), b_shard),
        lambda: jax.jit(
            make_step(grad_fn, optimizer, dtype, p_shard, mesh),
            in_shardings=(p_shard, o_shard, b_shard, f_shard, rep, rep),
            out_shardings=(p_shard, o_shard, rep, rep, rep),
            donate_argnums=(0, 1),
        ),
    )
    base_key = shd.put_global(jax.random.key_data(jax.random.key(seed)), rep)
    base_key = jax.random.wrap_key_data(base_key)

    history: list[dict] = []
    last: dict = dict(meta.get("metrics", {}))
    bar = progress if bar_given else progress_bar(steps, min(start, steps), progress)
    if bar_given and start:
        bar.update(min(start, steps))
    pending = None
    t_last, tokens_since = time.perf_counter(), 0
    try:
        host = _host_batches(streams, start) if start < steps else None
        if callback is not None:
            callback(start, params)
        for i in range(start, steps):
            if collect is not None:
                host, carry = _collected(collect, params, host, base_key, i, frozen, carry)
            batches = _device_batches(host, b_shard)
            tokens_since += _tokens(host)
            params, opt_state, metrics, ok, finite = step_fn(
                params, opt_state, batches, frozen, base_key, shd.put_global(np.int32(i), rep)
            )
            if pending is not None:
                _raise_if_nonfinite(*pending)
            pending = (i, ok, finite)
            save = ckpt is not None and (i + 1 == steps or (ckpt_every > 0 and (i + 1) % ckpt_every == 0))
            logged = i % log_every == 0 or i + 1 == steps
            if save or logged:
                _raise_if_nonfinite(*pending)
                pending = None
            if logged:
                values = {k: to_json_value(shd.to_host(v)) for k, v in metrics.items()}
                now = time.perf_counter()
                record = {"step": i, **values, "tokens_per_s": tokens_since / max(now - t_last, 1e-9)}
                t_last, tokens_since = now, 0
                last = values
                history.append(record)
                log.write(record)
                for cb in callbacks:
                    cb(record)
                bar.set_postfix(loss=values.get("loss"), tok_s=f"{record['tokens_per_s']:.0f}")
            if save:
                ckpt.save(
                    i + 1,
                    params,
                    opt_state,
                    {
                        "step": i + 1,
                        "seed": seed,
                        "data_position": {name: i + 1 for name in streams},
                        "metrics": last,
                        **({"collect_carry": carry} if collect is not None else {}),
                    },
                )
            if callback is not None and (i + 1 == steps or (callback_every > 0 and (i + 1) % callback_every == 0)):
                if pending is not None:
                    _raise_if_nonfinite(*pending)
                    pending = None
                callback(i + 1, params)
            bar.update(1)
            if i + 1 < steps:
                host = _host_batches(streams, i + 1)
        if pending is not None:
            _raise_if_nonfinite(*pending)
    finally:
        if not bar_given:
            bar.close()
        log.close()
        if ckpt is not None:
            ckpt.close()
    return TrainResult(params, opt_state, max(start, steps), last, history)


def _collected(collect, params, host, base_key, step: int, frozen, carry) -> tuple[dict, Any]:
    """(the step's host batches after `collect`, its new carry): STEP and CARRY given to it and
    removed from what it returns (a STATIC it adds stays)."""
    out = dict(collect(params, {**host, STEP: np.int32(step), CARRY: carry}, jax.random.fold_in(base_key, step),
                       frozen))
    out.pop(STEP, None)
    carry = out.pop(CARRY, None)
    return out, carry


def _fresh_copy(params, shardings):
    """Params placed on `shardings` in new buffers, so donation never deletes the caller's arrays."""
    if jax.process_count() > 1:
        return shd.shard_tree(params, shardings)
    placed = jax.device_put(params, shardings)
    copy = _cached_jit(
        ("copy", _hashable(shardings)),
        lambda: jax.jit(lambda t: jax.tree.map(jnp.copy, t), in_shardings=(shardings,), out_shardings=shardings),
    )
    return copy(placed)


def _raise_if_nonfinite(step: int, ok, finite) -> None:
    if not bool(shd.to_host(ok)):
        raise NonFiniteError(_nonfinite_message(step, finite))
