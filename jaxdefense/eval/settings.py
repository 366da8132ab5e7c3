"""`EvalSettings`: the one settings dataclass of every evaluation — the final report
(`jaxdefense eval`, the demo, build-base: `jaxdefense.eval.evaluate`) and the held-out monitor
during training (`jaxdefense.eval.monitor.HeldOutMonitor`, e.g. after each attack step).

A config section (`jaxdefense.config.field` metadata: choices, doc, ranges checked by
`from_dict`); a direct construction is checked the same way in `__post_init__`. Counts of 0
turn a part off. `monitor_settings()` gives the monitor's defaults (validation split, small).
"""

from __future__ import annotations

import dataclasses

from jaxdefense.config import check_bounds, field
from jaxdefense.errors import ConfigError

SPLITS = ("validation", "test")


@dataclasses.dataclass
class EvalSettings:
    harmful_prompts: int = field(64, ge=0, doc="held-out harmful prompts (harmful_prompts_eval) for refusal rate + judge")
    benign_prompts: int = field(64, ge=0, doc="held-out benign prompts (benign_instruct) for the over-refusal rate")
    nll_rows: int = field(64, ge=0, doc="held-out harmful_qa / benign_instruct rows for harmful / benign NLL")
    split: str = field("test", choices=SPLITS, doc="held-out split of every stream (validation while training)")
    max_new_tokens: int = field(64, ge=1, doc="greedy tokens generated per prompt")
    max_len: int = field(256, ge=2, doc="tokens per NLL / multiple-choice row")
    batch_size: int = field(8, ge=1, doc="rows per forward batch (NLL, multiple choice)")
    generate_batch_size: int = field(32, ge=1, doc="rows per generation batch (a decode step reads every weight "
                                                   "once whatever the batch, so wide batches cost little more per step)")
    mc: list[str] = field(["arc_easy"], doc="multiple-choice streams (mmlu, arc_easy, …); [] for none")
    mc_n: int = field(100, ge=0, doc="rows per multiple-choice stream")
    tasks: list[str] = field([], doc="downstream generation tasks (sst2, ag_news, gsm8k)")
    task_n: int = field(50, ge=0, doc="rows per downstream task (also the benign attack's accuracy rows)")
    samples: int = field(5, ge=0, doc="generations kept in the report")
    chat: bool = field(True, doc="prompts through the tokenizer's chat template (False: raw)")
    prompts_file: str | None = field(None, doc="harmful prompts file (.jsonl/.json/.csv/.tsv/.txt) instead of the stream")
    hf_judge: str | None = field(None, doc="local HF sequence-classification directory used as a second judge")
    hf_judge_label: str = field("auto", doc="its harmful label: index, name or 'auto'")
    hf_judge_template: str = field("{prompt}{response}", doc="its input text from {prompt} and {response}")
    harm_judge: str | None = field(None, doc="saved HarmJudge directory (default: the built-in judge)")
    every: int = field(10, ge=0, doc="monitor: measure every N training steps (0: only first and last)")

    def __post_init__(self):
        from jaxdefense.data.sources import MC_STREAMS
        from jaxdefense.data.tasks import TASKS

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            check_bounds(f.name, value, f.metadata.get("bounds") or {})
            choices = f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise ConfigError(f"{f.name}: {value!r} is not one of {list(choices)}")
        self.mc, self.tasks = list(self.mc), list(self.tasks)
        for name, values, known in (("mc", self.mc, MC_STREAMS), ("tasks", self.tasks, tuple(TASKS))):
            for v in values:
                if v not in known:
                    raise ConfigError(f"{name}: {v!r} is not one of {list(known)}")
        if "{response}" not in self.hf_judge_template:
            raise ConfigError(f"hf_judge_template: {self.hf_judge_template!r} has no {{response}}")

    def judge_label(self) -> int | str:
        """`hf_judge_label` as HFClassifierJudge takes it: an int when it is one."""
        label = self.hf_judge_label
        return int(label) if label.lstrip("-").isdigit() else label


def monitor_settings(**overrides) -> EvalSettings:
    """The held-out monitor's defaults (those of the former attacks.sft.EvalSettings): validation
    split, 32 NLL rows, 8 harmful prompts for the refusal rate, no benign refusal, 32 new tokens,
    max_len 128, every 10 steps, task_n 64; no multiple choice or tasks."""
    base = dict(harmful_prompts=8, benign_prompts=0, nll_rows=32, split="validation", max_new_tokens=32,
                max_len=128, batch_size=8, mc=[], tasks=[], task_n=64, samples=0, every=10)
    return EvalSettings(**{**base, **overrides})


__all__ = ["EvalSettings", "monitor_settings"]
