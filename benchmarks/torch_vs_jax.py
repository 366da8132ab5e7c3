"""PyTorch + transformers vs jaxdefense: the SFT step, SEAM's estimator and the exact cosine gradient.

`python -m benchmarks.torch_vs_jax [--quick] [--model smollm2-135m-instruct [--model-shape 2x64] [--model-only]]
[--torch-compile] [--processes shared] [--alternations 2] --out DIR`

Three operations, each on the same weights (the jaxdefense params written with `save_hf` and
loaded by `transformers.AutoModelForCausalLM`, eager attention, float32) and the same token
batches, timed in interleaved rounds (medians after a warm-up call):

    sft_step      one AdamW step: forward + backward + update
                  (torch: loss.backward(); optimizer.step(); jax: train.loop.make_step of `sft`,
                  params and optimiser state donated as the training loop does)
    seam_forward  SEAM's one-sided finite-difference ∇cos(g_a, g_b), 4 gradient evaluations:
                  (1/ε)[(g_b(θ+ε(ḡ_a−cḡ_b)) − g_b)/‖g_b‖ + (g_a(θ+ε(ḡ_b−cḡ_a)) − g_a)/‖g_a‖]
                  (torch: in-place perturbation of the parameters as the official SeamTrainer;
                  jax: `curvature.cosine_grad(estimator="forward")`)
    exact_cos     the exact ∇cos(g_a, g_b) (torch: double backward through create_graph=True;
                  jax: `cosine_grad(estimator="exact")`, two forward-over-reverse HVPs)

The headline is jax / torch time per operation (goal ≤ 0.8, issue 13; docs/PERFORMANCE.md), and
with --torch-compile also jax / torch.compile for the SFT step where inductor works here.
Processes: by default ("separate") each stack runs in fresh worker processes of its own, the
two stacks alternating `--alternations` times (torch, jax, torch, jax, ...; each worker times
`--rounds` interleaved rounds of its three operations), and a median is taken over all rounds
of a stack. This is how a researcher runs either stack, and it keeps one stack's heap and
thread pool from shaping the other's timings: in one process, glibc's heap grown by one stack
serves the other's buffers without page faults, and torch's OpenMP threads spin between
calls. "shared" times both stacks interleaved in this one process. The agreement check (cos
and ‖∇cos‖ from both stacks) always runs in this process.
Configs: "small" (named_config, batch 8 × 128, the PERFORMANCE.md peer) and, with --model, a
named or HF model (e.g. SmolLM2-135M-Instruct at batch 4 × 128, --model-shape to change it). A
GGUF checkpoint (a pretrained name such as smollm2-135m-instruct, or a .gguf path) is loaded
by each stack on its own: jaxdefense through `models.load_gguf`, transformers through
`from_pretrained(dir, gguf_file=...)` (needs `gguf` and `accelerate`), so the agreement check
also compares the two dequantisations. Writes torch_vs_jax.json/.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks._common import (donated_step, lm_batch, machine_info, parse_args, time_interleaved, uniform_tokens,
                               write_json)

GOAL = 0.8
SHAPES = {"small": (8, 128), "quick": (2, 64), "model": (4, 128)}
EPS = 1e-3
LR = 1e-4


def _torch():
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    return torch


def torch_model(cfg, params, workdir: Path):
    """transformers' model of (cfg, params): written by save_hf, loaded with eager attention, float32."""
    import transformers

    from jaxdefense.models import save_hf

    torch = _torch()
    save_hf(cfg, jax.device_get(params), workdir)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        workdir, dtype=torch.float32, attn_implementation="eager")
    model.train()
    return model


def torch_model_from_gguf(path: Path):
    """transformers' own load of a GGUF file (dequantised to float32), eager attention."""
    import transformers

    torch = _torch()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager", local_files_only=True)
    model.train()
    return model


