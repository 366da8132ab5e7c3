"""Per-device memory of the real training step on a device mesh, planned by XLA on abstract shapes.

`python -m benchmarks.memory_plan --model llama3-8b --mesh fsdp=64 --method sft,seam-exact
--batch 64 --seq 1024 [--device-mem-gib 80] [--remat dots-saveable] --out DIR`

For each (model, method) the one training loop's step (`train.loop.make_step`: the objective's
grad at params cast to `--compute-dtype`, AdamW update of the `--param-dtype` master weights,
finite checks) is jitted with the loop's own in/out shardings (`train.sharding`: params,
optimiser state and frozen trees by the rules table, batches over data·fsdp), lowered on
`jax.ShapeDtypeStruct`s (nothing is allocated) over `data·fsdp·tensor` simulated CPU devices and
compiled; `compiled.memory_analysis()` gives per-device bytes:

    total = arguments + outputs + temporaries − aliased (donated params / optimiser state)

The largest global batch that fits `--device-mem-gib` is found by fitting total(B) = a + b·B on
two compiled batches (B0 = the batch divisor data·fsdp and 2·B0), predicting B*, and compiling
at B* (stepping down by the divisor until one fits), so the reported batch is a compiled fit,
not an extrapolation. Model shapes are the public HF config.json values; no weights are read.
`--quick` plans smollm2-135m SFT on fsdp=8 (< 2 min on 2 cores).
"""

from __future__ import annotations

import math
import sys
import time

import jax

GIB = 2 ** 30
METHOD_LABELS = {"sft": "sft", "seam-forward": "seam_forward", "seam-exact": "seam_exact",
                 "ctrap": "ctrap_first", "ctrap-first": "ctrap_first", "ctrap-exact": "ctrap_exact"}

# Public Hugging Face config.json values (no weights).
MODELS = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                      num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                      tie_embeddings=False, max_position_embeddings=8192, bos_token_id=128000,
                      eos_token_id=128001),
    "llama3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
                       num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                       tie_embeddings=False, max_position_embeddings=8192, bos_token_id=128000,
                       eos_token_id=128001),
    "qwen3-32b": dict(vocab_size=151936, hidden_size=5120, intermediate_size=25600, num_layers=64,
                      num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
                      tie_embeddings=False, qk_norm=True, family="qwen3", max_position_embeddings=40960,
                      bos_token_id=151643, eos_token_id=151645),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                         num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_embeddings=True, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2),
}


def parse_mesh(text: str) -> dict:
    """"data=2,fsdp=8,tensor=1" → {"data": 2, "fsdp": 8, "tensor": 1} (missing axes are 1)."""
    mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in mesh or not value.strip().isdigit():
            raise SystemExit(f"--mesh: expected data=..,fsdp=..,tensor=.., got {text!r}")
        mesh[name.strip()] = int(value)
    return mesh


def _extra(parser) -> None:
    parser.add_argument("--model", default="llama3-8b", help=f"comma list of {sorted(MODELS)}")
    parser.add_argument("--mesh", default="fsdp=64", help="data=..,fsdp=..,tensor=..")
    parser.add_argument("--method", default="sft", help=f"comma list of {sorted(METHOD_LABELS)}")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: data·fsdp)")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--device-mem-gib", type=float, default=80.0)
    parser.add_argument("--param-dtype", default="float32", help="master weights and optimiser state")
    parser.add_argument("--compute-dtype", default="bfloat16", help="params cast for the grad")
    parser.add_argument("--remat", default=None, help="ModelConfig.remat override (none|dots-saveable|everything)")
    parser.add_argument("--no-search", action="store_true", help="only the given batch, no max-batch search")


def model_config(name: str, remat: str | None = None):
    from jaxdefense.models import ModelConfig

    fields = dict(MODELS[name])
    if remat is not None:
        fields["remat"] = remat
    return ModelConfig(**fields)


