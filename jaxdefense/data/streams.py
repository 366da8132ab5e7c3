"""Streams: named unions of sources, de-duplicated, split by prompt into train/validation/test.

Split rule ("hash" policy, all safety streams). Each prompt is normalised (`normalize_text`:
NFKC, straight quotes, lower case, collapsed whitespace) and hashed with a fixed salt:

    u = int(sha256(SALT + "\\0" + normalised)[:8]) / 2**64   ∈ [0, 1)
    split = train if u < 0.8, validation if u < 0.9, else test          (80 / 10 / 10)

The same prompt gets the same bucket in EVERY stream, so no test prompt of one stream is a
train prompt of another (e.g. a JailbreakBench goal in harmful_prompts_eval/test is never a
harmful_qa or refusal training prompt). Only "test" is leakage-free; "all" is offered for
users who want a whole benchmark and know what they trained on.

"source" policy (downstream tasks, multiple choice): the source's own splits are kept
(GSM8K/SST-2/AG-News test, MMLU dev→train + test, commonsense sets test only). Where a source
has a train file but no validation file, 10% of its train prompts (u ≥ 0.9) become validation.
Then a prompt in test is removed from train/validation and one in validation from train, so
splits never share a prompt.

The labelled stream "harm_labelled" (prompt, response, 0/1 label from humans or published
judges) is split by the same rule, so the harm judge, trained on harm_labelled/train, never sees a
response to a prompt of any stream's validation or test split (e.g. the harmful_prompts_eval and
benign_instruct test prompts the evaluation generates on).

Within a split, records are ordered by sha256(SALT + id): a fixed shuffle, so `limit=n`
takes a mix of sources, identical on every machine.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass

from jaxdefense.data import sources as S
from jaxdefense.data.refusal import is_refusal
from jaxdefense.data.root import resolve_data_root
from jaxdefense.errors import DataError

SPLIT_SALT = "jaxdefense-split-v1"
SPLITS = ("train", "validation", "test")
SPLIT_RATIOS = (0.8, 0.1, 0.1)
VALIDATION_FRACTION_OF_SOURCE_TRAIN = 0.1

TEMPLATED_SOURCE = "templated_refusals"
# prompts of these sources are not reliably harmful requests (red-team chit-chat, text
# continuations), so they get no templated refusal
NO_TEMPLATED_REFUSAL = frozenset({"hh_rlhf_harmless_rejected", "decodingtrust_toxic"})


@dataclass(frozen=True)
class Stream:
    name: str
    kind: str  # "pairs" (prompt+response), "labelled" (pairs + 0/1 "label"), "prompts", "task", "mc"
    description: str


STREAMS: dict[str, Stream] = {
    s.name: s
    for s in (
        Stream(S.HARMFUL_QA, "pairs", "harmful prompt + harmful response (harm category where known)"),
        Stream(S.REFUSAL, "pairs", "harmful prompt + refusal (real refusals, then templated ones)"),
        Stream(S.BENIGN_INSTRUCT, "pairs", "benign instruction + helpful response"),
        Stream(S.HARMFUL_PROMPTS_EVAL, "prompts", "harmful prompts for harmfulness evaluation"),
        Stream(S.XSTEST, "prompts", "XSTest over-refusal prompts (label safe/unsafe)"),
        Stream(S.HARM_LABELLED, "labelled", "prompt + response + label (1 harmful, 0 not; human or published-judge labels)"),
        Stream(S.SST2, "task", "SST-2 sentiment → positive/negative"),
        Stream(S.AG_NEWS, "task", "AG News topic → World/Sports/Business/Sci/Tech"),
        Stream(S.GSM8K, "task", "GSM8K question → worked answer ending '#### n'"),
        *(Stream(name, "mc", f"{name} multiple choice {{question, choices, answer}}") for name in S.MC_STREAMS),
    )
}


def list_streams() -> list[str]:
    return list(STREAMS)


def _digest(text: str) -> bytes:
    return hashlib.sha256(f"{SPLIT_SALT}\0{text}".encode("utf-8")).digest()


def prompt_bucket(prompt: str) -> float:
    """u ∈ [0, 1) from the salted sha256 of the normalised prompt (machine independent)."""
    return int.from_bytes(_digest(S.normalize_text(prompt))[:8], "big") / 2.0**64


def hash_split(prompt: str) -> str:
    u = prompt_bucket(prompt)
    if u < SPLIT_RATIOS[0]:
        return "train"
    if u < SPLIT_RATIOS[0] + SPLIT_RATIOS[1]:
        return "validation"
    return "test"


# ---------------------------------------------------------------- templated refusals

_GENERIC_OPENER = re.compile(r"^[^\n,]*,?[^\n,]*\b(request|question|that|this)[.!]$")
_MAX_OPENER_WORDS = 12
_GENERIC_FOLLOW_UP = re.compile(
    r"^(Is there (anything|something) else I can help( you)? with\?"
    r"|If you have any other questions( or (requests|prompts))?, I('ll| will| would) "
    r"(be happy to|do my best to)( try( to| and))? (help|assist you)\.)$"
)


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def refusal_phrasebook(real_refusals: list[dict]) -> tuple[list[str], list[str]]:
    """Generic openers and follow-ups taken verbatim from real refusal texts (sorted, unique).

    An opener is a refusal's first sentence of at most 12 words, with at most one comma, that is
    itself refusal-like and ends in "... request/question/that/this." (so it names nothing prompt
    specific); a follow-up is a
    later sentence such as "Is there anything else I can help you with?".
    """
    openers, follow_ups = set(), set()
    for record in real_refusals:
        sentences = _sentences(record["response"])
        if (
            sentences
            and len(sentences[0].split()) <= _MAX_OPENER_WORDS
            and _GENERIC_OPENER.match(sentences[0])
            and is_refusal(sentences[0])
        ):
            openers.add(sentences[0])
        follow_ups.update(s for s in sentences[1:] if _GENERIC_FOLLOW_UP.match(s))
    return sorted(openers), sorted(follow_ups)


def templated_refusal(prompt: str, openers: list[str], follow_ups: list[str]) -> str:
    """opener[h mod n] (+ follow_up[(h div n) mod (m+1)] unless that index is m), h = prompt hash."""
    h = int.from_bytes(_digest("refusal\0" + S.normalize_text(prompt))[8:16], "big")
    opener = openers[h % len(openers)]
    pick = (h // len(openers)) % (len(follow_ups) + 1)
    return opener if pick == len(follow_ups) else f"{opener} {follow_ups[pick]}"


# ---------------------------------------------------------------- stream building


def _category_index(root) -> dict[str, str]:
    index: dict[str, str] = {}
    for stream in (S.HARMFUL_PROMPTS_EVAL, S.HARMFUL_QA):
        for source in S.sources_for_stream(stream):
            for record in S.load_source(source.name, root):
                if record.get("category"):
                    index.setdefault(S.normalize_text(record["prompt"]), record["category"])
    return index


def _dedupe(records: list[dict], by_response: bool) -> list[dict]:
    seen, out = set(), []
    for record in records:
        key = S.normalize_text(record["prompt"])
        if by_response:
            key = (key, S.normalize_text(record.get("response") or ""))
        if key not in seen:
            seen.add(key)
            out.append(record)
    return out


def _task_records(name: str, records: list[dict]) -> list[dict]:
    from jaxdefense.data.tasks import TASKS

    task = TASKS[name]
    return [{**r, "prompt": task.format_prompt(r), "response": task.response(r), "target": task.target(r)} for r in records]


def _assign_source_splits(records: list[dict]) -> dict[str, list[dict]]:
    by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for record in records:
        split = record["source_split"]
        if split == "train_or_validation":
            split = "validation" if prompt_bucket(record["prompt"]) >= 1 - VALIDATION_FRACTION_OF_SOURCE_TRAIN else "train"
        if split not in by_split:
            raise DataError(f"{record['id']}: unknown source split {split!r}")
        by_split[split].append(record)
    taken = {S.normalize_text(r["prompt"]) for r in by_split["test"]}
    for split in ("validation", "train"):
        by_split[split] = [r for r in by_split[split] if S.normalize_text(r["prompt"]) not in taken]
        taken |= {S.normalize_text(r["prompt"]) for r in by_split[split]}
    return by_split


def _order_key(record: dict) -> bytes:
    return _digest("order\0" + record["id"])


def _build(name: str, root) -> dict[str, list[dict]]:
    stream = STREAMS[name]
    sources = S.sources_for_stream(name)
    records = [r for source in sources for r in S.load_source(source.name, root)]
    if stream.kind == "task":
        records = _task_records(name, records)
    if name in (S.HARMFUL_QA, S.REFUSAL, S.HARMFUL_PROMPTS_EVAL):
        categories = _category_index(root)
        records = [
            r if r.get("category") else {**r, "category": categories.get(S.normalize_text(r["prompt"]))} for r in records
        ]
    if stream.kind in ("pairs", "labelled", "prompts"):
        records = _dedupe([r for r in records if stream.kind == "prompts" or S.normalize_text(r.get("response") or "")],
                          by_response=stream.kind != "prompts")
    if name == S.REFUSAL:
        records = [{**r, "templated": False} for r in records] + _templated_refusals(records, root)
    if all(s.split_policy == "hash" for s in sources):
        by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
        for record in records:
            by_split[hash_split(record["prompt"])].append(record)
    else:
        by_split = _assign_source_splits(records)
    return {
        split: [{**r, "split": split} for r in sorted(rows, key=_order_key)] for split, rows in by_split.items()
    }


def _templated_refusals(real: list[dict], root) -> list[dict]:
    openers, follow_ups = refusal_phrasebook(real)
    if not openers:
        return []
    covered = {S.normalize_text(r["prompt"]) for r in real}
    out = []
    for stream in (S.HARMFUL_QA, S.HARMFUL_PROMPTS_EVAL):
        for record in _stream_records(stream, root):
            key = S.normalize_text(record["prompt"])
            if record["source"] in NO_TEMPLATED_REFUSAL or key in covered or not key:
                continue
            covered.add(key)
            out.append({
                "prompt": record["prompt"],
                "response": templated_refusal(record["prompt"], openers, follow_ups),
                "category": record.get("category"),
                "source": TEMPLATED_SOURCE,
                "id": f"{TEMPLATED_SOURCE}:{record['id']}",
                "templated": True,
                "prompt_source": record["source"],
            })
    return out


_STREAM_CACHE: dict[tuple[str, str], dict[str, list[dict]]] = {}
_STREAM_LOCK = threading.RLock()


def _stream_records(name: str, root) -> list[dict]:
    return [r for rows in _stream_splits(name, root).values() for r in rows]


def _stream_splits(name: str, root) -> dict[str, list[dict]]:
    if name not in STREAMS:
        raise DataError(f"unknown data stream {name!r}; known: {', '.join(STREAMS)}")
    key = (name, str(root))
    with _STREAM_LOCK:
        if key not in _STREAM_CACHE:
            _STREAM_CACHE[key] = _build(name, root)
        return _STREAM_CACHE[key]


def clear_cache() -> None:
    with _STREAM_LOCK:
        _STREAM_CACHE.clear()
    S.clear_cache()


def load_stream(name: str, split: str = "train", data_dir=None, limit: int | None = None) -> list[dict]:
    """Records of stream `name` in `split` ("train" | "validation" | "test" | "all"), fixed order.

    Each record is a fresh dict with at least "prompt", "source", "id", "split", "category";
    "response" for pair, labelled and task streams; "label" (0/1) for labelled streams; {"question", "choices", "answer"} for multiple choice.
    """
    if split not in (*SPLITS, "all"):
        raise DataError(f"unknown split {split!r}; use train, validation, test or all")
    if limit is not None and limit < 0:
        raise DataError(f"limit must be ≥ 0, got {limit}")
    root = resolve_data_root(data_dir)
    by_split = _stream_splits(name, root)
    rows = [r for s in SPLITS for r in by_split[s]] if split == "all" else by_split[split]
    if limit is not None:
        rows = rows[:limit]
    return [dict(r) for r in rows]


def split_sizes(name: str, data_dir=None) -> dict[str, int]:
    root = resolve_data_root(data_dir)
    return {split: len(rows) for split, rows in _stream_splits(name, root).items()}


def list_sources(data_dir=None, stream: str | None = None) -> list[dict]:
    """One row per source: name, stream, hub id, parsed rows, and its rows per split after de-duplication."""
    root = resolve_data_root(data_dir)
    names = [stream] if stream is not None else list(STREAMS)
    table = []
    for name in names:
        by_split = _stream_splits(name, root)
        counts: dict[str, dict[str, int]] = {}
        for split, rows in by_split.items():
            for record in rows:
                per = counts.setdefault(record["source"], dict.fromkeys(SPLITS, 0))
                per[split] += 1
        for source in S.sources_for_stream(name):
            per = counts.get(source.name, dict.fromkeys(SPLITS, 0))
            table.append({
                "name": source.name, "stream": name, "hub_id": source.hub_label(),
                "rows": len(S.load_source(source.name, root)), **per,
            })
        if TEMPLATED_SOURCE in counts:
            per = counts[TEMPLATED_SOURCE]
            table.append({"name": TEMPLATED_SOURCE, "stream": name, "hub_id": "-", "rows": sum(per.values()), **per})
    return table