def torch_ops(model, batch_a: dict, batch_b: dict, compile_sft: bool = False) -> dict:
    """{name: (callable, ())} of the three operations in PyTorch (each returns None when done)."""
    torch = _torch()
    params = [p for p in model.parameters() if p.requires_grad]

    def tensors(batch):
        ids = torch.from_numpy(np.asarray(batch["input_ids"], np.int64))
        mask = torch.from_numpy(np.asarray(batch["attention_mask"], np.int64))
        labels = ids.masked_fill(torch.from_numpy(np.asarray(batch["loss_mask"])) == 0, -100)
        return ids, mask, labels

    a, b = tensors(batch_a), tensors(batch_b)

    def loss(m, t):
        ids, mask, labels = t
        return m(input_ids=ids, attention_mask=mask, labels=labels).loss

    optimizer = torch.optim.AdamW(params, lr=LR)

    def sft_step(m=model):
        optimizer.zero_grad(set_to_none=True)
        loss(m, a).backward()
        optimizer.step()

    def grads(t, create_graph=False):
        return torch.autograd.grad(loss(model, t), params, create_graph=create_graph)

    def norm(g):
        return torch.sqrt(sum((x * x).sum() for x in g))

    @torch.no_grad()
    def shift(direction, scale):
        for p, d in zip(params, direction):
            p.add_(d, alpha=scale)

    def seam_forward():
        g_a, g_b = grads(a), grads(b)
        n_a, n_b = norm(g_a), norm(g_b)
        c = sum((x * y).sum() for x, y in zip(g_a, g_b)) / (n_a * n_b)
        d_b = [x / n_a - c * y / n_b for x, y in zip(g_a, g_b)]  # ḡ_a − c ḡ_b: perturbs g_b
        d_a = [y / n_b - c * x / n_a for x, y in zip(g_a, g_b)]
        shift(d_b, EPS)
        g_b1 = grads(b)
        shift(d_b, -EPS)
        shift(d_a, EPS)
        g_a1 = grads(a)
        shift(d_a, -EPS)
        return [((yb - y) / n_b + (xa - x) / n_a) / EPS for x, y, xa, yb in zip(g_a, g_b, g_a1, g_b1)]

    def exact_cos():
        g_a, g_b = grads(a, True), grads(b, True)
        cos = sum((x * y).sum() for x, y in zip(g_a, g_b)) / (norm(g_a) * norm(g_b))
        return torch.autograd.grad(cos, params)

    def run(f):
        def call():
            f()
            return None
        return call

    def exact_cos_value():
        g_a, g_b = grads(a, True), grads(b, True)
        cos = sum((x * y).sum() for x, y in zip(g_a, g_b)) / (norm(g_a) * norm(g_b))
        return float(cos.detach()), torch.autograd.grad(cos, params)

    ops = {"sft_step": (run(sft_step), ()), "seam_forward": (run(seam_forward), ()), "exact_cos": (run(exact_cos), ()),
           "_exact_cos_value": (exact_cos_value, ())}
    if compile_sft:
        try:
            compiled = torch.compile(model)
            start = time.perf_counter()
            sft_step(compiled)
            ops["sft_step_compiled"] = (run(lambda: sft_step(compiled)), ())
            ops["_compile_s"] = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001 - inductor needs a working C++ toolchain
            ops["_compile_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return ops


def jax_ops(cfg, params, batch_a: dict, batch_b: dict) -> dict:
    """{name: (compiled fn, args)} of the three operations in jaxdefense."""
    from jaxdefense.curvature import cosine_grad
    from jaxdefense.methods import get_method
    from jaxdefense.models import lm_loss
    from jaxdefense.train.loop import make_step

    sft = get_method("sft").bind(cfg)
    optimizer = optax.adamw(LR)
    # as the training loop runs it: params and optimiser state donated (torch updates in place)
    step = jax.jit(make_step(sft.grad, optimizer), donate_argnums=(0, 1))
    own = jax.tree.map(jnp.copy, params)
    sft_step = donated_step(step, own, optimizer.init(own), {"train": batch_a}, None, jax.random.key(0), np.int32(0))

    def loss(p, batch):
        return lm_loss(cfg, p, batch)

    def cos_fn(estimator):
        return jax.jit(lambda p: cosine_grad(loss, batch_a, loss, batch_b, p, estimator=estimator, eps=EPS)[1])

    return {"sft_step": (sft_step, ()),
            "seam_forward": (cos_fn("forward").lower(params).compile(), (params,)),
            "exact_cos": (cos_fn("exact").lower(params).compile(), (params,))}


def agreement(model, cfg, params, batch_a, batch_b) -> dict:
    """cos(g_a, g_b) and ‖∇cos‖ from both stacks (exact, same weights and batches): they must agree."""
    from jaxdefense.curvature import cosine_grad, tree_norm
    from jaxdefense.models import lm_loss

    torch = _torch()
    loss_j = lambda p, b: lm_loss(cfg, p, b)  # noqa: E731
    cos_j, g_j, _ = jax.jit(lambda p: cosine_grad(loss_j, batch_a, loss_j, batch_b, p, estimator="exact"))(params)
    ops = torch_ops(model, batch_a, batch_b)
    cos_t, g_t = ops["_exact_cos_value"][0]()
    return {"cos": {"torch": cos_t, "jax": float(cos_j)},
            "grad_norm": {"torch": float(torch.sqrt(sum((x * x).sum() for x in g_t))), "jax": float(tree_norm(g_j))}}


def build(spec: dict):
    """(cfg, params, gguf path or None) of a config spec: {"named": "small"|"tiny"} or {"model": name or path}."""
    from jaxdefense.models import init_params, named_config

    if "named" in spec:
        cfg = named_config(spec["named"])
        return cfg, init_params(cfg, jax.random.key(0)), None
    from jaxdefense.config import ModelSection
    from jaxdefense.pipeline import build_model, model_dir

    model = spec["model"]
    section = ModelSection(path=model) if Path(model).exists() else ModelSection(name=model)
    cfg, params = build_model(section, 0)
    source = model_dir(section.path) if section.path is not None else None
    return cfg, jax.tree.map(jnp.asarray, params), source if source is not None and source.suffix == ".gguf" else None


def batches(cfg, shape) -> tuple[dict, dict]:
    b, t = shape
    return (lm_batch(uniform_tokens(0, b, t, 3, cfg.vocab_size)), lm_batch(uniform_tokens(1, b, t, 3, cfg.vocab_size)))


def load_torch(cfg, params, gguf: Path | None):
    if gguf is not None:
        return torch_model_from_gguf(gguf)
    with tempfile.TemporaryDirectory(prefix="torch_vs_jax-") as tmp:
        return torch_model(cfg, params, Path(tmp))


def stack_ops(stack: str, cfg, params, gguf, batch_a, batch_b, compile_sft: bool, model=None) -> tuple[dict, dict]:
    """({op: (fn, args)}, extras such as torch.compile's time) of one stack."""
    if stack == "jax":
        return jax_ops(cfg, params, batch_a, batch_b), {}
    fns = torch_ops(load_torch(cfg, params, gguf) if model is None else model, batch_a, batch_b, compile_sft)
    extra = {k[1:]: fns.pop(k) for k in list(fns) if k.startswith("_")}
    extra.pop("exact_cos_value")
    return fns, extra


def run_worker(job: dict, out: Path) -> None:
    """One stack's timings of one config in this process: out/worker.json = {"timings", "extra"}."""
    cfg, params, gguf = build(job["spec"])
    fns, extra = stack_ops(job["stack"], cfg, params, gguf, *batches(cfg, job["shape"]), job["compile_sft"])
    write_json(out, "worker", {"timings": time_interleaved(fns, job["rounds"]), "extra": extra})


def separate_timings(spec: dict, shape, rounds: int, compile_sft: bool, alternations: int) -> tuple[dict, dict]:
    """{"stack/op": timing} from fresh worker processes, torch and jax alternating `alternations`
    times; each stack's median and min are over the rounds of all its workers."""
    per_stack, extra = {"torch": [], "jax": []}, {}
    for _ in range(alternations):
        for stack in per_stack:
            job = {"spec": spec, "shape": list(shape), "stack": stack, "rounds": rounds, "compile_sft": compile_sft}
            with tempfile.TemporaryDirectory(prefix="torch_vs_jax-worker-") as tmp:
                subprocess.run([sys.executable, "-m", "benchmarks.torch_vs_jax", "--worker", json.dumps(job),
                                "--out", tmp], check=True, cwd=Path(__file__).resolve().parents[1])
                result = json.loads((Path(tmp) / "worker.json").read_text())
            per_stack[stack].append(result["timings"])
            extra.update(result["extra"])
    timings = {}
    for stack, workers in per_stack.items():
        for op in workers[0]:
            times = [t for w in workers for t in w[op]["times_s"]]
            cpu = [t for w in workers for t in w[op]["cpu_times_s"]]
            timings[f"{stack}/{op}"] = {
                "median_s": statistics.median(times), "min_s": min(times), "times_s": times,
                "cpu_median_s": statistics.median(cpu), "worker_medians_s": [w[op]["median_s"] for w in workers],
                "first_call_s": statistics.median(w[op]["first_call_s"] for w in workers)}
    return timings, extra


def measure(name: str, spec: dict, shape, rounds: int, compile_sft: bool, processes: str = "separate",
            alternations: int = 2) -> dict:
    cfg, params, gguf = build(spec)
    batch_a, batch_b = batches(cfg, shape)
    model = load_torch(cfg, params, gguf)
    check = agreement(model, cfg, params, batch_a, batch_b)
    if processes == "separate":
        del model
        timings, extra = separate_timings(spec, shape, rounds, compile_sft, alternations)
    else:
        fns_t, extra = stack_ops("torch", cfg, params, gguf, batch_a, batch_b, compile_sft, model=model)
        fns_j, _ = stack_ops("jax", cfg, params, gguf, batch_a, batch_b, compile_sft)
        timings = time_interleaved({**{f"torch/{k}": v for k, v in fns_t.items()},
                                    **{f"jax/{k}": v for k, v in fns_j.items()}}, rounds)
    ops = [k.split("/", 1)[1] for k in timings if k.startswith("jax/")]
    ratios = {op: timings[f"jax/{op}"]["median_s"] / timings[f"torch/{op}"]["median_s"] for op in ops}
    if "torch/sft_step_compiled" in timings:
        ratios["sft_step_vs_compiled"] = timings["jax/sft_step"]["median_s"] / timings["torch/sft_step_compiled"]["median_s"]
    b, t = shape
    return {"config": name, "batch": b, "seq": t, "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
            "processes": processes, "alternations": alternations if processes == "separate" else None,
            "timings": timings, "jax_over_torch": ratios,
            "sft_tokens_per_s": {k: b * t / timings[f"{k}/sft_step"]["median_s"] for k in ("jax", "torch")},
            "goal": GOAL, "met": {k: v <= GOAL for k, v in ratios.items()}, "agreement": check,
            "torch_weights": "transformers GGUF load" if gguf is not None else "save_hf of the jax params", **extra}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(len(results), 1)
    for i, (name, res) in enumerate(results.items()):
        ops = list(res["jax_over_torch"])
        ax.bar([j + i * width for j in range(len(ops))], [res["jax_over_torch"][o] for o in ops], width, label=name)
        ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(ops))])
        ax.set_xticklabels(ops, fontsize=8)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(GOAL, color="tab:green", lw=0.8, ls="--", label=f"goal {GOAL}")
    ax.set_ylabel("jaxdefense time / PyTorch time")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    def extra(p):
        p.add_argument("--model", default=None, help="also a named/HF model (e.g. smollm2-135m-instruct)")
        p.add_argument("--rounds", type=int, default=None, help="default 5, quick 2")
        p.add_argument("--torch-compile", action="store_true", help="also torch.compile's SFT step")
        p.add_argument("--model-shape", default=None, help="batch x seq for --model (default 4x128)")
        p.add_argument("--model-only", action="store_true", help="skip the small/tiny config")
        p.add_argument("--processes", choices=("separate", "shared"), default="separate",
                       help="each stack in its own worker processes (default), or both in this one")
        p.add_argument("--alternations", type=int, default=2, help="separate: worker pairs per config")
        p.add_argument("--worker", default=None, help=argparse.SUPPRESS)

    args = parse_args(__doc__.splitlines()[0], argv, extra)
    if args.worker is not None:
        run_worker(json.loads(args.worker), args.out)
        return {}
    if args.alternations < 1:
        raise SystemExit(f"--alternations: must be ≥ 1, got {args.alternations}")
    rounds = args.rounds or (2 if args.quick else 5)
    jobs = {}
    if not (args.model and args.model_only):
        name = "tiny" if args.quick else "small"
        jobs[name] = ({"named": name}, SHAPES["quick" if args.quick else "small"])
    if args.model:
        shape = SHAPES["model"] if args.model_shape is None else tuple(int(x) for x in args.model_shape.split("x"))
        jobs[args.model] = ({"model": args.model}, shape)
    results = {name: measure(name, spec, shape, rounds, args.torch_compile, args.processes, args.alternations)
               for name, (spec, shape) in jobs.items()}
    for k, r in results.items():
        print(f"[torch_vs_jax] {k}: " + ", ".join(f"{op} {v:.2f}x" for op, v in r["jax_over_torch"].items()),
              flush=True)
    data = {"benchmark": "torch_vs_jax", "quick": args.quick, "rounds": rounds, "machine": machine_info(),
            "torch": _torch().__version__, "configs": results}
    write_json(args.out, "torch_vs_jax", data)
    plot(results, args.out / "torch_vs_jax.png")
    return data


if __name__ == "__main__":
    main()
