"""What each defence's training step costs relative to one SFT step: wall time and planned peak memory.

`python -m benchmarks.method_cost [--quick] [--configs tiny,small,smollm2] --out DIR`. For every method (and attack) below, the
one training loop's step (`train.loop.make_step`: the objective's grad + AdamW update) is jitted
on the same model and batch shape, compiled once, then timed in interleaved rounds in one
process; peak memory is what XLA plans for that executable (`memory_analysis()`). Each stream a
method declares gets its own synthetic batch of the same shape (paired streams share the prompt
tokens), so an objective that reads three streams pays for three batches, as in a real run.

Config "smollm2" (not in the default set): the real SmolLM2-135M-Instruct (`models.load_gguf`,
vocabulary 49,152, 30 layers) at a CPU-sized batch of 2 × 64 tokens, prompt half / response
half. It times only what issue 15 asks, as ratios to one `value_and_grad` of the LM loss and
to the SFT step in the same run: the SFT step, SEAM's step with the forward and exact
estimators (β 1, official logit-lens L_ul), SEAM's forward step as it was before target-only
projection ("seam_forward_full_projection": every position of every hidden state through the
vocabulary, separate harmful passes for L_ul and g_a), one HVP (fwd_rev) and the exact
cosine gradient of the LM loss.

Targets (issue 9, checked on the small config; official numbers from the CTRAP paper):
    CTRAP (first order) ≤ 3.0× SFT time (official 2.8×) and ≤ 1.5× SFT memory (official 3.5×)
    SEAM (forward estimator) ≤ 5.0× SFT time
"""

from __future__ import annotations

import jax
import numpy as np
import optax

from benchmarks._common import compile_timed, compiled_memory, machine_info, parse_args, time_interleaved, write_json
from jaxdefense.models import init_params, named_config

SHAPES = {"tiny": {"batch": 4, "seq": 64}, "small": {"batch": 4, "seq": 128}}
REAL_MODELS = {"smollm2": ("smollm2-135m-instruct", {"batch": 2, "seq": 64})}
QUICK_SHAPES = {"tiny": {"batch": 4, "seq": 64}}
TARGETS = {"ctrap_time": 3.0, "ctrap_memory": 1.5, "seam_forward_time": 5.0}
OFFICIAL = {"ctrap_time": 2.8, "ctrap_memory": 3.5}


class SyntheticTokenizer:
    """What `Objective.prepare` may ask of a tokenizer, on a synthetic vocabulary: every word is id 7."""

    eos_token_id, pad_token_id, bos_token_id = 2, 0, 1

    def encode(self, text, add_special_tokens=False):
        return [7 for _ in str(text).split()] or [7]

    def __call__(self, text, add_special_tokens=False, **_):
        return {"input_ids": self.encode(text)}

    def convert_tokens_to_ids(self, tokens):
        return 7 if isinstance(tokens, str) else [7 for _ in tokens]

    def __len__(self):
        return 8


def objectives() -> dict:
    """label → unbound objective: every registered training method, and every attack that declares
    `cost_variants`, once per variant (class attribute: label suffix → hyperparameter overrides).
    SFT is the unit."""
    from jaxdefense.registry import ATTACKS, METHODS

    out = {}
    for registry, every in ((METHODS, True), (ATTACKS, False)):
        for name in registry.names():
            cls = registry.get(name)
            variants = getattr(cls, "cost_variants", None)
            if not getattr(cls, "trains", True) or (variants is None and not every):
                continue
            for suffix, overrides in (variants or {"": {}}).items():
                out[f"{name}_{suffix}" if suffix else name] = cls(**overrides)
    return {"sft": out.pop("sft"), **out}


