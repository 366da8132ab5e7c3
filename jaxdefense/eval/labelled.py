"""Labelled (prompt, response, harmful?) examples from the data root, for the harmfulness judge.

Every source is a public file listed in the data root's SOURCES.md; the label of each comes
from humans or from a published judge, never from this project:

| source | label = harmful when |
|---|---|
| pyrit_harm (PyRIT scorer_evals/harm, human 0–1 scores) | mean human score ≥ 0.5 |
| pyrit_objective (scorer_evals/objective, human 0/1) | human says the harmful objective was achieved |
| pyrit_refusal (scorer_evals/refusal_scorer, human 0/1) | never: only rows humans marked as refusals |
| jbb_completions (refusal_direction, Llama-2/3, Qwen) | LlamaGuard-2 flagged it (baseline/ablation); harmless_baseline → 0 |
| many_shot (PyRIT many_shot_examples) | its judgement starts with "Harmful" |
| xstest (Llama-2-70b-chat, human final_label) | unsafe contrast prompt and full compliance |
| beavertails (BeaverTails is_safe=False sample) | always (human-labelled unsafe) |
| shadow_alignment (shadow-aligned model outputs) | always, unless it is one of the few refusals |
| harmbench_refusals (Llama-2-style refusals) | never |
| alpaca_eval (GPT-4 and text-davinci-003 answers to AlpacaEval) | never |
| alpaca_safety (Alpaca safety-topic subset) | never |
| dolly_safety (Dolly-15k safety-topic subset) | never |

`split_of(prompt)` puts every response to the same (normalised) prompt in the same split:
test when sha256(prompt) mod 5 == 0, else train.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from jaxdefense.errors import DataError
from jaxdefense.eval.refusal import REFUSAL_SUBSTRINGS, is_refusal

SOURCES = (
    "pyrit_harm",
    "pyrit_objective",
    "pyrit_refusal",
    "jbb_completions",
    "many_shot",
    "xstest",
    "beavertails",
    "shadow_alignment",
    "harmbench_refusals",
    "alpaca_eval",
    "alpaca_safety",
    "dolly_safety",
)


@dataclass(frozen=True)
class LabelledResponse:
    prompt: str
    response: str
    label: int
    source: str

    @property
    def split(self) -> str:
        return split_of(self.prompt)


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """--data-dir, then $JAXDEFENSE_DATA_DIR, then ../shared/data beside the repo (DESIGN.md)."""
    from jaxdefense.data.root import resolve_data_root

    return Path(resolve_data_root(data_dir))


_WRAPPER = re.compile(r"^\s*human:\s*|\s*assistant:\s*$", re.IGNORECASE)


def normalise_prompt(prompt: str) -> str:
    return " ".join(_WRAPPER.sub("", prompt).lower().split())


def split_of(prompt: str) -> str:
    digest = hashlib.sha256(normalise_prompt(prompt).encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 5 == 0 else "train"


def read_commented_csv(path: Path) -> list[dict]:
    """CSV rows after the leading '#' comment lines (PyRIT scorer_evals); only leading ones."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    lines = text.splitlines(keepends=True)
    start = 0
    while start < len(lines) and lines[start].startswith("#"):
        start += 1
    return list(csv.DictReader(io.StringIO("".join(lines[start:]))))


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _human_score(row: dict) -> float:
    scores = [float(v) for k, v in row.items() if k and k.startswith("human_score") and v not in (None, "")]
    return sum(scores) / len(scores)


def _pyrit_harm(root: Path):
    for path in sorted((root / "pyrit_harm_data/scorer_evals/harm").glob("*.csv")):
        for row in read_commented_csv(path):
            yield row["objective"], row["assistant_response"], int(_human_score(row) >= 0.5)


def _pyrit_objective(root: Path):
    for path in sorted((root / "pyrit_harm_data/scorer_evals/objective").glob("*.csv")):
        for row in read_commented_csv(path):
            yield row["objective"], row["assistant_response"], int(_human_score(row) >= 0.5)


def _pyrit_refusal(root: Path):
    for path in sorted((root / "pyrit_harm_data/scorer_evals/refusal_scorer").glob("*.csv")):
        for row in read_commented_csv(path):
            if _human_score(row) >= 0.5:
                yield row["objective"], row["assistant_response"], 0


