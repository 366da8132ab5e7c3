"""Fine-tuning attacks by SFT: harmful SFT (the threat) and benign SFT (the control), each
full-parameter or LoRA, in the one training loop, with evaluation curves vs attack step.

Harmful SFT trains on harmful_qa **train, attacker half** (prompt hash 0.4 ≤ u < 0.8; SEAM's
adversarial/alignment data is the defender half u < 0.4, see jaxdefense.data.pairs), first
`limit` = 1000 records as in the official SEAM evaluation. Benign SFT trains on the train split
of sst2 / ag_news / gsm8k / benign_instruct and reports the task's accuracy on its test split
after tuning (benign_instruct has no accuracy; its NLL is the utility figure).

Every `eval_every` steps (and at step 0 and the last) the `AttackMonitor` records, on held-out
validation rows nobody trains on: benign NLL (benign_instruct), harmful NLL (harmful_qa) and,
optionally, the refusal rate of greedy generations on held-out harmful prompts. These are the
curves of SEAM's self-destruction (benign NLL jumps at the first harmful steps).

LoRA: the trained pytree is {"base": params, "lora": adapters}; grads are taken w.r.t. the
adapters only and the optimiser is `optax.multi_transform` with `set_to_zero` on "base", so the
base weights stay bit-identical (checkpoints hold both; `merged_params` folds them for export).

Learning rates: the official sweep is 2e-5, 5e-5, 8e-5, 1e-4, 2e-4 on Llama-2-7B (pre-trained
at peak lr 3e-4), i.e. 1/15 … 2/3 of the pre-training peak. `lr_sweep(pretrain_lr)` keeps those
fractions for a model pre-trained at another peak: the project's base models (jaxdefense
build-base) pre-train at 3e-3, giving 2e-4, 5e-4, 8e-4, 1e-3, 2e-3 (`SMALL_MODEL_LRS`; the
pilot's 2e-4 … 3e-3 range on a 1.3M model, docs/research/pilot-seam-tiny.md).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxdefense.errors import ConfigError, DataError

KINDS = ("harmful_sft", "benign_sft")
BENIGN_TASKS = ("benign_instruct", "sst2", "ag_news", "gsm8k")
HARMFUL_TASKS = ("harmful_qa",)
ACCURACY_TASKS = ("sst2", "ag_news", "gsm8k")

OFFICIAL_LRS = (2e-5, 5e-5, 8e-5, 1e-4, 2e-4)
OFFICIAL_PRETRAIN_LR = 3e-4  # Llama-2 7B peak pre-training lr
OFFICIAL_HARMFUL_SAMPLES = 1000


def lr_sweep(pretrain_lr: float | None = None) -> tuple[float, ...]:
    """The official attack lrs, rescaled by pretrain_lr / 3e-4 (same fraction of the pre-training peak)."""
    if pretrain_lr is None:
        return OFFICIAL_LRS
    if not pretrain_lr > 0:
        raise ConfigError(f"pretrain_lr: must be > 0, got {pretrain_lr}")
    return tuple(float(f"{lr * pretrain_lr / OFFICIAL_PRETRAIN_LR:.3g}") for lr in OFFICIAL_LRS)


SMALL_MODEL_LRS = lr_sweep(3e-3)


def default_task(kind: str) -> str:
    return "harmful_qa" if kind == "harmful_sft" else "benign_instruct"


def check_kind_task(kind: str, task: str | None) -> str:
    if kind not in KINDS:
        raise ConfigError(f"attack kind: {kind!r} is not one of {KINDS}")
    task = task or default_task(kind)
    allowed = HARMFUL_TASKS if kind == "harmful_sft" else BENIGN_TASKS
    if task not in allowed:
        raise ConfigError(f"attack task: {task!r} is not a {kind} task (choose from {allowed})")
    return task


def attack_records(kind: str, task: str | None = None, *, split: str = "train", half: str = "attacker",
                   limit: int | None = None, data_dir=None) -> list[dict]:
    """Training records of an attack: the attacker half of harmful_qa, or a benign task's split."""
    from jaxdefense.data import load_stream
    from jaxdefense.data.pairs import split_half

    task = check_kind_task(kind, task)
    records = load_stream(task, split, data_dir)
    if kind == "harmful_sft":
        records = split_half(records, half)
    records = records[:limit] if limit is not None else records
    if not records:
        raise DataError(f"attack: no {task} records in split {split!r}")
    return records


