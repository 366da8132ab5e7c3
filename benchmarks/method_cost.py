"""What each defence's training step costs relative to one SFT step: wall time and planned peak memory.

`python -m benchmarks.method_cost [--quick] --out DIR`. For every method (and attack) below, the
one training loop's step (`train.loop.make_step`: the objective's grad + AdamW update) is jitted
on the same model and batch shape, compiled once, then timed in interleaved rounds in one
process; peak memory is what XLA plans for that executable (`memory_analysis()`). Each stream a
method declares gets its own synthetic batch of the same shape (paired streams share the prompt
tokens), so an objective that reads three streams pays for three batches, as in a real run.

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
    args = parse_args(__doc__.splitlines()[0], argv,
                      extra=lambda p: p.add_argument("--rounds", type=int, default=None, help="default 7, quick 3"))
    shapes = QUICK_SHAPES if args.quick else SHAPES
    rounds = args.rounds or (3 if args.quick else 7)
    results = {}
    for name, shape in shapes.items():
        results[name] = measure_config(name, shape, rounds)
        print(f"[method_cost] {name}: " + ", ".join(
            f"{k} {v:.2f}x time / {results[name]['memory_ratio_to_sft'].get(k, float('nan')):.2f}x memory"
            for k, v in results[name]["time_ratio_to_sft"].items()), flush=True)
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
        "targets": {"config": checked, "target": TARGETS, "official": OFFICIAL, "observed": observed,
                    "met": {k: (observed[k] is not None and observed[k] <= TARGETS[k]) for k in observed}},
        "notes": "Step = grad + AdamW update of the one loop (make_step); memory is XLA's planned peak "
                 "(arguments + outputs + temporaries − aliased), so params and optimiser state are in every row.",
    }
    write_json(args.out, "method_cost", data)
    plot(results, args.out / "method_cost.png")
    return data


if __name__ == "__main__":
    main()

