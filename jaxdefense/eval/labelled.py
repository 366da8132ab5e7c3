"""Labelled (prompt, response, harmful?) examples for the harmfulness judge: the data registry's
`harm_labelled` stream (jaxdefense.data.sources, "labelled" sources), split by the shared prompt
hash (`jaxdefense.data.streams.hash_split`), so the judge's train split holds no response to a
validation/test prompt of any stream. Labels come from humans or published judges (see the
table in jaxdefense/data/sources.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from jaxdefense.data import sources as S
from jaxdefense.data.streams import hash_split, load_stream
from jaxdefense.errors import DataError

STREAM = S.HARM_LABELLED
SOURCES: tuple[str, ...] = tuple(s.name for s in S.sources_for_stream(STREAM))


@dataclass(frozen=True)
class LabelledResponse:
    prompt: str
    response: str
    label: int
    source: str
    split: str


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """--data-dir, then $JAXDEFENSE_DATA_DIR, then ../shared/data beside the repo (DESIGN.md)."""
    from jaxdefense.data.root import resolve_data_root

    return Path(resolve_data_root(data_dir))


def split_of(prompt: str) -> str:
    """The shared prompt-hash split ("train" | "validation" | "test") of a prompt."""
    return hash_split(prompt)


def load_labelled_responses(
    data_dir: str | os.PathLike | None = None, sources: tuple[str, ...] = SOURCES, split: str = "all"
) -> list[LabelledResponse]:
    """Records of the harm_labelled stream (fixed order, de-duplicated), restricted to `sources`."""
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise DataError(f"unknown judge data source {unknown[0]!r}; known: {', '.join(SOURCES)}")
    wanted = set(sources)
    return [
        LabelledResponse(r["prompt"], r["response"], int(r["label"]), r["source"], r["split"])
        for r in load_stream(STREAM, split, data_dir)
        if r["source"] in wanted
    ]