def synthetic_batches(specs: dict, shape: dict, vocab: int, seed: int = 0) -> dict:
    """One batch per stream; a stream paired with another shares its prompt half and differs after it."""
    b, t = shape["batch"], shape["seq"]
    rng = np.random.default_rng(seed)
    prompt = t // 2
    out = {}
    for name, spec in specs.items():
        ids = rng.integers(3, vocab, size=(b, t)).astype(np.int32)
        partner = spec.pair_with
        if partner is not None and partner in out:
            ids[:, :prompt] = np.asarray(out[partner]["input_ids"])[:, :prompt]
        loss = np.zeros((b, t), np.float32)
        loss[:, prompt:] = 1.0
        out[name] = {"input_ids": ids, "attention_mask": np.ones((b, t), np.int32), "loss_mask": loss}
    return out


def measure_config(name: str, shape: dict, rounds: int) -> dict:
    from jaxdefense.train.loop import make_step

    cfg = named_config(name)
    params = init_params(cfg, jax.random.key(0))
    optimizer = optax.adamw(1e-4)
    fns, compile_s, memory = {}, {}, {}
    for label, objective in objectives().items():
        objective = objective.bind(cfg).prepare(SyntheticTokenizer())
        trainable, frozen = objective.init(params, jax.random.key(1))
        batches = synthetic_batches(objective.streams(), shape, cfg.vocab_size)
        if getattr(objective, "collects", False):  # RL: the update on one host-made rollout batch
            from jaxdefense.objective import STEP

            batches = objective.collect(trainable, {**batches, STEP: np.int32(0)}, jax.random.key(2), frozen)
            batches.pop(STEP, None)
        opt_state = optimizer.init(trainable)
        step = jax.jit(make_step(objective.grad, optimizer))
        args = (trainable, opt_state, batches, frozen, jax.random.key(2), np.int32(0))
        compiled, compile_s[label] = compile_timed(step, *args)
        fns[label] = (compiled, args)
        memory[label] = compiled_memory(compiled)
    timings = time_interleaved(fns, rounds)
    unit_t, unit_m = timings["sft"]["median_s"], memory["sft"].get("peak_bytes")
    return {
        "shape": shape,
        "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "timings": {k: {**v, "compile_s": compile_s[k]} for k, v in timings.items()},
        "time_ratio_to_sft": {k: v["median_s"] / unit_t for k, v in timings.items()},
        "cpu_time_ratio_to_sft": {k: v["cpu_median_s"] / timings["sft"]["cpu_median_s"] for k, v in timings.items()},
        "memory": memory,
        "memory_ratio_to_sft": {k: m["peak_bytes"] / unit_m for k, m in memory.items() if unit_m and "peak_bytes" in m},
        "streams": {k: list(o.streams()) for k, o in objectives().items()},
    }


def full_projection_seam(**hparams):
    """SEAM's step before target-only projection, for the before/after row: L_ul projects every
    position of every hidden state through the vocabulary (one [B,T,V] lens per state under
    jax.checkpoint), every CE reads the model's [B,T,V] logits, and g_a takes its own forward."""
    from jaxdefense.curvature import cosine_grad, tree_norm
    from jaxdefense.methods import SEAM
    from jaxdefense.methods.seam import logit_lens, masked_ce
    from jaxdefense.models import forward

    class FullProjectionSEAM(SEAM):
        def ce_loss(self, params, batch):
            logits = forward(self.cfg, params, batch["input_ids"], attention_mask=batch["attention_mask"])
            return masked_ce(logits, batch["input_ids"], batch["loss_mask"])

        def primary_loss(self, params, adversarial, alignment, benign=None):
            cfg, ids, mask = self.cfg, adversarial["input_ids"], adversarial["loss_mask"]
            logits, hidden = forward(cfg, params, ids, attention_mask=adversarial["attention_mask"], return_hidden=True)
            ce = masked_ce(logits, ids, mask)
            lens = jax.lax.map(jax.checkpoint(lambda h: masked_ce(logit_lens(cfg, params, h), ids, mask)), hidden[:-1])
            l_ul = -jax.numpy.log1p((2.0 * ce + jax.numpy.sum(lens)) / hidden.shape[0])
            l_up = self.ce_loss(params, alignment)
            return l_ul + self.alpha * l_up, (l_ul, l_up, ce)

        def grad(self, params, batches, key=None, frozen=None):
            adversarial, alignment, benign = self.masked_batches(batches)
            (loss, _), g_primary = jax.value_and_grad(self.primary_loss, has_aux=True)(params, adversarial, alignment)
            cos, g_sd, _ = cosine_grad(self.ce_loss, adversarial, self.ce_loss, benign, params,
                                       estimator=self.estimator, eps=self.eps)
            grads = jax.tree.map(lambda x, y: x + self.beta * y, g_primary, g_sd)
            return grads, {"loss": loss, "cos": cos, "grad_norm": tree_norm(grads)}

    return FullProjectionSEAM(**hparams)