# ------------------------------------------------------------------------------- grad fns


def full_grad(cfg, stream: str = "train"):
    """Full-parameter SFT gradient (the train package's sft_grad)."""
    from jaxdefense.train import sft_grad

    return sft_grad(cfg, stream)


@dataclasses.dataclass(frozen=True)
class LoraSFTGrad:
    """grad_fn over {"base", "lora"}: ∇ of lm_loss w.r.t. the adapters, zeros for the base."""

    cfg: Any
    scale: float
    stream: str = "train"

    @property
    def streams(self) -> tuple[str, ...]:
        return (self.stream,)

    def __call__(self, params, batches, key):
        from jaxdefense.models import lm_loss

        del key
        adapters = {"layers": None, "scale": self.scale}

        def loss(layers):
            return lm_loss(self.cfg, params["base"], batches[self.stream], lora={**adapters, "layers": layers})

        value, g = jax.value_and_grad(loss)(params["lora"])
        return {"base": jax.tree.map(jnp.zeros_like, params["base"]), "lora": g}, {"loss": value}


def lora_params(cfg, params, key, rank: int, alpha: float, targets: Sequence[str] = ("wq", "wv")):
    """({"base": params, "lora": adapter layers}, scale) with fresh adapters (B = 0)."""
    from jaxdefense.models import lora_init

    lora = lora_init(cfg, key, rank, alpha, tuple(targets), dtype=jax.tree.leaves(params)[0].dtype)
    return {"base": params, "lora": lora["layers"]}, float(lora["scale"])


