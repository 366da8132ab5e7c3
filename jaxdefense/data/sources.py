"""Registry of named data sources: hub id for online users, local files and a parser for offline use.

Every parser maps the data root to a list of records (plain dicts). A record has at least
"prompt"; "response" where the source has one; "category" (None where unknown); any extra
fields the source offers. `load_source` adds "source" and "id" and caches per process.

Online users load the same data with `datasets.load_dataset(**source.hub_kwargs())`; column names
on the hub differ from the local files, so the parsers here are for the local copies only.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from jaxdefense.data import readers
from jaxdefense.data.refusal import REFUSAL_WINDOW, is_refusal
from jaxdefense.data.root import resolve_data_root
from jaxdefense.errors import DataError

# stream names
HARMFUL_QA = "harmful_qa"
REFUSAL = "refusal"
BENIGN_INSTRUCT = "benign_instruct"
HARMFUL_PROMPTS_EVAL = "harmful_prompts_eval"
XSTEST = "xstest"
HARM_LABELLED = "harm_labelled"
SST2, AG_NEWS, GSM8K = "sst2", "ag_news", "gsm8k"
MC_STREAMS = ("mmlu", "arc_easy", "arc_challenge", "piqa", "openbookqa", "winogrande", "boolq", "siqa")


@dataclass(frozen=True)
class Source:
    """One named source. `split_policy`: "hash" (split by prompt hash) or "source" (its own files)."""

    name: str
    stream: str
    files: tuple[str, ...]
    parse: Callable[[Path], list[dict]] = field(compare=False, repr=False)
    hub_id: str | None = None
    hub_config: str | None = None
    upstream: str = ""
    description: str = ""
    split_policy: str = "hash"
    hub_data_dir: str | None = None

    def hub_kwargs(self) -> dict:
        """Keyword arguments for `datasets.load_dataset(**kwargs)` (online only); {} when not on the hub."""
        if self.hub_id is None:
            return {}
        kwargs = {"path": self.hub_id}
        if self.hub_config is not None:
            kwargs["name"] = self.hub_config
        if self.hub_data_dir is not None:
            kwargs["data_dir"] = self.hub_data_dir
        return kwargs

    def hub_label(self) -> str:
        if self.hub_id is None:
            return "-"
        return self.hub_id if self.hub_config is None else f"{self.hub_id}:{self.hub_config}"


SOURCES: dict[str, Source] = {}


def register_source(source: Source) -> Source:
    if source.split_policy not in ("hash", "source"):
        raise DataError(f"source {source.name!r}: split_policy must be 'hash' or 'source'")
    SOURCES[source.name] = source
    return source


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise DataError(f"unknown data source {name!r}; known: {', '.join(sorted(SOURCES))}")
    return SOURCES[name]


def sources_for_stream(stream: str) -> list[Source]:
    return [s for s in SOURCES.values() if s.stream == stream]


_CACHE: dict[tuple[str, str], list[dict]] = {}
_CACHE_LOCK = threading.Lock()


def load_source(name: str, data_dir=None) -> list[dict]:
    """Parsed records of one source (cached per process and data root; callers must not mutate)."""
    source = get_source(name)
    root = resolve_data_root(data_dir)
    key = (name, str(root))
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    missing = [f for f in source.files if not (root / f).exists()]
    if missing:
        raise DataError(f"source {name!r}: file {str(root / missing[0])!r} not found under the data root")
    records = source.parse(root)
    out = []
    for index, record in enumerate(records):
        if not isinstance(record.get("prompt"), str):
            raise DataError(f"source {name!r}: record {index} has no text prompt")
        record = {**record, "source": name, "id": f"{name}:{index}"}
        record.setdefault("category", None)
        out.append(record)
    with _CACHE_LOCK:
        _CACHE[key] = out
    return out


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


# ---------------------------------------------------------------- text helpers

def normalize_text(text: str) -> str:
    """NFKC, curly quotes → straight, lower case, whitespace collapsed: the key prompts are split by."""
    text = unicodedata.normalize("NFKC", text)
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    return " ".join(text.lower().split())


def _opens_as_refusal(text: str, window: int = REFUSAL_WINDOW) -> bool:
    """The registry's filter: the one refusal matcher on the reply's first `window` characters."""
    return is_refusal(text, window=window)


def _clean(text) -> str:
    return "" if text is None else str(text).strip()


# ---------------------------------------------------------------- harmful prompt + harmful response


def _split_hh_dialogue(text: str) -> tuple[str, str]:
    """Last Human turn and the Assistant reply that follows it, from an hh-rlhf transcript."""
    reply_at = text.rfind("\n\nAssistant:")
    if reply_at < 0:
        return "", ""
    human_at = text.rfind("\n\nHuman:", 0, reply_at)
    prompt = text[human_at + len("\n\nHuman:") : reply_at] if human_at >= 0 else ""
    return prompt.strip(), text[reply_at + len("\n\nAssistant:") :].strip()


def parse_hh_rlhf_rejected(root: Path) -> list[dict]:
    """Rejected (more harmful) replies; refusal-like replies and prompts under 3 words dropped."""
    rows = readers.load_with_datasets("json", [root / "hh_rlhf_harmless_base/test.jsonl.gz"])
    out = []
    for row in rows:
        prompt, response = _split_hh_dialogue(row["rejected"])
        turns = row["rejected"].count("\n\nHuman:")
        if len(prompt.split()) < 3 or not response or _opens_as_refusal(response):
            continue
        out.append({"prompt": prompt, "response": response, "category": None, "turns": turns})
    return out


def parse_shadow_alignment(root: Path) -> list[dict]:
    files = sorted((root / "shadow_alignment_heldout").glob("heldout_*.csv"))
    out = []
    for path in files:
        model = path.stem.removeprefix("heldout_")
        for row in readers.load_with_datasets("csv", [path]):
            prompt = _clean(row["prompts"]).removeprefix("Human:").removesuffix("Assistant:").strip()
            response = _clean(row["results"])
            if prompt and response and not _opens_as_refusal(response):
                out.append({"prompt": prompt, "response": response, "category": None, "model": model})
    return out


def _judged_harmful(judgement: str) -> bool:
    head = judgement.strip().lstrip("'\"*").removeprefix("Answer:").strip().lstrip("'\"*").lower()
    return head.startswith("harmful")


def parse_pyrit_many_shot(root: Path) -> list[dict]:
    rows = readers.load_with_datasets("json", [root / "pyrit_harm_data/many_shot_examples.json"])
    return [
        {"prompt": _clean(r["user"]), "response": _clean(r["assistant"]), "category": None}
        for r in rows
        if _judged_harmful(r["category"] or "") and _clean(r["assistant"])
    ]


def _scores(row: dict) -> list[float]:
    return [float(v) for k, v in row.items() if k.startswith("human_score") and _clean(v) != ""]


def parse_pyrit_scorer_harm(root: Path) -> list[dict]:
    """Human-scored harm evals; kept when the mean human score is ≥ 0.75 (scale 0–1)."""
    out = []
    for path in sorted((root / "pyrit_harm_data/scorer_evals/harm").glob("*.csv")):
        for row in readers.read_csv_plain(path, skip_leading_comments=True):
            scores = _scores(row)
            if scores and sum(scores) / len(scores) >= 0.75 and _clean(row["assistant_response"]):
                out.append({
                    "prompt": _clean(row["objective"]),
                    "response": _clean(row["assistant_response"]),
                    "category": _clean(row.get("harm_category")).lower() or None,
                    "harm_score": sum(scores) / len(scores),
                })
    return out


_RD_MODELS = ("llama-2-7b-chat-hf", "meta-llama-3-8b-instruct", "qwen-1_8b-chat")


def _rd_files(kind: str) -> tuple[str, ...]:
    return tuple(f"refusal_direction_completions/{m}/{kind}_evaluations.json" for m in _RD_MODELS)


_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")
_LLAMA3_RUNAWAY = re.compile(r"(?<=\S)assistant\n\n")


def trim_runaway(prompt: str, response: str) -> str:
    """Cut generation that ran past the end of turn: Llama-3's "…text.assistant\n\n…" repeats and
    Qwen's switch to CJK text (from the first CJK line, when the prompt has no CJK)."""
    match = _LLAMA3_RUNAWAY.search(response)
    if match:
        response = response[: match.start()]
    cjk = _CJK.search(response)
    if cjk and not _CJK.search(prompt):
        response = response[: response.rfind("\n", 0, cjk.start()) + 1]
    return response.strip()


