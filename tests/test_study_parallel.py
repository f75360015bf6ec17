"""`posenc study --jobs N`: runs trained by worker processes side by side give the
records a single process gives, in plan order (a two-phase study with a learning-rate
sweep too); finished runs are skipped without a worker; a failing run and a killed
worker stop the study with a clear error."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from posenc.cli import app
from posenc.experiments.config import config_from_dict
from posenc.experiments.parallel import StudyWorkerError, default_jobs, plan_jobs, run_study_parallel
from posenc.experiments.results import read_results
from posenc.experiments.study import plan_phases, run_study
from posenc.experiments.summary import choose_lr
from posenc.experiments.train import checkpoint_path

TINY = {
    "task": {"name": "copy", "train_length": 3, "num_symbols": 4, "eval_samples": 8, "eval_factors": [2]},
    "model": {"encoding": "sinusoidal", "dim": 16, "num_layers": 1, "num_heads": 2},
    "train": {"steps": 30, "batch_size": 8, "lr": 0.003, "warmup": 5, "checkpoint_every": 10, "threads": 1},
}


def _configs(encodings=("sinusoidal", "rope", "alibi"), seeds=(0,), steps=30):
    out = []
    for enc in encodings:
        for seed in seeds:
            d = json.loads(json.dumps(TINY))
            d["model"]["encoding"] = enc
            d["train"].update(seed=seed, steps=steps)
            out.append(config_from_dict(d))
    return out


@pytest.mark.slow
def test_parallel_records_equal_sequential_and_are_in_plan_order(tmp_path):
    configs = _configs(seeds=(0, 1))
    seq = run_study(configs, tmp_path / "seq")
    events = []
    par = run_study_parallel(
        configs,
        tmp_path / "par",
        2,
        on_run_start=lambda i, cfg: events.append(("start", i)),
        on_run_end=lambda i, rec, skipped: events.append(("end", i, skipped)),
    )
    assert [r["run_id"] for r in par] == [c.run_id for c in configs]
    assert [r["metrics"] for r in par] == [r["metrics"] for r in seq]  # same computation, bit for bit
    assert [r["run_id"] for r in read_results(tmp_path / "par")] == [c.run_id for c in configs]
    assert sorted(e[1] for e in events if e[0] == "start") == list(range(len(configs)))
    assert all(e[2] is False for e in events if e[0] == "end")

    events.clear()  # re-run: every run skipped, no worker started
    before = set(mp.active_children())
    again = run_study_parallel(configs, tmp_path / "par", 2, on_run_end=lambda i, r, s: events.append(s))
    assert again == par and events == [True] * len(configs) and set(mp.active_children()) == before

    # A later command with another plan order: the file only grows at its end (the pages of docs/ read
    # the first N lines of a committed results file), the new runs in their plan order.
    more = _configs(encodings=("none",), seeds=(0, 1))
    run_study_parallel([*more, *configs], tmp_path / "par", 2)
    assert [r["run_id"] for r in read_results(tmp_path / "par")] == [c.run_id for c in [*configs, *more]]


@pytest.mark.slow
def test_parallel_two_phase_study_equals_the_sequential_one(tmp_path):
    """Phase 2 starts after the sweep, at the rate chosen from it, in both runners;
    hooks get indices of ``plan.outline``; a half-finished study resumes."""
    plan = plan_phases(
        "smoke",
        encodings=["sinusoidal", "none"],
        seeds=[0, 1],
        steps=10,
        threads=1,
        lr_sweep=True,
        lr_grid=(1e-3, 1e-2),
    )
    seq = run_study(plan, tmp_path / "seq")
    run_study_parallel(list(plan.first[:1]), tmp_path / "par", 2)  # interrupted after one sweep run
    starts, ends = [], []
    par = run_study_parallel(
        plan,
        tmp_path / "par",
        2,
        on_run_start=lambda i, cfg: starts.append((i, cfg.run_id)),
        on_run_end=lambda i, rec, skipped: ends.append((i, skipped)),
    )
    assert [r["run_id"] for r in par] == [r["run_id"] for r in seq]
    assert [r["metrics"] for r in par] == [r["metrics"] for r in seq]
    chosen = choose_lr(seq[:4])
    assert [(r["encoding"], r["config"]["train"]["lr"]) for r in par[4:]] == [
        (e, chosen[("copy", e)]) for e in ("sinusoidal", "none")
    ]
    assert sorted(starts) == [(i, c.run_id) for i, c in enumerate(plan.runs(seq))]
    assert sorted(ends) == [(0, True)] + [(i, False) for i in range(1, 6)]
    assert [r["run_id"] for r in read_results(tmp_path / "par")] == [r["run_id"] for r in seq]


def test_cli_dry_run_states_the_two_phases(tmp_path):
    res = CliRunner().invoke(app, ["study", "--preset", "full", "--tasks", "copy", "--dry-run", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "study 'full': " in text and "nothing trained (--dry-run)" in text
    assert "phase 1, learning-rate sweep: " in text and "at lr 0.001, 0.003, 0.01; 0 finished" in text
    assert "phase 2, after phase 1: " in text and "fixed when phase 1 has finished" in text
    assert not (tmp_path / "results.jsonl").exists()
    res = CliRunner().invoke(app, ["study", "--tasks", "copy", "--no-lr-sweep", "--dry-run", "--out", str(tmp_path)])
    assert res.exit_code == 0 and "one phase: " in res.output and "phase 2" not in res.output


@pytest.mark.slow
def test_failing_run_stops_the_study_with_its_error(tmp_path):
    configs = _configs(encodings=("sinusoidal", "rope"))
    ckpt = checkpoint_path(tmp_path, configs[1].run_id)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint"):
        run_study_parallel(configs, tmp_path, 2)
    assert mp.active_children() == []  # the other worker was stopped
    assert all(r["run_id"] != configs[1].run_id for r in read_results(tmp_path))


@pytest.mark.slow
def test_killed_worker_is_named(tmp_path):
    configs = _configs(encodings=("sinusoidal",), steps=3000)
    killed = []

    def kill_once(i, step, steps, loss):
        if not killed:
            (child,) = mp.active_children()
            os.kill(child.pid, signal.SIGKILL)
            killed.append(child.pid)

    with pytest.raises(StudyWorkerError, match=r"worker \d+ died \(exit code -9\) during run"):
        run_study_parallel(configs, tmp_path, 2, on_step=kill_once)
    assert read_results(tmp_path) == []


def test_plan_jobs():
    assert default_jobs(20, cores=2) == 2 and default_jobs(1, cores=16) == 1 and default_jobs(100, cores=64) == 8
    assert plan_jobs(None, None, 20, cores=2) == (2, 1, None)  # two one-thread runs side by side
    assert plan_jobs(None, None, 20, cores=8) == (8, 1, None)
    assert plan_jobs(2, None, 20, cores=8) == (2, 2, None)  # at most 2 threads per run by default
    assert plan_jobs(1, None, 20, cores=2) == (1, None, None)  # one process: the run's default threads
    assert plan_jobs(None, None, 0, cores=2) == (1, None, None)
    jobs, threads, note = plan_jobs(4, 2, 20, cores=2)
    assert (jobs, threads) == (4, 2) and "4 processes x 2 threads > 2 cores" in note
    assert plan_jobs(None, 3, 5, launched=True) == (1, 3, None)
    with pytest.raises(ValueError, match="torchrun"):
        plan_jobs(2, None, 5, launched=True)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="--jobs must be an integer >= 1"):
            plan_jobs(bad, None, 5)


@pytest.mark.slow
def test_cli_jobs(tmp_path):
    runner = CliRunner()
    base = ["study", "--preset", "smoke", "--encodings", "sinusoidal,none", "--tasks", "copy", "--no-report"]
    res = runner.invoke(app, [*base, "--jobs", "0", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "--jobs must be an integer >= 1" in res.output
    assert not (tmp_path / "bad").exists()
    res = runner.invoke(app, [*base, "--jobs", "2", "--out", str(tmp_path / "ok")])
    assert res.exit_code == 0, res.output
    assert [r["encoding"] for r in read_results(tmp_path / "ok")] == ["sinusoidal", "none"]


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_workers_exit_when_the_parent_is_killed(tmp_path):
    script = (
        "import json, sys\n"
        "from posenc.experiments.config import config_from_dict\n"
        "from posenc.experiments.parallel import run_study_parallel\n"
        "cfgs = [config_from_dict(d) for d in json.loads(sys.argv[1])]\n"
        "run_study_parallel(cfgs, sys.argv[2], 2)\n"
    )
    dicts = [c.to_dict() for c in _configs(encodings=("sinusoidal", "rope"), steps=100_000)]
    parent = subprocess.Popen([sys.executable, "-c", script, json.dumps(dicts), str(tmp_path)])
    try:
        deadline = time.monotonic() + 120
        while len(list((tmp_path / "checkpoints").glob("*.pt"))) < 2:  # both workers are training
            assert parent.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        workers = [p for p in _children(parent.pid) if "spawn_main" in open(f"/proc/{p}/cmdline").read()]
        assert len(workers) == 2
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while any(os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split()[2] != "Z" for p in workers):
        assert time.monotonic() < deadline, "study workers outlived their parent"
        time.sleep(0.2)
