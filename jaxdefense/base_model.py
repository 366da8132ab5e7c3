"""`jaxdefense build-base`: the small aligned base model the demo starts from (jaxdefense/assets/base).

Every phase is a run of the one pipeline (`pipeline.fit` with the `sft` objective and the one
optimiser builder) and a pure function of the build config (fixed seeds, fixed data order), so the same
config on the same software gives the same weights:

1. tokenizer — byte-level BPE (`data.train_bpe_tokenizer`, specials <pad>=0 <s>=1 </s>=2) on the
   pretraining text below;
2. pretrain — next-token loss on every token of packed sequences of *benign* text only:
   benign_instruct train (in the prompt template, so the model learns it), hh-rlhf harmless-base
   "chosen" dialogues whose last prompt is in the train split, GSM8K, SST-2 and AG News train
   text. No harmful response is ever trained on;
3. align — SFT (response tokens only) on a shuffled mix of benign instructions and harmful
   prompt → refusal pairs (refusal stream, train split), with the first response token's CE
   up-weighted (`align_grad`): greedy decoding decides refuse-or-comply there, and plain SFT
   left the tiny model refusing almost every benign prompt too;

then evaluation on held-out data (benign/harmful/refusal NLL, refusal rate on held-out harmful
prompts, over-refusal on benign prompts, judge harmful rate) and `save_hf` + tokenizer +
build_info.json.

Size knobs: `configs/base.yaml` holds the default (≈ 10–15 min on a 2-core CPU). `--minutes M`
turns the step counts into a wall-clock budget: pretrain/align steps are set from the measured
speed of the first steps, and build_info.json records the steps to reproduce the run exactly.
About an hour on a 2-core CPU gives a clearly better model:

    jaxdefense build-base --minutes 60 --set model.hidden_size=256 --set model.head_dim=64 \\
        --set model.intermediate_size=688 --set model.num_layers=6 --set model.vocab_size=4096
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import time
from pathlib import Path

import numpy as np

from jaxdefense.config import OptimizerSection, field, load_config, to_dict
from jaxdefense.data.formatting import PLAIN_TEMPLATE
from jaxdefense.errors import ConfigError, DataError
from jaxdefense.eval.settings import EvalSettings
from jaxdefense.jsonutil import to_jsonable

DEFAULT_OUT = "runs/base"
ASSET_DIR = Path(__file__).resolve().parent / "assets" / "base"
PROMPT_FORMAT = PLAIN_TEMPLATE + "{response}</s>"  # the tokenizer has no chat template: apply_chat uses this
MAX_ASSET_BYTES = 25 * 2**20
SUMMARY_KEYS = ("benign_nll", "harmful_nll", "refusal_nll", "uniform_nll", "refusal_rate", "benign_refusal_rate",
                "judge_harmful_rate", "distinct_2")


@dataclasses.dataclass
class ModelSpec:
    """Llama-architecture decoder shape (RMSNorm, RoPE, GQA, SwiGLU)."""

    vocab_size: int = field(2048, doc="BPE vocabulary (3 specials + 256 bytes + merges)")
    hidden_size: int = 160
    intermediate_size: int = 432
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 40
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    max_position_embeddings: int = 1024


@dataclasses.dataclass
class PhaseConfig:
    """One training phase: AdamW(b2=0.95) with linear warm-up then cosine decay, global-norm clip."""

    steps: int = field(100, ge=1)
    batch_size: int = field(32, ge=1)
    lr: float = field(1e-3, gt=0)
    warmup_steps: int = field(20, ge=0)
    final_lr_fraction: float = field(0.1, ge=0, le=1)
    weight_decay: float = field(0.1, ge=0)
    clip_norm: float = field(1.0, gt=0)

    def optimizer(self) -> OptimizerSection:
        """The phase's section for `train.optim.make_optimizer` (AdamW b1 0.9, b2 0.95, cosine)."""
        return OptimizerSection(name="adamw", lr=self.lr, schedule="cosine", warmup_steps=self.warmup_steps,
                                final_lr_fraction=self.final_lr_fraction, weight_decay=self.weight_decay,
                                clip=self.clip_norm, b1=0.9, b2=0.95)


@dataclasses.dataclass
class CorpusConfig:
    """What goes into pretraining (limits in records; None = all of the train split)."""

    benign_repeats: int = field(2, doc="copies of benign_instruct train (the held-out eval domain)")
    hh_chosen: bool = True
    gsm8k_limit: int | None = None
    sst2_limit: int | None = 8000
    ag_news_limit: int | None = None
    benign_limit: int | None = None


