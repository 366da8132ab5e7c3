"""The one optimiser builder: `make_optimizer(config.OptimizerSection, steps)` for every run."""

from __future__ import annotations

import dataclasses

import optax

_BUILT: dict = {}


def learning_rate(section, steps: int) -> optax.Schedule:
    """Linear warm-up 0 → lr over `warmup_steps`, then constant, or cosine / linear decay to
    final_lr_fraction·lr at `steps` (optax `warmup_cosine_decay_schedule` for cosine)."""
    lr, warmup = section.lr, min(section.warmup_steps, max(steps - 1, 0))
    end = lr * section.final_lr_fraction
    if section.schedule == "cosine" and warmup > 0:
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end)
    decay_steps = max(steps - warmup, 1)
    if section.schedule == "constant":
        body = optax.constant_schedule(lr)
    elif section.schedule == "cosine":
        body = optax.cosine_decay_schedule(lr, decay_steps, alpha=section.final_lr_fraction)
    else:
        body = optax.linear_schedule(lr, end, decay_steps)
    if warmup == 0:
        return body
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), body], [warmup])


def make_optimizer(section, steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm (unless `clip` is None) → AdamW / Adam / SGD(+decoupled decay) on `learning_rate`.

    Args:
      section: a `jaxdefense.config.OptimizerSection` (validated: lr > 0, 0 ≤ b1, b2 < 1, ...).
      steps: the run's total steps (the decay horizon).
    Returns:
      An optax GradientTransformation; equal (section, steps) give the same object, so runs that
      share an optimiser also share the training loop's compiled step.
    """
    key = (type(section).__name__, dataclasses.astuple(section), steps)
    if key not in _BUILT:
        _BUILT[key] = _build(section, steps)
    return _BUILT[key]


def _build(section, steps: int) -> optax.GradientTransformation:
    schedule = learning_rate(section, steps)
    if section.name == "adamw":
        opt = optax.adamw(schedule, section.b1, section.b2, section.eps, weight_decay=section.weight_decay)
    elif section.name == "adam":
        opt = optax.adam(schedule, section.b1, section.b2, section.eps)
    else:
        opt = optax.sgd(schedule, momentum=section.momentum)
        if section.weight_decay:
            opt = optax.chain(optax.add_decayed_weights(section.weight_decay), opt)
    if section.clip is not None:
        opt = optax.chain(optax.clip_by_global_norm(section.clip), opt)
    return opt
