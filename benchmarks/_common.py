"""Shared benchmark helpers: CLI arguments, machine info and versions, interleaved median
timings, compiled peak memory, synthetic token batches and JSON/PNG output.

Timing rule (DESIGN.md): every timed function is compiled and run once (warm-up), then the
functions are called in interleaved rounds, so slow drift of a shared machine's load hits
all of them alike; the median of the rounds is reported, and comparisons are ratios of
medians from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense.allocator import jemalloc_loaded
from jaxdefense.jsonutil import to_jsonable


def parse_args(description: str, argv=None, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    """--quick and --out DIR (created), plus anything `extra` adds. A real run (argv None) first
    re-executes under jemalloc when it is installed, else with glibc huge pages where they apply
    (`jaxdefense.allocator.tune_malloc`; JAXDEFENSE_JEMALLOC=0 / JAXDEFENSE_HUGETLB=0: off)."""
    if argv is None:
        from jaxdefense.allocator import tune_malloc

        tune_malloc()
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny config only, < 2 min on 2 CPU cores")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def versions() -> dict:
    """Installed versions of the packages the numbers depend on."""
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "jaxdefense"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info() -> dict:
    """CPU model and flags, core count, load, memory, JAX backend/devices, XLA_FLAGS, versions."""
    cpu, flags, mem_kb = "", [], None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "memory_gib": None if mem_kb is None else round(mem_kb / 2**20, 1),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "jemalloc": jemalloc_loaded(),
        "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""),
        **{k: v for k, v in versions().items() if k != "python"},
    }


def block(x):
    return jax.block_until_ready(x)


def time_interleaved(fns: dict, rounds: int, *, warmup: int = 1) -> dict:
    """{name: {"median_s", "min_s", "times_s", "cpu_median_s", "cpu_times_s", "first_call_s"}}.

    fns = {name: (f, args)}. Each f is called warmup times (the first call includes
    compilation unless f is already compiled), then all fns are called once per round, in order, for `rounds` rounds.
    Wall time is the figure of record; process CPU time (all threads) is kept beside it
    because on a shared machine it is less sensitive to other processes' load.
    """
    result = {}
    for name, (fn, args) in fns.items():
        start = time.perf_counter()
        block(fn(*args))
        result[name] = {"first_call_s": time.perf_counter() - start, "times_s": [], "cpu_times_s": []}
        for _ in range(warmup - 1):
            block(fn(*args))
    for _ in range(rounds):
        for name, (fn, args) in fns.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            block(fn(*args))
            result[name]["times_s"].append(time.perf_counter() - start)
            result[name]["cpu_times_s"].append(time.process_time() - cpu_start)
    for entry in result.values():
        entry["median_s"] = statistics.median(entry["times_s"])
        entry["min_s"] = min(entry["times_s"])
        entry["cpu_median_s"] = statistics.median(entry["cpu_times_s"])
    return result


def donated_step(step, params, opt_state, *rest):
    """A no-argument call of a train step that donates its (params, opt_state) — `train.loop.make_step`
    jitted with donate_argnums=(0, 1), as the training loop runs it — carrying the updated pair from
    call to call; it returns the step's metrics. params and opt_state are consumed."""
    state = [params, opt_state]

    def call():
        new_params, new_opt_state, metrics, *_ = step(*state, *rest)
        state[:] = [new_params, new_opt_state]
        return metrics

    return call


def compile_timed(jitted, *args):
    """(`jitted.lower(*args).compile()`, seconds it took): compile once, then time and measure
    memory on the same executable."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def compiled_memory(compiled) -> dict:
    """Bytes from a compiled executable's `memory_analysis()`; peak = args + outputs + temps − aliased."""
    try:
        stats = compiled.memory_analysis()
    except Exception as exc:  # backends without memory analysis
        return {"error": f"{type(exc).__name__}: {exc}"}
    if stats is None:
        return {"error": "memory_analysis() returned None"}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes")
    out = {f: int(getattr(stats, f, 0) or 0) for f in fields}
    out["peak_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                         + out["temp_size_in_bytes"] - out["alias_size_in_bytes"])
    return out


def lm_batch(tokens: np.ndarray) -> dict:
    """A full-attention LM batch over int tokens [B, T]: every token after the first is a target."""
    b, t = tokens.shape
    loss_mask = np.ones((b, t), np.float32)
    loss_mask[:, 0] = 0.0
    return {
        "input_ids": jnp.asarray(tokens, jnp.int32),
        "attention_mask": jnp.ones((b, t), jnp.int32),
        "loss_mask": jnp.asarray(loss_mask),
    }


def uniform_tokens(seed: int, batch: int, seq: int, low: int, high: int) -> np.ndarray:
    """Uniform token ids in [low, high)."""
    return np.random.default_rng(seed).integers(low, high, size=(batch, seq), dtype=np.int64)


def markov_tokens(seed: int, batch: int, seq: int, support: int, *, table_seed: int, offset: int = 0,
                  stay: float = 0.9) -> np.ndarray:
    """Token ids offset + s_t of a sparse bigram chain on {0..support−1}: s_{t+1} = perm[s_t]
    with probability `stay`, else uniform.

    Different `table_seed`s (and offsets) give distinct token distributions whose loss falls
    well below log V under training: first the support (unigram), then the bigram table.
    """
    perm = np.random.default_rng(table_seed).permutation(support)
    rng = np.random.default_rng(seed)
    out = np.empty((batch, seq), np.int64)
    out[:, 0] = rng.integers(0, support, size=batch)
    for t in range(1, seq):
        jump = rng.random(batch) >= stay
        out[:, t] = np.where(jump, rng.integers(0, support, size=batch), perm[out[:, t - 1]])
    return out + offset


def write_json(out_dir: Path, name: str, data: dict) -> Path:
    """DIR/name.json via `jaxdefense.jsonutil.to_jsonable` (non-finite floats become null)."""
    path = Path(out_dir) / f"{name}.json"
    path.write_text(json.dumps(to_jsonable(data), indent=2, allow_nan=False))
    return path
