"""Throughput of GRPO in the training loop: rollout tokens/s, update step time, the share of a
step spent sampling vs updating, and a check that rollouts compile once.

    python -m benchmarks.rl_throughput [--quick] [--configs tiny,small] --out DIR

Writes DIR/rl_throughput.json. For each config (random init; small: vocab 8192, d 256, 4
layers), it runs `jaxdefense.train.train` with the `harmful_grpo`-shaped GRPO objective of
`jaxdefense.rl` (entropy reward, no tokenizer: B prompts × K rollouts × N new tokens, no stop
token so every row samples the full budget) for `steps` steps and reports, over the steps
after the first (compilation):

    rollout_tokens_per_s = B·K·N / median(sampling time)      (`rl.rollout.sample`)
    rollout_pass_ms      = median(old/ref log-prob pass)        (`rl.rollout.rollout_pass`)
    update_ms            = median(step time) − median(collect time)
    sample_share         = median(collect time) / median(step time)

and the jit cache entries the run added to the sampler, the rollout pass and the loop's step
(each must be 1: no recompilation per step).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax

SHAPES = {"tiny": dict(batch=4, k=4, prompt=32, new=32), "small": dict(batch=4, k=4, prompt=64, new=64)}


class PromptStream:
    def __init__(self, vocab, batch, length):
        self.vocab, self.batch, self.length = vocab, batch, length

    def batch_at(self, step):
        rng = np.random.default_rng([7, step])
        ids = rng.integers(3, self.vocab, (self.batch, self.length)).astype(np.int32)
        loss = np.zeros(ids.shape, np.float32)
        loss[:, -1] = 1
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss}


def measure(name: str, steps: int) -> dict:
    from jaxdefense.models.generate import _generate_jit
    from jaxdefense.models import init_params, named_config
    from jaxdefense.rl import rollout as rollout_mod
    from jaxdefense.methods.tokenbuncher import TokenBuncher
    from jaxdefense.train import loop, train

    shape = SHAPES[name]
    cfg = named_config(name)
    params = init_params(cfg, jax.random.key(0))
    obj = TokenBuncher(cfg=cfg, k=shape["k"], max_new_tokens=shape["new"], benign_weight=0.0, warmup_steps=10**6)
    object.__setattr__(obj, "stop_tokens", lambda: ())  # no stop token: the full budget on every row
    trainable, frozen = obj.init(params, jax.random.key(1))
    timings: dict[str, list[float]] = {"sample": [], "pass": [], "collect": [], "step": []}
    real_sample, real_pass = rollout_mod.sample, rollout_mod.rollout_pass

    def timed(key, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            out = fn(*a, **kw)
            timings[key].append(time.perf_counter() - t)
            return out
        return wrapper

    import jaxdefense.rl.objective as obj_mod

    obj_mod.sample, obj_mod.rollout_pass = timed("sample", real_sample), timed("pass", real_pass)
    collect = timed("collect", obj.collect)
    step_times: list[float] = []
    t_prev = [None]

    def on_record(record):
        now = time.perf_counter()
        if t_prev[0] is not None:
            step_times.append(now - t_prev[0])
        t_prev[0] = now

    before = (_generate_jit._cache_size(), rollout_mod._rollout_pass._cache_size())
    try:
        train(trainable, obj.grad, {"harmful": PromptStream(cfg.vocab_size, shape["batch"], shape["prompt"])},
              optax.adamw(1e-4), frozen=frozen, steps=steps, collect=collect, log_every=1, progress=False,
              callbacks=[on_record])
    finally:
        obj_mod.sample, obj_mod.rollout_pass = real_sample, real_pass
    med = {k: statistics.median(v[1:]) for k, v in timings.items() if len(v) > 1}
    step = statistics.median(step_times[1:]) if len(step_times) > 1 else float("nan")
    tokens = shape["batch"] * shape["k"] * shape["new"]
    step_caches = [f._cache_size() for key, f in loop._JIT_CACHE.items() if key[0] == "step"]
    return {
        "config": name, **shape, "steps": steps,
        "rollout_tokens_per_s": tokens / med["sample"],
        "sample_ms": 1e3 * med["sample"], "rollout_pass_ms": 1e3 * med["pass"], "collect_ms": 1e3 * med["collect"],
        "step_ms": 1e3 * step, "update_ms": 1e3 * (step - med["collect"]),
        "sample_share": med["collect"] / step,
        "compilations": {"sampler": _generate_jit._cache_size() - before[0],
                         "rollout_pass": rollout_mod._rollout_pass._cache_size() - before[1],
                         "loop_step": step_caches[-1] if step_caches else None},
    }


def main(argv=None) -> int:
    if argv is None:
        from jaxdefense.allocator import tune_malloc

        tune_malloc()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="tiny config, 4 steps")
    parser.add_argument("--configs", default="tiny,small")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    from benchmarks._common import machine_info, write_json

    configs = ["tiny"] if args.quick else [c for c in args.configs.split(",") if c]
    steps = args.steps or (4 if args.quick else 8)
    rows = []
    for name in configs:
        row = measure(name, steps)
        rows.append(row)
        print(row, file=sys.stderr)
    ok = all(v == 1 for r in rows for v in r["compilations"].values() if v is not None)
    result = {"benchmark": "rl_throughput", "what": "GRPO in train(): host rollouts (collect) + jitted update",
              "statistic": "median over the steps after the first (wall)", "machine": machine_info(), "rows": rows,
              "compiled_once": ok}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"wrote {write_json(out, 'rl_throughput', result)}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