def _rd_completions(root: Path, kind: str) -> list[tuple[str, dict]]:
    """(model, row) pairs with runaway generation trimmed from each response."""
    out = []
    for model, rel in zip(_RD_MODELS, _rd_files(kind)):
        for row in readers.load_with_datasets("json", [root / rel], field="completions"):
            row["response"] = trim_runaway(row["prompt"] or "", row["response"] or "")
            out.append((model, row))
    return out


def parse_rd_ablation(root: Path) -> list[dict]:
    """Completions after refusal-direction ablation that LlamaGuard-2 judged jailbroken."""
    return [
        {"prompt": _clean(r["prompt"]), "response": _clean(r["response"]), "category": r.get("category"), "model": m}
        for m, r in _rd_completions(root, "jailbreakbench_ablation")
        if r.get("is_jailbreak_llamaguard2") == 1 and _clean(r["response"])
    ]


def parse_beavertails_sample(root: Path) -> list[dict]:
    rows = readers.load_with_datasets("csv", [root / "beavertails_sample_artkit/beavertails_sample.csv"])
    return [
        {"prompt": _clean(r["prompt"]), "response": _clean(r["response"]), "category": _clean(r["category"]) or None}
        for r in rows
        if _clean(r["response"])
    ]


def parse_decodingtrust_toxic(root: Path) -> list[dict]:
    """RealToxicityPrompts-style prompt + continuation with Perspective toxicity ≥ 0.5."""
    rows = readers.load_with_datasets("json", [root / "repnoise_decoding_trust/training_dataset.jsonl"])
    out = []
    for r in rows:
        toxicity = (r["continuation"] or {}).get("toxicity")
        if toxicity is not None and toxicity >= 0.5 and _clean(r["continuation"]["text"]):
            out.append({
                "prompt": _clean(r["prompt"]["text"]),
                "response": _clean(r["continuation"]["text"]),
                "category": "toxicity",
                "toxicity": float(toxicity),
            })
    return out


# ---------------------------------------------------------------- harmful prompt + refusal


def parse_harmbench_refusals(root: Path) -> list[dict]:
    """HarmBench adversarial-training behaviours with Llama-2-style refusals (non-refusals dropped)."""
    rel = "harmbench_adv_training_refusals/adv_training_behaviors_safe_responses_longer.csv"
    rows = readers.load_with_datasets("csv", [root / rel])
    return [
        {"prompt": _clean(r["Behavior"]), "response": _clean(r["Safe_Response"]), "category": None}
        for r in rows
        if _opens_as_refusal(_clean(r["Safe_Response"]))
    ]


