"""The fast training step (``posenc.experiments.fast_step``) against the reference step.

The fast step compiles the traced forward + backward with Inductor and uses fused
AdamW: float32 sums in another order, so the two loss trajectories agree within
``RTOL`` (observed <= 4.1e-7 over 20 steps: rope, alibi, learned, t5), not bit for
bit. ``test_avx2`` runs the same comparison in a subprocess with
``ATEN_CPU_CAPABILITY=avx2`` and a fresh Inductor cache (the AVX2 kernels Inductor
generates on an AVX-512 machine are other code).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from posenc.experiments import fast_step
from posenc.experiments.config import config_from_dict
from posenc.experiments.results import read_results
from posenc.experiments.train import build_model, train_run

RTOL = 1e-4
STEPS = 20
ENCODINGS = ("rope", "alibi", "learned", "t5")
SRC = Path(__file__).resolve().parents[1] / "src"


def _config(encoding: str, task: str = "copy", **train):
    """The study's model (width 64, 2 layers, 4 heads) at a smaller batch."""
    synthetic = task == "copy"
    return config_from_dict(
        {
            "task": {"name": task, "train_length": 8 if synthetic else 16, "num_symbols": 32, "eval_samples": 8}
            if synthetic
            else {
                "name": task,
                "train_length": 16,
                "max_chars": 20_000,
                "eval_factors": [1, 2],
                "eval_tokens": 64,
                "eval_segments": 2,
            },
            "model": {"encoding": encoding, "dim": 64, "num_layers": 2, "num_heads": 4},
            "train": {"steps": STEPS, "batch_size": 16, "lr": 3e-3, "warmup": 5, "threads": 1, **train},
        }
    )


def _losses(config, run_dir: Path, mode: str) -> list[float]:
    losses: list[float] = []
    train_run(config, run_dir, on_step=lambda s, n, loss: losses.append(loss), step_mode=mode)
    return losses


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_fast_equals_reference(tmp_path: Path, encoding: str) -> None:
    config = _config(encoding)
    ref = _losses(config, tmp_path / "ref", "reference")
    fast = _losses(config, tmp_path / "fast", "fast")
    assert len(ref) == len(fast) == STEPS
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(ref), rtol=RTOL, atol=0)
    (rec_ref,), (rec_fast,) = read_results(tmp_path / "ref"), read_results(tmp_path / "fast")
    assert rec_ref["run_id"] == rec_fast["run_id"]  # the step does not change what a run is


def test_fast_language_model(tmp_path: Path) -> None:
    """No loss mask, full-width windows (the Shakespeare branch)."""
    config = _config("sinusoidal", task="stdlib")
    torch.testing.assert_close(
        torch.tensor(_losses(config, tmp_path / "f", "fast")),
        torch.tensor(_losses(config, tmp_path / "r", "reference")),
        rtol=RTOL,
        atol=0,
    )


@pytest.mark.slow
def test_fast_is_deterministic(tmp_path: Path) -> None:
    config = _config("rope")
    assert _losses(config, tmp_path / "a", "fast") == _losses(config, tmp_path / "b", "fast")


def test_mode_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fast_step.ENV_STEP, raising=False)
    long = fast_step.AUTO_MIN_STEPS
    assert fast_step.resolve_mode(None, steps=long, varying_positions=False) == "fast"
    assert fast_step.resolve_mode(None, steps=long - 1, varying_positions=False) == "reference"
    assert fast_step.resolve_mode("fast", steps=1, varying_positions=False) == "fast"
    assert fast_step.resolve_mode("fast", steps=long, varying_positions=True) == "reference"
    monkeypatch.setenv(fast_step.ENV_STEP, "reference")
    assert fast_step.resolve_mode(None, steps=long, varying_positions=False) == "reference"
    with pytest.raises(ValueError, match="step mode"):
        fast_step.resolve_mode("quick", steps=long, varying_positions=False)


