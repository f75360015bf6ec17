"""Two gloo processes on this machine: DDP training equals one process with the same
global batch, a sharded study writes the single-process result file, and a rank killed
with SIGKILL ends the job with a clear error within the timeout, after which a restart
resumes from the last checkpoint.

Tolerance: DDP sums the two half-batch gradients in another float32 order than one
process summing the whole batch, so losses agree to ``rtol=1e-5`` (observed: ~1e-7),
not bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from posenc.experiments import distributed
from posenc.experiments.config import config_from_dict
from posenc.experiments.parallel import run_study_sharded, shard
from posenc.experiments.results import read_results
from posenc.experiments.study import plan_study, run_study
from posenc.experiments.train import checkpoint_path, train_run

SRC = Path(__file__).resolve().parents[1] / "src"
RTOL = 1e-5
DEAD_PEER_TIMEOUT = 5  # POSENC_DIST_TIMEOUT of the spawned ranks, seconds
TINY = {
    "task": {"name": "copy", "train_length": 3, "num_symbols": 4, "eval_samples": 8, "eval_factors": [2]},
    "model": {"encoding": "rope", "dim": 16, "num_layers": 1, "num_heads": 2},
    "train": {
        "steps": 12,
        "batch_size": 8,
        "lr": 0.003,
        "warmup": 3,
        "checkpoint_every": 5,
        "threads": 1,
        "randomized_positions": True,
    },
}
STUDY = {"encodings": ["sinusoidal", "normalized", "rope+randpos"], "steps": 6, "threads": 1}


def _cfg(**sections):
    d = json.loads(json.dumps(TINY))
    for k, v in sections.items():
        d[k].update(v)
    return config_from_dict(d)


def _lm_cfg():
    """Character LM (no loss mask, positions [s]): the other branch of the loss."""
    return _cfg(
        task={
            "name": "stdlib",
            "train_length": 8,
            "max_chars": 20_000,
            "eval_factors": [1, 2],
            "eval_tokens": 64,
            "eval_segments": 2,
        },
        model={"encoding": "sinusoidal"},
        train={"randomized_positions": False},
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: a DDP run (losses to a file), a sharded study, then a DDP run in which
    rank 1 hangs (SIGSTOP) after step 3 and rank 0 records the error it gets."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        POSENC_DIST_TIMEOUT=str(DEAD_PEER_TIMEOUT),
    )
    torch.set_num_threads(1)
    ctx = distributed.init("gloo")
    losses: list[float] = []
    train_run(_cfg(), Path(out) / "ddp", on_step=lambda s, n, loss: losses.append(loss), context=ctx)
    (Path(out) / f"losses{rank}.json").write_text(json.dumps(losses))
    lm_losses: list[float] = []
    train_run(_lm_cfg(), Path(out) / "lm", on_step=lambda s, n, loss: lm_losses.append(loss), context=ctx)
    (Path(out) / f"lm_losses{rank}.json").write_text(json.dumps(lm_losses))
    configs, _ = plan_study("smoke", **STUDY)
    run_study_sharded(configs, Path(out) / "sharded", ctx)

    def hang_at_3(step: int, total: int, loss: float) -> None:
        if rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGSTOP)  # alive but silent: only the timeout can end the wait

    start = time.time()
    try:
        train_run(_cfg(train={"steps": 50}), Path(out) / "dead", on_step=hang_at_3, context=ctx)
    except distributed.DistributedError as err:
        (Path(out) / "dead_error.txt").write_text(f"{time.time() - start:.1f}\n{err}")
    # A group whose peer hung cannot be torn down: gloo's destructor may call
    # std::terminate (SIGABRT) at interpreter exit. Leave at once, as `posenc` does.
    distributed.exit_now(0)


def _spawn(out: Path) -> None:
    mpc = mp.get_context("spawn")
    port = _free_port()
    procs = [mpc.Process(target=_worker, args=(r, 2, port, str(out))) for r in range(2)]
    for p in procs:
        p.start()
    procs[0].join(timeout=60)
    for p in procs:  # rank 1 is stopped on purpose; rank 0 only if something hung
        if p.is_alive():
            p.kill()
            p.join()
    assert procs[0].exitcode == 0, "rank 0 did not finish within 60 s"


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    _spawn(out)
    return out


@pytest.mark.slow
def test_ddp_loss_curve_equals_one_process(spawned, tmp_path):
    single: list[float] = []
    rec, _ = train_run(_cfg(), tmp_path, on_step=lambda s, n, loss: single.append(loss))
    ddp0 = json.loads((spawned / "losses0.json").read_text())
    ddp1 = json.loads((spawned / "losses1.json").read_text())
    assert len(single) == len(ddp0) == 12
    assert ddp0 == ddp1  # the logged loss is the all-reduced global loss, identical on both ranks
    torch.testing.assert_close(torch.tensor(ddp0), torch.tensor(single), rtol=RTOL, atol=0)
    assert single[0] != single[-1]  # it trained
    # same run id, same checkpoint format: the DDP weights equal the single-process ones
    a = torch.load(checkpoint_path(spawned / "ddp", rec["run_id"]), weights_only=True)
    b = torch.load(checkpoint_path(tmp_path, rec["run_id"]), weights_only=True)
    assert a["step"] == b["step"] == 12
    for k in b["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=RTOL, atol=1e-6)
    (ddp_rec,) = read_results(spawned / "ddp")  # only rank 0 wrote it
    assert ddp_rec["run_id"] == rec["run_id"] and ddp_rec["metrics"] == rec["metrics"]


@pytest.mark.slow
def test_ddp_language_model_loss_curve_equals_one_process(spawned, tmp_path):
    single: list[float] = []
    rec, _ = train_run(_lm_cfg(), tmp_path, on_step=lambda s, n, loss: single.append(loss))
    ddp = json.loads((spawned / "lm_losses0.json").read_text())
    assert len(ddp) == len(single) == 12
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(single), rtol=RTOL, atol=0)
    (ddp_rec,) = read_results(spawned / "lm")
    for a, b in zip(ddp_rec["metrics"], rec["metrics"], strict=True):
        assert a["length"] == b["length"]
        assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-4)


@pytest.mark.slow
def test_sharded_study_writes_the_single_process_results(spawned, tmp_path):
    configs, _ = plan_study("smoke", **STUDY)
    run_study(configs, tmp_path)
    sharded, single = read_results(spawned / "sharded"), read_results(tmp_path)
    assert [r["run_id"] for r in sharded] == [c.run_id for c in configs]  # plan order, like one process
    for a, b in zip(sharded, single, strict=True):
        a.pop("wall_time_s"), b.pop("wall_time_s")
        assert a == b


def test_oversubscription_note(monkeypatch):
    cores = os.cpu_count() or 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))
    assert distributed.oversubscription(1) is None
    note = distributed.oversubscription(2)
    assert note is not None and f"{cores} processes x 2 threads > {cores} cores" in note and "--threads 1" in note


@pytest.mark.slow
def test_lonely_rank_cannot_form_a_group_within_the_timeout(monkeypatch):
    port = _free_port()
    monkeypatch.setenv("RANK", "1")  # rank 0 (the store's host) never comes
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    start = time.time()
    with pytest.raises(
        distributed.DistributedError, match=r"rank 1/2: could not form the gloo process group within 2 s"
    ):
        distributed.init("gloo", timeout_s=2)
    assert time.time() - start < 10


def test_batch_not_divisible_and_bad_settings():
    ctx = distributed.DistContext(rank=1, world_size=3, local_rank=1, backend="gloo", device=torch.device("cpu"))
    assert ctx.rows(12) == slice(4, 8)
    with pytest.raises(ValueError, match=r"batch_size=8 \(the global batch\) is not divisible by the world size 3"):
        ctx.rows(8)
    assert shard(7, 1, 3) == [1, 4]
    with pytest.raises(ValueError, match="backend must be one of"):
        distributed.choose_backend("mpi")
    os.environ[distributed.ENV_TIMEOUT] = "soon"
    try:
        with pytest.raises(ValueError, match="POSENC_DIST_TIMEOUT must be a number of seconds, got 'soon'"):
            distributed.collective_timeout()
    finally:
        del os.environ[distributed.ENV_TIMEOUT]


# -- a killed rank ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_hung_rank_is_an_error_after_the_timeout(spawned):
    """Rank 1 stopped (not dead: its sockets stay open) and no torchrun to stop rank 0:
    rank 0's next collective fails after POSENC_DIST_TIMEOUT seconds, not never."""
    seconds, message = (spawned / "dead_error.txt").read_text().split("\n", 1)
    assert DEAD_PEER_TIMEOUT - 1 < float(seconds) < DEAD_PEER_TIMEOUT + 5
    assert message.startswith("rank 0/2: step 4 failed") and "did not answer within 5 s" in message
    assert "Run the same command again to resume from the last checkpoint" in message


