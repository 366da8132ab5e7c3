"""One pipeline — `immunize(cfg)`, `attack(cfg)`, `evaluate(cfg)` — behind the CLI, the demo and build-base.

Every run takes one `RunConfig` (model, data, optimizer, mesh, lora, eval, steps, ... and a
`method:` or `attack:` section typed by its `name`) and an output directory, and writes there:
config.yaml (the resolved config), tokenizer/ (when trained by the run), metrics.jsonl,
checkpoints/ (orbax), hf/ (the exported model) and, for attacks and evaluations, eval.jsonl,
attack.json or report.{json,md,png}.

Everything that can fail on bad input (config keys, model, tokenizer, data, mesh) is built
BEFORE the run directory appears; it is assembled in a staging folder and moved into place in
one rename, so a failed start leaves nothing behind. `resume=True` continues from the latest
checkpoint, refusing a config that differs from the saved one except in RESUMABLE_CHANGES.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxdefense import config as C
from jaxdefense.config import field
from jaxdefense.errors import CheckpointError, ConfigError
from jaxdefense.eval.settings import EvalSettings
from jaxdefense.objective import Objective, with_lora

CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
HF_DIR = "hf"
ATTACK_FILE = "attack.json"
EVAL_CURVES_FILE = "eval.jsonl"
DATA_REPORT_FILE = "data_report.json"
RESUMABLE_CHANGES = ("steps", "log_every", "ckpt_every", "data.dir", "eval")


@dataclasses.dataclass
class RunConfig:
    """The one config schema of every command (`jaxdefense train|immunize|attack|eval`, demo runs)."""

    model: C.ModelSection | None = field(None, doc="{name: tiny} (random init) or {path: DIR} (HF or run dir)")
    data: C.DataSection = field(C.DataSection())
    optimizer: C.OptimizerSection = field(C.OptimizerSection())
    mesh: C.MeshSection = field(C.MeshSection())
    lora: C.LoraSection = field(C.LoraSection())
    method: Objective | None = field(None, registry="method", doc="defence: {name: seam, <hyperparameter>: ...}")
    attack: Objective | None = field(None, registry="attack", doc="attack: {name: harmful_sft, ...}")
    eval: EvalSettings = field(EvalSettings(), doc="evaluation (and attack-curve) settings")
    steps: int = field(100, ge=1)
    ckpt_every: int = field(0, ge=0, doc="checkpoint every N steps (0: only at the end)")
    log_every: int = field(10, ge=1)
    seed: int = field(0, ge=0)
    compute_dtype: str | None = field(None, choices=C.DTYPES, doc="e.g. bfloat16: cast params inside the step")
    export_hf: bool = field(True, doc="write the trained model to DIR/hf")


def load_run_config(path=None, overrides=(), base: dict | None = None) -> RunConfig:
    return C.load_config(path, RunConfig, overrides, base=base)


@dataclasses.dataclass
class RunResult:
    out: Path
    model_cfg: Any
    params: Any  # the exported full params (LoRA merged), on the host
    tokenizer: Any
    metrics: dict
    history: list[dict]
    summary: dict = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------- builders


def model_dir(path: str | os.PathLike, key: str = "model.path", error: type[Exception] = ConfigError) -> Path:
    """The checkpoint behind a model path: an HF directory (DIR itself, or DIR/hf for a run directory),
    a .gguf file, or the GGUF file of a named pretrained model (`models.PRETRAINED`); otherwise
    `error` (one line, prefixed by the config `key` it came from)."""
    from jaxdefense.models.pretrained import PRETRAINED, is_pretrained, pretrained_path

    p = Path(path)
    if is_pretrained(str(path)) and not p.exists():
        try:
            return pretrained_path(str(path))
        except CheckpointError as e:
            raise error(f"{key}: {e}") from e
    if p.is_file() and p.suffix == ".gguf":
        return p
    if (p / HF_DIR / "config.json").is_file():
        return p / HF_DIR
    if (p / "config.json").is_file():
        return p
    raise error(f"{key}: {str(path)!r} holds neither config.json nor {HF_DIR}/config.json (nor is it a .gguf file "
                f"or a pretrained model name: {', '.join(sorted(PRETRAINED))})")


def build_model(section: C.ModelSection | None, seed: int):
    """(ModelConfig, params): a named config initialised from `seed`, an HF / run directory or a GGUF file."""
    from jaxdefense.models import init_params, load_gguf, load_hf, named_config

    if section is None:
        raise ConfigError("model: required (model.name: a named config, or model.path: an HF/run directory)")
    dtype = jnp.dtype(section.dtype)
    if section.path is not None:
        if section.overrides:
            raise ConfigError("model.overrides: only allowed with model.name")
        source = model_dir(section.path)
        return load_gguf(source, dtype=dtype) if source.suffix == ".gguf" else load_hf(source, dtype=dtype)
    try:
        cfg = named_config(section.name, **section.overrides)
    except TypeError as e:
        raise ConfigError(f"model.overrides: {e}") from e
    except ConfigError as e:
        raise ConfigError(f"model.name: {e}") from e
    return cfg, init_params(cfg, jax.random.key(seed), dtype)


def build_tokenizer(spec: str | None, model_path: str | None, texts: list[str], workdir: Path):
    """Tokenizer from a directory, or "bpe:<vocab>": a byte-level BPE trained on the run's texts and
    saved to workdir/tokenizer (reused from there when present, e.g. on resume)."""
    from jaxdefense.data import train_bpe_tokenizer
    from jaxdefense.models import load_tokenizer

    spec = spec if spec is not None else (str(model_dir(model_path)) if model_path is not None else None)
    if spec is None:
        raise ConfigError("data.tokenizer: required when the model is a named config (a path or bpe:<vocab>)")
    if spec.startswith("bpe:"):
        try:
            vocab = int(spec[4:])
        except ValueError as e:
            raise ConfigError(f"data.tokenizer: expected bpe:<vocab size>, got {spec!r}") from e
        saved = workdir / TOKENIZER_DIR
        if (saved / "tokenizer.json").is_file():
            return load_tokenizer(saved)
        try:
            return train_bpe_tokenizer(texts, vocab, saved)
        except ConfigError as e:
            raise ConfigError(f"data.tokenizer: {e}") from e
    if not Path(spec).is_dir() and not (Path(spec).is_file() and spec.endswith(".gguf")):
        raise ConfigError(f"data.tokenizer: directory {spec!r} does not exist")
    try:
        return load_tokenizer(spec)
    except CheckpointError as e:
        raise ConfigError(f"data.tokenizer: {e}") from e


def check_vocab(tokenizer, model_cfg) -> None:
    if len(tokenizer) > model_cfg.vocab_size:
        raise ConfigError(
            f"data.tokenizer: {len(tokenizer)} tokens exceed the model's vocab_size {model_cfg.vocab_size}"
        )


def build_mesh(section: C.MeshSection):
    from jaxdefense.train.sharding import make_mesh

    return make_mesh(section.data, section.fsdp, section.tensor)


# ------------------------------------------------------------------------------- run dirs


class RunDir:
    """A run directory created atomically: files go to a staging dir until `commit()`."""

    def __init__(self, out: str | os.PathLike, fresh: bool):
        self.out = Path(out)
        self.fresh = fresh
        self.path = Path(tempfile.mkdtemp(prefix=".jaxdefense-staging-")) if fresh else self.out

    def commit(self) -> Path:
        if self.fresh and jax.process_index() == 0:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            if self.out.exists():
                self.out.rmdir()  # empty (checked by open_run)
            shutil.move(str(self.path), str(self.out))
        elif self.fresh:
            shutil.rmtree(self.path, ignore_errors=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxdefense-run-dir")
        self.path = self.out
        return self.out

    def discard(self) -> None:
        if self.fresh and self.path != self.out:
            shutil.rmtree(self.path, ignore_errors=True)


def check_out(out: Path, resume: bool) -> bool:
    """True when `out` is a run to resume; ConfigError for a non-empty dir without --resume."""
    saved = out / CONFIG_FILE
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r}: exists and is not a directory")
    nonempty = out.exists() and any(out.iterdir())
    if resume and nonempty and not saved.is_file():
        raise ConfigError(f"--out {str(out)!r}: not a run directory (no {CONFIG_FILE}); cannot resume it")
    if not resume and nonempty:
        raise ConfigError(f"--out {str(out)!r}: run directory exists; pass --resume to continue it")
    return resume and saved.is_file()


def check_resumable(config: RunConfig, out: Path) -> None:
    """ConfigError naming every key where `config` differs from out/config.yaml (resumable keys aside)."""
    saved = out / CONFIG_FILE
    previous = C.to_dict(C.from_dict(RunConfig, C.read_yaml(saved)))
    changed = [k for k in C.diff_keys(previous, C.to_dict(config))
               if not any(k == r or k.startswith(r + ".") for r in RESUMABLE_CHANGES)]
    if changed:
        raise ConfigError(f"--resume: config differs from {saved} at {', '.join(changed)}")


def saved_config(out: str | os.PathLike, overrides=()) -> RunConfig:
    """The resolved config of an existing run directory (with overrides)."""
    return load_run_config(Path(out) / CONFIG_FILE, overrides)


# ------------------------------------------------------------------------------- training


def fit(config: RunConfig, objective: Objective, out=None, *, resume: bool = False, data_dir=None, progress=None,
        hook=None, model=None, tokenizer=None, records=None) -> RunResult:
    """Train `objective` (a method or an attack, LoRA-wrapped per `config.lora`) in the one loop.

    Args:
      out: the run directory (None: nothing is written, e.g. the phases of build-base).
      hook: hook(model_cfg, tokenizer, objective, frozen, out) -> (callback(step, params), every) adds
        a loop callback (the attack's held-out curves).
      model, tokenizer, records: (ModelConfig, params), a tokenizer and {stream: records} to use
        instead of building them from `config.model`, `config.data.tokenizer` and the registry.
    """
    from jaxdefense.data.specs import build_streams, load_records, resolve_streams, tokenizer_texts
    from jaxdefense.models import save_hf
    from jaxdefense.train import train
    from jaxdefense.train.optim import make_optimizer

    resuming = False
    if out is not None:
        out = Path(out)
        resuming = check_out(out, resume)
        if resuming:
            check_resumable(config, out)
    if not objective.trains and config.lora.rank:
        raise ConfigError(f"lora.rank: {objective.name} trains nothing (no adapters); use lora.rank=0")
    objective = with_lora(objective, config.lora)
    data_dir = data_dir or config.data.dir
    run_dir = RunDir(out, not resuming) if out is not None else None
    try:
        mesh = build_mesh(config.mesh)
        resolved = resolve_streams(objective.streams(), config.data, objective.name)
        records = records if records is not None else load_records(resolved, data_dir)
        model_cfg, params = model if model is not None else build_model(config.model, config.seed)
        if tokenizer is None:
            workdir = run_dir.path if run_dir is not None else Path(tempfile.mkdtemp(prefix="jaxdefense-bpe-"))
            tokenizer = build_tokenizer(config.data.tokenizer, config.model.path if config.model else None,
                                        tokenizer_texts(records), workdir)
        check_vocab(tokenizer, model_cfg)
        objective = objective.bind(model_cfg).prepare(tokenizer)
        records, data_report = objective.build_records(records, model_cfg, params, tokenizer)
        streams = build_streams({n: r for n, r in resolved.items() if n in records}, records, tokenizer, config.seed)
        optimizer = make_optimizer(config.optimizer, config.steps)
        trainable, frozen = objective.init(params, jax.random.key(config.seed + 1))
        if run_dir is not None and jax.process_index() == 0:
            C.dump_yaml(config, run_dir.path / CONFIG_FILE)
            if data_report:
                from jaxdefense.jsonutil import to_jsonable

                (run_dir.path / DATA_REPORT_FILE).write_text(json.dumps(to_jsonable(data_report), indent=2) + "\n")
    except BaseException:
        if run_dir is not None:
            run_dir.discard()
        raise
    out = run_dir.commit() if run_dir is not None else None
    if not objective.trains:
        return _export_untrained(config, objective, trainable, frozen, model_cfg, tokenizer, out, data_report)
    callback, every = (None, 0)
    if hook is not None:
        callback, every = hook(model_cfg, tokenizer, objective, frozen, out)
    result = train(
        trainable, objective.grad, streams, optimizer, frozen=frozen,
        steps=config.steps, mesh=mesh, run_dir=out, ckpt_every=config.ckpt_every,
        resume=resuming, seed=config.seed, log_every=config.log_every,
        compute_dtype=config.compute_dtype, progress=progress, callback=callback, callback_every=every,
        collect=objective.collect if objective.collects else None,
    )
    params_out = jax.device_get(objective.export(result.params, frozen))
    if out is not None and config.export_hf and jax.process_index() == 0:
        save_hf(model_cfg, params_out, out / HF_DIR, tokenizer=tokenizer)
    return RunResult(out, model_cfg, params_out, tokenizer, dict(result.metrics), result.history,
                     {"data_report": data_report} if data_report else {})


def _export_untrained(config, objective, trainable, frozen, model_cfg, tokenizer, out, data_report) -> RunResult:
    """A post-hoc objective (`trains = False`): its init is the result; `steps` is ignored and
    metrics.jsonl holds one record saying no step ran."""
    from jaxdefense.models import save_hf
    from jaxdefense.train.metrics import MetricsLog

    params_out = jax.device_get(objective.export(trainable, frozen))
    metrics = {"step": 0, "steps": 0}
    if out is not None and jax.process_index() == 0:
        log = MetricsLog(out)
        log.write(metrics)
        log.close()
        if config.export_hf:
            save_hf(model_cfg, params_out, out / HF_DIR, tokenizer=tokenizer)
    return RunResult(out, model_cfg, params_out, tokenizer, metrics, [metrics],
                     {"data_report": data_report} if data_report else {})


def immunize(config: RunConfig, out=None, **kw) -> RunResult:
    """Train `config.method` (a registered defence); see `fit` for the keywords."""
    if config.method is None:
        raise ConfigError("method: required (e.g. method: {name: seam}), or pass --method")
    return fit(config, config.method, out, **kw)


def attack(config: RunConfig, out=None, **kw) -> RunResult:
    """Train `config.attack` with held-out curves every `eval.every` steps (eval.jsonl), then write
    attack.json: pre/post curve points, final train loss and, for a benign task with an accuracy,
    its test accuracy before and after."""
    from jaxdefense.eval.monitor import HeldOutMonitor

    if config.attack is None:
        raise ConfigError("attack: required (e.g. attack: {name: harmful_sft}), or pass --attack")
    if kw.get("model") is None and (config.model is None or config.model.path is None):
        raise ConfigError("model.path: an attack needs a trained model (an HF directory or a run directory)")
    data_dir = kw.get("data_dir") or config.data.dir
    monitors = []

    def hook(model_cfg, tokenizer, objective, frozen, out):
        monitor = HeldOutMonitor(model_cfg, tokenizer, config.eval, data_dir=data_dir,
                                 params_view=lambda p: objective.export(p, frozen),
                                 path=out / EVAL_CURVES_FILE if out is not None else None,
                                 template=config.data.template)
        monitors.append(monitor)
        return monitor, config.eval.every

    result = fit(config, config.attack, out, hook=hook, **kw)
    curves = monitors[0].records
    task = getattr(config.attack, "task", None)
    summary = {"attack": config.attack.name, "task": task, "steps": config.steps, "lr": config.optimizer.lr,
               "lora_rank": config.lora.rank, "model": config.model.path if config.model else None,
               "pre": curves[0] if curves else None, "post": curves[-1] if curves else None,
               "final_train_loss": result.metrics.get("loss"), "curves": curves}
    from jaxdefense.attacks import ACCURACY_TASKS

    if task in ACCURACY_TASKS and config.eval.task_n > 0:
        model_cfg, before = kw["model"] if kw.get("model") else build_model(config.model, config.seed)
        summary["task_accuracy_pre"] = task_accuracy_of(model_cfg, before, result.tokenizer, task, config, data_dir)
        summary["task_accuracy"] = task_accuracy_of(model_cfg, result.params, result.tokenizer, task, config, data_dir)
    if result.out is not None and jax.process_index() == 0:
        from jaxdefense.jsonutil import to_jsonable

        (result.out / ATTACK_FILE).write_text(json.dumps(to_jsonable(summary), indent=2) + "\n")
    result.summary = {**result.summary, **summary}
    return result


def task_accuracy_of(model_cfg, params, tokenizer, task: str, config: RunConfig, data_dir=None) -> float:
    """Greedy-generation accuracy on the first eval.n_task test records of a benign task."""
    from jaxdefense.data import load_stream
    from jaxdefense.eval import task_accuracy

    records = load_stream(task, "test", data_dir, limit=config.eval.task_n)
    return float(task_accuracy(model_cfg, params, tokenizer, task, records)["accuracy"])


def evaluate(config: RunConfig, out, *, data_dir=None, progress=None, judge=None, model=None, tokenizer=None,
             title: str | None = None) -> dict:
    """Evaluate the model at `config.model.path` (or `model` = (ModelConfig, params)) with `config.eval`;
    writes out/config.yaml and out/report.{json,md,png}; returns the report."""
    from jaxdefense.eval import evaluate as run_evaluation
    from jaxdefense.eval import plot_comparison, write_report
    from jaxdefense.models import load_tokenizer

    if model is None and (config.model is None or config.model.path is None):
        raise ConfigError("model.path: evaluation needs a model (an HF directory or a run directory)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r}: exists and is not a directory")
    source = model_dir(config.model.path) if model is None else None
    data_dir = data_dir or config.data.dir
    model_cfg, params = model if model is not None else build_model(config.model, config.seed)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.data.tokenizer or source)
    report = run_evaluation(config.eval, model_cfg, params, tokenizer, data_dir=data_dir, judge=judge,
                            progress=progress)
    name = source.name if source is not None else (title or "model")
    if source is not None:
        report["model"] = str(source.resolve())
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        C.dump_yaml(config, out / CONFIG_FILE)
        write_report(out, report, title=title or f"Evaluation of {name}")
        keys = [k for k in ("refusal_rate", "benign_refusal_rate", "judge_harmful_rate", "hf_judge_harmful_rate",
                            "distinct_2", "repetition") if isinstance(report.get(k), float)]
        if keys:
            plot_comparison({name: report}, keys, out / "report.png", title="harmfulness, over-refusal, collapse")
    return report
