"""`jaxdefense immunize`: train a model with a defence in the one training loop, then export it.

    jaxdefense immunize --method seam --config configs/seam_tiny.yaml --out runs/seam \\
        [--set method.beta=1 --set steps=200 ...] [--data-dir D] [--resume]

The config is a `RunConfig` (model, data, optimizer, mesh, steps, ...) plus
    method: {name: seam, <hyperparameter>: value, ...}   (--method overrides method.name)
    pairs:  the paired harmful/refusal streams (SEAM's "adversarial"/"alignment"), built from
            harmful_qa + refusal, defender half of the train split (jaxdefense.data.pairs)
    export_hf: write DIR/hf (save_hf + tokenizer) after training
Every stream the method declares must be a pair stream or a `data.streams` entry. The run
directory holds config.yaml, tokenizer/, metrics.jsonl, checkpoints/ (orbax) and hf/.
An unknown method or hyperparameter is a ConfigError (one line, exit 2) before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import jax

from jaxdefense import config as C
from jaxdefense.config import field
from jaxdefense.errors import ConfigError, DataError

HF_DIR = "hf"


@dataclasses.dataclass
class PairSection:
    names: list[str] = field(["adversarial", "alignment"], doc="stream names of the harmful and refusal sides")
    harmful: str = field("harmful_qa", doc="harmful prompt + answer stream")
    refusal: str = field("refusal", doc="harmful prompt + refusal stream")
    split: str = field("train")
    half: str = field("defender", choices=("all", "defender", "attacker"),
                      doc="defender half of the prompts (the attacker trains on the other half)")
    batch_size: int = field(8)
    max_len: int = field(64)
    limit: int | None = field(None, doc="use only the first N pairs")
    template: str = field("chat", doc="prompt template (see data.formatting)")

    def __post_init__(self):
        if len(self.names) != 2:
            raise ConfigError(f"pairs.names: expected two stream names, got {self.names}")


@dataclasses.dataclass
class ImmunizeConfig(C.RunConfig):
    method: dict[str, Any] = field({"name": "seam"}, doc="method name and hyperparameters")
    pairs: PairSection | None = field(PairSection(), doc="paired harmful/refusal streams (null: none)")
    export_hf: bool = field(True, doc="write the immunised model to DIR/hf")


def method_from_config(section: dict[str, Any]):
    """The (unbound) method named in `method.name` with the other keys as hyperparameters."""
    from jaxdefense.methods import get_method

    hparams = dict(section)
    name = hparams.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError("method.name: required (e.g. seam), or pass --method")
    return get_method(name, **hparams)


def build_method_streams(method, config: ImmunizeConfig, records: dict, tokenizer, seed: int) -> dict:
    """{stream name: batch_at stream} for every stream the method declares."""
    from jaxdefense.data import stream_seed
    from jaxdefense.data.pairs import PairedBatches
    from jaxdefense.train.run import build_streams

    plain = build_streams(config.data, records, tokenizer, seed) if config.data.streams else {}
    paired = None
    if config.pairs is not None and any(n in config.pairs.names for n in method.streams):
        p = config.pairs
        try:
            paired = PairedBatches(records["__pairs__"], tokenizer, p.batch_size, p.max_len,
                                   seed=stream_seed(seed, p.names[0]), template=p.template, names=tuple(p.names))
        except (ConfigError, DataError) as e:
            raise type(e)(f"pairs: {e}") from e
    streams = {}
    for name in method.streams:
        if paired is not None and name in config.pairs.names:
            streams[name] = paired.view(name)
        elif name in plain:
            streams[name] = plain[name]
        else:
            raise ConfigError(f"data.streams.{name}: method {method.name!r} needs a stream {name!r} "
                              f"(it uses {list(method.streams)})")
    return streams


def load_records(config: ImmunizeConfig, method, data_dir) -> dict[str, list[dict]]:
    """Records of data.streams plus "__pairs__" (the paired records) when the method uses pairs."""
    from jaxdefense.data.pairs import load_pairs
    from jaxdefense.train.run import stream_records

    records = stream_records(config.data, data_dir) if config.data.streams else {}
    if config.pairs is not None and any(n in config.pairs.names for n in method.streams):
        p = config.pairs
        try:
            records["__pairs__"] = load_pairs(p.split, p.half, data_dir, p.limit, p.harmful, p.refusal)
        except (ConfigError, DataError) as e:
            raise type(e)(f"pairs: {e}") from e
    return records


def _tokenizer_texts(records: dict[str, list[dict]]) -> dict[str, list[dict]]:
    out = dict(records)
    if "__pairs__" in out:
        pairs = out.pop("__pairs__")
        out["__harmful__"] = [{"prompt": r["prompt"], "response": r["response"]} for r in pairs]
        out["__refusal__"] = [{"prompt": r["prompt"], "response": r["refusal"]} for r in pairs]
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jaxdefense.train.run import add_run_arguments

    parser.add_argument("--method", default=None, help="defence name (overrides method.name), e.g. seam")
    add_run_arguments(parser, config_help="YAML config, e.g. configs/seam_tiny.yaml", set_example="method.beta=1")


def run(args: argparse.Namespace) -> int:
    from jaxdefense.models import save_hf
    from jaxdefense.train import distributed, train
    from jaxdefense.train.run import (CONFIG_FILE, RunDir, build_mesh, build_model, build_tokenizer, check_vocab,
                                      make_optimizer, resolve_run_config)

    distributed.initialize_from_args(args)
    if args.method is not None:
        args.set = [f"method.name={args.method}", *(args.set or [])]
    config, fresh = resolve_run_config(args, ImmunizeConfig)
    method = method_from_config(config.method)
    run_dir = RunDir(args.out, fresh)
    try:
        mesh = build_mesh(config.mesh)
        data_dir = args.data_dir or config.data.dir
        records = load_records(config, method, data_dir)
        model_cfg, params = build_model(config.model, config.seed)
        tokenizer = build_tokenizer(config.data.tokenizer, config.model.path, _tokenizer_texts(records), run_dir.path)
        check_vocab(tokenizer, model_cfg)
        streams = build_method_streams(method, config, records, tokenizer, config.seed)
        optimizer = make_optimizer(config.optimizer, config.steps)
        method = method.bind(model_cfg)
        if jax.process_index() == 0:
            C.dump_yaml(config, run_dir.path / CONFIG_FILE)
    except BaseException:
        run_dir.discard()
        raise
    out = run_dir.commit()
    result = train(
        params, method.grad, streams, optimizer,
        steps=config.steps, mesh=mesh, run_dir=out, ckpt_every=config.ckpt_every,
        resume=not fresh or bool(args.resume), seed=config.seed, log_every=config.log_every,
        compute_dtype=config.compute_dtype, progress=not args.no_progress,
    )
    if config.export_hf and jax.process_index() == 0:
        save_hf(model_cfg, jax.device_get(result.params), out / HF_DIR, tokenizer=tokenizer)
    if jax.process_index() == 0:
        m = result.metrics
        shown = ", ".join(f"{k} {m[k]:.4g}" for k in ("loss", "l_ul", "l_up", "cos") if isinstance(m.get(k), float))
        print(f"immunised with {method.name} for {result.step} steps ({shown}); run dir {out}"
              + (f"; HF export {out / HF_DIR}" if config.export_hf else ""))
    return 0