def _objective(method: str, cfg):
    from benchmarks.method_cost import SyntheticTokenizer, objectives

    label = METHOD_LABELS.get(method, method.replace("-", "_"))
    table = objectives()
    if label not in table:
        raise SystemExit(f"--method: unknown {method!r}; known: {sorted(METHOD_LABELS)} or {sorted(table)}")
    return label, table[label].bind(cfg).prepare(SyntheticTokenizer())


def _abstract_batches(objective, batch: int, seq: int) -> dict:
    import jax.numpy as jnp

    def stream():
        return {"input_ids": jax.ShapeDtypeStruct((batch, seq), jnp.int32),
                "attention_mask": jax.ShapeDtypeStruct((batch, seq), jnp.int32),
                "loss_mask": jax.ShapeDtypeStruct((batch, seq), jnp.float32)}

    return {name: stream() for name in objective.streams()}


class StepPlanner:
    """The loop's jitted step for one (model, method, mesh), compiled on abstract shapes per batch."""

    def __init__(self, cfg, objective, mesh, param_dtype: str, compute_dtype: str):
        import jax.numpy as jnp

        from jaxdefense.config import OptimizerSection
        from jaxdefense.models import init_params
        from jaxdefense.train import sharding as shd
        from jaxdefense.train.loop import make_step
        from jaxdefense.train.optim import make_optimizer

        self.mesh, self.objective = mesh, objective
        params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), jnp.dtype(param_dtype)))
        trainable, frozen = jax.eval_shape(objective.init, params, jax.random.key(1))
        optimizer = make_optimizer(OptimizerSection(), 1000)
        opt_state = jax.eval_shape(optimizer.init, trainable)
        p_shard = shd.param_shardings(trainable, mesh)
        o_shard = shd.state_shardings(opt_state, trainable, p_shard, mesh)
        f_shard = shd.param_shardings(frozen, mesh) if frozen is not None else None
        self.b_shard, rep = shd.batch_sharding(mesh), shd.replicated(mesh)
        self.divisor = shd.batch_divisor(mesh)
        self.args = (trainable, opt_state, frozen)
        self.num_params = int(sum(math.prod(x.shape) for x in jax.tree.leaves(trainable)))
        self.step = jax.jit(
            _make_step(make_step, objective.grad, optimizer, compute_dtype, p_shard, mesh),
            in_shardings=(p_shard, o_shard, self.b_shard, f_shard, rep, rep),
            out_shardings=(p_shard, o_shard, rep, rep, rep),
            donate_argnums=(0, 1),
        )

    def plan(self, batch: int, seq: int) -> dict:
        import jax.numpy as jnp

        from benchmarks._common import compiled_memory

        batches = _abstract_batches(self.objective, batch, seq)
        key = jax.eval_shape(lambda: jax.random.key(2))
        start = time.perf_counter()
        compiled = self.step.lower(*self.args[:2], batches, self.args[2], key,
                                   jax.ShapeDtypeStruct((), jnp.int32)).compile()
        seconds = time.perf_counter() - start
        mem = compiled_memory(compiled)
        return {"batch": batch, "seq": seq, "compile_s": round(seconds, 1),
                **{k: mem.get(k) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                            "temp_size_in_bytes", "alias_size_in_bytes", "peak_bytes")}}


def _make_step(make_step, grad_fn, optimizer, compute_dtype, p_shard, mesh):
    import inspect

    if "mesh" in inspect.signature(make_step).parameters:
        return make_step(grad_fn, optimizer, compute_dtype, p_shard, mesh=mesh)
    return make_step(grad_fn, optimizer, compute_dtype, p_shard)


