"""Downstream tasks (prompt template, target string, accuracy) and multiple-choice scoring pairs.

Task streams' records already carry the templated "prompt" and the SFT "response" (the target
for classification, the worked answer for GSM8K), so benign fine-tuning on a task reuses the
ordinary SFT batching. `accuracy(predictions, records)` scores generated text against
`record["target"]`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from jaxdefense.data.sources import AG_NEWS_CLASSES
from jaxdefense.errors import DataError

SST2_CLASSES = ("negative", "positive")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def first_class_mentioned(prediction: str, classes: Sequence[str]) -> str | None:
    """The class name that occurs earliest in the prediction (case-insensitive, whole word)."""
    best, best_at = None, len(prediction) + 1
    lowered = prediction.lower()
    for name in classes:
        match = re.search(rf"(?<![\w/]){re.escape(name.lower())}(?![\w/])", lowered)
        if match and match.start() < best_at:
            best, best_at = name, match.start()
    return best


def _canonical_number(text: str) -> str | None:
    text = text.replace(",", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def gsm8k_final_number(text: str) -> str | None:
    """Number after the last '####' if there is one, else the last number in the text; canonical form."""
    text = text.replace("$", "")
    if "####" in text:
        match = _NUMBER.search(text.rsplit("####", 1)[1])
        return None if match is None else _canonical_number(match.group(0))
    numbers = _NUMBER.findall(text)
    return _canonical_number(numbers[-1]) if numbers else None


@dataclass(frozen=True)
class Task:
    name: str
    template: str
    input_key: str
    target: Callable[[dict], str]
    response: Callable[[dict], str]
    score: Callable[[str, dict], bool]

    def format_prompt(self, record: dict) -> str:
        return self.template.format(**{self.input_key: record[self.input_key]})

    def accuracy(self, predictions: Sequence[str], records: Sequence[dict]) -> float:
        """Share of predictions scored correct against `record["target"]`."""
        if len(predictions) != len(records):
            raise DataError(f"{self.name}: {len(predictions)} predictions for {len(records)} records")
        if not records:
            raise DataError(f"{self.name}: accuracy of zero records")
        return sum(self.score(p, r) for p, r in zip(predictions, records)) / len(records)


def _class_score(classes: Sequence[str]) -> Callable[[str, dict], bool]:
    def score(prediction: str, record: dict) -> bool:
        return first_class_mentioned(prediction, classes) == record["target"]

    return score


def _gsm8k_score(prediction: str, record: dict) -> bool:
    return gsm8k_final_number(prediction) == record["target"]


def _gsm8k_target(record: dict) -> str:
    target = gsm8k_final_number(record["answer"]) if "####" in record["answer"] else None
    if target is None:
        raise DataError(f"gsm8k: answer without '#### <number>' in {record.get('id', '?')}")
    return target


TASKS: dict[str, Task] = {
    "sst2": Task(
        "sst2",
        "Analyze the sentiment of the input, and respond only positive or negative.\n\nInput: {sentence}",
        "sentence",
        target=lambda r: SST2_CLASSES[r["label"]],
        response=lambda r: SST2_CLASSES[r["label"]],
        score=_class_score(SST2_CLASSES),
    ),
    "ag_news": Task(
        "ag_news",
        "Categorize the news article given in the input into one of the 4 categories:\n\n"
        + "\n".join(AG_NEWS_CLASSES)
        + "\n\nInput: {text}",
        "text",
        target=lambda r: AG_NEWS_CLASSES[r["label"]],
        response=lambda r: AG_NEWS_CLASSES[r["label"]],
        score=_class_score(AG_NEWS_CLASSES),
    ),
    "gsm8k": Task(
        "gsm8k",
        "{question}\nFirst think step by step and then answer the final number after '####'.",
        "question",
        target=_gsm8k_target,
        response=lambda r: r["answer"],
        score=_gsm8k_score,
    ),
}


def accuracy(task: str, predictions: Sequence[str], records: Sequence[dict]) -> float:
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return TASKS[task].accuracy(predictions, records)


# ---------------------------------------------------------------- multiple choice


def mc_pairs(stream: str, record: dict) -> list[tuple[str, str]]:
    """(context, continuation) per choice for log-likelihood scoring; score = log p(continuation | context).

    Winogrande uses partial scoring: the option fills the blank inside the context and the
    continuation is the rest of the sentence (as in lm-evaluation-harness).
    """
    question, choices = record["question"], record["choices"]
    if stream == "winogrande":
        blank = question.find("_")
        if blank < 0:
            raise DataError(f"{record.get('id', '?')}: winogrande sentence has no '_' blank")
        rest = " " + question[blank + 1 :].strip()
        return [(question[:blank] + choice, rest) for choice in choices]
    if stream == "boolq":
        return [(f"Question: {question.rstrip('?')}?\nAnswer:", f" {choice}") for choice in choices]
    return [(f"Question: {question}\nAnswer:", f" {choice}") for choice in choices]


def mc_accuracy(scores: Sequence[Sequence[float]], records: Sequence[dict]) -> float:
    """Share of records whose highest-scoring choice is `record["answer"]` (first max on ties)."""
    if len(scores) != len(records) or not records:
        raise DataError(f"mc_accuracy: {len(scores)} score rows for {len(records)} records")
    correct = 0
    for row, record in zip(scores, records):
        if len(row) != len(record["choices"]):
            raise DataError(f"{record.get('id', '?')}: {len(row)} scores for {len(record['choices'])} choices")
        correct += max(range(len(row)), key=lambda i: (row[i], -i)) == record["answer"]
    return correct / len(records)