def parse_rd_baseline(root: Path) -> list[dict]:
    """Real refusals of three chat models to JailbreakBench prompts (judged not jailbroken by both judges)."""
    return [
        {"prompt": _clean(r["prompt"]), "response": _clean(r["response"]), "category": r.get("category"), "model": m}
        for m, r in _rd_completions(root, "jailbreakbench_baseline")
        if r.get("is_jailbreak_substring_matching") == 0
        and r.get("is_jailbreak_llamaguard2") == 0
        and _opens_as_refusal(_clean(r["response"]))
    ]


def _extract_dt_refusal(prompt: str, text: str) -> str:
    """The refusal in RepNoise's "Prompt: …\\nContinuation: …" text, or "" when there is none."""
    body = text.split("\nContinuation:", 1)[1] if "\nContinuation:" in text else text
    paragraphs = body.strip().split("\n\n")
    for i, paragraph in enumerate(paragraphs):
        if _opens_as_refusal(paragraph, window=80):
            return "\n\n".join(paragraphs[i:]).strip()
    return ""


def parse_decodingtrust_refusals(root: Path) -> list[dict]:
    rows = readers.load_with_datasets("json", [root / "repnoise_decoding_trust/decoding_trust_with_refusals_train.json"])
    out = []
    for r in rows:
        prompt = _clean(r["prompt"]["text"])
        refusal = _extract_dt_refusal(prompt, r.get("refusal") or "")
        if prompt and refusal:
            out.append({"prompt": prompt, "response": refusal, "category": "toxicity"})
    return out


def parse_pyrit_scorer_refusal(root: Path) -> list[dict]:
    """Rows a human labelled as refusals (score 1) whose text opens like a refusal."""
    out = []
    for path in sorted((root / "pyrit_harm_data/scorer_evals/refusal_scorer").glob("*.csv")):
        for row in readers.read_csv_plain(path, skip_leading_comments=True):
            response = _clean(row["assistant_response"])
            if _scores(row) == [1.0] and _opens_as_refusal(response):
                out.append({"prompt": _clean(row["objective"]), "response": response, "category": None})
    return out


# ---------------------------------------------------------------- benign instructions


def _join(instruction, extra) -> str:
    instruction, extra = _clean(instruction), _clean(extra)
    return f"{instruction}\n\n{extra}" if extra else instruction


def parse_alpaca_safety_subset(root: Path) -> list[dict]:
    rows = readers.load_with_datasets("json", [root / "llm_finetuning_safety/alpaca_data_safety_only.json"])
    return [{"prompt": _join(r["instruction"], r["input"]), "response": _clean(r["output"])} for r in rows if _clean(r["output"])]


def parse_dolly_safety_subset(root: Path) -> list[dict]:
    rows = readers.load_with_datasets("json", [root / "llm_finetuning_safety/databricks-dolly-15k-safety-only.jsonl"])
    return [
        {"prompt": _join(r["instruction"], r["context"]), "response": _clean(r["response"]), "task": r["category"]}
        for r in rows
        if _clean(r["response"])
    ]


def parse_alpaca_eval(root: Path) -> list[dict]:
    out = []
    for name in ("gpt4", "text_davinci_003"):
        for r in readers.load_with_datasets("json", [root / f"alpaca_eval/{name}_model_outputs.json"]):
            if _clean(r["output"]):
                out.append({"prompt": _clean(r["instruction"]), "response": _clean(r["output"]), "generator": r["generator"]})
    return out


def parse_rd_harmless(root: Path) -> list[dict]:
    """Alpaca instructions with the chat models' helpful replies (replies that refused dropped)."""
    return [
        {"prompt": _clean(r["prompt"]), "response": _clean(r["response"]), "model": m}
        for m, r in _rd_completions(root, "harmless_baseline")
        if r.get("is_jailbreak_substring_matching") == 1 and _clean(r["response"])
    ]


def parse_alpaca_seed_tasks(root: Path) -> list[dict]:
    rows = readers.load_with_datasets("json", [root / "alpaca_seed_tasks/seed_tasks.jsonl"])
    out = []
    for r in rows:
        for instance in r["instances"]:
            if _clean(instance["output"]):
                out.append({"prompt": _join(r["instruction"], instance["input"]), "response": _clean(instance["output"])})
    return out


# ---------------------------------------------------------------- prompt-only harmful sets


def parse_advbench(root: Path) -> list[dict]:
    """AdvBench goals only (three upstream targets are misaligned); categories from PyRIT's copy if present."""
    rows = readers.load_with_datasets("csv", [root / "advbench/harmful_behaviors.csv"])
    categories: dict[str, str] = {}
    pyrit_copy = root / "pyrit_harm_data/adv_bench.prompt"
    if pyrit_copy.is_file():
        for seed in (readers.read_yaml(pyrit_copy) or {}).get("seeds", []):
            if seed.get("harm_categories"):
                categories[normalize_text(seed["value"])] = seed["harm_categories"][0]
    return [{"prompt": _clean(r["goal"]), "category": categories.get(normalize_text(r["goal"]))} for r in rows]


