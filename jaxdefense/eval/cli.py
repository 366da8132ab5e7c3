"""`jaxdefense eval --model DIR --out DIR [--prompts FILE] [--data-dir D] [--n N] [--judge HF_DIR]`.

Loads a HF checkpoint directory (config.json + safetensors + tokenizer), runs
`jaxdefense.eval.report.evaluate` and writes OUT/report.json, OUT/report.md and
OUT/report.png. Registered in jaxdefense/cli.py as module "jaxdefense.eval.cli"
(`add_arguments`, `run`); `add_eval_arguments` / `run_eval` are the same functions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxdefense.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF model directory (config.json, *.safetensors, tokenizer)")
    parser.add_argument("--out", required=True, help="output directory for report.json / report.md / report.png")
    parser.add_argument("--prompts", default=None,
                        help="harmful prompts file: .jsonl/.json ('prompt' field), .csv/.tsv ('prompt'/'goal'/'Behavior' "
                             "column) or .txt; default: the harmful_prompts_eval test split")
    parser.add_argument("--data-dir", default=None, help="data root (default: $JAXDEFENSE_DATA_DIR, then ../shared/data)")
    parser.add_argument("--n", type=int, default=64, help="number of harmful prompts (and benign prompts / NLL rows)")
    parser.add_argument("--judge", default=None, help="local HF sequence-classification directory used as a second judge")
    parser.add_argument("--judge-label", default="auto", help="its harmful label: index, name or 'auto'")
    parser.add_argument("--judge-template", default="{prompt}{response}", help="its input text from {prompt} and {response}")
    parser.add_argument("--harm-judge", default=None, help="saved HarmJudge directory (default: built-in, trained on demand)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=256, help="token length for NLL and multiple-choice rows")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mc", default="arc_easy", help="comma-separated multiple-choice streams ('' for none)")
    parser.add_argument("--n-mc", type=int, default=100)
    parser.add_argument("--tasks", default="", help="comma-separated downstream tasks (sst2, ag_news, gsm8k)")
    parser.add_argument("--n-task", type=int, default=50)
    parser.add_argument("--no-chat", action="store_true", help="feed prompts raw instead of through the chat template")


def run(args: argparse.Namespace) -> int:
    from jaxdefense.eval.judge import HarmJudge, HFClassifierJudge
    from jaxdefense.eval.prompts import load_prompt_file
    from jaxdefense.eval.report import _jsonable, evaluate, plot_comparison, write_report
    from jaxdefense.models import load_hf, load_tokenizer

    for name in ("n", "max_new_tokens", "batch_size", "max_len"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    prompts = load_prompt_file(args.prompts) if args.prompts else None
    cfg, params = load_hf(args.model)
    tokenizer = load_tokenizer(args.model)
    judge = HarmJudge.load(args.harm_judge) if args.harm_judge else None
    hf_judge = None
    if args.judge:
        label = int(args.judge_label) if args.judge_label.lstrip("-").isdigit() else args.judge_label
        hf_judge = HFClassifierJudge(args.judge, harmful_label=label, template=args.judge_template)
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    report = evaluate(cfg, params, tokenizer, data_dir=args.data_dir, n_prompts=args.n, prompts=prompts,
                      mc_tasks=split(args.mc), n_mc=args.n_mc, tasks=split(args.tasks), n_task=args.n_task,
                      max_new_tokens=args.max_new_tokens, max_len=args.max_len, batch_size=args.batch_size,
                      judge=judge, hf_judge=hf_judge, chat=not args.no_chat)
    report["model"] = str(Path(args.model).resolve())
    if args.prompts:
        report["config"]["prompt_file"] = str(Path(args.prompts).resolve())
    out = Path(args.out)
    write_report(out, report, title=f"Evaluation of {Path(args.model).name}")
    keys = [k for k in ("refusal_rate", "judge_harmful_rate", "hf_judge_harmful_rate", "distinct_2", "repetition")
            if isinstance(report.get(k), float)]
    if keys:
        plot_comparison({Path(args.model).name: report}, keys, out / "report.png", title="harmfulness and collapse")
    summary = {k: report.get(k) for k in ("refusal_rate", "judge_harmful_rate", "harmful_nll", "benign_nll",
                                          "distinct_2", "entropy") if k in report}
    print(json.dumps(_jsonable(summary)), file=sys.stdout)
    return 0


add_eval_arguments = add_arguments
run_eval = run


def eval_command(argv=None) -> int:
    """Stand-alone entry point with the same arguments (`python -m jaxdefense.eval.cli ...`)."""
    from jaxdefense.cli import main

    return main(["eval", *(sys.argv[1:] if argv is None else list(argv))])


if __name__ == "__main__":
    raise SystemExit(eval_command())
