"""Model FLOP utilisation of the SFT step and of SEAM's exact step (issue 13's accelerator figures).

    python -m benchmarks.mfu [--quick] [--config llama3.2-1b] [--batch 8] [--seq 2048]
        [--dtype bfloat16] [--remat dots-saveable] [--peak-tflops X] [--steps 10] --out DIR

Each operation is the one training loop's step (`train.loop.make_step`: the objective's grad and
an AdamW update, params and optimiser state donated), compute dtype `--dtype` over float32
master weights, on synthetic batches (prompt half, response half; `benchmarks.method_cost`):

    sft_step     SFT (every response token)
    seam_exact   SEAM with the exact estimator: L_ul + α L_up + β ∇cos(g_a, g_b) through two
                 forward-over-reverse products (methods/seam.py; official α 1, β 0.01, ε unused)

FLOPs per step are XLA's own count for the compiled executable (`cost_analysis()["flops"]`: 2·M·N·K
per dot, elementwise ops included): the count MFU uses. Beside it, the textbook count of the SFT
step, 6·N·T + 6·L·T·S·d (N: non-embedding weights plus the output projection, T = batch·seq
tokens, causal attention over S = seq keys counted in full), as a check on XLA's.

    achieved TFLOP/s = flops / median step time,   MFU = achieved / peak

Peak: `--peak-tflops`, else the dense bf16 (float32: TF32) figure of a known accelerator kind
(PEAK_TFLOPS, vendor data sheets; dense, no sparsity); on CPU or an unknown kind MFU is null.
Goals (issue 13): SFT ≥ 40%, SEAM-exact ≥ 35% on a ~1B Llama in bf16 on one GPU.
--quick: the tiny config at 2 × 32 tokens, 3 steps (a CPU smoke run).
"""

from __future__ import annotations

import jax
import numpy as np
import optax

from benchmarks._common import (compile_timed, compiled_memory, donated_step, machine_info, parse_args,
                               time_interleaved, write_json)

GOALS = {"sft_step": 0.40, "seam_exact": 0.35}
PEAK_TFLOPS = {  # dense, per chip: (bf16, float32 via TF32)
    "H200": (989.0, 494.0), "H100": (989.0, 494.0), "A100": (312.0, 156.0), "L40S": (362.0, 183.0),
    "A10": (125.0, 62.5), "TPU v5e": (197.0, 197.0), "TPU v5p": (459.0, 459.0), "TPU v4": (275.0, 275.0),
}


def peak_tflops(device, dtype: str) -> float | None:
    """The dense peak of `device` for compute `dtype` from PEAK_TFLOPS (None: CPU or unknown)."""
    kind = getattr(device, "device_kind", "")
    for name, (bf16, fp32) in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return bf16 if dtype == "bfloat16" else fp32
    return None


def textbook_sft_flops(cfg, batch: int, seq: int) -> float:
    """6·N·T + 6·L·T·S·d: forward and backward (×3) of every weight matmul and of the attention
    scores and values (2 matmuls of T·S·d per layer, causal mask not discounted)."""
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    qkv = d * cfg.head_dim * (cfg.num_heads + 2 * cfg.num_kv_heads)
    per_layer = qkv + cfg.num_heads * cfg.head_dim * d + 3 * d * f
    n = L * per_layer + d * cfg.vocab_size
    tokens = batch * seq
    return 6.0 * n * tokens + 6.0 * L * tokens * seq * cfg.num_heads * cfg.head_dim


def _objectives():
    from jaxdefense.methods import SEAM, get_method

    return {"sft_step": get_method("sft"), "seam_exact": SEAM(alpha=1.0, beta=0.01, estimator="exact")}


def measure(cfg, batch: int, seq: int, dtype: str, steps: int, peak: float | None) -> dict:
    from benchmarks.method_cost import SyntheticTokenizer, synthetic_batches
    from jaxdefense.models import init_params
    from jaxdefense.train.loop import make_step

    optimizer = optax.adamw(1e-5)
    rows = {}
    for label, objective in _objectives().items():
        objective = objective.bind(cfg).prepare(SyntheticTokenizer())
        batches = jax.device_put(synthetic_batches(objective.streams(), {"batch": batch, "seq": seq}, cfg.vocab_size))
        params = init_params(cfg, jax.random.key(0))
        step = jax.jit(make_step(objective.grad, optimizer, dtype), donate_argnums=(0, 1))
        args = (params, optimizer.init(params), batches, None, jax.random.key(1), np.int32(0))
        compiled, compile_s = compile_timed(step, *args)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", float("nan")))
        memory = compiled_memory(compiled)
        t = time_interleaved({"step": (donated_step(compiled, *args), ())}, steps)["step"]
        achieved = flops / t["median_s"] / 1e12
        rows[label] = {"step_s": t["median_s"], "min_step_s": t["min_s"], "compile_s": compile_s,
                       "xla_flops": flops, "achieved_tflops": achieved,
                       "mfu": None if peak is None else achieved / peak, "goal": GOALS[label],
                       "streams": list(objective.streams()), "memory": memory}
        del args, compiled
    rows["sft_step"]["textbook_flops"] = textbook_sft_flops(cfg, batch, seq)
    rows["sft_step"]["xla_over_textbook"] = rows["sft_step"]["xla_flops"] / rows["sft_step"]["textbook_flops"]
    rows["seam_exact_over_sft_flops"] = rows["seam_exact"]["xla_flops"] / rows["sft_step"]["xla_flops"]
    return rows


def main(argv=None) -> dict:
    def extra(p):
        p.add_argument("--config", default="llama3.2-1b", help="models.named_config name")
        p.add_argument("--batch", type=int, default=8)
        p.add_argument("--seq", type=int, default=2048)
        p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
        p.add_argument("--remat", default="dots-saveable", choices=("none", "dots-saveable", "everything"))
        p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak (default: PEAK_TFLOPS)")
        p.add_argument("--steps", type=int, default=10, help="timed steps after one warm-up call")

    args = parse_args(__doc__.splitlines()[0], argv, extra)
    from jaxdefense.models import named_config

    if args.quick:
        args.config, args.batch, args.seq, args.steps = "tiny", 2, 32, 3
    cfg = named_config(args.config, remat=args.remat)
    device = jax.devices()[0]
    peak = args.peak_tflops or peak_tflops(device, args.dtype)
    rows = measure(cfg, args.batch, args.seq, args.dtype, args.steps, peak)
    for label in GOALS:
        r = rows[label]
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(f"[mfu] {label}: {r['step_s'] * 1e3:.1f} ms/step, {r['xla_flops'] / 1e12:.2f} TFLOP/step (XLA), "
              f"{r['achieved_tflops']:.1f} TFLOP/s, MFU {mfu} (goal {r['goal']:.0%})", flush=True)
    data = {"benchmark": "mfu", "quick": args.quick, "config": args.config, "batch": args.batch, "seq": args.seq,
            "dtype": args.dtype, "remat": args.remat, "device_kind": getattr(device, "device_kind", ""),
            "peak_tflops": peak, "machine": machine_info(), "rows": rows}
    write_json(args.out, "mfu", data)
    return data


if __name__ == "__main__":
    main()