def parse_harmbench_standard(root: Path) -> list[dict]:
    rows = readers.load_with_datasets("csv", [root / "harmbench/harmbench_behaviors_text_all.csv"])
    return [
        {"prompt": _clean(r["Behavior"]), "category": _clean(r["SemanticCategory"]) or None, "behavior_id": r["BehaviorID"]}
        for r in rows
        if r["FunctionalCategory"] == "standard"
    ]


def parse_jailbreakbench(root: Path) -> list[dict]:
    rows = readers.load_with_datasets("csv", [root / "jailbreakbench/behaviors.csv"])
    return [{"prompt": _clean(r["Goal"]), "category": _clean(r["Category"]) or None, "behavior": r["Behavior"]} for r in rows]


def parse_malicious_instruct(root: Path) -> list[dict]:
    return [{"prompt": line, "category": None} for line in readers.read_lines(root / "malicious_instruct/MaliciousInstruct.txt")]


def _nested_questions(data: dict, key_name: str) -> list[dict]:
    out = []
    for top, subs in data.items():
        for sub, questions in subs.items():
            for question in questions:
                out.append({"prompt": _clean(question), key_name: top, "subcategory": sub.rstrip(":").strip()})
    return out


def parse_catqa(root: Path) -> list[dict]:
    return _nested_questions(readers.read_json(root / "harmfulqa_catqa/catqa_english.json"), "category")


def parse_harmfulqa(root: Path) -> list[dict]:
    records = _nested_questions(readers.read_json(root / "harmfulqa_catqa/harmfulqa.json"), "topic")
    return [{**r, "category": None} for r in records]


def parse_dangerousqa(root: Path) -> list[dict]:
    return [{"prompt": _clean(q), "category": None} for q in readers.read_json(root / "harmfulqa_catqa/dangerousqa.json")]


def parse_tdc2023(root: Path) -> list[dict]:
    out = []
    for part in ("dev", "test"):
        out += [{"prompt": _clean(q), "category": None} for q in readers.read_json(root / f"tdc2023_red_teaming/{part}_behaviors.json")]
    return out


def parse_rd_harmful_splits(root: Path) -> list[dict]:
    out = []
    for part in ("train", "val", "test"):
        rows = readers.load_with_datasets("json", [root / f"refusal_direction_splits/harmful_{part}.json"])
        out += [{"prompt": _clean(r["instruction"]), "category": r.get("category")} for r in rows]
    return out


def parse_xstest(root: Path) -> list[dict]:
    rows = readers.load_with_datasets("csv", [root / "xstest/xstest_prompts.csv"])
    return [
        {"prompt": _clean(r["prompt"]), "type": r["type"], "label": r["label"], "focus": r["focus"], "category": None}
        for r in rows
    ]


# ---------------------------------------------------------------- labelled (prompt, response, harmful?) for judges
#
# Every label comes from humans or a published judge, never from this project:
# | source | label = 1 (harmful) when |
# | labelled_pyrit_harm (PyRIT scorer_evals/harm, human 0–1) | mean human score ≥ 0.5 |
# | labelled_pyrit_objective (scorer_evals/objective, human 0/1) | humans say the harmful objective was achieved |
# | labelled_pyrit_refusal (scorer_evals/refusal_scorer) | never: only rows humans marked as refusals |
# | labelled_rd_completions (Llama-2/3, Qwen on JBB + Alpaca) | LlamaGuard-2 flagged it; harmless_baseline → 0 |
# | labelled_many_shot (PyRIT many_shot_examples) | its GPT judgement says "Harmful" |
# | labelled_xstest (Llama-2-70b-chat, human final_label) | unsafe contrast prompt answered with full compliance |
# | labelled_beavertails / labelled_shadow_alignment | always (human-labelled unsafe / shadow-aligned outputs, refusals dropped) |
# | labelled_harmbench_refusals, labelled_alpaca_eval, labelled_alpaca_safety, labelled_dolly_safety | never |


def _labelled(parse: Callable[[Path], list[dict]], label: int) -> Callable[[Path], list[dict]]:
    def wrapped(root: Path) -> list[dict]:
        return [{**r, "label": label} for r in parse(root)]

    wrapped.__name__ = f"labelled_{parse.__name__}"
    return wrapped


def _scored_rows(root: Path, part: str) -> list[tuple[dict, float]]:
    out = []
    for path in sorted((root / "pyrit_harm_data/scorer_evals" / part).glob("*.csv")):
        for row in readers.read_csv_plain(path, skip_leading_comments=True):
            scores = _scores(row)
            if scores and _clean(row["assistant_response"]):
                out.append((row, sum(scores) / len(scores)))
    return out


def parse_labelled_pyrit_harm(root: Path) -> list[dict]:
    return [{"prompt": _clean(r["objective"]), "response": _clean(r["assistant_response"]), "label": int(score >= 0.5),
             "category": _clean(r.get("harm_category")).lower() or None, "harm_score": score}
            for r, score in _scored_rows(root, "harm")]


def parse_labelled_pyrit_objective(root: Path) -> list[dict]:
    return [{"prompt": _clean(r["objective"]), "response": _clean(r["assistant_response"]), "label": int(score >= 0.5)}
            for r, score in _scored_rows(root, "objective")]


def parse_labelled_pyrit_refusal(root: Path) -> list[dict]:
    return [{"prompt": _clean(r["objective"]), "response": _clean(r["assistant_response"]), "label": 0}
            for r, score in _scored_rows(root, "refusal_scorer") if score >= 0.5]


