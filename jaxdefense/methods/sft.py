"""Supervised fine-tuning, the objective behind `jaxdefense train`, alignment and the SFT attacks.

    L(θ) = CE(θ; response tokens) + w · CE(θ; first response token)

CE is the mean next-token cross-entropy over the loss-mask tokens of the "train" stream
(`models.lm_loss`). Greedy decoding commits to refusing or complying at the first response
token, which plain SFT weights by only 1/|response|; w = `first_token_weight` up-weights that
decision (the embedded base model's alignment uses w = 5); w = 0 is plain SFT.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxdefense.config import HALVES, field
from jaxdefense.data.specs import LOSS_ON, StreamSpec
from jaxdefense.objective import Objective
from jaxdefense.registry import register_method


def first_token_ce(cfg, params, batch):
    """(mean CE over the loss mask, CE of each row's first loss-mask target averaged over rows)."""
    from jaxdefense.models import forward, next_token_nll

    logits = forward(cfg, params, batch["input_ids"], attention_mask=batch["attention_mask"])
    nll, weights = next_token_nll(logits, batch["input_ids"], batch["loss_mask"])
    first = ((jnp.cumsum(weights, axis=1) == 1) & (weights > 0)).astype(jnp.float32)
    ce = jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    return ce, jnp.sum(nll * first) / jnp.maximum(jnp.sum(first), 1.0)


@register_method("sft")
@dataclasses.dataclass(frozen=True)
class SFT(Objective):
    """SFT on one stream "train" of `source`; hyperparameters source, half, loss_on, first_token_weight."""

    source: str = field("benign_instruct", doc="data stream trained on")
    half: str = field("all", choices=HALVES)
    limit: int | None = field(None, ge=1, doc="first N records of the split")
    loss_on: str = field("response", choices=LOSS_ON)
    first_token_weight: float = field(0.0, ge=0, doc="extra weight w of the first response token's CE")

    def streams(self) -> dict[str, StreamSpec]:
        return {"train": StreamSpec(self.source, half=self.half, loss_on=self.loss_on, limit=self.limit)}

    def grad(self, params, batches, key, frozen):
        """∇ [CE + w·CE_first]; metrics loss (and first_ce when w > 0)."""
        from jaxdefense.models import lm_loss

        del key, frozen
        cfg, batch = self.require_cfg(), batches["train"]
        if self.first_token_weight == 0:
            loss, grads = jax.value_and_grad(lambda p: lm_loss(cfg, p, batch))(params)
            return grads, {"loss": loss}

        def loss_fn(p):
            ce, first = first_token_ce(cfg, p, batch)
            return ce + self.first_token_weight * first, first

        (loss, first), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, {"loss": loss, "first_ce": first}
