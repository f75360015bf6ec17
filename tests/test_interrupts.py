"""Interrupted work: SIGKILL a training process at several points, resume,
and get the same final metrics as an uninterrupted run; a damaged results file or
checkpoint is a clear error and nothing else is lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from posenc.experiments.config import config_from_dict
from posenc.experiments.results import read_results
from posenc.experiments.train import checkpoint_path, train_run

CONFIG = {
    "task": {"name": "reverse", "train_length": 3, "num_symbols": 4, "eval_samples": 8, "eval_factors": [2]},
    "model": {"encoding": "rope", "dim": 16, "num_layers": 1, "num_heads": 2},
    "train": {"steps": 400, "batch_size": 8, "lr": 0.003, "warmup": 5, "checkpoint_every": 4, "threads": 1},
}
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _kill_after_step(cfg_path: Path, out: Path, run_id: str, min_step: int) -> int:
    """Start ``posenc train``, SIGKILL it once its checkpoint reaches ``min_step``;
    return the step of the checkpoint left behind."""
    ckpt = checkpoint_path(out, run_id)
    proc = subprocess.Popen(
        [sys.executable, "-m", "posenc.cli", "train", "--config", str(cfg_path), "--out", str(out)],
        env={**os.environ, "PYTHONPATH": SRC},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 90
    step = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists():
                try:
                    step = torch.load(ckpt, weights_only=True)["step"]
                except Exception:  # being replaced right now: os.replace makes this rare
                    step = 0
                if step >= min_step:
                    break
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return torch.load(ckpt, weights_only=True)["step"]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL needs POSIX signals: not on Windows")
def test_sigkill_at_several_points_then_resume_equals_uninterrupted(tmp_path):
    cfg = config_from_dict(json.loads(json.dumps(CONFIG)))
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(json.dumps(cfg.to_dict()), encoding="utf-8")  # JSON is YAML
    clean, _ = train_run(cfg, tmp_path / "clean")

    out = tmp_path / "killed"
    killed_at = []
    for target in (4, 100, 200):  # early, middle, late: three kills of the same run
        killed_at.append(_kill_after_step(cfg_path, out, cfg.run_id, target))
    assert killed_at == sorted(killed_at) and killed_at[0] >= 4 and killed_at[-1] < 400, killed_at
    assert not (out / "results.jsonl").exists()  # nothing written for an unfinished run
    resumed, _ = train_run(cfg, out)
    assert resumed["metrics"] == clean["metrics"]
    assert [r["run_id"] for r in read_results(out)] == [cfg.run_id]


def test_truncated_results_file_loses_nothing_else(tmp_path):
    cfg = config_from_dict(json.loads(json.dumps(CONFIG)) | {"train": {**CONFIG["train"], "steps": 8}})
    rec, _ = train_run(cfg, tmp_path)
    results = tmp_path / "results.jsonl"
    good = results.read_bytes()
    results.write_bytes(good[:-10])  # the last line cut short
    with pytest.raises(ValueError, match="corrupt"):
        read_results(tmp_path)
    # The checkpoint is intact, so the run itself is not lost.
    assert checkpoint_path(tmp_path, cfg.run_id).exists()
    assert results.read_bytes() == good[:-10]  # the error did not rewrite the file
