"""`jaxdefense data [--data-dir D] [--stream S] [--json]`: the sources, their rows and split sizes."""

from __future__ import annotations

import argparse
import json
import sys

from jaxdefense.errors import DataError

_COLUMNS = ("name", "stream", "hub_id", "rows", "train", "validation", "test")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None,
                        help="data root (default: $JAXDEFENSE_DATA_DIR, then ../shared/data beside the repo)")
    parser.add_argument("--stream", default=None, help="show only this stream's sources")
    parser.add_argument("--json", action="store_true", help="print the table as JSON lines")


def format_table(rows: list[dict]) -> str:
    """Fixed-width table with one line per source and a total line per stream."""
    lines, totals = [], {}
    for row in rows:
        total = totals.setdefault(row["stream"], {"train": 0, "validation": 0, "test": 0})
        for split in total:
            total[split] += row[split]
    table = [dict(row) for row in rows]
    for stream, total in totals.items():
        table.append({"name": "TOTAL", "stream": stream, "hub_id": "", "rows": "", **total})
    widths = {c: max(len(c), *(len(str(r[c])) for r in table)) for c in _COLUMNS}
    right = {"rows", "train", "validation", "test"}

    def fmt(values: dict) -> str:
        return "  ".join(str(values[c]).rjust(widths[c]) if c in right else str(values[c]).ljust(widths[c]) for c in _COLUMNS)

    lines.append(fmt({c: c for c in _COLUMNS}))
    lines.append("  ".join("-" * widths[c] for c in _COLUMNS))
    lines += [fmt(r) for r in table]
    return "\n".join(line.rstrip() for line in lines)


def data_command(args: argparse.Namespace) -> int:
    from jaxdefense.data.root import resolve_data_root
    from jaxdefense.data.streams import STREAMS, list_sources

    root = resolve_data_root(getattr(args, "data_dir", None))
    stream = getattr(args, "stream", None)
    if stream is not None and stream not in STREAMS:
        raise DataError(f"unknown stream {stream!r}; known: {', '.join(STREAMS)}")
    rows = list_sources(root, stream=stream)
    if getattr(args, "json", False):
        for row in rows:
            print(json.dumps(row), file=sys.stdout)
    else:
        print(f"data root: {root}")
        print(format_table(rows))
    return 0


run = data_command
