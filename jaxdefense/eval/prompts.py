"""User prompt files for `jaxdefense eval --prompts FILE`: JSONL, JSON list, CSV/TSV or plain text.

The prompt is the first present field of PROMPT_FIELDS ("prompt", "goal", "Behavior", …;
case-insensitive) in each JSON object or CSV row; a .txt file has one prompt per line.
Any problem raises DataError naming the file (and the line or the columns found).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from jaxdefense.errors import DataError

PROMPT_FIELDS = ("prompt", "goal", "behavior", "instruction", "question", "query", "text")


def _pick_field(keys, path: Path, where: str) -> str:
    lowered = {str(k).strip().lower(): k for k in keys if k is not None}
    for name in PROMPT_FIELDS:
        if name in lowered:
            return lowered[name]
    raise DataError(f"{path}: {where} has no prompt field (looked for {', '.join(PROMPT_FIELDS)}; "
                    f"found {', '.join(map(str, keys)) or 'none'})")


def _from_objects(objects, path: Path, where) -> list[str]:
    prompts = []
    for i, obj in enumerate(objects):
        if isinstance(obj, str):
            prompts.append(obj)
            continue
        if not isinstance(obj, dict):
            raise DataError(f"{path}: {where(i)} is a {type(obj).__name__}, not an object with a 'prompt' field")
        value = obj[_pick_field(obj.keys(), path, where(i))]
        if not isinstance(value, str):
            raise DataError(f"{path}: {where(i)} prompt is a {type(value).__name__}, not a string")
        prompts.append(value)
    return prompts


def load_prompt_file(path: str | os.PathLike) -> list[str]:
    """Prompts of a .jsonl/.json/.csv/.tsv/.txt file, in file order, blank prompts dropped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompt file does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read prompt file ({e})") from e
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        objects = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    objects.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from e
        prompts = _from_objects([o for _, o in objects], path, lambda i: f"line {objects[i][0]}")
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of prompts or objects, got {type(data).__name__}")
        prompts = _from_objects(data, path, lambda i: f"item {i}")
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(keepends=True), delimiter="\t" if suffix == ".tsv" else ",")
        if not reader.fieldnames:
            raise DataError(f"{path}: empty CSV (no header row)")
        field = _pick_field(reader.fieldnames, path, "the header")
        try:
            prompts = [row[field] or "" for row in reader]
        except csv.Error as e:
            raise DataError(f"{path}: malformed CSV ({e})") from e
    elif suffix == ".txt":
        prompts = text.splitlines()
    else:
        raise DataError(f"{path}: unknown prompt file type {suffix!r} (use .jsonl, .json, .csv, .tsv or .txt)")
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise DataError(f"{path}: no prompts in file")
    return prompts