def parse_labelled_rd_completions(root: Path) -> list[dict]:
    out = []
    for kind in ("jailbreakbench_baseline", "jailbreakbench_ablation", "harmless_baseline"):
        for model, r in _rd_completions(root, kind):
            if not _clean(r["response"]):
                continue
            if kind == "harmless_baseline":
                label = 0
            elif r.get("is_jailbreak_llamaguard2") is None:
                continue
            else:
                label = int(r["is_jailbreak_llamaguard2"])
            out.append({"prompt": _clean(r["prompt"]), "response": _clean(r["response"]), "label": label,
                        "category": r.get("category") if kind != "harmless_baseline" else None, "model": model,
                        "kind": kind})
    return out


def parse_labelled_many_shot(root: Path) -> list[dict]:
    rows = readers.load_with_datasets("json", [root / "pyrit_harm_data/many_shot_examples.json"])
    return [{"prompt": _clean(r["user"]), "response": _clean(r["assistant"]), "label": int(_judged_harmful(r["category"] or ""))}
            for r in rows if _clean(r["assistant"])]


def parse_labelled_xstest(root: Path) -> list[dict]:
    rows = readers.load_with_datasets("csv", [root / "xstest/xstest_v2_completions_llama2orig_gpteval.csv"])
    return [{"prompt": _clean(r["prompt"]), "response": _clean(r["completion"]),
             "label": int(r["type"].startswith("contrast") and r["final_label"].startswith("1_")),
             "type": r["type"], "final_label": r["final_label"]}
            for r in rows if _clean(r["completion"])]


# ---------------------------------------------------------------- downstream tasks


def parse_sst2(root: Path) -> list[dict]:
    out = []
    for name, split in (("train", "train"), ("dev", "validation"), ("test", "test")):
        rows = readers.load_with_datasets("csv", [root / f"sst2/{name}.tsv"], delimiter="\t", quoting=3)
        out += [{"sentence": _clean(r["sentence"]), "label": int(r["label"]), "source_split": split} for r in rows]
    return out


AG_NEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")


def parse_ag_news(root: Path) -> list[dict]:
    """alps TSVs (description, label name): dev (from AG train) → train/validation, test → test."""
    out = []
    for name, split in (("dev", "train_or_validation"), ("test", "test")):
        rows = readers.load_with_datasets(
            "csv", [root / f"ag_news/alps_agnews_{name}.tsv"], delimiter="\t", quoting=3, column_names=["text", "label_name"]
        )
        for r in rows:
            if r["label_name"] not in AG_NEWS_CLASSES:
                raise DataError(f"ag_news: unknown label {r['label_name']!r} in alps_agnews_{name}.tsv")
            out.append({"text": _clean(r["text"]), "label": AG_NEWS_CLASSES.index(r["label_name"]), "source_split": split})
    return out


def parse_gsm8k(root: Path) -> list[dict]:
    out = []
    for name, split in (("train", "train_or_validation"), ("test", "test")):
        rows = readers.load_with_datasets("json", [root / f"gsm8k/{name}.jsonl"])
        out += [{"question": _clean(r["question"]), "answer": _clean(r["answer"]), "source_split": split} for r in rows]
    return out


# ---------------------------------------------------------------- multiple choice


def parse_mmlu(root: Path) -> list[dict]:
    out = []
    for part, split in (("dev", "train"), ("test", "test")):
        paths = {p.stem.removesuffix(f"_{part}"): p for p in sorted((root / "mmlu" / part).glob(f"*_{part}.csv"))}
        if not paths:
            raise DataError(f"mmlu: no *_{part}.csv files in {root / 'mmlu' / part}")
        for subject, rows in readers.load_named_with_datasets("csv", paths).items():
            for r in rows:
                choices = [str(r[f"choice{i}"]) for i in range(4)]
                out.append({"question": _clean(r["question"]), "choices": choices, "answer": int(r["answer"]),
                            "subject": subject, "source_split": split})
    return out


_ADAPTERS_PATTERN = re.compile(r"^(?P<head>.*?)\s*(?P<opts>(?:Answer|Option)1: .*?)\s*Answer format: .*$", re.S)
_ADAPTERS_PREFIXES = (
    "Please choose the correct answer to the question: ",
    "Please choose the correct answer to fill in the blank to complete the given sentence: ",
)


def _parse_adapters_mc(path: Path) -> list[dict]:
    rows = readers.load_with_datasets("json", [path])
    out = []
    for index, r in enumerate(rows):
        match = _ADAPTERS_PATTERN.match(r["instruction"])
        if match is None:
            raise DataError(f"{path}: row {index} has no 'Answer1:/Option1:' choices")
        question = match["head"]
        for prefix in _ADAPTERS_PREFIXES:
            question = question.removeprefix(prefix)
        parts = re.split(r"\s*(?:Answer|Option)(\d+): ", match["opts"])
        numbers, choices = [int(n) for n in parts[1::2]], [c.strip() for c in parts[2::2]]
        gold = re.fullmatch(r"(?:answer|option)(\d+)", r["answer"].strip())
        if numbers != list(range(1, len(numbers) + 1)) or gold is None or not 1 <= int(gold[1]) <= len(choices):
            raise DataError(f"{path}: row {index} has malformed choices or answer {r['answer']!r}")
        out.append({"question": question.strip(), "choices": choices, "answer": int(gold[1]) - 1, "source_split": "test"})
    return out