@dataclasses.dataclass
class AlignConfig:
    refusal_fraction: float = field(0.25, ge=0, lt=1, doc="share of harmful→refusal examples in the SFT mix")
    first_token_weight: float = field(5.0, ge=0, doc="extra weight w of the first response token's CE (0: plain SFT)")
    benign_limit: int | None = field(None, ge=1)


BASE_EVAL = EvalSettings(harmful_prompts=64, benign_prompts=32, nll_rows=128, split="test", max_new_tokens=48,
                         max_len=128, batch_size=32, mc=[], tasks=[], samples=4)


@dataclasses.dataclass
class BaseBuildConfig:
    seed: int = 0
    seq_len: int = 128
    compute_dtype: str | None = field(None, choices=(None, "float32", "bfloat16"))
    save_dtype: str = field("float32", choices=("float32", "bfloat16"))
    tokenizer_max_texts: int | None = field(None, doc="texts the BPE is trained on (None: all pretraining text)")
    model: ModelSpec = field(ModelSpec())
    corpus: CorpusConfig = field(CorpusConfig())
    pretrain: PhaseConfig = field(PhaseConfig(steps=600, batch_size=32, lr=3e-3, warmup_steps=30))
    align: PhaseConfig = field(PhaseConfig(steps=400, batch_size=24, lr=1e-3, warmup_steps=10, weight_decay=0.0))
    alignment: AlignConfig = field(AlignConfig())
    eval: EvalSettings = field(BASE_EVAL)


def model_config(spec: ModelSpec):
    from jaxdefense.models import ModelConfig

    return ModelConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_layers=spec.num_layers, num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, rms_norm_eps=1e-5, rope_theta=spec.rope_theta,
        tie_embeddings=spec.tie_embeddings, max_position_embeddings=spec.max_position_embeddings,
        family="llama", bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


# ---------------------------------------------------------------- corpora


def _plain(prompt: str, response: str) -> str:
    return PLAIN_TEMPLATE.format(prompt=prompt) + response


def _hh_chosen_dialogues(root: Path) -> list[str]:
    """hh-rlhf harmless-base chosen dialogues whose last Human turn falls in the train split."""
    from jaxdefense.data import hash_split
    from jaxdefense.data.readers import load_with_datasets
    from jaxdefense.data.sources import _split_hh_dialogue

    rows = load_with_datasets("json", [root / "hh_rlhf_harmless_base/test.jsonl.gz"])
    out = []
    for row in rows:
        text = row["chosen"].strip()
        prompt, _ = _split_hh_dialogue(row["chosen"])
        if text and prompt and hash_split(prompt) == "train":
            out.append(text)
    return out


def pretraining_texts(corpus: CorpusConfig, data_dir=None) -> list[tuple[str, str]]:
    """(source, text) pairs of benign pretraining text, in a fixed order (train splits only)."""
    from jaxdefense.data import load_stream, resolve_data_root

    texts = []
    benign = load_stream("benign_instruct", "train", data_dir, limit=corpus.benign_limit)
    for _ in range(corpus.benign_repeats):
        texts += [("benign_instruct", _plain(r["prompt"], r["response"])) for r in benign]
    if corpus.hh_chosen:
        texts += [("hh_rlhf_chosen", t) for t in _hh_chosen_dialogues(resolve_data_root(data_dir))]
    texts += [("gsm8k", f"{r['question']}\n{r['answer']}")
              for r in load_stream("gsm8k", "train", data_dir, limit=corpus.gsm8k_limit)]
    texts += [("sst2", r["sentence"]) for r in load_stream("sst2", "train", data_dir, limit=corpus.sst2_limit)]
    texts += [("ag_news", r["text"]) for r in load_stream("ag_news", "train", data_dir, limit=corpus.ag_news_limit)]
    texts = [(s, t) for s, t in texts if t.strip()]
    if not texts:
        raise DataError("build-base: no pretraining text found under the data root")
    return texts


def alignment_records(cfg: BaseBuildConfig, data_dir=None) -> list[dict]:
    """Benign instructions + harmful prompt → refusal pairs, refusal share `refusal_fraction`."""
    from jaxdefense.data import load_stream

    frac = cfg.alignment.refusal_fraction
    if not 0 <= frac < 1:
        raise ConfigError(f"alignment.refusal_fraction: must be in [0, 1), got {frac}")
    benign = load_stream("benign_instruct", "train", data_dir, limit=cfg.alignment.benign_limit)
    refusals = load_stream("refusal", "train", data_dir)
    want = int(round(len(benign) * frac / (1 - frac)))
    real = [r for r in refusals if not r.get("templated")]
    templated = [r for r in refusals if r.get("templated")]
    picked = (real + templated)[:want]
    return benign + picked