def lora_optimizer(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optimizer` on the adapters, zero updates for the base."""
    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()},
                                 {"base": "frozen", "lora": "train"})


def merged_params(trained, scale: float | None = None):
    """Full params: a plain params tree as is, or base + scale·A·B for a LoRA tree."""
    from jaxdefense.models import lora_merge

    if scale is None:
        return trained
    return lora_merge(trained["base"], {"layers": trained["lora"], "scale": scale})


# ------------------------------------------------------------------------------- monitor


@dataclasses.dataclass
class EvalSettings:
    every: int = 10
    n: int = 32
    split: str = "validation"
    max_len: int = 128
    batch_size: int = 8
    refusal_prompts: int = 8
    max_new_tokens: int = 32
    task_n: int = 64


class AttackMonitor:
    """callback(step, params) for the training loop: held-out benign/harmful NLL (+ refusal rate),
    appended to `records` and to run_dir/eval.jsonl."""

    def __init__(self, cfg, tokenizer, settings: EvalSettings, *, lora_scale: float | None = None,
                 data_dir=None, path: Path | None = None, template="chat"):
        from jaxdefense.data import load_stream

        self.cfg, self.tokenizer, self.s, self.lora_scale = cfg, tokenizer, settings, lora_scale
        self.template = template
        self.benign = load_stream("benign_instruct", settings.split, data_dir, limit=settings.n)
        self.harmful = load_stream("harmful_qa", settings.split, data_dir, limit=settings.n)
        self.prompts = []
        if settings.refusal_prompts > 0:
            self.prompts = [r["prompt"] for r in
                            load_stream("harmful_prompts_eval", settings.split, data_dir, limit=settings.refusal_prompts)]
        self.path = path
        self.records: list[dict] = []

    def measure(self, params) -> dict:
        from jaxdefense.eval import generate_samples, refusal_rate, response_nll

        kw = dict(max_len=self.s.max_len, batch_size=self.s.batch_size, template=self.template)
        out = {"benign_nll": response_nll(self.cfg, params, self.tokenizer, self.benign, **kw)["nll"],
               "harmful_nll": response_nll(self.cfg, params, self.tokenizer, self.harmful, **kw)["nll"]}
        if self.prompts:
            gens = generate_samples(self.cfg, params, self.tokenizer, self.prompts,
                                    max_new_tokens=self.s.max_new_tokens, batch_size=self.s.batch_size)
            out["refusal_rate"] = float(refusal_rate(gens.texts))
        return out

    def __call__(self, step: int, trained) -> None:
        params = jax.device_get(merged_params(trained, self.lora_scale))
        record = {"step": int(step), **self.measure(params)}
        self.records.append(record)
        if self.path is not None and jax.process_index() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------- the attack


@dataclasses.dataclass
class AttackResult:
    params: Any  # merged full params after the attack
    curves: list[dict]  # AttackMonitor records
    summary: dict
    train_history: list[dict]


def run_sft_attack(cfg, params, tokenizer, *, kind: str, task: str | None = None, steps: int = 100,
                   optimizer: optax.GradientTransformation | None = None, lr: float = 2e-5,
                   batch_size: int = 8, max_len: int = 64, limit: int | None = OFFICIAL_HARMFUL_SAMPLES,
                   half: str = "attacker", lora_rank: int = 0, lora_alpha: float = 16.0,
                   lora_targets: Sequence[str] = ("wq", "wv"), eval_settings: EvalSettings | None = None,
                   run_dir=None, mesh=None, seed: int = 0, data_dir=None, log_every: int = 10,
                   compute_dtype=None, progress: bool = False, template="chat", records=None) -> AttackResult:
    """Harmful or benign SFT of `params` for `steps` steps; returns merged params, curves, summary.

    optimizer defaults to the official attack's AdamW (weight decay 0.01, cosine to 0) at `lr`.
    """
    from jaxdefense.data import make_batches, stream_seed
    from jaxdefense.train import train

    task = check_kind_task(kind, task)
    if records is None:
        records = attack_records(kind, task, half=half, limit=limit, data_dir=data_dir)
    settings = eval_settings or EvalSettings()
    if optimizer is None:
        optimizer = optax.adamw(optax.cosine_decay_schedule(lr, max(steps, 1)), weight_decay=0.01)
    stream = make_batches(records, tokenizer, batch_size, max_len, seed=stream_seed(seed, "train"), template=template)
    if lora_rank > 0:
        trained, scale = lora_params(cfg, params, jax.random.key(seed + 1), lora_rank, lora_alpha, lora_targets)
        grad_fn, opt = LoraSFTGrad(cfg, scale), lora_optimizer(optimizer)
    else:
        trained, scale, grad_fn, opt = params, None, full_grad(cfg), optimizer
    path = None
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        path = Path(run_dir) / "eval.jsonl"
    monitor = AttackMonitor(cfg, tokenizer, settings, lora_scale=scale, data_dir=data_dir, path=path, template=template)
    every = settings.every if settings.every > 0 else 0
    result = train(trained, grad_fn, {"train": stream}, opt, steps=steps, mesh=mesh, run_dir=run_dir, seed=seed,
                   log_every=log_every, compute_dtype=compute_dtype, progress=progress,
                   callback=monitor, callback_every=every)
    final = jax.device_get(merged_params(result.params, scale))
    summary = {"kind": kind, "task": task, "steps": steps, "lora_rank": lora_rank, "train_records": len(records),
               "pre": monitor.records[0] if monitor.records else None,
               "post": monitor.records[-1] if monitor.records else None,
               "final_train_loss": result.metrics.get("loss")}
    if task in ACCURACY_TASKS and settings.task_n > 0:
        summary["task_accuracy"] = task_accuracy_of(cfg, final, tokenizer, task, settings.task_n, data_dir)
        summary["task_accuracy_pre"] = task_accuracy_of(cfg, jax.device_get(params), tokenizer, task,
                                                        settings.task_n, data_dir)
    return AttackResult(final, monitor.records, summary, result.history)


def task_accuracy_of(cfg, params, tokenizer, task: str, n: int, data_dir=None) -> float:
    """Greedy-generation accuracy on the first n test records of a benign task."""
    from jaxdefense.data import load_stream
    from jaxdefense.eval import task_accuracy

    return float(task_accuracy(cfg, params, tokenizer, task, load_stream(task, "test", data_dir, limit=n))["accuracy"])


def harmful_sft(cfg, params, tokenizer, **kw) -> AttackResult:
    """Harmful SFT on the attacker half of harmful_qa (see run_sft_attack for options)."""
    return run_sft_attack(cfg, params, tokenizer, kind="harmful_sft", task="harmful_qa", **kw)


def benign_sft(cfg, params, tokenizer, task: str = "benign_instruct", **kw) -> AttackResult:
    """Benign SFT on a task's train split; summary has the task accuracy after tuning."""
    return run_sft_attack(cfg, params, tokenizer, kind="benign_sft", task=task, **kw)