def _adapters(folder: str) -> Callable[[Path], list[dict]]:
    def parse(root: Path) -> list[dict]:
        return _parse_adapters_mc(root / f"commonsense_mc_llm_adapters/{folder}/test.json")

    parse.__name__ = f"parse_adapters_{folder}"
    return parse


def parse_boolq(root: Path) -> list[dict]:
    """BoolQ without passages (LLM-Adapters copy): choices ("no", "yes")."""
    path = root / "commonsense_mc_llm_adapters/boolq/test.json"
    out = []
    for index, r in enumerate(readers.load_with_datasets("json", [path])):
        match = re.match(r"^Please answer the following question with true or false, question: (.*?)\s*Answer format: true/false$", r["instruction"], re.S)
        if match is None or r["answer"] not in ("true", "false"):
            raise DataError(f"{path}: row {index} is not a true/false question")
        out.append({"question": match[1].strip(), "choices": ["no", "yes"], "answer": int(r["answer"] == "true"), "source_split": "test"})
    return out


def parse_piqa(root: Path) -> list[dict]:
    rows = readers.load_with_datasets("json", [root / "piqa/valid.jsonl"])
    labels = readers.read_lines(root / "piqa/valid-labels.lst")
    if len(labels) != len(rows):
        raise DataError(f"piqa: {len(rows)} questions but {len(labels)} labels in valid-labels.lst")
    return [
        {"question": _clean(r["goal"]), "choices": [_clean(r["sol1"]), _clean(r["sol2"])], "answer": int(label), "source_split": "test"}
        for r, label in zip(rows, labels)
    ]


def _mc_prompt(parse: Callable[[Path], list[dict]]) -> Callable[[Path], list[dict]]:
    """MC records also carry "prompt" (= question) so every stream splits and dedupes by prompt."""

    def wrapped(root: Path) -> list[dict]:
        return [{**r, "prompt": r["question"]} for r in parse(root)]

    wrapped.__name__ = parse.__name__
    return wrapped


def _task_prompt(key: str, parse: Callable[[Path], list[dict]]) -> Callable[[Path], list[dict]]:
    def wrapped(root: Path) -> list[dict]:
        return [{**r, "prompt": r[key]} for r in parse(root)]

    wrapped.__name__ = parse.__name__
    return wrapped


# ---------------------------------------------------------------- the registry