def _children_with_rank(parent: int, rank: int) -> list[int]:
    """PIDs of ``parent``'s child processes whose environment has ``RANK=<rank>``."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (d / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            found.append(int(d.name))
    return found


def _torchrun(cfg_path: Path, out: Path, timeout_s: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", distributed.ENV_TIMEOUT: str(timeout_s)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--max-restarts=0",
        "-m",
        "posenc.cli",
        "train",
        "--config",
        str(cfg_path),
        "--out",
        str(out),
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find the rank's process")
def test_killed_rank_fails_fast_and_restart_resumes(tmp_path):
    timeout_s = 10
    cfg = _cfg(train={"steps": 150, "checkpoint_every": 5})
    (tmp_path / "run.yaml").write_text(json.dumps(cfg.to_dict()), encoding="utf-8")  # JSON is YAML
    ckpt = checkpoint_path(tmp_path / "run", cfg.run_id)
    proc = _torchrun(tmp_path / "run.yaml", tmp_path / "run", timeout_s)
    deadline = time.time() + 40
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert ckpt.exists(), "no checkpoint was written"
    victims = _children_with_rank(proc.pid, 1)
    assert len(victims) == 1, f"expected one rank-1 worker, found {victims}"
    os.kill(victims[0], signal.SIGKILL)
    killed_at = time.time()
    try:
        output, _ = proc.communicate(timeout=timeout_s + 15)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the job did not exit within {timeout_s + 15} s of the kill")
    assert proc.returncode != 0
    assert time.time() - killed_at < timeout_s + 15
    assert "SIGKILL" in output and "posenc.cli" in output, output[-2000:]  # torchrun names the dead rank
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < step < 150

    proc = _torchrun(tmp_path / "run.yaml", tmp_path / "run", timeout_s)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output[-3000:]
    m = re.search(r"resuming \S+ from \S+ at step (\d+)", output)
    assert m is not None, output[-3000:]
    assert int(m.group(1)) >= step and int(m.group(1)) % 5 == 0
    (rec,) = read_results(tmp_path / "run")
    assert rec["run_id"] == cfg.run_id
    assert torch.load(ckpt, weights_only=True)["step"] == 150


def test_cli_bad_backend_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from posenc.cli import app

    (tmp_path / "run.yaml").write_text(json.dumps(_cfg().to_dict()), encoding="utf-8")
    res = CliRunner().invoke(
        app, ["train", "-c", str(tmp_path / "run.yaml"), "--out", str(tmp_path), "--backend", "mpi"]
    )
    assert res.exit_code == 2
    assert "backend must be one of ['gloo', 'nccl'], got 'mpi'" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "checkpoints").exists()