# ---------------------------------------------------------------- evaluation


def evaluate_base(cfg, params, tokenizer, ev: EvalSettings, data_dir=None, judge=None) -> dict:
    """`jaxdefense.eval.evaluate` (held-out benign/harmful NLL, refusal rate on held-out harmful
    prompts, over-refusal on benign prompts, judge harmful rate) plus the refusal-response NLL."""
    from jaxdefense.eval import evaluate, stream_nll

    report = evaluate(ev, cfg, params, tokenizer, data_dir=data_dir, judge=judge)
    report["refusal_nll"] = stream_nll(cfg, params, tokenizer, "refusal", data_dir=data_dir, n=ev.nll_rows,
                                       max_len=ev.max_len, batch_size=ev.batch_size)["nll"]
    report["uniform_nll"] = math.log(cfg.vocab_size)
    return report


# ---------------------------------------------------------------- build


PHASE_SEED_OFFSET = {"pretrain": 0, "align": 1}


def phase_config(cfg_build: BaseBuildConfig, name: str, steps: int | None = None):
    """The pipeline run config of phase `name` ("pretrain": packed raw text; "align": chat SFT)."""
    from jaxdefense.config import DataSection, StreamSection
    from jaxdefense.pipeline import RunConfig

    phase = getattr(cfg_build, name)
    steps = phase.steps if steps is None else steps
    pretrain = name == "pretrain"
    data = DataSection(batch_size=phase.batch_size, max_len=cfg_build.seq_len, template="raw" if pretrain else "chat",
                       streams={"train": StreamSection(options={"pack": True})} if pretrain else {})
    optimizer = dataclasses.replace(phase.optimizer(), warmup_steps=min(phase.warmup_steps, max(steps - 1, 0)))
    return RunConfig(data=data, optimizer=optimizer, steps=steps, seed=cfg_build.seed + PHASE_SEED_OFFSET[name],
                     log_every=max(1, steps // 20), compute_dtype=cfg_build.compute_dtype, export_hf=False)


def phase_objective(cfg_build: BaseBuildConfig, name: str):
    from jaxdefense.methods import SFT

    return SFT() if name == "pretrain" else SFT(first_token_weight=cfg_build.alignment.first_token_weight)


def _phase(cfg_build, name, model, tokenizer, records, progress: bool, steps: int | None = None):
    """(params, loss history) after phase `name`, through `pipeline.fit`."""
    from jaxdefense.pipeline import fit

    result = fit(phase_config(cfg_build, name, steps), phase_objective(cfg_build, name), None, model=model,
                 tokenizer=tokenizer, records={"train": records}, progress=progress)
    keys = ("loss", "first_ce")
    history = [{"step": r["step"], **{k: r[k] for k in keys if k in r}} for r in result.history]
    return result.params, history, result


def _step_seconds(cfg_build, name, model, tokenizer, records, probe_steps: int = 4) -> float:
    """Measured seconds per step of phase `name` (compile excluded): time of the last probe steps."""
    from jaxdefense.pipeline import fit

    config = dataclasses.replace(phase_config(cfg_build, name, probe_steps), log_every=1)
    result = fit(config, phase_objective(cfg_build, name), None, model=model, tokenizer=tokenizer,
                 records={"train": records}, progress=False)
    rates = [r["tokens_per_s"] for r in result.history[1:]]
    tokens = getattr(cfg_build, name).batch_size * cfg_build.seq_len
    return float(np.median([tokens / r for r in rates])) if rates else 1.0


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "machine": platform.machine()}
    for name in ("jax", "jaxlib", "flax", "optax", "tokenizers", "transformers", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    try:
        import jaxdefense

        out["jaxdefense"] = jaxdefense.__version__
    except Exception:  # noqa: BLE001
        pass
    return out


def _cast(params, dtype: str):
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)


def build_base(cfg_build: BaseBuildConfig, out_dir=DEFAULT_OUT, data_dir=None, *, minutes: float | None = None,
               progress: bool = False, evaluate: bool = True, log=print) -> dict:
    """Tokenizer → pretrain → align → evaluate → save; returns the build_info dict."""
    import tempfile

    import jax

    from jaxdefense.data import train_bpe_tokenizer
    from jaxdefense.models import init_params, save_hf

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    timings = {}
    texts = pretraining_texts(cfg_build.corpus, data_dir)
    tok_texts = [t for _, t in texts][: cfg_build.tokenizer_max_texts]
    with tempfile.TemporaryDirectory(prefix="jaxdefense-bpe-") as tmp:
        tokenizer = train_bpe_tokenizer(tok_texts, cfg_build.model.vocab_size, tmp)
    if len(tokenizer) != cfg_build.model.vocab_size:
        raise ConfigError(f"model.vocab_size: the corpus only supports {len(tokenizer)} BPE tokens, "
                          f"set model.vocab_size={len(tokenizer)} or less")
    timings["tokenizer_s"] = time.perf_counter() - t0
    log(f"build-base: tokenizer {len(tokenizer)} tokens on {len(tok_texts)} texts ({timings['tokenizer_s']:.0f} s)")

    cfg = model_config(cfg_build.model)
    seq = cfg_build.seq_len
    pre_records = [{"prompt": "", "response": t, "source": s, "id": f"{s}:{i}"} for i, (s, t) in enumerate(texts)]
    t = time.perf_counter()
    align_records = alignment_records(cfg_build, data_dir)
    pre_stream = phase_stream(cfg_build, "pretrain", tokenizer, pre_records)
    align_stream = phase_stream(cfg_build, "align", tokenizer, align_records)
    timings["tokenize_s"] = time.perf_counter() - t
    log(f"build-base: {len(pre_records)} pretraining texts → {pre_stream.num_rows} packed rows of {seq}; "
        f"{len(align_records)} alignment examples ({timings['tokenize_s']:.0f} s)")

    params = init_params(cfg, jax.random.key(cfg_build.seed))
    phase_records = {"pretrain": pre_records, "align": align_records}
    if minutes is not None:
        cfg_build = _fit_budget(cfg_build, minutes, time.perf_counter() - t0, (cfg, params), tokenizer,
                                phase_records, log)

    t = time.perf_counter()
    params, pre_hist, _ = _phase(cfg_build, "pretrain", (cfg, params), tokenizer, pre_records, progress)
    timings["pretrain_s"] = time.perf_counter() - t
    log(f"build-base: pretrained {cfg_build.pretrain.steps} steps ({timings['pretrain_s']:.0f} s), "
        f"loss {pre_hist[0]['loss']:.3f} → {pre_hist[-1]['loss']:.3f}")
    t = time.perf_counter()
    params, align_hist, _ = _phase(cfg_build, "align", (cfg, params), tokenizer, align_records, progress)
    timings["align_s"] = time.perf_counter() - t
    log(f"build-base: aligned {cfg_build.align.steps} steps ({timings['align_s']:.0f} s), "
        f"loss {align_hist[0]['loss']:.3f} → {align_hist[-1]['loss']:.3f}")

    params = _cast(params, cfg_build.save_dtype)
    metrics = {}
    if evaluate:
        t = time.perf_counter()
        metrics = evaluate_base(cfg, _cast(params, "float32"), tokenizer, cfg_build.eval, data_dir)
        timings["eval_s"] = time.perf_counter() - t
        log("build-base: " + ", ".join(f"{k} {metrics[k]:.3f}" for k in SUMMARY_KEYS if k in metrics))

    n_params = int(sum(x.size for x in jax.tree.leaves(params)))
    timings["total_s"] = time.perf_counter() - t0
    info = {
        "format": "jaxdefense base model v1",
        "prompt_format": PROMPT_FORMAT,
        "model": dataclasses.asdict(cfg_build.model) | {"family": "llama", "parameters": n_params},
        "build_config": to_dict(cfg_build),
        "minutes_budget": minutes,
        "pretrain": {"steps": cfg_build.pretrain.steps, "packed_rows": pre_stream.num_rows,
                     "texts": len(pre_records), "texts_by_source": _count(s for s, _ in texts),
                     "token_slots": cfg_build.pretrain.steps * cfg_build.pretrain.batch_size * seq,
                     "tokens_seen": tokens_seen(pre_stream, cfg_build.pretrain.steps),
                     "loss_history": pre_hist},
        "align": {"steps": cfg_build.align.steps, "examples": len(align_records),
                  "refusal_examples": sum("templated" in r for r in align_records),
                  "token_slots": cfg_build.align.steps * cfg_build.align.batch_size * seq,
                  "tokens_seen": tokens_seen(align_stream, cfg_build.align.steps),
                  "loss_history": align_hist},
        "eval": to_jsonable(metrics),
        "wall_time_s": timings,
        "versions": _versions(),
        "reproduce": "jaxdefense build-base --out DIR " + " ".join(
            f"--set {k}={v}" for k, v in (("pretrain.steps", cfg_build.pretrain.steps),
                                         ("align.steps", cfg_build.align.steps))),
    }
    save_hf(cfg, params, out_dir, tokenizer=tokenizer)
    out_dir.chmod(0o755)  # save_hf writes through a private temp dir; the asset ships readable
    for f in out_dir.iterdir():
        f.chmod(0o644)
    (out_dir / "build_info.json").write_text(json.dumps(to_jsonable(info), indent=2) + "\n")
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())
    info["asset_bytes"] = size
    (out_dir / "build_info.json").write_text(json.dumps(to_jsonable(info), indent=2) + "\n")
    if size > MAX_ASSET_BYTES and out_dir.resolve() == ASSET_DIR.resolve():
        log(f"build-base: warning: {out_dir} is {size / 2**20:.1f} MiB (> 25 MiB); use --set save_dtype=bfloat16")
    log(f"build-base: wrote {out_dir} ({size / 2**20:.1f} MiB, {n_params:,} parameters) in {timings['total_s']:.0f} s")
    return info


