"""The run commands: `jaxdefense train | immunize | attack | eval`, each a thin layer over `pipeline`.

    jaxdefense immunize --config configs/seam_tiny.yaml --out runs/seam [--set method.beta=1] [--resume]
    jaxdefense attack --model runs/seam --out runs/seam_attack [--attack harmful_sft] [--lr 2e-4] [--sweep small]
    jaxdefense eval --model runs/seam --out runs/seam_eval [--n 64] [--set eval.max_new_tokens=32]
    jaxdefense train --config configs/sft_tiny.yaml --out runs/sft

Flags are shorthands for config keys (`--lr` is `optimizer.lr`, `--method` is `method.name`, ...);
`--set key=value` sets any key; `--import mod` (a module name or a .py file) registers a user's
own methods and attacks first. Errors: one line on stderr, exit code 2, nothing written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxdefense.errors import ConfigError



def attack_defaults() -> dict:
    """The official SEAM attack (ZJUWYH/seam: AdamW lr 2e-5, weight decay 0.01, cosine to 0, no
    clipping) with the held-out monitor's settings (`eval.settings.monitor_settings`)."""
    from jaxdefense import config as C
    from jaxdefense.eval.settings import monitor_settings

    return {"attack": {"name": "harmful_sft"},
            "optimizer": {"name": "adamw", "lr": 2e-5, "schedule": "cosine", "weight_decay": 0.01, "clip": None},
            "eval": C.to_dict(monitor_settings())}

SWEEPS = ("official", "small")


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """Multi-process flags (also read from JAXDEFENSE_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID)."""
    group = parser.add_argument_group("multi-process (jax.distributed)")
    group.add_argument("--coordinator-address", default=None, help="host:port of process 0")
    group.add_argument("--num-processes", type=int, default=None)
    group.add_argument("--process-id", type=int, default=None)


def add_run_arguments(parser: argparse.ArgumentParser, *, config_help: str = "YAML config (see configs/)",
                      set_example: str = "optimizer.lr=3e-4", resume: bool = True) -> None:
    """The arguments every config-driven command shares."""
    parser.add_argument("--config", default=None, help=config_help)
    parser.add_argument("--out", required=True, help="run directory")
    if resume:
        parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config key, e.g. --set {set_example} (repeatable)")
    parser.add_argument("--data-dir", default=None, help="data root (overrides data.dir)")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import a module (name or .py file) that registers methods/attacks (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_distributed_arguments(parser)


def _flags(args, mapping: dict[str, str]) -> list[str]:
    """`--set` items for the flags that were given (flag attribute → config key)."""
    out = []
    for attr, key in mapping.items():
        value = getattr(args, attr, None)
        if value is not None:
            out.append(f"{key}={value}")
    return out


def load(args, flags: dict[str, str], base: dict | None = None):
    """The RunConfig of a command: user modules imported, then base ← --config ← flags ← --set.
    With --resume on an existing run and no --config, the run's saved config is the start."""
    from jaxdefense import pipeline
    from jaxdefense.registry import import_modules
    from jaxdefense.train import distributed

    distributed.initialize_from_args(args)
    if hasattr(args, "resume"):
        pipeline.check_out(Path(args.out), args.resume)
    import_modules(args.imports)
    overrides = [*_flags(args, flags), *(args.set or [])]
    path = args.config
    saved = Path(args.out) / pipeline.CONFIG_FILE
    if path is None and getattr(args, "resume", False) and saved.is_file():
        path = saved
    return pipeline.load_run_config(path, overrides, base=base)


def _progress(args) -> bool:
    return not args.no_progress


def _shown(metrics: dict, keys=("loss", "l_ul", "l_up", "cos")) -> str:
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), float))


# ------------------------------------------------------------------------------- train / immunize


def train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default=None, help="objective (default sft), e.g. sft")
    add_run_arguments(parser)


def train_command(args) -> int:
    """Plain SFT: `immunize` with method sft unless the config names another."""
    from jaxdefense import pipeline

    config = load(args, {"method": "method.name"}, base={"method": {"name": "sft"}})
    result = pipeline.immunize(config, args.out, resume=args.resume, data_dir=args.data_dir,
                               progress=_progress(args))
    print(f"trained {config.steps} steps ({_shown(result.metrics)}); run dir {result.out}")
    return 0


def immunize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default=None, help="defence name (method.name), e.g. seam")
    add_run_arguments(parser, config_help="YAML config, e.g. configs/seam_tiny.yaml", set_example="method.beta=1")


def immunize_command(args) -> int:
    from jaxdefense import pipeline

    config = load(args, {"method": "method.name"})
    result = pipeline.immunize(config, args.out, resume=args.resume, data_dir=args.data_dir,
                               progress=_progress(args))
    steps = config.steps if config.method.trains else 0
    print(f"immunised with {config.method.name} for {steps} steps ({_shown(result.metrics)}); "
          f"run dir {result.out}" + (f"; HF export {result.out / pipeline.HF_DIR}" if config.export_hf else ""))
    return 0