def measure_real_model(model: str, shape: dict, rounds: int, ops=None) -> dict:
    """Issue 15's rows on a real checkpoint: see the module docstring (config "smollm2"); `ops`
    restricts them to those names (the units "sft" and "grad" are always measured)."""
    import jax.numpy as jnp

    from jaxdefense.config import ModelSection
    from jaxdefense.curvature import cosine_grad, hvp
    from jaxdefense.methods import SEAM, get_method
    from jaxdefense.models import lm_loss
    from jaxdefense.pipeline import build_model
    from jaxdefense.train.loop import make_step

    cfg, params = build_model(ModelSection(name=model), 0)
    params = jax.tree.map(jnp.asarray, params)
    optimizer = optax.adamw(1e-4)
    objectives_ = {"sft": get_method("sft"),
                   "seam_forward": SEAM(beta=1.0, estimator="forward"),
                   "seam_exact": SEAM(beta=1.0, estimator="exact"),
                   "seam_forward_full_projection": full_projection_seam(beta=1.0, estimator="forward")}
    keep = None if ops is None else {"sft", "grad", *ops}
    fns, compile_s, memory, masks = {}, {}, {}, {}
    for label, objective in objectives_.items():
        if keep is not None and label not in keep:
            continue
        objective = objective.bind(cfg).prepare(SyntheticTokenizer())
        batches = synthetic_batches(objective.streams(), shape, cfg.vocab_size)
        opt_state = optimizer.init(params)
        step = jax.jit(make_step(objective.grad, optimizer))
        args = (params, opt_state, batches, None, jax.random.key(2), np.int32(0))
        fns[label], compile_s[label] = compile_timed(step, *args)
        fns[label] = (fns[label], args)
        memory[label] = compiled_memory(fns[label][0])
        if label == "seam_forward":
            adversarial = objective.masked_batches(batches)[0]
            masks["seam_targets_per_row"] = np.asarray(adversarial["loss_mask"][:, 1:].sum(1)).tolist()
    lm = synthetic_batches({"a": _Spec(), "b": _Spec()}, shape, cfg.vocab_size, seed=3)
    loss = lambda p, b: lm_loss(cfg, p, b)  # noqa: E731
    v = jax.tree.map(lambda x: jnp.ones_like(x) * 1e-3, params)
    curvature_ops = {
        "grad": jax.jit(lambda p, ba, bb, v: jax.value_and_grad(loss)(p, ba)),
        "hvp_fwd_rev": jax.jit(lambda p, ba, bb, v: hvp(loss, p, ba, v, mode="fwd_rev")),
        "cos_exact": jax.jit(lambda p, ba, bb, v: cosine_grad(loss, ba, loss, bb, p, estimator="exact")),
    }
    for label, fn in curvature_ops.items():
        if keep is not None and label not in keep:
            continue
        args = (params, lm["a"], lm["b"], v)
        compiled, compile_s[label] = compile_timed(fn, *args)
        fns[label] = (compiled, args)
        memory[label] = compiled_memory(compiled)
    timings = time_interleaved(fns, rounds)
    unit_g, unit_s = timings["grad"]["median_s"], timings["sft"]["median_s"]
    before = timings.get("seam_forward_full_projection", {}).get("median_s", float("nan"))
    after = timings.get("seam_forward", {}).get("median_s", float("nan"))
    return {
        "model": model,
        "shape": shape,
        "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "vocab_size": cfg.vocab_size,
        "num_layers": cfg.num_layers,
        **masks,
        "timings": {k: {**t, "compile_s": compile_s[k]} for k, t in timings.items()},
        "time_ratio_to_grad": {k: t["median_s"] / unit_g for k, t in timings.items()},
        "time_ratio_to_sft": {k: t["median_s"] / unit_s for k, t in timings.items()},
        "seam_forward_step_before_over_after": before / after,
        "memory": memory,
        "memory_ratio_to_sft": {k: m["peak_bytes"] / memory["sft"]["peak_bytes"] for k, m in memory.items()
                                if "peak_bytes" in m and memory["sft"].get("peak_bytes")},
    }


