"""Rebuild the shipped harm judge: `python -m jaxdefense.eval.build_judge [--data-dir D] [--out DIR]`.

Trains `HarmJudge` with its defaults on the train split of the data registry's harm_labelled
stream (deterministic), prints the held-out (validation, test) metrics and saves judge.npz + judge.json (default: jaxdefense/assets/harm_judge, ~0.4 MB).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from jaxdefense.eval.judge import ASSET_DIR, HarmJudge


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=str(ASSET_DIR), help="where to save (default: the shipped asset)")
    args = parser.parse_args(argv)
    judge = HarmJudge.train(args.data_dir)
    judge.save(args.out)
    m = judge.metrics
    print(json.dumps({k: m[k] for k in ("train_seconds", "n_train", "n_validation", "n_test", "validation", "test",
                                                "test_first_40_words")}, indent=1))
    for source, sm in m["test_by_source"].items():
        print(f"{source:28s} n={sm['n']:4d} acc={sm['accuracy']:.3f} positives={sm['positive_rate']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
