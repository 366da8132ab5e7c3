"""Circuit Breakers — representation rerouting, RR (Zou et al., arXiv 2406.04313).

Seed equations (seed 002, Lever 2):

    L_RR     = ReLU( rep_cb(x_s) · rep_orig(x_s) / (‖rep_cb(x_s)‖₂ ‖rep_orig(x_s)‖₂) )    circuit-breaker set x_s
    L_retain = ‖rep_orig(x_r) − rep_cb(x_r)‖₂²                                            retain set x_r
    loss     = c_cb(t)·L_RR + c_retain(t)·L_retain,  LoRA adapters on the frozen original model

As implemented:

    h^θ_l(x)   residual stream after layer l (`decoder_stack(return_hidden=True)`); orig: the
               frozen base, cb: base + LoRA (the only trainable parameters)
    layers     target hidden indices l_j = clip(round(f_j·L), 1, L) for the fractions f
               (official 10 and 20 of 32: f = 10/32, 20/32); the model above max l_j is not run
    L_RR       = Σ_{j, tokens} ReLU(cos(h^cb_{l_j}, h^orig_{l_j})) / (#targets · #real tokens)   on x_s
    L_retain   = Σ_{l=1..max l_j, tokens} ‖h^orig_l − h^cb_l‖₂ / (max l_j · #real tokens)      on x_r
               (retain_norm="l2", official; "squared": ‖·‖₂², the seed's)
    c_cb       = α(1 − t/2T),  c_retain = α·t/2T,  t = step + 1, T = total_steps
    grads      = ∇_adapters loss;  export = base with the adapters merged

x_s is the harmful QA stream (prompt and answer, every real token), x_r the benign
instructions followed by refusals to defender-half harmful prompts (every real token).
rep_orig comes from `frozen["base"]` (an argument of the step) under stop_gradient.
At step 0 with B = 0 (b_init_std = 0, PEFT's init) every cosine is 1 (L_RR = 1 on every row)
and L_retain = 0; with b_init_std = σ > 0, B ~ N(0, σ²) and the run starts off that point.

The cos = 1 fixed point. With B = 0 the adapted model is the base (s·A·0 = 0 whatever a LoRA
dropout mask does, so dropout cannot break the symmetry), and there ∇_x ReLU(cos(x, u)) =
(û − (x̂·û)x̂)/‖x‖ = 0 at x = u, the L2 retain distance sits at its kink (gradient 0) and
∂/∂A ∝ B = 0: the exact gradient is zero and the computed one is rounding residue. Adam turns
any residue above its ε into an lr-sized step, after which the L2 term's gradient has constant
magnitude c_retain (a kink, not a minimum of a smooth loss) and Adam keeps Δh at O(lr): the
symmetry breaks by itself after a step or two in float32, float64 and (official mechanics, PEFT
over a bf16 base) bf16 alike. What it does not guarantee is rerouting: near the fixed point
1 − cos ≈ θ²/2 for the angle θ between h^cb and h^orig, so the rerouting pull falls linearly
with θ (∝ c_cb·θ/‖h‖) while the L2 retain pull stays c_retain; whether the run leaves cos ≈ 1
depends on c_cb/c_retain, on ‖h‖ and on how many hidden states each mean runs over (2 targets
vs all states up to the deepest, official 22 of a 32-layer model: its retain weight per state is
~1/22, here 1/depth). b_init_std sets θ at step 0 deterministically (not through the platform's
rounding residue). Metrics: loss, l_rr, l_retain, c_cb, c_retain, cos_h<l> (mean cosine,
before the ReLU, at each target on x_s). `layer_cosines` gives the per-layer cosine of two
models on any batch (the held-out harmful prompts of the report).

The official code (`GraySwanAI/circuit-breakers` `src/lorra_circuit_breaker.py`, not in the
index: read from a third-party copy, docs/research/anchors-methods.md §10 [unv]) and how this
port differs:
- Official progress = current_training_step/300 with max_steps 150 (t/2T), the counter
  incremented before use (t = step + 1, as here); T is `total_steps` here (set it to the run's
  `steps`).
- Official retain term is `torch.norm(lora − orig, dim=-1).nanmean()` over the stack of *all*
  hidden states of its truncated model (embedding output included, and the final-normed last
  state), with pad positions zeroed but counted in the mean; here the mean is over the real
  tokens of hidden states 1..max l_j (the embedding output cannot move). Its cosine divides by
  ‖h‖ without an epsilon; here a zero norm is guarded.
- Official LoRA: r16/α16 on q,k,v,o,gate,up,down of layers 0..max target, dropout 0.05 (no
  dropout here; with B = 0 it changes nothing, see above), PEFT's init (A kaiming-uniform,
  B = 0: b_init_std = 0 here); `layers_to_transform` matches the adapters here, which exist
  only for the layers that are run. Llama-3-8B-Instruct, α = 10 (`lorra_alpha`), lr 1e-4, 150 steps, batch 16.
- Official retain data: UltraChat, XSTest borderline prompts and refusals; here benign
  instructions and refusals. Official circuit-breaker data: harmful request + harmful
  completion pairs, as the harmful QA stream here.
- The run's `lora` section must stay at rank 0: the method has its own adapters.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxdefense.config import field
from jaxdefense.data.specs import StreamSpec
from jaxdefense.errors import ConfigError
from jaxdefense.models import lora_init, lora_merge
from jaxdefense.models.decoder import decoder_stack
from jaxdefense.models.lora import LORA_TARGETS
from jaxdefense.objective import STEP, Objective, concat_rows
from jaxdefense.registry import register_method

RETAIN_NORMS = ("l2", "squared")
TINY = 1e-30


def target_indices(fractions, num_layers: int) -> tuple[int, ...]:
    """Sorted distinct hidden indices clip(round(f·L), 1, L) (hidden 0 is the embedding output)."""
    return tuple(sorted({min(max(int(round(f * num_layers)), 1), num_layers) for f in fractions}))


def _wide(x):
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def safe_norm(x, axis=-1):
    """‖x‖₂ over `axis` with gradient 0 (not NaN) where x = 0."""
    sq = jnp.sum(jnp.square(_wide(x)), axis=axis)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def token_cosine(a, b):
    """cos(a, b) over the last axis, a zero vector giving 0."""
    dot = jnp.sum(_wide(a) * _wide(b), axis=-1)
    return dot / jnp.maximum(safe_norm(a) * safe_norm(b), TINY)


def truncated(params, depth: int):
    """params with only the first `depth` layers of the stack."""
    return {**params, "layers": jax.tree.map(lambda x: x[:depth], params["layers"])}


def hidden_states(cfg, params, batch, depth: int, lora=None):
    """Residual streams h_0..h_depth [depth+1, B, T, D] of the first `depth` layers."""
    cfg_d = dataclasses.replace(cfg, num_layers=depth)
    _, hidden = decoder_stack(cfg_d, truncated(params, depth), batch["input_ids"], batch.get("attention_mask"),
                              lora, return_hidden=True)
    return hidden


def layer_cosines(cfg, params_a, params_b, batch):
    """Mean cosine [L+1] over real tokens between the two models' hidden states h_0..h_L on batch."""
    ha = hidden_states(cfg, params_a, batch, cfg.num_layers)
    hb = hidden_states(cfg, params_b, batch, cfg.num_layers)
    mask = batch["attention_mask"].astype(jnp.float32)
    return jnp.sum(token_cosine(ha, hb) * mask, axis=(1, 2)) / jnp.maximum(jnp.sum(mask), 1.0)