@pytest.mark.slow
def test_resume_across_steps(tmp_path: Path) -> None:
    """A run stopped after a fast step's checkpoint resumes (with the fast step) to the
    uninterrupted run's losses."""
    config = _config("rope", checkpoint_every=10)
    full = _losses(config, tmp_path / "full", "fast")

    class Stop(Exception):
        pass

    def stop_at_12(step, steps, loss):
        if step == 12:
            raise Stop

    with pytest.raises(Stop):
        train_run(config, tmp_path / "cut", on_step=stop_at_12, step_mode="fast")
    rest: list[float] = []
    train_run(config, tmp_path / "cut", on_step=lambda s, n, loss: rest.append(loss), step_mode="fast")
    assert rest == full[10:]


_AVX2_SCRIPT = """
import json, sys, tempfile
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch
from test_fast_step import _config, _losses
out = {{}}
for name in ("rope", "alibi"):  # a rotation and a bias graph: the suite's time budget allows two
    d = Path(tempfile.mkdtemp())
    out[name] = [_losses(_config(name), d / "r", "reference"), _losses(_config(name), d / "f", "fast")]
print(torch.backends.cpu.get_cpu_capability())
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith("AVX"), reason="x86 only")
def test_avx2(tmp_path: Path) -> None:
    """The compiled step is also right with AVX2 code (fresh Inductor cache)."""
    env = {
        **os.environ,
        "ATEN_CPU_CAPABILITY": "avx2",
        "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(dir=tmp_path),
        "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    script = _AVX2_SCRIPT.format(tests=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    capability, payload = proc.stdout.strip().splitlines()[-2:]
    assert capability == "AVX2"
    for name, (ref, fast) in json.loads(payload).items():
        torch.testing.assert_close(torch.tensor(fast), torch.tensor(ref), rtol=RTOL, atol=0, msg=name)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank of a 2-process gloo job training with the fast step."""
    from posenc.experiments import distributed

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    ctx = distributed.init("gloo")
    losses: list[float] = []
    record = lambda s, n, loss: losses.append(loss)  # noqa: E731
    train_run(_config("alibi"), Path(out) / "ddp", on_step=record, context=ctx, step_mode="fast")
    (Path(out) / f"losses{rank}.json").write_text(json.dumps(losses))
    distributed.shutdown()


@pytest.mark.slow
def test_fast_step_under_ddp(tmp_path: Path) -> None:
    """Two ranks with the fast step (gradients summed over ranks by one all-reduce) train
    like one process with the fast step."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [mp.get_context("spawn").Process(target=_ddp_worker, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
        assert p.exitcode == 0
    single = _losses(_config("alibi"), tmp_path / "one", "fast")
    for rank in range(2):
        ddp = json.loads((tmp_path / f"losses{rank}.json").read_text())
        torch.testing.assert_close(torch.tensor(ddp), torch.tensor(single), rtol=RTOL, atol=0)


def test_a_batch_of_the_buckets_width_after_a_padded_one() -> None:
    """The first batch of a shape is padded to the bucket (contiguous), a later one is
    exactly the bucket's width: ``batch[:, 1:]`` of ``[b, s + 1]`` tokens, strides
    ``(s + 1, 1)``. The graph traced on the first must take the second (it raised "Cannot
    view a tensor with shape [16, 65] and strides (66, 1)" in a copy fine-tune), and its
    loss is the eager loss of the same batch."""
    cfg = _config("rope")
    model = build_model(cfg, 40, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: the weights stay, so losses compare
    step = fast_step.FastStep(model, opt, 1.0, bucket=6)
    g = torch.Generator().manual_seed(0)
    short = torch.randint(0, 40, (2, 5), generator=g)
    step(short[:, :-1], short[:, 1:], None, torch.arange(6), 8)  # padded from 4 to 6
    full = torch.randint(0, 40, (2, 7), generator=g)
    inputs, targets = full[:, :-1], full[:, 1:]
    assert not targets.is_contiguous()
    loss = step(inputs, targets, None, torch.arange(6), 12)
    with torch.no_grad():
        eager = fast_step.masked_loss(model(inputs, torch.arange(6)), targets, None, 12)
    assert float(loss) == pytest.approx(float(eager), rel=RTOL)