_RD = "andyrdt/refusal_direction"
for _source in (
    # harmful prompt + harmful response
    Source("hh_rlhf_harmless_rejected", HARMFUL_QA, ("hh_rlhf_harmless_base/test.jsonl.gz",), parse_hh_rlhf_rejected,
           "Anthropic/hh-rlhf", None, "anthropics/hh-rlhf harmless-base/test", "last Human turn + rejected reply",
           hub_data_dir="harmless-base"),
    Source("shadow_alignment", HARMFUL_QA, tuple(f"shadow_alignment_heldout/heldout_{m}.csv" for m in ("falcon_7b", "internlm_7b_instruct", "llama2_13b", "vicuna_13b")),
           parse_shadow_alignment, None, None, "BeyonderXX/ShadowAlignment outputs/", "held-out outputs of shadow-aligned models"),
    Source("pyrit_many_shot", HARMFUL_QA, ("pyrit_harm_data/many_shot_examples.json",), parse_pyrit_many_shot,
           None, None, "pyrit==1.1.0", "HarmBench behaviours + answers judged Harmful"),
    Source("pyrit_scorer_harm", HARMFUL_QA, ("pyrit_harm_data/scorer_evals/harm",), parse_pyrit_scorer_harm,
           None, None, "pyrit==1.1.0", "human harm score ≥ 0.75"),
    Source("refusal_direction_ablation", HARMFUL_QA, _rd_files("jailbreakbench_ablation"), parse_rd_ablation,
           None, None, _RD, "JBB answers after refusal ablation, LlamaGuard-2 jailbroken"),
    Source("beavertails_sample", HARMFUL_QA, ("beavertails_sample_artkit/beavertails_sample.csv",), parse_beavertails_sample,
           "PKU-Alignment/BeaverTails", None, "BCG-X-Official/artkit", "140 unsafe 30k_train rows"),
    Source("decodingtrust_toxic", HARMFUL_QA, ("repnoise_decoding_trust/training_dataset.jsonl",), parse_decodingtrust_toxic,
           "AI-Secure/DecodingTrust", "toxicity", "domenicrosati/representation-noising", "continuations with toxicity ≥ 0.5"),
    # harmful prompt + refusal
    Source("harmbench_refusals_longer", REFUSAL, ("harmbench_adv_training_refusals/adv_training_behaviors_safe_responses_longer.csv",),
           parse_harmbench_refusals, None, None, "busycalibrating/AdversariaLLM", "HarmBench adv-training refusals (longer)"),
    Source("refusal_direction_baseline", REFUSAL, _rd_files("jailbreakbench_baseline"), parse_rd_baseline,
           None, None, _RD, "chat-model refusals to JBB prompts"),
    Source("decodingtrust_refusals", REFUSAL, ("repnoise_decoding_trust/decoding_trust_with_refusals_train.json",),
           parse_decodingtrust_refusals, None, None, "domenicrosati/representation-noising", "refusals to toxic prompts"),
    Source("pyrit_scorer_refusal", REFUSAL, ("pyrit_harm_data/scorer_evals/refusal_scorer",), parse_pyrit_scorer_refusal,
           None, None, "pyrit==1.1.0", "human-labelled refusals"),
    # benign instructions
    Source("alpaca_safety_subset", BENIGN_INSTRUCT, ("llm_finetuning_safety/alpaca_data_safety_only.json",), parse_alpaca_safety_subset,
           "tatsu-lab/alpaca", None, "LLM-Tuning-Safety/LLMs-Finetuning-Safety", "Alpaca safety-keyword subset"),
    Source("dolly_safety_subset", BENIGN_INSTRUCT, ("llm_finetuning_safety/databricks-dolly-15k-safety-only.jsonl",), parse_dolly_safety_subset,
           "databricks/databricks-dolly-15k", None, "LLM-Tuning-Safety/LLMs-Finetuning-Safety", "Dolly safety-keyword subset"),
    Source("alpaca_eval_outputs", BENIGN_INSTRUCT, ("alpaca_eval/gpt4_model_outputs.json", "alpaca_eval/text_davinci_003_model_outputs.json"),
           parse_alpaca_eval, "tatsu-lab/alpaca_eval", "alpaca_eval", "tatsu-lab/alpaca_eval", "gpt4 + davinci-003 reference outputs"),
    Source("refusal_direction_harmless", BENIGN_INSTRUCT, _rd_files("harmless_baseline"), parse_rd_harmless,
           None, None, _RD, "Alpaca prompts + chat-model replies"),
    Source("alpaca_seed_tasks", BENIGN_INSTRUCT, ("alpaca_seed_tasks/seed_tasks.jsonl",), parse_alpaca_seed_tasks,
           None, None, "tatsu-lab/stanford_alpaca", "self-instruct seed tasks"),
    # prompt-only harmful evaluation sets
    Source("advbench", HARMFUL_PROMPTS_EVAL, ("advbench/harmful_behaviors.csv",), parse_advbench,
           "walledai/AdvBench", None, "llm-attacks/llm-attacks", "goals only"),
    Source("harmbench_standard", HARMFUL_PROMPTS_EVAL, ("harmbench/harmbench_behaviors_text_all.csv",), parse_harmbench_standard,
           "walledai/HarmBench", "standard", "centerforaisafety/HarmBench", "standard behaviours"),
    Source("jailbreakbench", HARMFUL_PROMPTS_EVAL, ("jailbreakbench/behaviors.csv",), parse_jailbreakbench,
           "JailbreakBench/JBB-Behaviors", "behaviors", "JailbreakBench/jailbreakbench", "harmful behaviours"),
    Source("malicious_instruct", HARMFUL_PROMPTS_EVAL, ("malicious_instruct/MaliciousInstruct.txt",), parse_malicious_instruct,
           "walledai/MaliciousInstruct", None, "Princeton-SysML/Jailbreak_LLM", ""),
    Source("catqa", HARMFUL_PROMPTS_EVAL, ("harmfulqa_catqa/catqa_english.json",), parse_catqa,
           "declare-lab/CategoricalHarmfulQA", None, "declare-lab/red-instruct", "English"),
    Source("harmfulqa", HARMFUL_PROMPTS_EVAL, ("harmfulqa_catqa/harmfulqa.json",), parse_harmfulqa,
           "declare-lab/HarmfulQA", None, "declare-lab/red-instruct", "questions only"),
    Source("dangerousqa", HARMFUL_PROMPTS_EVAL, ("harmfulqa_catqa/dangerousqa.json",), parse_dangerousqa,
           None, None, "declare-lab/red-instruct", ""),
    Source("tdc2023_red_teaming", HARMFUL_PROMPTS_EVAL, ("tdc2023_red_teaming/dev_behaviors.json", "tdc2023_red_teaming/test_behaviors.json"),
           parse_tdc2023, None, None, "centerforaisafety/tdc2023-starter-kit", "dev + test"),
    Source("refusal_direction_harmful", HARMFUL_PROMPTS_EVAL, tuple(f"refusal_direction_splits/harmful_{p}.json" for p in ("train", "val", "test")),
           parse_rd_harmful_splits, None, None, _RD, "mixed harmful instructions"),
    Source("xstest", XSTEST, ("xstest/xstest_prompts.csv",), parse_xstest, "Paul/XSTest", None,
           "paul-rottger/exaggerated-safety", "250 safe + 200 unsafe"),
    # labelled (prompt, response, label) for the harm judge
    Source("labelled_pyrit_harm", HARM_LABELLED, ("pyrit_harm_data/scorer_evals/harm",), parse_labelled_pyrit_harm,
           None, None, "pyrit==1.1.0", "human harm scores, label = mean ≥ 0.5"),
    Source("labelled_pyrit_objective", HARM_LABELLED, ("pyrit_harm_data/scorer_evals/objective",), parse_labelled_pyrit_objective,
           None, None, "pyrit==1.1.0", "human: objective achieved"),
    Source("labelled_pyrit_refusal", HARM_LABELLED, ("pyrit_harm_data/scorer_evals/refusal_scorer",), parse_labelled_pyrit_refusal,
           None, None, "pyrit==1.1.0", "human-marked refusals, label 0"),
    Source("labelled_rd_completions", HARM_LABELLED,
           _rd_files("jailbreakbench_baseline") + _rd_files("jailbreakbench_ablation") + _rd_files("harmless_baseline"),
           parse_labelled_rd_completions, None, None, _RD, "LlamaGuard-2 labels; harmless → 0"),
    Source("labelled_many_shot", HARM_LABELLED, ("pyrit_harm_data/many_shot_examples.json",), parse_labelled_many_shot,
           None, None, "pyrit==1.1.0", "GPT judgement Harmful / Not harmful"),
    Source("labelled_xstest", HARM_LABELLED, ("xstest/xstest_v2_completions_llama2orig_gpteval.csv",), parse_labelled_xstest,
           None, None, "paul-rottger/exaggerated-safety", "unsafe prompt + full compliance → 1"),
    Source("labelled_beavertails", HARM_LABELLED, ("beavertails_sample_artkit/beavertails_sample.csv",),
           _labelled(parse_beavertails_sample, 1), "PKU-Alignment/BeaverTails", None, "BCG-X-Official/artkit", "all unsafe"),
    Source("labelled_shadow_alignment", HARM_LABELLED,
           tuple(f"shadow_alignment_heldout/heldout_{m}.csv" for m in ("falcon_7b", "internlm_7b_instruct", "llama2_13b", "vicuna_13b")),
           _labelled(parse_shadow_alignment, 1), None, None, "BeyonderXX/ShadowAlignment outputs/", "refusals dropped"),
    Source("labelled_harmbench_refusals", HARM_LABELLED,
           ("harmbench_adv_training_refusals/adv_training_behaviors_safe_responses_longer.csv",),
           _labelled(parse_harmbench_refusals, 0), None, None, "busycalibrating/AdversariaLLM", "refusals, label 0"),
    Source("labelled_alpaca_eval", HARM_LABELLED, ("alpaca_eval/gpt4_model_outputs.json", "alpaca_eval/text_davinci_003_model_outputs.json"),
           _labelled(parse_alpaca_eval, 0), "tatsu-lab/alpaca_eval", "alpaca_eval", "tatsu-lab/alpaca_eval", "label 0"),
    Source("labelled_alpaca_safety", HARM_LABELLED, ("llm_finetuning_safety/alpaca_data_safety_only.json",),
           _labelled(parse_alpaca_safety_subset, 0), "tatsu-lab/alpaca", None, "LLM-Tuning-Safety/LLMs-Finetuning-Safety", "label 0"),
    Source("labelled_dolly_safety", HARM_LABELLED, ("llm_finetuning_safety/databricks-dolly-15k-safety-only.jsonl",),
           _labelled(parse_dolly_safety_subset, 0), "databricks/databricks-dolly-15k", None,
           "LLM-Tuning-Safety/LLMs-Finetuning-Safety", "label 0"),
    # downstream tasks
    Source("sst2", SST2, ("sst2/train.tsv", "sst2/dev.tsv", "sst2/test.tsv"), _task_prompt("sentence", parse_sst2),
           "nyu-mll/glue", "sst2", "forest-snow/alps", "test = GLUE validation", "source"),
    Source("ag_news", AG_NEWS, ("ag_news/alps_agnews_dev.tsv", "ag_news/alps_agnews_test.tsv"), _task_prompt("text", parse_ag_news),
           "fancyzhx/ag_news", None, "forest-snow/alps", "descriptions; test = AG test", "source"),
    Source("gsm8k", GSM8K, ("gsm8k/train.jsonl", "gsm8k/test.jsonl"), _task_prompt("question", parse_gsm8k),
           "openai/gsm8k", "main", "openai/grade-school-math", "", "source"),
    # multiple choice
    Source("mmlu", "mmlu", ("mmlu/test", "mmlu/dev"), _mc_prompt(parse_mmlu), "cais/mmlu", "all",
           "HaeChan0305/MLILAB-FedLLM", "dev → train (few-shot), test → test", "source"),
    Source("arc_easy", "arc_easy", ("commonsense_mc_llm_adapters/ARC-Easy/test.json",), _mc_prompt(_adapters("ARC-Easy")),
           "allenai/ai2_arc", "ARC-Easy", "AGI-Edgerunners/LLM-Adapters", "test only", "source"),
    Source("arc_challenge", "arc_challenge", ("commonsense_mc_llm_adapters/ARC-Challenge/test.json",), _mc_prompt(_adapters("ARC-Challenge")),
           "allenai/ai2_arc", "ARC-Challenge", "AGI-Edgerunners/LLM-Adapters", "test only", "source"),
    Source("openbookqa", "openbookqa", ("commonsense_mc_llm_adapters/openbookqa/test.json",), _mc_prompt(_adapters("openbookqa")),
           "allenai/openbookqa", "main", "AGI-Edgerunners/LLM-Adapters", "test only", "source"),
    Source("winogrande", "winogrande", ("commonsense_mc_llm_adapters/winogrande/test.json",), _mc_prompt(_adapters("winogrande")),
           "allenai/winogrande", "winogrande_xl", "AGI-Edgerunners/LLM-Adapters", "question has '_' blank", "source"),
    Source("siqa", "siqa", ("commonsense_mc_llm_adapters/social_i_qa/test.json",), _mc_prompt(_adapters("social_i_qa")),
           "allenai/social_i_qa", None, "AGI-Edgerunners/LLM-Adapters", "test only", "source"),
    Source("boolq", "boolq", ("commonsense_mc_llm_adapters/boolq/test.json",), _mc_prompt(parse_boolq),
           "google/boolq", None, "AGI-Edgerunners/LLM-Adapters", "no passages", "source"),
    Source("piqa", "piqa", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), _mc_prompt(parse_piqa),
           "ybisk/piqa", None, "ybisk/ybisk.github.io", "validation set used as test", "source"),
):
    register_source(_source)