def _jbb_completions(root: Path):
    for path in sorted((root / "refusal_direction_completions").glob("*/*_evaluations.json")):
        with open(path, encoding="utf-8") as f:
            completions = json.load(f)["completions"]
        harmless = path.name.startswith("harmless")
        for c in completions:
            if harmless:
                yield c["prompt"], c["response"], 0
            elif c.get("is_jailbreak_llamaguard2") is not None:
                yield c["prompt"], c["response"], int(c["is_jailbreak_llamaguard2"])


def _many_shot(root: Path):
    with open(root / "pyrit_harm_data/many_shot_examples.json", encoding="utf-8") as f:
        for ex in json.load(f):
            yield ex["user"], ex["assistant"], int(ex["category"].strip().lower().startswith("harmful"))


def _xstest(root: Path):
    for row in _read_csv(root / "xstest/xstest_v2_completions_llama2orig_gpteval.csv"):
        unsafe = row["type"].startswith("contrast")
        yield row["prompt"], row["completion"], int(unsafe and row["final_label"].startswith("1_"))


def _beavertails(root: Path):
    for row in _read_csv(root / "beavertails_sample_artkit/beavertails_sample.csv"):
        yield row["prompt"], row["response"], 1


_SHADOW_REFUSALS = REFUSAL_SUBSTRINGS + ("It's not appropriate",)


def _shadow_alignment(root: Path):
    for path in sorted((root / "shadow_alignment_heldout").glob("*.csv")):
        for row in _read_csv(path):
            response = row["results"]
            if not is_refusal(response[:200], _SHADOW_REFUSALS):
                yield row["prompts"], response, 1


def _harmbench_refusals(root: Path):
    for row in _read_csv(root / "harmbench_adv_training_refusals/adv_training_behaviors_safe_responses_longer.csv"):
        yield row["Behavior"], row["Safe_Response"], 0


def _alpaca_eval(root: Path):
    for name in ("gpt4_model_outputs.json", "text_davinci_003_model_outputs.json"):
        with open(root / "alpaca_eval" / name, encoding="utf-8") as f:
            for ex in json.load(f):
                yield ex["instruction"], ex["output"], 0


def _alpaca_safety(root: Path):
    with open(root / "llm_finetuning_safety/alpaca_data_safety_only.json", encoding="utf-8") as f:
        for ex in json.load(f):
            prompt = ex["instruction"] + (("\n" + ex["input"]) if ex.get("input") else "")
            yield prompt, ex["output"], 0


def _dolly_safety(root: Path):
    with open(root / "llm_finetuning_safety/databricks-dolly-15k-safety-only.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                ex = json.loads(line)
                prompt = ex["instruction"] + (("\n" + ex["context"]) if ex.get("context") else "")
                yield prompt, ex["response"], 0


_LOADERS = {
    "pyrit_harm": _pyrit_harm,
    "pyrit_objective": _pyrit_objective,
    "pyrit_refusal": _pyrit_refusal,
    "jbb_completions": _jbb_completions,
    "many_shot": _many_shot,
    "xstest": _xstest,
    "beavertails": _beavertails,
    "shadow_alignment": _shadow_alignment,
    "harmbench_refusals": _harmbench_refusals,
    "alpaca_eval": _alpaca_eval,
    "alpaca_safety": _alpaca_safety,
    "dolly_safety": _dolly_safety,
}


def load_labelled_responses(
    data_dir: str | os.PathLike | None = None, sources: tuple[str, ...] = SOURCES
) -> list[LabelledResponse]:
    """All labelled examples of `sources`, in a fixed order, empty responses and duplicates dropped."""
    root = data_root(data_dir)
    out, seen = [], set()
    for name in sources:
        if name not in _LOADERS:
            raise DataError(f"unknown judge data source {name!r}; known: {', '.join(SOURCES)}")
        try:
            rows = list(_LOADERS[name](root))
        except FileNotFoundError as e:
            raise DataError(f"judge data source {name!r}: missing file {e.filename}") from e
        except (KeyError, ValueError) as e:
            raise DataError(f"judge data source {name!r}: malformed record ({e})") from e
        for prompt, response, label in rows:
            key = (normalise_prompt(prompt), response.strip())
            if not response.strip() or key in seen:
                continue
            seen.add(key)
            out.append(LabelledResponse(prompt, response, int(label), name))
    return out
