"""Stream specs → records → batch streams: the one data builder behind every method and attack.

A method or attack declares its streams as `StreamSpec`s (which source, split, half, pairing,
which tokens the loss covers); a run config may override each stream's source/split/half and
sets its batch size, length and record limit (`jaxdefense.config.DataSection`). Step i of a
run reads `batch_at(i)` of every stream, so a stream is a pure function of (records, seed).

Pairing: a spec with `pair_with="adversarial"` is the row-by-row partner of that stream: its
records are joined to the partner's by normalised prompt (`data.pairs.pair_records`), and the
two are batched together with one prompt truncation (`data.pairs.PairedBatches`), so both
batches hold the same prompts and differ only in the responses (SEAM's harmful/refusal pair,
DPO's chosen/rejected). The partner's batch size, length and limit apply to both.

Mixing: `data.streams.<name>.mix` appends the records of other sources (each with its own split,
half and limit, defaulting to the stream's) to an unpaired stream's records before batching, so
one stream's shuffled batches draw from the union (e.g. alignment SFT on benign instructions plus
defender-half harmful prompt → refusal pairs).

Loss tokens: `loss_on="response"` marks the response tokens (the SFT default), `"sequence"`
every real token with a real predecessor (a plain language-modelling loss).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxdefense.config import HALVES, DataSection, StreamSection
from jaxdefense.errors import ConfigError, DataError

LOSS_ON = ("response", "sequence")


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """One data stream of a method or attack.

    Args:
      source: a data stream name of the registry (`jaxdefense data list`), e.g. "harmful_qa".
      split: "train" | "validation" | "test" | "all".
      half: "all" | "defender" | "attacker" (prompt-hash halves of the train split, data.pairs).
      pair_with: the name of another stream of the same objective whose rows this one pairs.
      loss_on: "response" | "sequence" — which tokens the loss mask covers.
      limit: use only the first N records of the split (a run's `data.streams.<name>.limit` wins).
    """

    source: str
    split: str = "train"
    half: str = "all"
    pair_with: str | None = None
    loss_on: str = "response"
    limit: int | None = None

    def __post_init__(self):
        if self.half not in HALVES:
            raise ConfigError(f"stream half: {self.half!r} is not one of {HALVES}")
        if self.loss_on not in LOSS_ON:
            raise ConfigError(f"stream loss_on: {self.loss_on!r} is not one of {LOSS_ON}")


@dataclasses.dataclass(frozen=True)
class ResolvedStream:
    """A spec with the run's overrides applied: everything needed to load and batch it."""

    name: str
    spec: StreamSpec
    batch_size: int
    max_len: int
    limit: int | None
    template: str
    options: Mapping[str, Any]
    mix: tuple[StreamSpec, ...] = ()


def resolve_streams(specs: Mapping[str, StreamSpec], data: DataSection, owner: str) -> dict[str, ResolvedStream]:
    """Specs with `data.streams.<name>` laid over them; ConfigError names an unknown or bad stream key."""
    for name in data.streams:
        if name not in specs:
            raise ConfigError(f"data.streams.{name}: {owner} has no stream {name!r} (its streams: {', '.join(specs)})")
    out = {}
    for name, spec in specs.items():
        if spec.pair_with is not None and spec.pair_with not in specs:
            raise ConfigError(f"{owner}: stream {name!r} pairs with unknown stream {spec.pair_with!r}")
        s = data.streams.get(name) or StreamSection()
        changed = {k: getattr(s, k) for k in ("source", "split", "half") if getattr(s, k) is not None}
        spec = dataclasses.replace(spec, **changed)
        if s.mix and spec.pair_with is not None:
            raise ConfigError(f"data.streams.{name}.mix: a paired stream cannot mix in other sources")
        mix = tuple(StreamSpec(m.source, split=m.split or spec.split, half=m.half or spec.half,
                               loss_on=spec.loss_on, limit=m.limit) for m in s.mix)
        out[name] = ResolvedStream(name, spec, s.batch_size or data.batch_size, s.max_len or data.max_len,
                                   s.limit if s.limit is not None else spec.limit,
                                   data.template, dict(s.options), mix)
    for name, r in out.items():
        if r.spec.pair_with is not None:
            partner = out[r.spec.pair_with]
            for key in ("batch_size", "max_len", "limit"):
                if getattr(data.streams.get(name) or StreamSection(), key) not in (None, getattr(partner, key)):
                    raise ConfigError(f"data.streams.{name}.{key}: a paired stream takes its partner "
                                      f"{partner.name!r}'s {key}")
    return out


def load_records(streams: Mapping[str, ResolvedStream], data_dir=None) -> dict[str, list[dict]]:
    """Records per stream (paired streams: the joined pairs, under both names)."""
    from jaxdefense.data.pairs import pair_records, split_half
    from jaxdefense.data.streams import load_stream

    def read(r: ResolvedStream, limit=None, spec: StreamSpec | None = None, key: str = "source"):
        spec = spec or r.spec
        try:
            rows = split_half(load_stream(spec.source, spec.split, data_dir), spec.half)
        except DataError as e:
            raise DataError(f"data.streams.{r.name}.{key}: {e}") from e
        return rows[:limit] if limit is not None else rows

    records = {}
    for name, r in streams.items():
        if r.spec.pair_with is not None:
            partner = streams[r.spec.pair_with]
            pairs = pair_records(read(partner), read(r))[: partner.limit]
            if not pairs:
                raise DataError(f"data.streams.{name}: no {partner.spec.source}/{r.spec.source} pairs in split "
                                f"{partner.spec.split!r} half {partner.spec.half!r}")
            records[name] = records[partner.name] = pairs
    for name, r in streams.items():
        if name not in records:
            records[name] = read(r, r.limit)
            if not records[name]:
                raise DataError(f"data.streams.{name}: source {r.spec.source!r} split {r.spec.split!r} "
                                f"half {r.spec.half!r} has no records")
            for i, m in enumerate(r.mix):
                extra = read(r, m.limit, m, f"mix[{i}].source")
                if not extra:
                    raise DataError(f"data.streams.{name}.mix[{i}]: source {m.source!r} split {m.split!r} "
                                    f"half {m.half!r} has no records")
                records[name] = records[name] + extra
    return records


def tokenizer_texts(records: Mapping[str, list[dict]]) -> list[str]:
    """Every prompt and response of the run's records (what a run-trained BPE learns from)."""
    keys = ("prompt", "response", "paired")
    return [r[k] for rows in records.values() for r in rows for k in keys if isinstance(r.get(k), str)]


class SequenceLoss:
    """A stream whose loss mask is every real token with a real predecessor."""

    def __init__(self, stream):
        self.stream = stream

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        batch = dict(self.stream.batch_at(step))
        real = batch["attention_mask"].astype(np.float32)
        batch["loss_mask"] = real * np.pad(real[:, :-1], ((0, 0), (1, 0)))
        return batch


def build_streams(streams: Mapping[str, ResolvedStream], records: Mapping[str, list[dict]], tokenizer,
                  seed: int) -> dict[str, Any]:
    """{name: stream with batch_at(step)}, each seeded by (run seed, stream name)."""
    from jaxdefense.data.batching import make_batches, stream_seed
    from jaxdefense.data.pairs import PairedBatches

    out: dict[str, Any] = {}
    partners = {r.spec.pair_with for r in streams.values()}
    for name, r in streams.items():
        try:
            if r.spec.pair_with is not None:
                partner = streams[r.spec.pair_with]
                paired = PairedBatches(records[name], tokenizer, partner.batch_size, partner.max_len,
                                       seed=stream_seed(seed, partner.name), template=r.template,
                                       names=(partner.name, name))
                out[partner.name], out[name] = paired.view(partner.name), paired.view(name)
            elif name not in partners:
                out[name] = make_batches(records[name], tokenizer, r.batch_size, r.max_len,
                                         seed=stream_seed(seed, name), template=r.template, **r.options)
        except TypeError as e:
            raise ConfigError(f"data.streams.{name}.options: {e}") from e
        except (ConfigError, DataError) as e:
            raise type(e)(f"data.streams.{name}: {e}") from e
    return {name: SequenceLoss(s) if streams[name].spec.loss_on == "sequence" else s for name, s in out.items()}