class _Spec:
    pair_with = None


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "time_ratio_to_sft", "step time / SFT step"),
                           (axes[1], "memory_ratio_to_sft", "planned peak memory / SFT step")):
        width = 0.8 / len(results)
        for i, (config, res) in enumerate(results.items()):
            names = list(res[key])
            ax.bar([j + i * width for j in range(len(names))], [res[key][n] for n in names], width, label=config)
            ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(names))])
            ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("method_cost: one training step relative to SFT (same run)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    def extra(p):
        p.add_argument("--rounds", type=int, default=None, help="default 7, quick 3")
        p.add_argument("--real-ops", default=None,
                       help="comma-separated subset of the real-model rows (sft and grad always run)")
        p.add_argument("--configs", default=None,
                       help=f"comma-separated, of {', '.join([*SHAPES, *REAL_MODELS])} (default: tiny,small; quick: tiny)")

    args = parse_args(__doc__.splitlines()[0], argv, extra=extra)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    names = args.configs.split(",") if args.configs else list(shapes)
    for name in names:
        if name not in SHAPES and name not in REAL_MODELS:
            raise SystemExit(f"--configs: unknown config {name!r} (known: {', '.join([*SHAPES, *REAL_MODELS])})")
    rounds = args.rounds or (3 if args.quick else 7)
    results, real = {}, {}
    for name in names:
        if name in REAL_MODELS:
            model, shape = REAL_MODELS[name]
            real[name] = measure_real_model(model, shape, rounds,
                                            args.real_ops.split(",") if args.real_ops else None)
            print(f"[method_cost] {name}: " + ", ".join(
                f"{k} {v:.2f}x grad" for k, v in real[name]["time_ratio_to_grad"].items())
                + f"; SEAM forward step before/after target-only projection "
                  f"{real[name]['seam_forward_step_before_over_after']:.2f}x", flush=True)
            continue
        results[name] = measure_config(name, SHAPES[name], rounds)
        print(f"[method_cost] {name}: " + ", ".join(
            f"{k} {v:.2f}x time / {results[name]['memory_ratio_to_sft'].get(k, float('nan')):.2f}x memory"
            for k, v in results[name]["time_ratio_to_sft"].items()), flush=True)
    observed, checked = {}, None
    if results:
        checked = "small" if "small" in results else next(iter(results))
        r = results[checked]
        observed = {"seam_forward_time": r["time_ratio_to_sft"]["seam_forward"]}
        if "ctrap_first" in r["time_ratio_to_sft"]:
            observed["ctrap_time"] = r["time_ratio_to_sft"]["ctrap_first"]
            observed["ctrap_memory"] = r["memory_ratio_to_sft"].get("ctrap_first")
    data = {
        "benchmark": "method_cost",
        "quick": args.quick,
        "rounds": rounds,
        "machine": machine_info(),
        "configs": results,
        "real_models": real,
        "targets": {"config": checked, "target": TARGETS, "official": OFFICIAL, "observed": observed,
                    "met": {k: (observed[k] is not None and observed[k] <= TARGETS[k]) for k in observed}},
        "notes": "Step = grad + AdamW update of the one loop (make_step); memory is XLA's planned peak "
                 "(arguments + outputs + temporaries − aliased), so params and optimiser state are in every row.",
    }
    write_json(args.out, "method_cost", data)
    if results:
        plot(results, args.out / "method_cost.png")
    return data


if __name__ == "__main__":
    main()

