"""Paired harmful/refusal batches (SEAM's D_adv and D_aln) and the defender/attacker halves.

SEAM needs, for the same prompts, one batch of harmful answers and one of refusals, row by row
and padded to one length, so its loss mask (the positions where the two token sequences
differ) can be formed. `pair_records` joins the harmful_qa and refusal streams by normalised
prompt (the refusal stream carries real refusals and, for harmful_qa prompts without one,
templated refusals built from real refusal phrases; see data.streams); `PairedBatches` encodes
both sequences of a pair with ONE prompt truncation, so the prompt tokens coincide and only the
responses differ.

Defender/attacker split of harmful data (no overlap, by the prompt hash u of data.streams,
the same u that assigns train/validation/test):
    defender half: train split with u < 0.4      (SEAM's adversarial + alignment data)
    attacker half: train split with 0.4 ≤ u < 0.8 (harmful-SFT attack data)
    validation/test: never trained on by either (attack curves, evaluation)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxdefense.data.batching import BatchStream, Encoded, collate, prompt_ids, response_ids, truncate
from jaxdefense.data.sources import normalize_text
from jaxdefense.data.streams import SPLIT_RATIOS, prompt_bucket
from jaxdefense.errors import ConfigError, DataError

HALVES = ("all", "defender", "attacker")
DEFENDER_CUT = SPLIT_RATIOS[0] / 2


def split_half(records: Sequence[dict], half: str) -> list[dict]:
    """Records of the defender (u < 0.4) or attacker (0.4 ≤ u) half; "all" keeps every record.

    Meant for the train split (u < 0.8); on validation/test every record is in the attacker half.
    """
    if half not in HALVES:
        raise ConfigError(f"half: {half!r} is not one of {HALVES}")
    if half == "all":
        return list(records)
    defender = half == "defender"
    return [r for r in records if (prompt_bucket(r["prompt"]) < DEFENDER_CUT) == defender]


def pair_records(primary: Sequence[dict], partners: Sequence[dict]) -> list[dict]:
    """Primary records that have a partner record for the same (normalised) prompt, as
    {prompt, response (primary), paired (partner's response), id, source, paired_source, category};
    the first partner of a prompt wins."""
    by_prompt: dict[str, dict] = {}
    for r in partners:
        by_prompt.setdefault(normalize_text(r["prompt"]), r)
    out = []
    for h in primary:
        r = by_prompt.get(normalize_text(h["prompt"]))
        if r is not None and h.get("response") and r.get("response"):
            out.append({"prompt": h["prompt"], "response": h["response"], "paired": r["response"],
                        "id": h.get("id"), "source": h.get("source"), "paired_source": r.get("source"),
                        "category": h.get("category")})
    return out


def load_pairs(split: str = "train", half: str = "defender", data_dir=None, limit: int | None = None,
               harmful_stream: str = "harmful_qa", refusal_stream: str = "refusal") -> list[dict]:
    """Paired records of one split (and half), in the harmful stream's fixed order."""
    from jaxdefense.data import load_stream

    harmful = split_half(load_stream(harmful_stream, split, data_dir), half)
    pairs = pair_records(harmful, load_stream(refusal_stream, split, data_dir))
    if not pairs:
        raise DataError(f"no {harmful_stream}/{refusal_stream} pairs in split {split!r} half {half!r}")
    return pairs[:limit] if limit is not None else pairs


def encode_pair(tokenizer, prompt: str, harmful: str, refusal: str, max_len: int, template="chat") -> tuple[Encoded, Encoded]:
    """Both sequences with the same (most truncated) prompt, responses cut to fit max_len."""
    p = prompt_ids(tokenizer, prompt, template)
    rh, rr = response_ids(tokenizer, harmful), response_ids(tokenizer, refusal)
    bos = getattr(tokenizer, "bos_token_id", None)
    p = min((truncate(p, r, max_len, bos)[0] for r in (rh, rr)), key=len)
    out = []
    for r in (rh, rr):
        r = r[: max(0, max_len - len(p))]
        mask = [0] * len(p) + [1] * len(r)
        mask[0] = 0
        if not any(mask):
            raise DataError(f"pair with prompt {prompt[:60]!r}: no response token left (max_len {max_len})")
        out.append(Encoded(tuple(int(i) for i in p + r), tuple(mask), False, False))
    return out[0], out[1]


class PairedBatches:
    """Row-aligned harmful/refusal batches: `batch_at(step)` -> {"adversarial": b, "alignment": b}
    (names configurable); `view(name)` is a train-loop stream over one side."""

    def __init__(self, pairs: Sequence[dict], tokenizer, batch_size: int, max_len: int, seed: int = 0, *,
                 template="chat", names: tuple[str, str] = ("adversarial", "alignment"), shuffle: bool = True):
        if not pairs:
            raise DataError("cannot batch an empty list of pairs")
        # BatchStream provides the deterministic, resumable order; rows are encoded here in pairs.
        self.order = BatchStream([{"prompt": p["prompt"], "response": p["response"]} for p in pairs],
                                 tokenizer, batch_size, max_len, seed, template=template, shuffle=shuffle)
        self.pairs, self.tokenizer, self.max_len, self.template = list(pairs), tokenizer, max_len, template
        self.names = names
        self.pad_id = self.order.pad_id
        self._cache: dict[int, tuple[Encoded, Encoded]] = {}

    def example(self, index: int) -> tuple[Encoded, Encoded]:
        if index not in self._cache:
            p = self.pairs[index]
            self._cache[index] = encode_pair(self.tokenizer, p["prompt"], p["response"], p["paired"],
                                             self.max_len, self.template)
        return self._cache[index]

    def batch_at(self, step: int) -> dict[str, dict[str, np.ndarray]]:
        rows = [self.example(i) for i in self.order.indices_at(step)]
        return {name: collate([r[k] for r in rows], self.max_len, self.pad_id) for k, name in enumerate(self.names)}

    def view(self, name: str) -> PairedView:
        if name not in self.names:
            raise ConfigError(f"paired stream name {name!r} is not one of {self.names}")
        return PairedView(self, name)


class PairedView:
    """One side of a PairedBatches (same rows at every step as the other side)."""

    def __init__(self, paired: PairedBatches, name: str):
        self.paired, self.name = paired, name

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        return self.paired.batch_at(step)[self.name]