# ------------------------------------------------------------------------------- attack

ATTACK_FLAGS = {"attack": "attack.name", "task": "attack.source", "model": "model.path", "lr": "optimizer.lr",
                "steps": "steps", "lora_rank": "lora.rank"}


def attack_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--attack", "--kind", dest="attack", default=None,
                        help="attack name (attack.name): harmful_sft (default), benign_sft, ...")
    parser.add_argument("--task", default=None, help="data stream trained on (attack.source): harmful_qa | "
                                                     "benign_instruct, sst2, ag_news, gsm8k")
    parser.add_argument("--model", default=None, help="HF directory or run directory (model.path)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (optimizer.lr)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (lora.rank; 0: full-parameter)")
    parser.add_argument("--sweep", choices=SWEEPS, default=None,
                        help="one run per lr of the official sweep or its small-model rescaling, in OUT/lr_<lr>")
    add_run_arguments(parser, config_help="YAML config (optional; defaults: the official SEAM attack)")


def _attack_line(summary: dict) -> str:
    pre, post = summary.get("pre") or {}, summary.get("post") or {}
    parts = [f"{k} {pre[k]:.3f}→{post[k]:.3f}" for k in ("benign_nll", "harmful_nll", "refusal_rate")
             if isinstance(pre.get(k), float) and isinstance(post.get(k), float)]
    if "task_accuracy" in summary:
        parts.append(f"{summary['task']} accuracy {summary['task_accuracy_pre']:.3f}→{summary['task_accuracy']:.3f}")
    return "; ".join(parts)


def attack_command(args) -> int:
    from jaxdefense import pipeline
    from jaxdefense.attacks import lr_sweep
    from jaxdefense.jsonutil import to_jsonable

    config = load(args, ATTACK_FLAGS, base=attack_defaults())
    if config.model is None or config.model.path is None:
        raise ConfigError("--model: required (an HF directory or a run directory)")
    pipeline.model_dir(config.model.path)
    out = Path(args.out)
    kw = dict(resume=args.resume, data_dir=args.data_dir, progress=_progress(args))
    if args.sweep is None:
        result = pipeline.attack(config, out, **kw)
        print(f"{config.attack.name} ({result.summary['task']}, lr {config.optimizer.lr:g}, {config.steps} steps): "
              f"{_attack_line(result.summary)}; run dir {out}")
        return 0
    import dataclasses

    pipeline.check_out(out, args.resume)
    lrs = lr_sweep(None if args.sweep == "official" else 3e-3)
    runs = []
    for lr in lrs:
        one = dataclasses.replace(config, optimizer=dataclasses.replace(config.optimizer, lr=lr))
        result = pipeline.attack(one, out / f"lr_{lr:g}", **kw)
        runs.append({k: v for k, v in result.summary.items() if k != "curves"})
        print(f"lr {lr:g}: {_attack_line(result.summary)}")
    (out / "sweep.json").write_text(json.dumps(to_jsonable({"sweep": args.sweep, "lrs": list(lrs), "runs": runs}),
                                               indent=2) + "\n")
    print(f"sweep {args.sweep} ({len(lrs)} runs); run dir {out}")
    return 0


# ------------------------------------------------------------------------------- eval

EVAL_FLAGS = {"model": "model.path", "n": "eval.harmful_prompts", "prompts": "eval.prompts_file",
              "judge": "eval.hf_judge",
              "max_new_tokens": "eval.max_new_tokens", "batch_size": "eval.batch_size"}


def eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF directory or run directory (model.path)")
    parser.add_argument("--n", type=int, default=None, help="harmful prompts (eval.harmful_prompts)")
    parser.add_argument("--prompts", default=None, help="harmful prompts file (eval.prompts_file): .jsonl/.json/.csv/.txt")
    parser.add_argument("--judge", default=None, help="local HF sequence classifier as a second judge (eval.hf_judge)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    add_run_arguments(parser, config_help="YAML config (optional: its eval section)", set_example="eval.nll_rows=32",
                      resume=False)


def eval_command(args) -> int:
    from jaxdefense import pipeline
    from jaxdefense.jsonutil import to_jsonable

    config = load(args, EVAL_FLAGS)
    report = pipeline.evaluate(config, args.out, data_dir=args.data_dir, progress=_progress(args))
    summary = {k: report.get(k) for k in ("refusal_rate", "benign_refusal_rate", "judge_harmful_rate", "harmful_nll",
                                          "benign_nll", "distinct_2", "entropy") if k in report}
    print(json.dumps(to_jsonable(summary)), file=sys.stdout)
    return 0
