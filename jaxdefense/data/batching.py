"""Tokenisation of (prompt, response) records and deterministic, resumable batching.

Example layout (one row, right padded to max_len):

    [BOS] prompt-template tokens | response tokens [EOS] | <pad> …
    loss_mask:        0 …  0     |     1 …     1      1  |   0 …

loss_mask[t] = 1 marks token t as a target (predicted from position t − 1): the response
tokens and the EOS, never the prompt, never padding, never position 0.

Tokenisation: prompt ids = tokenizer(format_prompt(prompt), add_special_tokens=not chat) —
the same ids `jaxdefense.data.formatting.encode_prompts` feeds generation (BOS from the tokenizer for
plain templates, the template's own specials for chat) — and response ids =
tokenizer(response, add_special_tokens=False, split_special_tokens=True) + [eos], so a literal
"</s>" inside a response stays text.

Truncation when len(P) + len(R) > max_len:
  1. the prompt loses tokens from the LEFT (its BOS, if first, is kept) down to
     max(max_len − len(R), min(len(P), max(1, max_len // 4)));
  2. the response is then cut from the RIGHT to fill the rest (the EOS goes first when cut).
So a long prompt shrinks before any response token is dropped, and the prompt always keeps
its last ⌊max_len/4⌋ tokens (the template tail that announces the response).

Batch order: global example slot g = step·B + i reads example perm_e[g mod N], e = g div N,
perm_e = a permutation drawn from SeedSequence([seed, e]); the batch at step k is a pure
function of (records, tokenizer, seed, k), so a resumed run sees the same data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from jaxdefense.data.formatting import Template, format_prompt, uses_chat_template
from jaxdefense.errors import ConfigError, DataError


@dataclass(frozen=True)
class Encoded:
    """One example: ids, targets mask, and whether truncation removed prompt or response tokens."""

    input_ids: tuple[int, ...]
    loss_mask: tuple[int, ...]
    prompt_truncated: bool
    response_truncated: bool


def _record_label(record: dict, index: int | None) -> str:
    where = f"record {index}" if index is not None else "record"
    return f"{where} (source {record.get('source', '?')!r}, id {record.get('id', '?')!r})"


def _eos_id(tokenizer) -> int | None:
    return getattr(tokenizer, "eos_token_id", None)


def pad_id_of(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def prompt_ids(tokenizer, prompt: str, template: Template = "chat") -> list[int]:
    """Ids of the formatted prompt: the tokenizer's own specials (e.g. BOS) unless a chat template supplies them."""
    text = format_prompt(tokenizer, prompt, template)
    return list(tokenizer(text, add_special_tokens=not uses_chat_template(tokenizer, template))["input_ids"])


def response_ids(tokenizer, response: str) -> list[int]:
    """Ids of the response text (special-token strings kept as text) followed by EOS when the tokenizer has one."""
    ids = list(tokenizer(response, add_special_tokens=False, split_special_tokens=True)["input_ids"]) if response else []
    eos = _eos_id(tokenizer)
    return ids + ([eos] if eos is not None else [])


