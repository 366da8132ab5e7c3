"""Evaluation: refusal matching, harmfulness judges, utility and collapse metrics, reports, the held-out monitor.

    from jaxdefense.eval import EvalSettings, evaluate, write_report
    report = evaluate(EvalSettings(harmful_prompts=64), cfg, params, tokenizer, data_dir=None, progress=bar)
    write_report("runs/x", report)      # report.json + report.md

    monitor = HeldOutMonitor(cfg, tokenizer, monitor_settings(), params_view=merge, path=run_dir / "eval.jsonl")
    train(..., callback=monitor, callback_every=monitor.every)
"""

from jaxdefense.eval.judge import HarmJudge, HFClassifierJudge, binary_metrics, default_judge
from jaxdefense.eval.labelled import LabelledResponse, load_labelled_responses
from jaxdefense.eval.metrics import (
    Generations,
    collapse_metrics,
    continuation_logprobs,
    distinct_n,
    generate_samples,
    generation_entropy,
    max_token_run,
    mc_accuracy,
    mc_scores,
    repetition_rate,
    response_nll,
    stream_nll,
    task_accuracy,
)
from jaxdefense.eval.monitor import HeldOutMonitor
from jaxdefense.eval.prompts import load_prompt_file
from jaxdefense.eval.refusal import (
    GCG_REFUSAL_PREFIXES,
    JBB_REFUSAL_SUBSTRINGS,
    REFUSAL_SUBSTRINGS,
    REFUSAL_WINDOW,
    is_refusal,
    refusal_flags,
    refusal_rate,
)
from jaxdefense.eval.report import (
    Progress,
    comparison_markdown,
    evaluate,
    plot_comparison,
    plot_curves,
    plot_metrics,
    report_markdown,
    write_report,
)
from jaxdefense.eval.settings import EvalSettings, monitor_settings

__all__ = [
    "EvalSettings", "GCG_REFUSAL_PREFIXES", "Generations", "HFClassifierJudge", "HarmJudge", "HeldOutMonitor",
    "JBB_REFUSAL_SUBSTRINGS", "LabelledResponse", "Progress", "REFUSAL_SUBSTRINGS", "REFUSAL_WINDOW", "binary_metrics",
    "collapse_metrics", "comparison_markdown", "continuation_logprobs", "default_judge", "distinct_n", "evaluate",
    "generate_samples", "generation_entropy", "is_refusal", "load_labelled_responses", "load_prompt_file",
    "max_token_run", "mc_accuracy", "mc_scores", "monitor_settings", "plot_comparison", "plot_curves", "plot_metrics",
    "refusal_flags", "refusal_rate", "repetition_rate", "report_markdown", "response_nll", "stream_nll",
    "task_accuracy", "write_report",
]
