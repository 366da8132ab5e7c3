"""Metrics logging: `metrics.jsonl` (one JSON object per logged step) and a tqdm bar.

Only process 0 writes. On resume the file is cut back to the steps before the restored
checkpoint, so a resumed run's file equals an uninterrupted run's file line for line
(wall-clock fields aside).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from jaxdefense.jsonutil import to_jsonable

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a metrics.jsonl (a run dir or the file); a torn last line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records = []
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


# one JSON cleaner for the whole package (non-finite floats → null, arrays → lists)
to_json_value = to_jsonable


class MetricsLog:
    """Appends records to `<run_dir>/metrics.jsonl`, keeping only records with step < start."""

    def __init__(self, run_dir: str | os.PathLike | None, start_step: int = 0, enabled: bool = True):
        self.path = Path(run_dir) / METRICS_FILE if run_dir is not None and enabled else None
        self._file = None
        if self.path is None:
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", -1) < start_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)
        self._file = open(self.path, "a")

    def write(self, record: dict) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def progress_bar(total: int, initial: int, enabled: bool):
    """tqdm bar on stderr, or a no-op stand-in."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, file=sys.stderr, dynamic_ncols=True, unit="step", mininterval=0.5
    )


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass
