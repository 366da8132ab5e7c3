"""`jaxdefense train`: plain SFT from a YAML config, and the builders other commands reuse.

    jaxdefense train --config configs/sft_tiny.yaml --out runs/sft [--resume] [--set k=v ...]

Everything that can fail on bad input (config keys and types, model, tokenizer, data
sources, mesh) is built BEFORE the run directory appears; the directory is assembled in a
staging folder (config.yaml, tokenizer/) and moved into place in one rename, so a failed
start leaves nothing behind. `--resume` continues from the latest checkpoint; a resumed
run's metrics.jsonl equals the uninterrupted run's (see jaxdefense.train.loop).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxdefense import config as C
from jaxdefense.errors import CheckpointError, ConfigError, DataError
from jaxdefense.train import distributed

CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
# Keys that may change when a run is resumed.
RESUMABLE_CHANGES = ("steps", "log_every", "ckpt_every", "data.dir")


# ------------------------------------------------------------------------------- builders


def build_model(section: C.ModelSection, seed: int):
    """(ModelConfig, params): a named config initialised from `seed`, or an HF directory."""
    from jaxdefense.models import init_params, load_hf, named_config

    dtype = jnp.dtype(section.dtype)
    if section.path is not None:
        if not Path(section.path).is_dir():
            raise ConfigError(f"model.path: directory {section.path!r} does not exist")
        if section.overrides:
            raise ConfigError("model.overrides: only allowed with model.name")
        return load_hf(section.path, dtype=dtype)
    try:
        cfg = named_config(section.name, **section.overrides)
    except TypeError as e:
        raise ConfigError(f"model.overrides: {e}") from e
    except ConfigError as e:
        raise ConfigError(f"model.name: {e}") from e
    return cfg, init_params(cfg, jax.random.key(seed), dtype)


def make_optimizer(section: C.OptimizerSection, steps: int) -> optax.GradientTransformation:
    """optax optimiser: schedule (warmup, then constant / cosine / linear decay to 0), clipping."""
    lr, warmup = section.lr, section.warmup_steps
    decay_steps = max(steps - warmup, 1)
    if section.schedule == "constant":
        body = optax.constant_schedule(lr)
    elif section.schedule == "cosine":
        body = optax.cosine_decay_schedule(lr, decay_steps)
    else:
        body = optax.linear_schedule(lr, 0.0, decay_steps)
    schedule = (
        optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), body], [warmup]) if warmup > 0 else body
    )
    if section.name == "adamw":
        opt = optax.adamw(schedule, section.b1, section.b2, section.eps, weight_decay=section.weight_decay)
    elif section.name == "adam":
        if section.weight_decay:
            raise ConfigError("optimizer.weight_decay: adam has no weight decay; use adamw")
        opt = optax.adam(schedule, section.b1, section.b2, section.eps)
    else:
        opt = optax.sgd(schedule, momentum=section.momentum)
        if section.weight_decay:
            opt = optax.chain(optax.add_decayed_weights(section.weight_decay), opt)
    if section.clip is not None:
        if section.clip <= 0:
            raise ConfigError(f"optimizer.clip: must be > 0 or null, got {section.clip}")
        opt = optax.chain(optax.clip_by_global_norm(section.clip), opt)
    return opt


def stream_records(data: C.DataSection, data_dir=None) -> dict[str, list[dict]]:
    """Records per configured stream (DataError names the config key)."""
    from jaxdefense.data import load_stream

    if not data.streams:
        raise ConfigError("data.streams: no streams configured")
    records = {}
    for name, s in data.streams.items():
        try:
            records[name] = load_stream(s.source, s.split, data_dir=data_dir, limit=s.limit)
        except DataError as e:
            raise DataError(f"data.streams.{name}.source: {e}") from e
        if not records[name]:
            raise DataError(f"data.streams.{name}: source {s.source!r} split {s.split!r} has no records")
    return records


def build_tokenizer(spec: str | None, model_path: str | None, records: dict[str, list[dict]], workdir: Path):
    """Tokenizer from a directory, or "bpe:<vocab>": a byte-level BPE trained on the stream
    texts and saved to workdir/tokenizer (reused from there when present, e.g. on resume)."""
    from jaxdefense.data import train_bpe_tokenizer
    from jaxdefense.models import load_tokenizer

    spec = spec if spec is not None else model_path
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
        texts = [r.get(k, "") for rows in records.values() for r in rows for k in ("prompt", "response")]
        try:
            return train_bpe_tokenizer(texts, vocab, saved)
        except ConfigError as e:
            raise ConfigError(f"data.tokenizer: {e}") from e
    if not Path(spec).is_dir():
        raise ConfigError(f"data.tokenizer: directory {spec!r} does not exist")
    try:
        return load_tokenizer(spec)
    except CheckpointError as e:
        raise ConfigError(f"data.tokenizer: {e}") from e


def build_streams(data: C.DataSection, records, tokenizer, seed: int) -> dict[str, Any]:
    """`BatchStream` per configured stream, seeded by (run seed, stream name)."""
    from jaxdefense.data import make_batches, stream_seed

    streams = {}
    for name, s in data.streams.items():
        try:
            streams[name] = make_batches(records[name], tokenizer, s.batch_size, s.max_len,
                                         seed=stream_seed(seed, name), **s.options)
        except TypeError as e:
            raise ConfigError(f"data.streams.{name}.options: {e}") from e
        except (ConfigError, DataError) as e:
            raise type(e)(f"data.streams.{name}: {e}") from e
    return streams


def check_vocab(tokenizer, model_cfg) -> None:
    if len(tokenizer) > model_cfg.vocab_size:
        raise ConfigError(
            f"data.tokenizer: {len(tokenizer)} tokens exceed the model's vocab_size {model_cfg.vocab_size}"
        )


def build_mesh(section: C.MeshSection):
    from jaxdefense.train.sharding import make_mesh

    return make_mesh(section.data, section.fsdp, section.tensor)


# ------------------------------------------------------------------------------- run dirs


def resolve_run_config(args, schema=C.RunConfig):
    """(config, fresh): the config from --config/--set, checked against DIR/config.yaml on resume."""
    out = Path(args.out)
    saved = out / CONFIG_FILE
    resuming = bool(getattr(args, "resume", False)) and saved.is_file()
    if getattr(args, "resume", False) and not resuming and out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {str(out)!r}: not a run directory (no {CONFIG_FILE}); cannot resume it")
    if args.config is None and not resuming:
        raise ConfigError("--config: required (except with --resume on an existing run dir)")
    if not getattr(args, "resume", False) and out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {str(out)!r}: run directory exists; pass --resume to continue it")
    config = C.load_config(args.config if args.config is not None else saved, schema, args.set or [])
    if resuming:
        previous = C.to_dict(C.from_dict(schema, C.read_yaml(saved)))
        changed = [k for k in C.diff_keys(previous, C.to_dict(config))
                   if not any(k == r or k.startswith(r + ".") for r in RESUMABLE_CHANGES)]
        if changed:
            raise ConfigError(f"--resume: config differs from {saved} at {', '.join(changed)}")
    return config, not resuming


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
                self.out.rmdir()  # empty (checked earlier)
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


# ------------------------------------------------------------------------------- command


def add_run_arguments(parser: argparse.ArgumentParser, *, config_help: str = "YAML config (see configs/)",
                      set_example: str = "optimizer.lr=3e-4") -> None:
    """The arguments every config-driven run command shares (train, immunize)."""
    from jaxdefense.cli import add_distributed_arguments

    parser.add_argument("--config", default=None, help=config_help)
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config key, e.g. --set {set_example} (repeatable)")
    parser.add_argument("--data-dir", default=None, help="data root (overrides data.dir)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_distributed_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from jaxdefense.train.loop import sft_grad, train

    distributed.initialize_from_args(args)
    config, fresh = resolve_run_config(args)
    if "train" not in config.data.streams:
        raise ConfigError("data.streams.train: `jaxdefense train` needs a stream named 'train'")
    run_dir = RunDir(args.out, fresh)
    try:
        mesh = build_mesh(config.mesh)
        data_dir = args.data_dir or config.data.dir
        records = stream_records(config.data, data_dir)
        model_cfg, params = build_model(config.model, config.seed)
        tokenizer = build_tokenizer(config.data.tokenizer, config.model.path, records, run_dir.path)
        check_vocab(tokenizer, model_cfg)
        streams = build_streams(config.data, records, tokenizer, config.seed)
        optimizer = make_optimizer(config.optimizer, config.steps)
        if jax.process_index() == 0:
            C.dump_yaml(config, run_dir.path / CONFIG_FILE)
    except BaseException:
        run_dir.discard()
        raise
    out = run_dir.commit()
    result = train(
        params, sft_grad(model_cfg, "train"), streams, optimizer,
        steps=config.steps, mesh=mesh, run_dir=out, ckpt_every=config.ckpt_every,
        resume=not fresh or bool(args.resume), seed=config.seed, log_every=config.log_every,
        compute_dtype=config.compute_dtype, progress=not args.no_progress,
    )
    if jax.process_index() == 0:
        loss = result.metrics.get("loss")
        print(f"trained {result.step} steps; last loss {loss}; run dir {out}")
    return 0
