import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from jaxdefense import cli
from jaxdefense.data import data_root_available
from jaxdefense.train import Checkpointer, read_metrics

REPO = Path(__file__).resolve().parents[1]
needs_data = pytest.mark.skipif(not data_root_available(), reason="shared data root not found")

# One tiny config shared by every CLI test (small BPE, few records, single device).
TINY_RUN = {
    "model": {"name": "tiny"},
    "method": {"name": "sft", "source": "benign_instruct", "limit": 128},
    "data": {"tokenizer": "bpe:512", "batch_size": 4, "max_len": 32},
    "optimizer": {"name": "adamw", "lr": 3e-3, "schedule": "cosine", "warmup_steps": 5},
    "steps": 160, "ckpt_every": 20, "log_every": 1, "seed": 3, "export_hf": False,
}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_RUN))
    return path


def _staging_dirs():
    return sorted(Path(tempfile.gettempdir()).glob(".jaxdefense-staging-*"))


def _main(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip()


@pytest.mark.parametrize("extra, names", [
    (["--set", "optimizer.foo=1"], "optimizer.foo"),
    (["--set", "steps=abc"], "steps: expected int"),
    (["--set", "optimizer.name=lion"], "optimizer.name"),
    (["--set", "data.streams.train.source=no_such_stream"], "data.streams.train.source"),
    (["--set", "data.tokenizer=/no/such/tokenizer"], "data.tokenizer"),
    (["--set", "mesh.fsdp=64"], "mesh"),
    (["--set", "optimizer.lr=-1"], "optimizer.lr: must be > 0"),
    (["--set", "data.streams.nonesuch.limit=3"], "data.streams.nonesuch: sft has no stream"),
    (["--set", "method.name=nonesuch"], "method.name: unknown method"),
])
@needs_data
def test_bad_config_is_one_line_exit_2_and_leaves_no_run_dir(tmp_path, capsys, monkeypatch, tiny_config, extra, names):
    # a temp dir of this test's own: other test workers stage runs in the shared one meanwhile
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    out = tmp_path / "run"
    rc, err = _main(capsys, "train", "--config", tiny_config, "--out", out, "--no-progress", *extra)
    assert rc == 2
    assert err.startswith("error: ") and "\n" not in err and names in err
    assert not out.exists()
    assert _staging_dirs() == []


def test_missing_config_file_and_existing_run_dir(tmp_path, capsys):
    rc, err = _main(capsys, "train", "--config", tmp_path / "nope.yaml", "--out", tmp_path / "run")
    assert rc == 2 and "nope.yaml" in err and "\n" not in err
    assert not (tmp_path / "run").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    rc, err = _main(capsys, "train", "--config", tmp_path / "nope.yaml", "--out", tmp_path / "busy")
    assert rc == 2 and "--resume" in err


def test_registry_placeholder_and_error_handling(capsys):
    from jaxdefense.errors import DataError

    def add_arguments(parser):
        parser.add_argument("--what", default="x")

    def run(args):
        raise DataError(f"source {args.what!r} is\nmissing")

    cli.register("test-fails", "fails", add_arguments=add_arguments, run=run)
    cli.register("test-later", "someday", module="jaxdefense.no_such_module_yet")
    try:
        rc, err = _main(capsys, "test-fails", "--what", "abc")
        assert rc == 2 and err == "error: source 'abc' is missing"
        rc, err = _main(capsys, "test-later")
        assert rc == 1 and "not yet available" in err
    finally:
        cli.COMMANDS.pop("test-fails")
        cli.COMMANDS.pop("test-later")
    for name in ("immunize", "attack", "eval", "demo", "build-base", "train", "data"):
        assert name in cli.COMMANDS


@needs_data
def test_nonfinite_lr_stops_with_exit_2(tmp_path, capsys, tiny_config):
    out = tmp_path / "run"
    rc, err = _main(capsys, "train", "--config", tiny_config, "--out", out, "--no-progress",
                    "--set", "optimizer.lr=.inf", "--set", "optimizer.schedule=constant",
                    "--set", "optimizer.warmup_steps=0", "--set", "steps=3")
    assert rc == 2 and "non-finite" in err and "at step 0" in err
    assert (out / "config.yaml").is_file()
    with Checkpointer(out / "checkpoints") as ckpt:
        assert ckpt.latest_step() is None
    # Resuming with a different config names the keys that differ (steps may change).
    rc, err = _main(capsys, "train", "--config", tiny_config, "--out", out, "--resume")
    assert rc == 2 and err.endswith("at optimizer.lr, optimizer.schedule, optimizer.warmup_steps")


def _spawn(config, out, *extra, cache=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    if cache is not None:  # later processes reuse the first one's compiled step
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    cmd = [sys.executable, "-m", "jaxdefense.cli", "train", "--config", str(config), "--out", str(out),
           "--no-progress", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _last_step(run_dir):
    records = read_metrics(run_dir)
    return records[-1]["step"] if records else -1


@pytest.mark.slow
@needs_data
def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_config):
    full, part, cache = tmp_path / "full", tmp_path / "part", tmp_path / "jax-cache"
    reference = _spawn(tiny_config, full, cache=cache)
    out_ref, err_ref = reference.communicate(timeout=300)
    assert reference.returncode == 0, err_ref
    victim = _spawn(tiny_config, part, cache=cache)
    deadline = time.time() + 240
    while _last_step(part) < 50 and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert victim.poll() is None, "run finished before it could be killed: " + victim.stderr.read()
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = _last_step(part)
    with Checkpointer(part / "checkpoints") as ckpt:
        saved = ckpt.latest_step()
    assert saved is not None and saved < TINY_RUN["steps"] and killed_at < TINY_RUN["steps"] - 1
    resumed = _spawn(tiny_config, part, "--resume", cache=cache)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in a] == list(range(TINY_RUN["steps"]))
    assert [r["step"] for r in b] == [r["step"] for r in a]
    assert [r["loss"] for r in b] == [r["loss"] for r in a]  # bit-identical (JSON floats round-trip)
    assert [r["grad_norm"] for r in b] == [r["grad_norm"] for r in a]
    assert json.loads(json.dumps(a[-1]["loss"])) == a[-1]["loss"]
