"""Speed of evaluation: `generate`'s prefill and decode tokens/s per batch size, and where an
`evaluate` call (what `jaxdefense eval` runs) spends its time.

    python -m benchmarks.eval_speed [--quick] [--model smollm2-135m-instruct] [--n 64] --out DIR

Writes DIR/eval_speed.json. `--model` is anything `model.path` accepts (a named pretrained model,
an HF or run directory, a .gguf file; default: the embedded base). Part 1, for each batch size B
(`--batches`, default 8,32,64), greedy `generate` on B uniform-random prompts of P = 64 tokens with
no stop token, N = `--new` new tokens and 2 new tokens, medians of interleaved rounds:

    prefill_tokens_per_s = B·P / t(2 new)            (the prompt pass and one decode step)
    decode_ms_per_step   = (t(N) − t(2)) / (N − 2),  decode_tokens_per_s = B / decode_ms_per_step

Part 2 runs `jaxdefense.eval.evaluate` with `EvalSettings(harmful_prompts=n, benign_prompts=n,
nll_rows=n)` (else the defaults: arc_easy 100 rows, 64 new tokens) on the data root, once to
compile and once timed, and reports its per-part timings and their shares of the total.
--quick: the embedded base, batches 8 and 32, n 8, one round.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from benchmarks._common import machine_info, parse_args, time_interleaved, uniform_tokens, write_json

PROMPT_TOKENS = 64


def load_model(path):
    """(cfg, params, tokenizer) of anything `model.path` accepts; None: the embedded base."""
    from jaxdefense import pipeline
    from jaxdefense.base_model import ASSET_DIR
    from jaxdefense.models import load_gguf, load_hf, load_tokenizer

    source = pipeline.model_dir(path if path is not None else ASSET_DIR)
    cfg, params = load_gguf(source) if source.suffix == ".gguf" else load_hf(source)
    return cfg, params, load_tokenizer(source)


def generation_speed(cfg, params, batches, new_tokens: int, rounds: int) -> dict:
    from jaxdefense.models import generate

    fns = {}
    for b in batches:
        ids = uniform_tokens(b, b, PROMPT_TOKENS, 3, cfg.vocab_size).astype(np.int32)
        for n in (2, new_tokens):
            fns[f"{b}/{n}"] = (lambda ids=ids, n=n: generate(cfg, params, ids, max_new_tokens=n), ())
    times = time_interleaved(fns, rounds)
    out = {}
    for b in batches:
        t2, tn = times[f"{b}/2"]["median_s"], times[f"{b}/{new_tokens}"]["median_s"]
        step = (tn - t2) / (new_tokens - 2)
        out[str(b)] = {"prefill_tokens_per_s": b * PROMPT_TOKENS / t2, "decode_ms_per_step": 1e3 * step,
                       "decode_tokens_per_s": b / step, "t_2_new_s": t2, f"t_{new_tokens}_new_s": tn,
                       "first_call_s": times[f"{b}/{new_tokens}"]["first_call_s"]}
    return out


def evaluation_speed(cfg, params, tokenizer, n: int, data_dir, generate_batch_size: int) -> dict:
    from jaxdefense.eval import EvalSettings, evaluate
    from jaxdefense.eval.judge import default_judge

    settings = EvalSettings(harmful_prompts=n, benign_prompts=n, nll_rows=n, generate_batch_size=generate_batch_size)
    judge = default_judge(data_dir)
    start = time.perf_counter()
    evaluate(settings, cfg, params, tokenizer, data_dir=data_dir, judge=judge)
    first = time.perf_counter() - start
    report = evaluate(settings, cfg, params, tokenizer, data_dir=data_dir, judge=judge)
    timings = report["timings"]
    total = timings["total"]
    return {"settings": {"n": n, "generate_batch_size": generate_batch_size, "mc": settings.mc,
                         "mc_n": settings.mc_n, "max_new_tokens": settings.max_new_tokens},
            "first_call_s": first, "total_s": total, "timings_s": timings,
            "shares": {k: v / total for k, v in timings.items() if k != "total"},
            "refusal_rate": report.get("refusal_rate"), "judge_harmful_rate": report.get("judge_harmful_rate")}


def main(argv=None) -> int:
    def extra(p):
        p.add_argument("--model", default=None, help="model.path: pretrained name, HF/run directory or .gguf")
        p.add_argument("--batches", default="8,32,64", help="generation batch sizes")
        p.add_argument("--new", type=int, default=34, help="new tokens of the long generation")
        p.add_argument("--n", type=int, default=64, help="eval prompts / NLL rows")
        p.add_argument("--rounds", type=int, default=3)
        p.add_argument("--data-dir", default=None)
        p.add_argument("--generate-batch-size", type=int, default=32)
        p.add_argument("--skip-eval", action="store_true")

    args = parse_args(__doc__.splitlines()[0], argv, extra)
    batches = [int(b) for b in args.batches.split(",")]
    if args.quick:
        args.model, batches, args.n, args.rounds = None, [8, 32], 8, 1
    cfg, params, tokenizer = load_model(args.model)
    result = {"machine": machine_info(), "model": args.model or "embedded base",
              "parameters": int(sum(x.size for x in jax.tree.leaves(params))),
              "generate": generation_speed(cfg, params, batches, args.new, args.rounds)}
    for b, row in result["generate"].items():
        print(f"batch {b:>3}: prefill {row['prefill_tokens_per_s']:8.0f} tok/s, decode {row['decode_ms_per_step']:7.1f} "
              f"ms/step = {row['decode_tokens_per_s']:7.1f} tok/s")
    if not args.skip_eval:
        from jaxdefense.data import resolve_data_root

        data_dir = resolve_data_root(args.data_dir)
        result["evaluate"] = ev = evaluation_speed(cfg, params, tokenizer, args.n, data_dir, args.generate_batch_size)
        print(f"evaluate n={args.n}: {ev['total_s']:.1f} s (first call {ev['first_call_s']:.1f} s); "
              + ", ".join(f"{k} {v:.0%}" for k, v in ev["shares"].items()))
    print(write_json(args.out, "eval_speed", result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
