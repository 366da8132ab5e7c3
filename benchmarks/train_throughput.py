"""Tokens/s of the jitted SFT training step (AdamW), as the training loop runs it.

    python -m benchmarks.train_throughput [--quick] [--sweep] --out DIR

Writes DIR/train_throughput.json. For the tiny and small configs (small: vocab 8192, d 256,
4 layers, 8/2 heads, batch 8 × 128, docs/PERFORMANCE.md) and fp32 / bf16 compute (fp32
master weights), it times `jaxdefense.train.loop.make_step` — grads, AdamW update,
non-finite flags, grad norm — jitted with donated params/opt state, and reports

    tokens/s = batch · seq_len / median(step time)   (after warm-up)

plus `value_and_grad` alone for reference. `--allocators` times the small step under plain glibc
malloc, glibc with huge pages and jemalloc (those available; `jaxdefense.allocator`) in
alternating fresh processes. `--sweep` re-runs the small config in child
processes under XLA_FLAGS variants (flags must be set before jax starts) and reports each
as a ratio to the default flags measured in the same run.

On a shared machine wall times measure the neighbours. `step_cpu_ms` (process CPU time,
all threads) is robust to them; for wall figures, run in a raised-priority autogroup
(Linux; recorded under machine.scheduling):

    setsid bash -c 'echo -15 > /proc/self/autogroup; exec nice -n -15 \
        python -m benchmarks.train_throughput --out DIR'
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

BASELINES_TOK_S = {"prototype_fp32": 2330, "prototype_bf16": 3380, "pytorch_fp32": 3140, "goal": 3900}

SHAPES = {"tiny": dict(batch=8, seq=64), "small": dict(batch=8, seq=128)}

FLAG_VARIANTS = {
    "default": "",
    "no_multi_thread_eigen": "--xla_cpu_multi_thread_eigen=false",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "vector_width_512": "--xla_cpu_prefer_vector_width=512",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "onednn": "--xla_cpu_use_onednn=true",
    "no_thunk_runtime": "--xla_cpu_use_thunk_runtime=false",
    "ynn_eltwise_reduce": "--xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce",
    "xnn_graph_greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "concurrency_scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
}


def machine_info() -> dict:
    from benchmarks._common import machine_info as common_machine_info

    return {**common_machine_info(), "scheduling": _scheduling()}


def _scheduling() -> str:
    """Process nice and autogroup (a raised-priority run on a shared machine says so here)."""
    try:
        group = Path("/proc/self/autogroup").read_text().strip()
    except OSError:
        group = ""
    return f"nice {os.nice(0)}; {group}".strip("; ")


def _batch(cfg, batch: int, seq: int):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (batch, seq)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "loss_mask": np.ones(ids.shape, np.float32)}


def _median_time(fn, warmup: int, repeats: int) -> dict:
    """Seconds per call of fn() after `warmup` calls (`_common.time_interleaved`): median and
    min wall time, median process CPU time (all threads; a contention-robust measure of work),
    and the first call (compile)."""
    from benchmarks._common import time_interleaved

    t = time_interleaved({"fn": (fn, ())}, repeats, warmup=warmup)["fn"]
    return {"median": t["median_s"], "min": t["min_s"], "cpu": t["cpu_median_s"], "first": t["first_call_s"]}


def time_step(name: str, compute_dtype: str | None, repeats: int, warmup: int = 2) -> dict:
    import jax
    import optax

    from jaxdefense.models import init_params, lm_loss, named_config
    from jaxdefense.train.loop import make_step, sft_grad
    from benchmarks._common import donated_step

    cfg = named_config(name)
    shape = SHAPES[name]
    host = _batch(cfg, shape["batch"], shape["seq"])
    batches = {"train": jax.device_put(host)}
    optimizer = optax.adamw(1e-4)
    # step(params, opt_state, batches, frozen, base_key, step); SFT has no frozen tree
    step = jax.jit(make_step(sft_grad(cfg, "train"), optimizer, compute_dtype), donate_argnums=(0, 1))
    params = init_params(cfg, jax.random.key(0))
    run_step = donated_step(step, params, optimizer.init(params), batches, None, jax.random.key(0), 0)

    t = _median_time(run_step, warmup, repeats)
    tokens = shape["batch"] * shape["seq"]
    row = {"config": name, "compute_dtype": compute_dtype or "float32", **shape,
           "step_ms": 1e3 * t["median"], "tokens_per_s": tokens / t["median"],
           "step_ms_min": 1e3 * t["min"], "tokens_per_s_best": tokens / t["min"],
           "step_cpu_ms": 1e3 * t["cpu"], "first_call_s": t["first"], "load_average_1m": os.getloadavg()[0]}
    if compute_dtype is None:
        vg = jax.jit(jax.value_and_grad(lambda p, b: lm_loss(cfg, p, b)))
        params = init_params(cfg, jax.random.key(0))
        v = _median_time(lambda: jax.block_until_ready(vg(params, batches["train"])), warmup, repeats)
        row["value_and_grad_ms"] = 1e3 * v["median"]
        row["value_and_grad_cpu_ms"] = 1e3 * v["cpu"]
        row["step_over_value_and_grad_cpu"] = t["cpu"] / v["cpu"]
    return row


def measure(configs, repeats: int) -> list[dict]:
    rows = []
    for name in configs:
        for dtype in (None, "bfloat16"):
            row = time_step(name, dtype, repeats)
            print(f"  {name:5s} {row['compute_dtype']:8s} {row['step_ms']:8.1f} ms  "
                  f"{row['tokens_per_s']:9.0f} tok/s (best {row['tokens_per_s_best']:.0f}; "
                  f"cpu {row['step_cpu_ms']:.1f} ms; load {row['load_average_1m']:.1f})",
                  file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def sweep(repeats: int) -> dict:
    """Small-config step under each XLA_FLAGS variant, each in a fresh process."""
    results = {}
    base_flags = os.environ.get("XLA_FLAGS", "")
    for label, flags in FLAG_VARIANTS.items():
        env = {**os.environ, "XLA_FLAGS": f"{base_flags} {flags}".strip()}
        cmd = [sys.executable, "-m", "benchmarks.train_throughput", "--child", "--configs", "small",
               "--repeats", str(repeats)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            results[label] = {"flags": flags, "error": tail[:300]}
            print(f"  sweep {label}: failed ({tail[:120]})", file=sys.stderr)
            continue
        rows = json.loads(proc.stdout.strip().splitlines()[-1])
        results[label] = {"flags": flags, "rows": rows}
        print(f"  sweep {label}: " + ", ".join(f"{r['compute_dtype']} {r['tokens_per_s']:.0f} tok/s "
                                             f"cpu {r['step_cpu_ms']:.0f} ms" for r in rows),
              file=sys.stderr, flush=True)
    default = {r["compute_dtype"]: r for r in results.get("default", {}).get("rows", [])}
    for res in results.values():
        for r in res.get("rows", []):
            if r["compute_dtype"] in default:
                ref = default[r["compute_dtype"]]
                r["speedup_wall"] = ref["step_ms"] / r["step_ms"]
                r["speedup_cpu"] = ref["step_cpu_ms"] / r["step_cpu_ms"]
    return results


def _child(configs: str, repeats: int, env: dict) -> list[dict]:
    cmd = [sys.executable, "-m", "benchmarks.train_throughput", "--child", "--configs", configs, "--repeats", str(repeats)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["?"])[-1][:300])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def allocators(repeats: int, rounds: int = 2) -> dict:
    """The small-config step in fresh processes under plain glibc malloc, glibc with huge pages and
    jemalloc (those available; `jaxdefense.allocator`), alternating for `rounds` rounds; medians
    over rounds and each variant's speedup over plain glibc."""
    import statistics

    from jaxdefense.allocator import ENV, HUGETLB_ENV, MARKER, hugetlb_tunable, jemalloc_path

    clean = {k: v for k, v in os.environ.items() if k not in (MARKER, ENV, HUGETLB_ENV, "LD_PRELOAD", "GLIBC_TUNABLES")}
    variants = {"glibc": {**clean, ENV: "0", HUGETLB_ENV: "0"}}
    if hugetlb_tunable(clean) is not None:
        variants["glibc_hugetlb"] = {**clean, ENV: "0", HUGETLB_ENV: "1"}
    lib = jemalloc_path(clean)
    if lib is not None:
        variants["jemalloc"] = {**clean, ENV: lib}
    if len(variants) == 1:
        return {"error": "neither jemalloc (libjemalloc2, or JAXDEFENSE_JEMALLOC=PATH) nor glibc huge pages "
                         "(glibc >= 2.35, transparent_hugepage madvise/always) is available"}
    runs = {label: [] for label in variants}
    for _ in range(rounds):
        for label, env in variants.items():
            runs[label].append({r["compute_dtype"]: r for r in _child("small", repeats, env)})
    out = {"jemalloc_library": lib, "rounds": rounds}
    for label, rows in runs.items():
        out[label] = {dt: {k: statistics.median(r[dt][k] for r in rows) for k in ("step_ms", "step_cpu_ms", "tokens_per_s")}
                      for dt in rows[0]}
    out["speedup"] = {label: {dt: {"wall": out["glibc"][dt]["step_ms"] / out[label][dt]["step_ms"],
                                   "cpu": out["glibc"][dt]["step_cpu_ms"] / out[label][dt]["step_cpu_ms"]}
                              for dt in out["glibc"]} for label in variants if label != "glibc"}
    for label, per_dtype in out["speedup"].items():
        for dt, sp in per_dtype.items():
            print(f"  allocator {dt}: glibc {out['glibc'][dt]['step_ms']:.1f} ms, {label} {out[label][dt]['step_ms']:.1f} ms "
                  f"(wall ×{sp['wall']:.2f}, cpu ×{sp['cpu']:.2f})", file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    if argv is None:
        from jaxdefense.allocator import tune_malloc

        tune_malloc()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no sweep (< 2 min)")
    parser.add_argument("--sweep", action="store_true", help="also time XLA_FLAGS variants")
    parser.add_argument("--allocators", action="store_true",
                        help="also time glibc malloc vs glibc huge pages vs jemalloc (fresh processes, same run)")
    parser.add_argument("--configs", default="tiny,small")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    repeats = args.repeats or (5 if args.quick else 15)
    if args.child:
        print(json.dumps(measure(configs, repeats)))
        return 0
    info = machine_info()
    print(f"train_throughput: {info.get('cpu', '')} ({info.get('cores')} cores), load {info.get('load_average')}",
          file=sys.stderr)
    rows = measure(configs, repeats)
    result = {
        "benchmark": "train_throughput",
        "what": "jitted SFT step (grads + AdamW + non-finite flags), donated buffers, single device",
        "tokens_per_step": "batch * seq",
        "statistic": f"median of {repeats} steps after 2 warm-up steps (wall); min wall; median CPU time",
        "note": "the 2-core machine is shared: compare step_cpu_ms and load_average_1m before wall figures",
        "machine": info,
        "baselines_tok_s": BASELINES_TOK_S,
        "rows": rows,
    }
    small = {r["compute_dtype"]: r["tokens_per_s"] for r in rows if r["config"] == "small"}
    if small:
        result["small_vs_pytorch"] = {k: v / BASELINES_TOK_S["pytorch_fp32"] for k, v in small.items()}
        result["small_meets_goal"] = {k: v >= BASELINES_TOK_S["goal"] for k, v in small.items()}
    if args.sweep and not args.quick:
        result["xla_flags_sweep"] = sweep(max(5, repeats // 2))
    if args.allocators:
        result["allocators"] = allocators(max(5, repeats // 2))
    from benchmarks._common import write_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"wrote {write_json(out, 'train_throughput', result)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