@register_method("circuit_breakers")
@dataclasses.dataclass(frozen=True)
class CircuitBreakers(Objective):
    """Circuit Breakers (RR): LoRA trained on c_cb·ReLU(cos) of harmful reps + c_retain·retain distance.

    Hyperparameters: alpha (α, official 10), target_layers (fractions of depth, official
    10/32 and 20/32), total_steps (T of the schedule, official 150), retain_norm ("l2"
    official | "squared" seed), rank / lora_alpha / targets (official r16, α16, all linear),
    b_init_std (σ of B's N(0, σ²) init; official 0).
    """

    alpha: float = field(10.0, ge=0, doc="α of c_cb = α(1 − t/2T) and c_retain = α·t/2T")
    target_layers: tuple[float, ...] = field((10 / 32, 20 / 32), doc="target hidden states as fractions of depth")
    total_steps: int = field(150, ge=1, doc="T of the coefficient schedule (set to the run's steps)")
    retain_norm: str = field("l2", choices=RETAIN_NORMS, doc="per-token retain distance: ‖·‖ (official) or ‖·‖²")
    rank: int = field(16, ge=1, doc="LoRA rank")
    lora_alpha: float = field(16.0, gt=0, doc="LoRA alpha (scale lora_alpha/rank)")
    targets: tuple[str, ...] = field(LORA_TARGETS, doc="adapted weights")
    b_init_std: float = field(0.0, ge=0, doc="σ of the LoRA B init N(0, σ²); 0: PEFT's B = 0 (official), "
                                             "> 0 breaks the cos = 1 fixed point")

    def __post_init__(self):
        super().__post_init__()
        if not self.target_layers or any(not 0 < f <= 1 for f in self.target_layers):
            raise ConfigError(f"method.target_layers: fractions in (0, 1] required, got {list(self.target_layers)}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets:
            raise ConfigError(f"method.targets: unknown {unknown} (choose from {list(LORA_TARGETS)})")

    def streams(self) -> dict[str, StreamSpec]:
        """circuit_breaker: harmful QA (defender half); retain: benign instructions + refusals."""
        return {"circuit_breaker": StreamSpec("harmful_qa", half="defender"),
                "retain": StreamSpec("benign_instruct"),
                "refusal": StreamSpec("refusal", half="defender")}

    def layers(self) -> tuple[int, ...]:
        return target_indices(self.target_layers, self.require_cfg().num_layers)

    def depth(self) -> int:
        return max(self.layers())

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.rank

    def init(self, params, key):
        """(adapters {name: {a, b}} of layers 0..depth−1, {"base": params}); A ~ U(±1/√in), B = 0
        or, with b_init_std = σ > 0, B ~ N(0, σ²) (key fold_in(key, 1))."""
        cfg = dataclasses.replace(self.require_cfg(), num_layers=self.depth())
        dtype = jax.tree.leaves(params)[0].dtype
        adapters = lora_init(cfg, key, self.rank, self.lora_alpha, tuple(self.targets), dtype=dtype)["layers"]
        if self.b_init_std > 0:
            keys = jax.random.split(jax.random.fold_in(key, 1), len(adapters))
            adapters = {name: {"a": ab["a"], "b": self.b_init_std * jax.random.normal(k, ab["b"].shape, dtype)}
                        for k, (name, ab) in zip(keys, sorted(adapters.items()))}
        return adapters, {"base": params}

    def coefficients(self, step):
        """(c_cb, c_retain) at 0-based `step`: α(1 − t/2T), α·t/2T with t = step + 1."""
        progress = (jnp.asarray(step, jnp.float32) + 1.0) / (2.0 * self.total_steps)
        return self.alpha * (1.0 - progress), self.alpha * progress

    def retain_batch(self, batches) -> dict:
        return concat_rows(batches["retain"], batches["refusal"], ("retain", "refusal"))

    def losses(self, adapters, batches, frozen):
        """(L_RR, L_retain, aux) with aux per-row rr_rows, retain_rows and mean cosine per target."""
        cfg, base, depth, idx = self.require_cfg(), frozen["base"], self.depth(), jnp.asarray(self.layers())
        lora = {"layers": adapters, "scale": self.scale}
        cb, retain = batches["circuit_breaker"], self.retain_batch(batches)

        orig_cb = jax.lax.stop_gradient(hidden_states(cfg, base, cb, depth)[idx])
        new_cb = hidden_states(cfg, base, cb, depth, lora)[idx]
        m_cb = cb["attention_mask"].astype(jnp.float32)
        cos = token_cosine(new_cb, orig_cb)  # [targets, B, T]
        rr = jnp.sum(jax.nn.relu(cos) * m_cb, axis=0)
        n_cb = len(self.layers()) * jnp.sum(m_cb, axis=1)
        l_rr = jnp.sum(rr) / jnp.maximum(jnp.sum(n_cb), 1.0)

        orig_r = jax.lax.stop_gradient(hidden_states(cfg, base, retain, depth)[1:])
        new_r = hidden_states(cfg, base, retain, depth, lora)[1:]
        m_r = retain["attention_mask"].astype(jnp.float32)
        dist = safe_norm(new_r - orig_r)
        dist = dist if self.retain_norm == "l2" else jnp.square(dist)
        ret = jnp.sum(dist * m_r, axis=0)
        n_r = depth * jnp.sum(m_r, axis=1)
        l_retain = jnp.sum(ret) / jnp.maximum(jnp.sum(n_r), 1.0)

        aux = {"rr_rows": jnp.sum(rr, axis=1) / jnp.maximum(n_cb, 1.0),
               "retain_rows": jnp.sum(ret, axis=1) / jnp.maximum(n_r, 1.0),
               "cos": jnp.sum(cos * m_cb, axis=(1, 2)) / jnp.maximum(jnp.sum(m_cb), 1.0)}
        return l_rr, l_retain, aux

    def grad(self, params, batches, key=None, frozen=None):
        """∇_adapters [c_cb·L_RR + c_retain·L_retain]; metrics loss, l_rr, l_retain, c_cb, c_retain, cos_h*."""
        del key
        c_cb, c_retain = self.coefficients(batches.get(STEP, 0))

        def total(a):
            l_rr, l_retain, aux = self.losses(a, batches, frozen)
            return c_cb * l_rr + c_retain * l_retain, (l_rr, l_retain, aux)

        (loss, (l_rr, l_retain, aux)), grads = jax.value_and_grad(total, has_aux=True)(params)
        metrics = {"loss": loss, "l_rr": l_rr, "l_retain": l_retain, "c_cb": c_cb, "c_retain": c_retain}
        for j, layer in enumerate(self.layers()):
            metrics[f"cos_h{layer}"] = aux["cos"][j]
        return grads, metrics

    def export(self, params, frozen):
        """The base with the adapters merged into layers 0..depth−1 (the rest untouched)."""
        base, depth = frozen["base"], self.depth()
        top = lora_merge(truncated(base, depth), {"layers": params, "scale": self.scale})["layers"]
        layers = {name: (jnp.concatenate([top[name], w[depth:]], axis=0) if name in params else w)
                  for name, w in base["layers"].items()}
        return {**base, "layers": layers}