def max_batch(planner: StepPlanner, seq: int, limit_bytes: float, first: dict | None = None) -> dict:
    """Largest global batch (a multiple of the batch divisor) whose compiled total fits `limit_bytes`."""
    d = planner.divisor
    tried = {}
    a = dict(first) if first is not None and first["batch"] == d else planner.plan(d, seq)
    tried[d] = a
    if a["peak_bytes"] > limit_bytes:
        return {"max_batch": 0, "tried": list(tried.values())}
    b = planner.plan(2 * d, seq)
    tried[2 * d] = b
    slope = max((b["peak_bytes"] - a["peak_bytes"]) / d, 1.0)
    guess = int((limit_bytes - a["peak_bytes"]) / slope) + d
    guess = max(d, guess // d * d)
    for _ in range(6):
        if guess not in tried:
            tried[guess] = planner.plan(guess, seq)
        if tried[guess]["peak_bytes"] <= limit_bytes:
            break
        over = tried[guess]["peak_bytes"] - limit_bytes
        guess = max(d, guess - max(d, int(math.ceil(over / slope / d)) * d))
    fits = [bb for bb, r in tried.items() if r["peak_bytes"] <= limit_bytes]
    return {"max_batch": max(fits), "slope_bytes_per_row": slope, "tried": sorted(tried.values(), key=lambda r: r["batch"])}


def _gib(x):
    return None if x is None else round(x / GIB, 2)


def table(rows: list[dict]) -> str:
    head = ("model", "mesh", "method", "remat", "batch", "seq", "args GiB", "out GiB", "temp GiB", "total GiB",
            "fits", "max batch", "tok/dev")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1"
        m = r.get("max_batch")
        tok = None if m is None else m * r["seq"] // math.prod(r["mesh"].values())
        lines.append("| " + " | ".join(str(x) for x in (
            r["model"], mesh, r["method"], r["remat"], r["batch"], r["seq"], _gib(r["argument_size_in_bytes"]),
            _gib(r["output_size_in_bytes"]), _gib(r["temp_size_in_bytes"]), _gib(r["peak_bytes"]),
            r["fits"], "-" if m is None else m, "-" if tok is None else tok)) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    from benchmarks._common import machine_info, parse_args, write_json

    args = parse_args(__doc__.splitlines()[0], argv, extra=_extra)
    if args.quick:
        args.model, args.mesh, args.method, args.seq = "smollm2-135m", "fsdp=8", "sft", 256
    mesh_shape = parse_mesh(args.mesh)
    n = math.prod(mesh_shape.values())
    jax.config.update("jax_num_cpu_devices", max(n, 1))
    if jax.device_count() < n:
        raise SystemExit(f"--mesh needs {n} devices; the backend started with {jax.device_count()} "
                         "(run in a fresh process)")
    from jaxdefense.train.sharding import make_mesh

    mesh = make_mesh(**mesh_shape)
    limit = args.device_mem_gib * GIB
    rows = []
    for model in filter(None, args.model.split(",")):
        if model not in MODELS:
            raise SystemExit(f"--model: unknown {model!r}; known: {sorted(MODELS)}")
        cfg = model_config(model, args.remat)
        for method in filter(None, args.method.split(",")):
            label, objective = _objective(method, cfg)
            planner = StepPlanner(cfg, objective, mesh, args.param_dtype, args.compute_dtype)
            batch = args.batch or planner.divisor
            row = {"model": model, "method": method, "objective": label, "mesh": mesh_shape,
                   "remat": getattr(cfg, "remat", "none"), "num_params": planner.num_params,
                   "param_dtype": args.param_dtype, "compute_dtype": args.compute_dtype,
                   **planner.plan(batch, args.seq)}
            row["fits"] = row["peak_bytes"] <= limit
            if not args.no_search:
                search = max_batch(planner, args.seq, limit, {k: row[k] for k in ("batch", "seq", "compile_s", "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes", "peak_bytes")})
                row["max_batch"], row["search"] = search["max_batch"], search
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
    text = table(rows)
    print(text)
    data = {"benchmark": "memory_plan", "quick": args.quick, "argv": list(argv), "device_mem_gib": args.device_mem_gib,
            "machine": machine_info(), "rows": rows, "table": text,
            "notes": "Per-device bytes from XLA:CPU memory_analysis() of the compiled SPMD step over simulated "
                     "devices; total = arguments + outputs + temporaries − aliased (donated params and "
                     "optimiser state)."}
    write_json(args.out, "memory_plan", data)
    return data


if __name__ == "__main__":
    main()
