"""`HeldOutMonitor`: a generic train-loop hook `callback(step, params)` measuring held-out curves.

On rows nobody trains on (the `settings.split` split, validation while training): benign NLL
(benign_instruct), harmful NLL (harmful_qa), the refusal rate of greedy generations on held-out
harmful prompts (harmful_prompts_eval; `settings.harmful_prompts`, 0: off) and optionally the
benign refusal rate (over-refusal; `settings.benign_prompts`, 0: off). Each call appends a
record {"step", "benign_nll", "harmful_nll", ["refusal_rate"], ["benign_refusal_rate"]} to
`records` and, on process 0, one JSON line to `path` (a run's eval.jsonl).

`params_view(params) -> full params` maps what the loop trains to a model's params (e.g. a LoRA
merge: {"base", "lora"} → base + scale·A·B); by default the params are used as they are.
These are the curves of SEAM's self-destruction (benign NLL jumps at the first harmful steps).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxdefense.eval.settings import EvalSettings
from jaxdefense.jsonutil import to_jsonable


class HeldOutMonitor:
    """callback(step, params) for the training loop; see the module docstring."""

    def __init__(self, cfg, tokenizer, settings: EvalSettings, *, params_view: Callable[[Any], Any] | None = None,
                 data_dir=None, path: str | Path | None = None, template="chat"):
        from jaxdefense.data import load_stream

        if not isinstance(settings, EvalSettings):
            raise TypeError(f"HeldOutMonitor: settings must be an EvalSettings, got {type(settings).__name__}")
        self.cfg, self.tokenizer, self.settings = cfg, tokenizer, settings
        self.params_view, self.template = params_view, template
        s = settings
        self.benign = load_stream("benign_instruct", s.split, data_dir, limit=s.nll_rows) if s.nll_rows else []
        self.harmful = load_stream("harmful_qa", s.split, data_dir, limit=s.nll_rows) if s.nll_rows else []
        self.prompts = ([r["prompt"] for r in load_stream("harmful_prompts_eval", s.split, data_dir, limit=s.harmful_prompts)]
                        if s.harmful_prompts else [])
        self.benign_prompts = ([r["prompt"] for r in load_stream("benign_instruct", s.split, data_dir, limit=s.benign_prompts)]
                               if s.benign_prompts else [])
        self.path = Path(path) if path is not None else None
        self.records: list[dict] = []

    @property
    def every(self) -> int:
        """How often the loop should call the monitor (`settings.every`; 0: first and last step only)."""
        return self.settings.every

    def _refusal_rate(self, params, prompts) -> float:
        from jaxdefense.eval.metrics import generate_samples
        from jaxdefense.eval.refusal import refusal_rate

        gens = generate_samples(self.cfg, params, self.tokenizer, prompts, max_new_tokens=self.settings.max_new_tokens,
                                batch_size=self.settings.generate_batch_size, chat=self.settings.chat)
        return float(refusal_rate(gens.texts))

    def measure(self, params) -> dict:
        """The held-out numbers of full model `params` (no view applied)."""
        from jaxdefense.eval.metrics import response_nll

        s = self.settings
        kw = dict(max_len=s.max_len, batch_size=s.batch_size, template=self.template)
        out = {}
        if self.benign:
            out["benign_nll"] = response_nll(self.cfg, params, self.tokenizer, self.benign, **kw)["nll"]
        if self.harmful:
            out["harmful_nll"] = response_nll(self.cfg, params, self.tokenizer, self.harmful, **kw)["nll"]
        if self.prompts:
            out["refusal_rate"] = self._refusal_rate(params, self.prompts)
        if self.benign_prompts:
            out["benign_refusal_rate"] = self._refusal_rate(params, self.benign_prompts)
        return out

    def __call__(self, step: int, params) -> dict:
        import jax

        full = self.params_view(params) if self.params_view is not None else params
        record = {"step": int(step), **self.measure(jax.device_get(full))}
        self.records.append(record)
        if self.path is not None and jax.process_index() == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(to_jsonable(record), allow_nan=False) + "\n")
        return record


__all__ = ["HeldOutMonitor"]
