"""File readers: `datasets` json/csv loaders where the format fits, plain Python for odd formats."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import Any, Sequence

from jaxdefense.errors import DataError


def _require(paths: Sequence[Path]) -> list[str]:
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(f"data file not found: {missing[0]}")
    return [str(p) for p in paths]


def _csv_header(path: str, delimiter: str) -> list[str]:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        return next(csv.reader([handle.readline()], delimiter=delimiter))


def _load_dataset(kind: str, data_files, first: str, **config: Any):
    import datasets
    from datasets.utils import logging as ds_logging

    if kind == "csv":
        columns = config.get("column_names")
        if columns is None:
            columns = _csv_header(first, config.get("delimiter", ","))
            if "" in columns:  # an unnamed index column: name it, replacing the header row
                columns = [c or f"column_{i}" for i, c in enumerate(columns)]
                config = {"column_names": columns, "header": 0, **config}
        config = {
            "na_filter": False,
            "keep_default_na": False,
            "features": datasets.Features({c: datasets.Value("string") for c in columns}),
            **config,
        }
    bars_were_on = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        return datasets.load_dataset(kind, data_files=data_files, **config)
    except Exception as exc:  # the loaders raise many types (ArrowInvalid, DatasetGenerationError …)
        raise DataError(f"cannot read {first} with the datasets {kind} loader: {exc}") from exc
    finally:
        if bars_were_on:
            ds_logging.enable_progress_bar()


def load_with_datasets(kind: str, paths: Sequence[Path], **config: Any) -> list[dict]:
    """Rows of `datasets.load_dataset(kind, data_files=paths, split="train", **config)` as dicts.

    `kind` is "json" or "csv"; every CSV field is read as a string without NA conversion, so an
    empty field stays "", "null" stays a string and "01" is not turned into 1.
    """
    files = _require(paths)
    return _load_dataset(kind, files, files[0], split="train", **config).to_list()


def load_named_with_datasets(kind: str, named_paths: dict[str, Path], **config: Any) -> dict[str, list[dict]]:
    """One `datasets` builder for many same-layout files: {name: rows}, name = a split name (letters, digits, _)."""
    files = dict(zip(named_paths, _require(list(named_paths.values()))))
    dataset_dict = _load_dataset(kind, files, next(iter(files.values())), **config)
    return {name: dataset_dict[name].to_list() for name in files}


def read_text(path: Path) -> str:
    """Whole file as text (UTF-8, BOM stripped, gzip by suffix), line ends untouched."""
    _require([path])
    try:
        if str(path).endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8-sig", newline="") as handle:
                return handle.read()
        with open(path, encoding="utf-8-sig", newline="") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def strip_leading_comment_lines(text: str, marker: str = "#") -> str:
    """Drop only the comment lines at the top of a file (later lines may legitimately start with '#')."""
    while text.startswith(marker):
        newline = text.find("\n")
        text = "" if newline < 0 else text[newline + 1 :]
    return text


def read_csv_plain(path: Path, *, skip_leading_comments: bool = False, delimiter: str = ",") -> list[dict]:
    """csv.DictReader rows; handles CRLF, quoted multi-line fields and leading '#' comment lines."""
    text = read_text(path)
    if skip_leading_comments:
        text = strip_leading_comment_lines(text)
    try:
        return list(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter))
    except csv.Error as exc:
        raise DataError(f"cannot parse CSV {path}: {exc}") from exc


def read_json(path: Path) -> Any:
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"cannot parse JSON {path}: {exc}") from exc


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line_no, line in enumerate(read_text(path).splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"cannot parse JSON line {line_no} of {path}: {exc}") from exc
    return rows


def read_lines(path: Path) -> list[str]:
    """Non-empty lines, stripped."""
    return [line.strip() for line in read_text(path).splitlines() if line.strip()]


def read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(read_text(path))
    except yaml.YAMLError as exc:
        raise DataError(f"cannot parse YAML {path}: {exc}") from exc