def truncate(prompt: list[int], response: list[int], max_len: int, bos_id: int | None = None) -> tuple[list[int], list[int]]:
    """Apply the module's truncation rule; returns (prompt, response) with len sum ≤ max_len."""
    if len(prompt) + len(response) <= max_len:
        return prompt, response
    floor = min(len(prompt), max(1, max_len // 4))
    keep = max(max_len - len(response), floor)
    if keep < len(prompt):
        if prompt and bos_id is not None and prompt[0] == bos_id and keep >= 1:
            prompt = [prompt[0]] + (prompt[len(prompt) - keep + 1 :] if keep > 1 else [])
        else:
            prompt = prompt[len(prompt) - keep :]
    return prompt, response[: max(0, max_len - len(prompt))]


def encode_example(tokenizer, prompt: str, response: str, max_len: int, template: Template = "chat", *,
                   record: dict | None = None, index: int | None = None) -> Encoded:
    """Token ids of prompt + response (+ EOS) and the response-only loss mask, at most max_len long.

    Raises DataError (naming `index` and the record's source) when the prompt and response are
    both empty or no target token is left after truncation.
    """
    if max_len < 2:
        raise ConfigError(f"max_len must be ≥ 2, got {max_len}")
    label = _record_label(record or {}, index)
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise DataError(f"{label}: prompt and response must be strings, got {type(prompt).__name__} and {type(response).__name__}")
    if not prompt.strip() and not response.strip():
        raise DataError(f"{label}: empty prompt and empty response")
    p_ids, r_ids = prompt_ids(tokenizer, prompt, template), response_ids(tokenizer, response)
    p_cut, r_cut = truncate(p_ids, r_ids, max_len, getattr(tokenizer, "bos_token_id", None))
    ids = p_cut + r_cut
    mask = [0] * len(p_cut) + [1] * len(r_cut)
    if mask:
        mask[0] = 0
    if not any(mask):
        raise DataError(f"{label}: no response token left to train on (max_len {max_len}, prompt {len(p_ids)} tokens)")
    return Encoded(tuple(int(i) for i in ids), tuple(mask), len(p_cut) < len(p_ids), len(r_cut) < len(r_ids))


def collate(examples: Sequence[Encoded], max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded batch dict: input_ids int32, attention_mask int32, loss_mask float32, all [B, max_len]."""
    batch = len(examples)
    input_ids = np.full((batch, max_len), pad_id, np.int32)
    attention_mask = np.zeros((batch, max_len), np.int32)
    loss_mask = np.zeros((batch, max_len), np.float32)
    for b, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[b, :n] = example.input_ids
        attention_mask[b, :n] = 1
        loss_mask[b, :n] = example.loss_mask
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def pack_examples(examples: Sequence[Encoded], max_len: int) -> list[Encoded]:
    """Greedy packing in the given order: whole examples are concatenated while they fit in max_len.

    Packed examples attend to earlier ones in the same row (plain causal attention, positions
    continue across the row); loss masks are kept per token. Use for pre-training-style runs.
    """
    rows, ids, mask = [], [], []
    for example in examples:
        if ids and len(ids) + len(example.input_ids) > max_len:
            rows.append(Encoded(tuple(ids), tuple(mask), False, False))
            ids, mask = [], []
        ids += example.input_ids
        mask += example.loss_mask
    if ids:
        rows.append(Encoded(tuple(ids), tuple(mask), False, False))
    return rows


def stream_seed(seed: int, name: str) -> int:
    """A per-stream seed derived from a run seed and a stream name (stable across machines)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:4], "big")


class BatchStream:
    """Deterministic batches over a list of records: `batch_at(step)` is pure in (seed, step).

    Examples are tokenised on first use and cached (all at once when `pack=True`). Iterating
    yields batch_at(start_step), batch_at(start_step + 1), … without end.
    """

    def __init__(self, records: Sequence[dict], tokenizer, batch_size: int, max_len: int, seed: int = 0, *,
                 template: Template = "chat", pack: bool = False, shuffle: bool = True, start_step: int = 0):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be ≥ 1, got {batch_size}")
        if max_len < 2:
            raise ConfigError(f"max_len must be ≥ 2, got {max_len}")
        if not records:
            raise DataError("cannot batch an empty list of records")
        for index, record in enumerate(records):
            prompt, response = record.get("prompt"), record.get("response")
            if not isinstance(prompt, str):
                raise DataError(f"{_record_label(record, index)}: no text 'prompt'")
            if not isinstance(response, str):
                raise DataError(f"{_record_label(record, index)}: no text 'response' (prompt-only records cannot be trained on)")
            if not prompt.strip() and not response.strip():
                raise DataError(f"{_record_label(record, index)}: empty prompt and empty response")
        self.records = list(records)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_len = max_len
        self.seed = int(seed)
        self.template = template
        self.shuffle = shuffle
        self.start_step = start_step
        self.pad_id = pad_id_of(tokenizer)
        self._cache: dict[int, Encoded] = {}
        self._perm: tuple[int, np.ndarray] | None = None
        self._rows: list[Encoded] | None = None
        if pack:
            order = np.random.default_rng(np.random.SeedSequence([self.seed, 2**31 - 1])).permutation(len(self.records))
            self._rows = pack_examples([self.example(int(i)) for i in order], max_len)

    def example(self, index: int) -> Encoded:
        if index not in self._cache:
            record = self.records[index]
            self._cache[index] = encode_example(self.tokenizer, record["prompt"], record["response"], self.max_len,
                                                self.template, record=record, index=index)
        return self._cache[index]

    @property
    def num_rows(self) -> int:
        """Rows drawn per epoch: examples, or packed rows with pack=True."""
        return len(self._rows) if self._rows is not None else len(self.records)

    @property
    def steps_per_epoch(self) -> float:
        return self.num_rows / self.batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
            self._perm = (epoch, rng.permutation(self.num_rows))
        return self._perm[1]

    def indices_at(self, step: int) -> list[int]:
        """Row indices of the batch at `step` (epochs wrap inside a batch, so every batch is full)."""
        if step < 0:
            raise ConfigError(f"step must be ≥ 0, got {step}")
        n, out = self.num_rows, []
        for slot in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(int(self._permutation(slot // n)[slot % n]))
        return out

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        rows = self.indices_at(step)
        examples = [self._rows[i] for i in rows] if self._rows is not None else [self.example(i) for i in rows]
        return collate(examples, self.max_len, self.pad_id)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        step = self.start_step
        while True:
            yield self.batch_at(step)
            step += 1


def make_batches(records: Sequence[dict], tokenizer, batch_size: int, max_len: int, seed: int = 0,
                 start_step: int = 0, **options) -> BatchStream:
    """A `BatchStream` (iterable from `start_step`; `batch_at(k)` for random access). Options:
    template ("chat"), pack (False), shuffle (True)."""
    return BatchStream(records, tokenizer, batch_size, max_len, seed, start_step=start_step, **options)


def batches_at(streams: dict[str, BatchStream], step: int) -> dict[str, dict[str, np.ndarray]]:
    """{stream name: batch} at one step — the `batches` argument of a method's grad function."""
    return {name: stream.batch_at(step) for name, stream in streams.items()}
