"""Two processes on localhost (CPU, gloo collectives) train like one process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxdefense.data import data_root_available
from jaxdefense.train import read_metrics

REPO = Path(__file__).resolve().parents[2]
CONFIG = {
    "model": {"name": "tiny"},
    "method": {"name": "sft", "source": "benign_instruct", "limit": 128},
    "data": {"tokenizer": "bpe:512", "batch_size": 8, "max_len": 32},
    "optimizer": {"name": "adamw", "lr": 3e-3},
    "mesh": {"fsdp": 2, "tensor": 2},
    "steps": 6, "ckpt_every": 3, "log_every": 1, "seed": 1, "export_hf": False,
}

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not data_root_available(), reason="shared data root not found")]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(config, out, processes, devices_per_process, *extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices_per_process), PYTHONPATH=str(REPO))
    base = [sys.executable, "-m", "jaxdefense.cli", "train", "--config", str(config), "--out", str(out),
            "--no-progress", *extra]
    if processes == 1:
        procs = [subprocess.Popen(base, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    else:
        port = _free_port()
        procs = [subprocess.Popen(base + ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes",
                                          str(processes), "--process-id", str(i)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(processes)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    return [r["loss"] for r in read_metrics(out)]


def test_two_processes_match_one_process_and_resume_bit_identically(tmp_path):
    config = tmp_path / "mp.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    two = _train(config, tmp_path / "two", 2, 2)
    one = _train(config, tmp_path / "one", 1, 4)
    assert len(two) == len(one) == 6
    np.testing.assert_allclose(two, one, rtol=1e-5)
    assert two[-1] < two[0]
    # Multi-process resume: stop at 3, continue to 6 -> the same losses bit for bit.
    first = _train(config, tmp_path / "resumed", 2, 2, "--set", "steps=3")
    assert first == two[:3]
    assert _train(config, tmp_path / "resumed", 2, 2, "--resume") == two