def tokens_seen(stream, steps: int) -> int:
    """Real (non-padding) tokens in the first `steps` batches of a stream."""
    return int(sum(int(stream.batch_at(i)["attention_mask"].sum()) for i in range(steps)))


def _count(items) -> dict:
    out: dict = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def _fit_budget(cfg_build, minutes, spent_s, model, tokenizer, records, log):
    """Steps that fill `minutes` in total: 80 % of the remaining time pretrains, 20 % aligns,
    after a fixed reserve for evaluation and saving (measured step times, compile excluded)."""
    if minutes <= 0:
        raise ConfigError(f"--minutes: must be > 0, got {minutes}")
    t_pre = _step_seconds(cfg_build, "pretrain", model, tokenizer, records["pretrain"])
    t_align = _step_seconds(cfg_build, "align", model, tokenizer, records["align"])
    reserve = 60.0 + 30.0  # compiles of the two real phases, evaluation, saving
    left = minutes * 60 - spent_s - reserve - 8 * (t_pre + t_align)
    if left <= 0:
        raise ConfigError(f"--minutes {minutes}: not enough time for any training on this machine")
    pre_steps = max(1, int(0.8 * left / t_pre))
    align_steps = max(1, int(0.2 * left / t_align))
    log(f"build-base: {minutes} min budget → {pre_steps} pretrain steps ({t_pre:.2f} s/step), "
        f"{align_steps} align steps ({t_align:.2f} s/step)")
    return dataclasses.replace(
        cfg_build,
        pretrain=dataclasses.replace(cfg_build.pretrain, steps=pre_steps,
                                     warmup_steps=min(cfg_build.pretrain.warmup_steps, pre_steps // 10 + 1)),
        align=dataclasses.replace(cfg_build.align, steps=align_steps,
                                  warmup_steps=min(cfg_build.align.warmup_steps, align_steps // 10 + 1)))


def phase_stream(cfg_build, name: str, tokenizer, records):
    """The "train" stream phase `name` trains on (the one `pipeline.fit` builds), for build_info."""
    from jaxdefense.data.specs import build_streams, resolve_streams

    config = phase_config(cfg_build, name)
    resolved = resolve_streams(phase_objective(cfg_build, name).streams(), config.data, name)
    return build_streams(resolved, {"train": records}, tokenizer, config.seed)["train"]


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"output HF directory (default {DEFAULT_OUT}; copy it to jaxdefense/assets/base to ship it)")
    parser.add_argument("--data-dir", default=None, help="data root (default: $JAXDEFENSE_DATA_DIR or ../shared/data)")
    parser.add_argument("--config", default=None, help="YAML build config (default: built-in = configs/base.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set model.hidden_size=256")
    parser.add_argument("--minutes", type=float, default=None,
                        help="wall-clock budget: choose the step counts from the measured step time")
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    parser.add_argument("--progress", action="store_true", help="show progress bars")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, BaseBuildConfig, args.overrides)
    if args.minutes is not None and not args.minutes > 0:
        raise ConfigError(f"--minutes: must be > 0, got {args.minutes}")
    build_base(cfg, args.out, args.data_dir, minutes=args.minutes, progress=args.progress,
               evaluate=not args.no_eval)
    return 0
