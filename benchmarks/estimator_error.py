"""Accuracy of the cos-gradient estimators against the float64 exact gradient.

    python -m benchmarks.estimator_error [--quick] [--model smollm2-135m-instruct] --out DIR

For ∇_θ cos(∇L_a, ∇L_b) (SEAM's L_sd; jaxdefense.curvature.cosine_grad) it measures, over
ε ∈ {1, 3e-1, 1e-1, …, 1e-7}, precision ∈ {fp64, fp32, bf16, bf16 with the perturbed point
formed in fp32}, estimator ∈ {forward (SEAM), central, exact} and model state ∈ {init,
trained} on the tiny and small configs (--quick: tiny only, five ε, a short training run):

    rel_error = ‖est − g*‖/‖g*‖,   cosine = ⟨est, g*⟩/(‖est‖‖g*‖),   scale = ⟨est, g*⟩/‖g*‖²

where g* is the exact gradient computed in float64 from the same float32 weights and batches
(bf16 rows keep that truth, so they include the rounding of θ to bf16). "trained" is
AdamW on a mixture of two synthetic bigram-chain token distributions, a on token ids
[0, S) and b on [S, 2S) (S = min(V/2, 512)); the cosine is taken between a fresh batch of a
and one of b.

Theorem 1 (seed 000): ‖∇̂ − ∇‖ ≤ (ε/2)(L_a/‖g_a‖ + L_b/‖g_b‖) + O(ε²). L_a, L_b are
measured in float64 as ‖H(θ + δu)u − H(θ)u‖/δ along the estimator's own unit directions
u = δ̂_a, δ̂_b (δ = 1e-4) and, for reference, as the max over random unit pairs. The JSON
"bound" entry lists, per config/state and ε, the bound with the along-direction L (and the
(1 − c²) factor of ‖δ‖², see spectra.seam_bound) beside the observed fp64 forward error;
"bound_seed_form" drops the (1 − c²) factor, "bound_random_lipschitz" uses the random-pair L.
L is measured at radius 1e-4, so for ε ≳ 0.3 the bound misses the O(ε²) term, and at
ε ≲ 1e-7 float64 rounding (≈ u‖g‖/ε) exceeds the truncation error the theorem bounds.

--model NAME (a named pretrained model, e.g. smollm2-135m-instruct) studies that checkpoint
instead of the named configs, in its one state "pretrained" (no training): batch a is harmful
QA text (harmful_qa, SEAM's g_a stream), batch b benign instructions (benign_instruct, g_b),
each rendered with the model's chat template and cut to the first `seq` tokens (data root:
--data-dir / JAXDEFENSE_DATA_DIR / ../shared/data). Defaults sized to a 2-core CPU: batch
2 × 32 tokens, ε ∈ {1e-1, 1e-2, 1e-3, 1e-4}, precisions fp32, bf16, bf16+fp32_perturb (the
float64 truth and Lipschitz constants are still computed; fp64 rows are opt-in), one random
direction for the random-pair Lipschitz constant.

Writes DIR/estimator_error.json (rows, bound, best_eps, training, machine) and log-log
plots DIR/estimator_error.png (all precisions) and DIR/estimator_error_<precision>.png.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks._common import lm_batch, machine_info, markov_tokens, parse_args, write_json
from jaxdefense.curvature import cosine_grad, hessian_lipschitz, seam_bound
from jaxdefense.curvature._tree import tree_cast, tree_norm, tree_vdot
from jaxdefense.models import init_params, lm_loss, named_config

EPS_FULL = [1.0, 3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7]
EPS_QUICK = [1e-1, 1e-2, 1e-3, 1e-4, 1e-5]
PRECISIONS = {
    "fp64": (jnp.float64, None),
    "fp32": (jnp.float32, None),
    "bf16": (jnp.bfloat16, None),
    "bf16+fp32_perturb": (jnp.bfloat16, jnp.float32),
}
SHAPES = {"tiny": dict(batch=8, seq=32), "small": dict(batch=8, seq=64)}
QUICK_SHAPES = {"tiny": dict(batch=4, seq=16)}
TRAIN = {"tiny": dict(steps=300, lr=3e-3), "small": dict(steps=120, lr=1e-3)}
QUICK_TRAIN = {"tiny": dict(steps=40, lr=3e-3)}
TABLE_SEEDS = {"a": 11, "b": 22}
MODEL_SHAPE = dict(batch=2, seq=32)
MODEL_EPS = [1e-1, 1e-2, 1e-3, 1e-4]
MODEL_PRECISIONS = ["fp32", "bf16", "bf16+fp32_perturb"]
MODEL_STREAMS = {"a": "harmful_qa", "b": "benign_instruct"}


def load_pretrained(name: str):
    """(cfg, params as jax arrays, tokenizer) of a named pretrained model (`models.PRETRAINED`)."""
    from jaxdefense.models import load_gguf, load_gguf_tokenizer, pretrained_path

    path = pretrained_path(name)
    cfg, params = load_gguf(path)
    return cfg, jax.tree.map(jnp.asarray, params), load_gguf_tokenizer(path)


def text_tokens(tokenizer, stream: str, batch: int, seq: int, data_dir=None, skip: int = 0) -> np.ndarray:
    """[batch, seq] ids: the first `seq` tokens of chat-rendered (prompt, response) records of a
    data stream that have at least `seq` tokens, after skipping `skip` such records."""
    from jaxdefense.data.formatting import apply_chat
    from jaxdefense.data.streams import load_stream

    rows = []
    for record in load_stream(stream, "train", data_dir):
        text = apply_chat(tokenizer, record["prompt"], record.get("response"))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= seq:
            if skip:
                skip -= 1
                continue
            rows.append(ids[:seq])
            if len(rows) == batch:
                return np.asarray(rows, np.int64)
    raise SystemExit(f"estimator_error: stream {stream!r} has fewer than {batch} records of ≥ {seq} tokens")


def stream_tokens(cfg, stream: str, seed: int, batch: int, seq: int) -> np.ndarray:
    """Distribution a: a bigram chain on token ids [0, S); b: another chain on [S, 2S);
    S = min(V/2, 512)."""
    support = min(cfg.vocab_size // 2, 512)
    offset = 0 if stream == "a" else support
    return markov_tokens(seed, batch, seq, support, table_seed=TABLE_SEEDS[stream], offset=offset)


def _flat64(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def _compare(est: np.ndarray, truth: np.ndarray) -> dict:
    t2 = float(truth @ truth)
    dot = float(est @ truth)
    norm_est = float(np.linalg.norm(est))
    return {
        "rel_error": float(np.linalg.norm(est - truth) / np.sqrt(t2)),
        "cosine": dot / (norm_est * np.sqrt(t2)) if norm_est > 0 else 0.0,
        "scale": dot / t2,
        "abs_error": float(np.linalg.norm(est - truth)),
    }


def train(cfg, shape, steps, lr, seed=0):
    """AdamW on a 50/50 mixture of the two bigram distributions; returns (params, log)."""
    params = init_params(cfg, jax.random.key(seed))
    tx = optax.adamw(lr, weight_decay=0.0)
    opt_state = tx.init(params)
    loss = lambda p, b: lm_loss(cfg, p, b)

    @jax.jit
    def step(p, s, batch):
        value, grad = jax.value_and_grad(loss)(p, batch)
        updates, s = tx.update(grad, s, p)
        return optax.apply_updates(p, updates), s, value

    half = shape["batch"] // 2
    losses = []
    for i in range(steps):
        tokens = np.concatenate([
            stream_tokens(cfg, "a", 1000 + i, half, shape["seq"]),
            stream_tokens(cfg, "b", 5000 + i, shape["batch"] - half, shape["seq"]),
        ])
        params, opt_state, value = step(params, opt_state, lm_batch(tokens))
        losses.append(float(value))
    return params, {"steps": steps, "lr": lr, "loss_first": losses[0] if losses else None,
                    "loss_last": float(np.mean(losses[-10:])) if losses else None}


_FNS_CACHE = {}
_T0 = time.perf_counter()


def _estimator_fns(cfg, perturb_dtype):
    """({"forward", "central"}: jitted f(p, ba, bb, ε) with ε traced, exact: jitted f(p, ba, bb)).

    Cached per config (and perturb dtype for the finite differences), so each precision
    compiles each estimator once; "exact" ignores perturb_dtype and is shared.
    """
    loss = lambda p, b: lm_loss(cfg, p, b)
    pd_name = None if perturb_dtype is None else jnp.dtype(perturb_dtype).name
    if ("exact", cfg) not in _FNS_CACHE:
        _FNS_CACHE[("exact", cfg)] = jax.jit(lambda p, ba, bb: cosine_grad(loss, ba, loss, bb, p)[1])
    if ("fd", cfg, pd_name) not in _FNS_CACHE:
        _FNS_CACHE[("fd", cfg, pd_name)] = {
            est: jax.jit(lambda p, ba, bb, eps, est=est: cosine_grad(
                loss, ba, loss, bb, p, estimator=est, eps=eps, perturb_dtype=perturb_dtype)[1])
            for est in ("forward", "central")
        }
    return _FNS_CACHE[("fd", cfg, pd_name)], _FNS_CACHE[("exact", cfg)]


def lipschitz_constants(cfg, params64, batch_a, batch_b, quick):
    """fp64 (cos, ‖g_a‖, ‖g_b‖, L_a, L_b, L_a random, L_b random).

    L along each stream's own unit direction δ̂ (δ_a = ĝ_b − cĝ_a, δ_b = ĝ_a − cĝ_b) with
    radius 1e-4, and the max over random unit pairs (radius 1e-3). One compilation serves
    both streams.
    """
    key = ("lipschitz", cfg, quick)
    if key not in _FNS_CACHE:
        loss = lambda p, b: lm_loss(cfg, p, b)
        n_dirs = 1 if quick else 4
        _FNS_CACHE[key] = (
            jax.jit(jax.grad(loss)),
            jax.jit(lambda p, b, u, k: (
                hessian_lipschitz(loss, p, b, 1e-4, 1, k, u=u, v=u),
                hessian_lipschitz(loss, p, b, 1e-3, n_dirs, k),
            )),
        )
    grad_fn, lip_fn = _FNS_CACHE[key]
    g_a, g_b = grad_fn(params64, batch_a), grad_fn(params64, batch_b)
    norm_a, norm_b = float(tree_norm(g_a)), float(tree_norm(g_b))
    cos = float(tree_vdot(g_a, g_b)) / (norm_a * norm_b)
    d_a = jax.tree.map(lambda x, y: x / norm_b - cos * y / norm_a, g_b, g_a)
    d_b = jax.tree.map(lambda x, y: x / norm_a - cos * y / norm_b, g_a, g_b)
    along_a, rand_a = lip_fn(params64, batch_a, d_a, jax.random.key(7))
    along_b, rand_b = lip_fn(params64, batch_b, d_b, jax.random.key(8))
    return cos, norm_a, norm_b, float(along_a), float(along_b), float(rand_a), float(rand_b)


def study_state(config, state, cfg, params, batch_a, batch_b, eps_list, quick, precisions):
    rows = []
    with jax.enable_x64(True):
        params64 = tree_cast(params, jnp.float64)
        _, exact64 = _estimator_fns(cfg, None)
        truth = _flat64(exact64(params64, batch_a, batch_b))
        cos, norm_a, norm_b, lip_a, lip_b, rand_a, rand_b = lipschitz_constants(cfg, params64, batch_a, batch_b, quick)
    truth_norm = float(np.linalg.norm(truth))

    for precision in precisions:
        dtype, perturb_dtype = PRECISIONS[precision]
        with jax.enable_x64(precision == "fp64"):
            p = tree_cast(params, dtype)
            fd, exact = _estimator_fns(cfg, perturb_dtype)
            rows.append({"config": config, "state": state, "precision": precision, "estimator": "exact",
                         "eps": None, **_compare(_flat64(exact(p, batch_a, batch_b)), truth)})
            for estimator, fn in fd.items():
                for eps in eps_list:
                    est = _flat64(fn(p, batch_a, batch_b, eps))
                    rows.append({"config": config, "state": state, "precision": precision,
                                 "estimator": estimator, "eps": eps, **_compare(est, truth)})
        print(f"[estimator_error] {config}/{state}/{precision} done at {time.perf_counter() - _T0:.0f}s", flush=True)

    fwd64 = {r["eps"]: r["abs_error"] for r in rows
             if r["precision"] == "fp64" and r["estimator"] == "forward"}
    fwd32 = {r["eps"]: r["abs_error"] for r in rows
             if r["precision"] == "fp32" and r["estimator"] == "forward"}
    bound = {
        "cos": cos, "norm_a": norm_a, "norm_b": norm_b, "truth_norm": truth_norm,
        "lipschitz_a": lip_a, "lipschitz_b": lip_b,
        "lipschitz_random_a": rand_a, "lipschitz_random_b": rand_b,
        "eps": [], "bound": [], "bound_seed_form": [], "bound_random_lipschitz": [], "observed": [], "holds": [],
    }
    for eps in eps_list:
        b = float(seam_bound(eps, lip_a, lip_b, norm_a, norm_b, cos=cos))
        bound["eps"].append(eps)
        bound["bound"].append(b)
        bound["bound_seed_form"].append(float(seam_bound(eps, max(lip_a, rand_a), max(lip_b, rand_b), norm_a, norm_b)))
        bound["bound_random_lipschitz"].append(float(seam_bound(eps, rand_a, rand_b, norm_a, norm_b, cos=cos)))
        if eps in fwd64:
            bound["observed"].append(fwd64[eps])
            bound["holds"].append(fwd64[eps] <= b)
        if eps in fwd32:
            bound.setdefault("observed_fp32", []).append(fwd32[eps])
    return rows, bound


def best_eps(rows):
    best = {}
    for r in rows:
        if r["eps"] is None:
            continue
        key = f'{r["config"]}/{r["state"]}/{r["precision"]}/{r["estimator"]}'
        if key not in best or r["rel_error"] < best[key]["rel_error"]:
            best[key] = {"eps": r["eps"], "rel_error": r["rel_error"], "cosine": r["cosine"]}
    return best


def plot(rows, bounds, out_dir, precisions):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["config"], r["state"]) for r in rows})
    colours = {g: f"C{i}" for i, g in enumerate(groups)}

    def draw(ax, precision):
        for g in groups:
            for estimator, style in (("forward", "-o"), ("central", "--s")):
                pts = [(r["eps"], r["rel_error"]) for r in rows if (r["config"], r["state"]) == g
                       and r["precision"] == precision and r["estimator"] == estimator]
                if pts:
                    xs, ys = zip(*pts)
                    ax.loglog(xs, ys, style, color=colours[g], ms=3, lw=1, label=f"{g[0]}/{g[1]} {estimator}")
            exact = [r["rel_error"] for r in rows if (r["config"], r["state"]) == g
                     and r["precision"] == precision and r["estimator"] == "exact"]
            if exact:
                ax.axhline(max(exact[0], 1e-17), color=colours[g], ls=":", lw=1)
            b = bounds.get(f"{g[0]}/{g[1]}")
            if b:
                ax.loglog(b["eps"], np.array(b["bound"]) / b["truth_norm"], color=colours[g], lw=0.6, alpha=0.5)
        ax.set_title(f"{precision} (dotted: exact; thin: Theorem 1 bound / ‖g*‖)", fontsize=9)
        ax.set_xlabel("ε")
        ax.set_ylabel("‖est − g*‖ / ‖g*‖")
        ax.grid(True, which="both", alpha=0.3)

    for precision in precisions:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        draw(ax, precision)
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out_dir / f"estimator_error_{precision}.png", dpi=120)
        plt.close(fig)
    fig, axes = plt.subplots(1, len(precisions), figsize=(5 * len(precisions), 4.2), squeeze=False)
    for ax, precision in zip(axes[0], precisions):
        draw(ax, precision)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / "estimator_error.png", dpi=110)
    plt.close(fig)


def _extra_args(parser):
    parser.add_argument("--configs", type=lambda s: s.split(","), default=None, help="e.g. tiny,small")
    parser.add_argument("--precisions", type=lambda s: s.split(","), default=None,
                        help=f"subset of {','.join(PRECISIONS)}")
    parser.add_argument("--eps", type=lambda s: [float(x) for x in s.split(",")], default=None)
    parser.add_argument("--train-steps", type=int, default=None)
    parser.add_argument("--model", default=None, help="a named pretrained model, e.g. smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=None, help=f"with --model (default {MODEL_SHAPE['batch']})")
    parser.add_argument("--seq", type=int, default=None, help=f"with --model (default {MODEL_SHAPE['seq']})")
    parser.add_argument("--data-dir", default=None, help="data root (with --model)")


def study_model(args) -> dict:
    """The --model study: rows and bound of the pretrained checkpoint at one real-text batch pair."""
    eps_list = args.eps or MODEL_EPS
    precisions = args.precisions or MODEL_PRECISIONS
    shape = {"batch": args.batch or MODEL_SHAPE["batch"], "seq": args.seq or MODEL_SHAPE["seq"]}
    start = time.perf_counter()
    cfg, params, tokenizer = load_pretrained(args.model)
    batch_a = lm_batch(text_tokens(tokenizer, MODEL_STREAMS["a"], shape["batch"], shape["seq"], args.data_dir))
    batch_b = lm_batch(text_tokens(tokenizer, MODEL_STREAMS["b"], shape["batch"], shape["seq"], args.data_dir))
    print(f"[estimator_error] {args.model}: loaded at {time.perf_counter() - _T0:.0f}s", flush=True)
    rows, bound = study_state(args.model, "pretrained", cfg, params, batch_a, batch_b, eps_list, True, precisions)
    return {
        "benchmark": "estimator_error",
        "quick": args.quick,
        "model": args.model,
        "streams": MODEL_STREAMS,
        "eps": eps_list,
        "precisions": precisions,
        "shapes": {args.model: shape},
        "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "rows": rows,
        "bound": {f"{args.model}/pretrained": bound},
        "best_eps": best_eps(rows),
        "wall_s": time.perf_counter() - start,
        "machine": machine_info(),
    }


def main(argv=None):
    args = parse_args(__doc__.splitlines()[0], argv, extra=_extra_args)
    if args.model:
        data = study_model(args)
        write_json(args.out, "estimator_error", data)
        plot(data["rows"], data["bound"], args.out, data["precisions"])
        return data
    train_cfg = QUICK_TRAIN if args.quick else TRAIN
    configs = args.configs or list(train_cfg)
    eps_list = args.eps or (EPS_QUICK if args.quick else EPS_FULL)
    precisions = args.precisions or list(PRECISIONS)
    start = time.perf_counter()
    rows, bounds, training = [], {}, {}
    for config in configs:
        cfg, shape = named_config(config), (QUICK_SHAPES if args.quick else SHAPES)[config]
        steps = args.train_steps if args.train_steps is not None else train_cfg.get(config, TRAIN[config])["steps"]
        trained, training[config] = train(cfg, shape, steps, train_cfg.get(config, TRAIN[config])["lr"])
        print(f"[estimator_error] {config}: trained {steps} steps at {time.perf_counter() - _T0:.0f}s", flush=True)
        batch_a = lm_batch(stream_tokens(cfg, "a", 1, shape["batch"], shape["seq"]))
        batch_b = lm_batch(stream_tokens(cfg, "b", 2, shape["batch"], shape["seq"]))
        states = {"init": init_params(cfg, jax.random.key(0)), "trained": trained}
        for state, params in states.items():
            r, b = study_state(config, state, cfg, params, batch_a, batch_b, eps_list, args.quick, precisions)
            rows += r
            bounds[f"{config}/{state}"] = b
    data = {
        "benchmark": "estimator_error",
        "quick": args.quick,
        "eps": eps_list,
        "precisions": precisions,
        "shapes": {c: (QUICK_SHAPES if args.quick else SHAPES)[c] for c in configs},
        "training": training,
        "rows": rows,
        "bound": bounds,
        "best_eps": best_eps(rows),
        "wall_s": time.perf_counter() - start,
        "machine": machine_info(),
    }
    write_json(args.out, "estimator_error", data)
    plot(rows, bounds, args.out, precisions)
    return data


if __name__ == "__main__":
    main()
