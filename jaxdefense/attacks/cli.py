"""`jaxdefense attack`: harmful or benign SFT of a (defended) model, with curves vs attack step.

    jaxdefense attack --kind harmful_sft --model runs/seam --out runs/seam_attack \\
        [--lr 2e-4] [--steps 100] [--lora-rank 8] [--task sst2] [--config C] [--set k=v ...]
    jaxdefense attack --kind harmful_sft --model M --out D --sweep small   # one run per lr in D/lr_<lr>

--model is a Hugging Face directory or an immunize run directory (its hf/ export is used); the
tokenizer comes from the same directory unless `tokenizer` is set. The run directory holds
config.yaml, metrics.jsonl (train loss), eval.jsonl (benign/harmful NLL, refusal rate every
eval.every steps, from step 0), attack.json (summary, curves, task accuracy for sst2 / ag_news /
gsm8k), checkpoints/ and hf/ (the attacked model, LoRA merged).
Defaults are the official SEAM attack (AdamW lr 2e-5, weight decay 0.01, cosine, no clipping,
1000 harmful samples); `--sweep official|small` runs attacks.sft.lr_sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxdefense import config as C
from jaxdefense.attacks.sft import KINDS, OFFICIAL_HARMFUL_SAMPLES, check_kind_task
from jaxdefense.config import field
from jaxdefense.errors import ConfigError

SWEEPS = ("official", "small")


@dataclasses.dataclass
class LoraSection:
    rank: int = field(0, doc="0: full-parameter attack; r > 0: LoRA adapters of rank r")
    alpha: float = field(16.0)
    targets: list[str] = field(["wq", "wv"])


@dataclasses.dataclass
class AttackEvalSection:
    every: int = field(10, doc="evaluate every N steps (0: only at the start and the end)")
    n: int = field(32, doc="held-out rows for benign / harmful NLL")
    split: str = field("validation", choices=("validation", "test"))
    max_len: int = field(128)
    batch_size: int = field(8)
    refusal_prompts: int = field(8, doc="held-out harmful prompts for the refusal rate (0: off)")
    max_new_tokens: int = field(32)
    task_n: int = field(64, doc="test rows for the benign task's accuracy after tuning (0: off)")


@dataclasses.dataclass
class AttackConfig:
    kind: str = field("harmful_sft", choices=KINDS)
    task: str | None = field(None, doc="harmful_qa | benign_instruct, sst2, ag_news, gsm8k")
    model: str | None = field(None, doc="HF directory or immunize run directory")
    tokenizer: str | None = field(None, doc="tokenizer directory (default: the model's)")
    data_dir: str | None = field(None)
    half: str = field("attacker", choices=("all", "defender", "attacker"), doc="harmful_qa half (harmful_sft)")
    limit: int | None = field(OFFICIAL_HARMFUL_SAMPLES, doc="training records (official: 1000)")
    steps: int = field(100)
    batch_size: int = field(8)
    max_len: int = field(64)
    template: str = field("chat")
    optimizer: C.OptimizerSection = field(C.OptimizerSection(name="adamw", lr=2e-5, schedule="cosine",
                                                             weight_decay=0.01, clip=None))
    lora: LoraSection = field(LoraSection())
    eval: AttackEvalSection = field(AttackEvalSection())
    mesh: C.MeshSection = field(C.MeshSection())
    seed: int = field(0)
    log_every: int = field(10)
    compute_dtype: str | None = field(None, choices=C.DTYPES)
    export_hf: bool = field(True)

    def __post_init__(self):
        if self.steps < 0:
            raise ConfigError(f"steps: must be >= 0, got {self.steps}")
        if self.lora.rank < 0:
            raise ConfigError(f"lora.rank: must be >= 0, got {self.lora.rank}")
        self.task = check_kind_task(self.kind, self.task)


def model_dir(path: str | None) -> Path:
    """The HF directory behind --model: DIR itself, or DIR/hf for an immunize/attack run dir."""
    if path is None:
        raise ConfigError("--model: required (an HF directory or an immunize run directory)")
    p = Path(path)
    if (p / "hf" / "config.json").is_file():
        return p / "hf"
    if (p / "config.json").is_file():
        return p
    raise ConfigError(f"--model: {path!r} holds neither config.json nor hf/config.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=KINDS, default=None, help="harmful_sft (default) or benign_sft")
    parser.add_argument("--task", default=None, help="harmful_qa | benign_instruct, sst2, ag_news, gsm8k")
    parser.add_argument("--model", default=None, help="HF directory or immunize run directory")
    parser.add_argument("--out", required=True, help="run directory (must not exist or be empty)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (optimizer.lr)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (0: full-parameter)")
    parser.add_argument("--sweep", choices=SWEEPS, default=None,
                        help="run every lr of the official sweep or its small-model rescaling")
    parser.add_argument("--config", default=None, help="YAML attack config (optional)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--data-dir", default=None, help="data root")
    parser.add_argument("--no-progress", action="store_true")


def load_attack_config(args: argparse.Namespace) -> AttackConfig:
    flags = {"kind": args.kind, "task": args.task, "model": args.model, "optimizer.lr": args.lr,
             "steps": args.steps, "lora.rank": args.lora_rank, "data_dir": args.data_dir}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None]
    return C.load_config(args.config, AttackConfig, [*overrides, *(args.set or [])])


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {str(out)!r}: exists and is not an empty directory")


def run_one(config: AttackConfig, out: Path, *, progress: bool) -> dict:
    """One attack into `out`; returns the summary written to out/attack.json."""
    from jaxdefense.attacks.sft import EvalSettings, attack_records, run_sft_attack
    from jaxdefense.models import load_hf, load_tokenizer, save_hf
    from jaxdefense.train.run import build_mesh, check_vocab, make_optimizer

    src = model_dir(config.model)
    records = attack_records(config.kind, config.task, half=config.half, limit=config.limit,
                             data_dir=config.data_dir)
    cfg, params = load_hf(src, dtype=jnp.float32)
    tokenizer = load_tokenizer(config.tokenizer or src)
    check_vocab(tokenizer, cfg)
    mesh = build_mesh(config.mesh)
    optimizer = make_optimizer(config.optimizer, config.steps)
    out.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        C.dump_yaml(config, out / "config.yaml")
    e = config.eval
    settings = EvalSettings(every=e.every, n=e.n, split=e.split, max_len=e.max_len, batch_size=e.batch_size,
                            refusal_prompts=e.refusal_prompts, max_new_tokens=e.max_new_tokens, task_n=e.task_n)
    result = run_sft_attack(
        cfg, params, tokenizer, kind=config.kind, task=config.task, steps=config.steps, optimizer=optimizer,
        batch_size=config.batch_size, max_len=config.max_len, lora_rank=config.lora.rank,
        lora_alpha=config.lora.alpha, lora_targets=tuple(config.lora.targets), eval_settings=settings,
        run_dir=out, mesh=mesh, seed=config.seed, data_dir=config.data_dir, log_every=config.log_every,
        compute_dtype=config.compute_dtype, progress=progress, template=config.template, records=records,
    )
    summary = {**result.summary, "model": str(src), "lr": config.optimizer.lr, "curves": result.curves}
    if jax.process_index() == 0:
        (out / "attack.json").write_text(json.dumps(summary, indent=2) + "\n")
        if config.export_hf:
            save_hf(cfg, result.params, out / "hf", tokenizer=tokenizer)
    return summary


def _line(summary: dict) -> str:
    pre, post = summary.get("pre") or {}, summary.get("post") or {}
    parts = [f"{k} {pre[k]:.3f}→{post[k]:.3f}" for k in ("benign_nll", "harmful_nll", "refusal_rate")
             if k in pre and k in post]
    if "task_accuracy" in summary:
        parts.append(f"{summary['task']} accuracy {summary['task_accuracy_pre']:.3f}→{summary['task_accuracy']:.3f}")
    return "; ".join(parts)


def run(args: argparse.Namespace) -> int:
    from jaxdefense.attacks.sft import lr_sweep

    config = load_attack_config(args)
    model_dir(config.model)
    out = Path(args.out)
    _check_out(out)
    if args.sweep is None:
        summary = run_one(config, out, progress=not args.no_progress)
        print(f"{config.kind} ({config.task}, lr {config.optimizer.lr:g}, {config.steps} steps): {_line(summary)}; "
              f"run dir {out}")
        return 0
    lrs = lr_sweep(None if args.sweep == "official" else 3e-3)
    results = []
    for lr in lrs:
        one = dataclasses.replace(config, optimizer=dataclasses.replace(config.optimizer, lr=lr))
        summary = run_one(one, out / f"lr_{lr:g}", progress=not args.no_progress)
        results.append({k: v for k, v in summary.items() if k != "curves"})
        print(f"lr {lr:g}: {_line(summary)}")
    if jax.process_index() == 0:
        (out / "sweep.json").write_text(json.dumps({"sweep": args.sweep, "lrs": list(lrs), "runs": results},
                                                   indent=2) + "\n")
    print(f"sweep {args.sweep} ({len(lrs)} runs); run dir {out}")
    return 0
