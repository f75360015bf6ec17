"""Beyond one process: data-parallel training and studies sharded across ranks.

Both run under ``torchrun`` (one machine or several); see docs/distributed.md.

``train_distributed(config, run_dir, ctx)``
    One run trained with ``DistributedDataParallel``. Every rank draws the SAME global
    batch of ``config.train.batch_size`` rows from the shared seeded generator (exactly
    the batch a single process draws) and keeps its own contiguous slice of
    ``batch_size / world_size`` rows. Each rank's loss is its slice's summed token loss
    divided by the token count of the whole global batch, times ``world_size``; DDP
    averages gradients over ranks, so the gradient is the single-process gradient of the
    global batch (up to float32 summation order). Rank 0 decides whether the run is
    finished or resumes (and broadcasts the checkpoint), writes every checkpoint and the
    results line; every rank evaluates its identical model (no collective after
    training, so a long evaluation cannot hit the collective timeout). Checkpoints have
    the single-process format: a run started with N processes can resume with any other
    N, or with plain ``posenc train``.

``run_study_sharded(configs, run_dir, ctx)``
    Plan entry ``i`` is trained by rank ``i % world_size`` as a plain single-process
    ``train_run`` (which appends its line to ``results.jsonl`` under the file lock);
    after a monitored barrier rank 0 rewrites ``results.jsonl`` in plan order, so the file
    equals the single-process study's (apart from wall times).

Timeouts: collectives fail after ``POSENC_DIST_TIMEOUT`` seconds (default 60); the
barrier that ends a study waits ``POSENC_DIST_STUDY_TIMEOUT`` seconds (default 86400)
for the slowest shard. A rank that dies is reported by ``torchrun``, which stops the
others; the survivors raise ``DistributedError`` and should leave with ``exit_now``
(the broken group cannot be destroyed safely).
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from posenc.experiments.config import RunConfig
from posenc.experiments.results import RESULTS_FILE, append_result, find_result, order_results, read_results

ENV_TIMEOUT = "POSENC_DIST_TIMEOUT"
ENV_STUDY_TIMEOUT = "POSENC_DIST_STUDY_TIMEOUT"
ENV_BACKEND = "POSENC_DIST_BACKEND"
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_STUDY_TIMEOUT_S = 86400.0
BACKENDS = ("gloo", "nccl")


class DistributedError(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or disagrees."""


def launched() -> bool:
    """True under ``torchrun`` (or any launcher setting ``WORLD_SIZE``) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1") or "1") > 1


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{name} must be > 0 seconds, got {raw!r}")
    return value


def collective_timeout() -> float:
    """Seconds a collective may wait (``POSENC_DIST_TIMEOUT``, default 60)."""
    return _env_seconds(ENV_TIMEOUT, DEFAULT_TIMEOUT_S)


def study_timeout() -> float:
    """Seconds the end-of-study barrier waits (``POSENC_DIST_STUDY_TIMEOUT``, default 86400)."""
    return _env_seconds(ENV_STUDY_TIMEOUT, DEFAULT_STUDY_TIMEOUT_S)


def choose_backend(backend: str | None = None) -> str:
    """``backend``, else ``$POSENC_DIST_BACKEND``, else ``nccl`` if CUDA is available, else ``gloo``."""
    chosen = backend or os.environ.get(ENV_BACKEND) or ("nccl" if torch.cuda.is_available() else "gloo")
    if chosen not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {chosen!r}")
    if chosen == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs CUDA, which is not available here; use backend 'gloo'")
    return chosen


@dataclasses.dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's contiguous slice of a global batch of ``batch_size`` rows."""
        if batch_size % self.world_size:
            raise ValueError(
                f"batch_size={batch_size} (the global batch) is not divisible by the world size {self.world_size}; "
                f"choose a multiple of {self.world_size}"
            )
        per = batch_size // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)


def oversubscription(threads: int | None) -> str | None:
    """A warning when this machine's processes x torch threads exceed its cores, else None.
    ``threads`` is a run's ``train.threads`` (None: ``min(2, cores)``)."""
    cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or "1")
    per = threads or max(1, min(2, cores))
    if local * per <= cores:
        return None
    return (f"{local} processes x {per} threads > {cores} cores on this machine: they will compete; "
            f"pass --threads {max(1, cores // local)} (or set train.threads)")  # fmt: skip


def _env_int(name: str) -> int:
    raw = os.environ.get(name)
    if raw is None:
        raise ValueError(f"environment variable {name} is not set: launch with torchrun (see docs/distributed.md)")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def init(backend: str | None = None, *, timeout_s: float | None = None) -> DistContext:
    """Join the process group described by torchrun's environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``)."""
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), int(os.environ.get("LOCAL_RANK", "0"))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    chosen = choose_backend(backend)
    device = torch.device("cpu")
    if chosen == "nccl":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s if timeout_s is not None else collective_timeout())
    if not dist.is_initialized():
        try:
            dist.init_process_group(chosen, rank=rank, world_size=world, timeout=timeout)
        except RuntimeError as err:  # DistStoreError / DistNetworkError: the others never came
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise DistributedError(
                f"rank {rank}/{world}: could not form the {chosen} process group within {timeout.total_seconds():g} s "
                f"({first}); start every rank with the same MASTER_ADDR/MASTER_PORT (or rendezvous endpoint)"
            ) from None
    return DistContext(rank, world, local, chosen, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_now(code: int) -> None:
    """End this process at once after a ``DistributedError``.

    A process group whose peer died or hung cannot be torn down: destroying it may
    block, and gloo's destructor can call ``std::terminate`` (SIGABRT) at interpreter
    exit, which would replace the exit code and the error message. Checkpoints and
    results are written atomically, so nothing is lost by skipping the clean-up.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _lost(ctx: DistContext, what: str, err: BaseException) -> DistributedError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    return DistributedError(
        f"rank {ctx.rank}/{ctx.world_size}: {what} failed ({first}); another rank died or did not answer within "
        f"{collective_timeout():g} s ({ENV_TIMEOUT}). Run the same command again to resume from the last checkpoint."
    )


def _broadcast(ctx: DistContext, obj: Any, what: str) -> Any:
    """Rank 0's ``obj`` on every rank."""
    box = [obj if ctx.is_main else None]
    try:
        dist.broadcast_object_list(box, src=0, device=ctx.device if ctx.backend == "nccl" else None)
    except (RuntimeError, ValueError) as err:  # gloo/nccl report a dead peer or a timeout as RuntimeError
        raise _lost(ctx, what, err) from None
    return box[0]


def _same_everywhere(ctx: DistContext, value: str, what: str) -> None:
    """Every rank must hold the same ``value`` (same config, same plan)."""
    values: list[Any] = [None] * ctx.world_size
    try:
        dist.all_gather_object(values, value)
    except (RuntimeError, ValueError) as err:
        raise _lost(ctx, f"comparing {what}", err) from None
    if len(set(values)) != 1:
        raise DistributedError(f"the ranks disagree on {what}: {values}; launch every rank with the same arguments")


def _rank0_decides(ctx: DistContext, run_dir: Path, config: RunConfig) -> tuple[str, Any]:
    """On rank 0: ("done", record) | ("resume", checkpoint state) | ("fresh", None) |
    ("error", message); broadcast to every rank."""
    from posenc.experiments.train import check_checkpoint_config, checkpoint_path, load_checkpoint

    decision: tuple[str, Any] = ("fresh", None)
    if ctx.is_main:
        try:
            done = find_result(run_dir, config.run_id)
            ckpt = checkpoint_path(run_dir, config.run_id)
            if done is not None:
                decision = ("done", done)
            elif ckpt.exists():
                state = load_checkpoint(ckpt)
                check_checkpoint_config(state, config, ckpt)
                decision = ("resume", state)
        except ValueError as err:
            decision = ("error", str(err))
    return _broadcast(ctx, decision, "sharing the checkpoint from rank 0")


def _wrap(model: nn.Module, ctx: DistContext) -> nn.parallel.DistributedDataParallel:
    """DDP without per-forward buffer syncs: buffers are position caches that every rank
    computes alike (synced once at construction)."""
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, **no_sync)


def _log(ctx: DistContext, message: str) -> None:
    if ctx.is_main:
        print(f"[posenc rank 0/{ctx.world_size}] {message}", file=sys.stderr, flush=True)


def train_distributed(
    config: RunConfig,
    run_dir: str | Path,
    ctx: DistContext,
    *,
    on_step: Callable[[int, int, float], None] | None = None,
    corpus_cache: dict | None = None,
) -> tuple[dict[str, Any], bool]:
    """``train_run`` with DistributedDataParallel over the ranks of ``ctx``; returns
    ``(record, skipped)`` on every rank (only rank 0 writes files). ``on_step(step,
    steps, loss)`` receives the global mean loss of the step."""
    from posenc.experiments.evaluate import _seed
    from posenc.experiments.train import (
        _batch,
        _lr,
        build_model,
        checkpoint_path,
        checkpoint_state,
        default_threads,
        evaluate_model,
        result_record,
        save_checkpoint,
        setup,
    )

    if not isinstance(config, RunConfig):
        raise TypeError(f"config must be a RunConfig, got {type(config).__name__}")
    run_dir = Path(run_dir)
    tc = config.train
    rows = ctx.rows(tc.batch_size)
    _same_everywhere(ctx, config.run_id, "the run config")
    kind, payload = _rank0_decides(ctx, run_dir, config)
    if kind == "error":
        raise ValueError(payload)
    if kind == "done":
        return payload, True
    torch.set_num_threads(tc.threads or default_threads())
    s = setup(config, corpus_cache)

    torch.manual_seed(_seed(tc.seed, 1))
    model = build_model(config, s.vocab_size, s.max_len).to(ctx.device)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(_seed(tc.seed, 2))  # the data generator: same stream on every rank
    step, elapsed = 0, 0.0
    ckpt = checkpoint_path(run_dir, config.run_id)
    if kind == "resume":
        model.load_state_dict(payload["model"])
        opt.load_state_dict(payload["optimizer"])
        gen.set_state(payload["rng"]["data"])
        torch.set_rng_state(payload["rng"]["torch"])
        step, elapsed = int(payload["step"]), float(payload["elapsed"])
        _log(ctx, f"resuming {config.run_id} from {ckpt} at step {step}")
    ddp = _wrap(model, ctx)

    def snapshot() -> dict[str, Any]:
        return checkpoint_state(config, step, model, opt, gen, elapsed + (time.perf_counter() - start))

    start = time.perf_counter()
    ddp.train()
    while step < tc.steps:
        for group in opt.param_groups:
            group["lr"] = _lr(step, tc)
        inputs, targets, mask, positions = _batch(s, gen)  # the global batch [B, s], as one process draws it
        count = float(targets.numel()) if mask is None else float(mask.sum())  # tokens scored in the global batch
        inputs, targets = inputs[rows].to(ctx.device), targets[rows].to(ctx.device)  # [B/N, s]
        mask = None if mask is None else mask[rows].to(ctx.device)
        positions = (positions[rows] if positions.dim() == 2 else positions).to(ctx.device)  # [B/N, s] | [s]
        logits = ddp(inputs, positions)  # [B/N, s, vocab]
        tok = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                          reduction="none")  # fmt: skip
        part = (tok.sum() if mask is None else (tok * mask.reshape(-1)).sum()) / count  # this slice's share
        global_loss = part.detach().clone()
        try:
            dist.all_reduce(global_loss)  # sum of the shares = the single-process loss
            opt.zero_grad(set_to_none=True)
            (part * ctx.world_size).backward()  # DDP averages over ranks -> d(global loss)
        except RuntimeError as err:
            raise _lost(ctx, f"step {step + 1}", err) from None
        if not torch.isfinite(global_loss):
            raise FloatingPointError(
                f"run {config.run_id}: loss is {float(global_loss)} at step {step} (try a lower lr)"
            )
        nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        step += 1
        if ctx.is_main and (step % tc.checkpoint_every == 0 or step == tc.steps):
            save_checkpoint(ckpt, snapshot())
        if on_step is not None:
            on_step(step, tc.steps, float(global_loss))

    metrics = evaluate_model(model.cpu().eval(), s)  # every rank: identical models, no collective
    record = result_record(config, metrics, elapsed + time.perf_counter() - start)
    if ctx.is_main:
        append_result(run_dir, record)
    return record, False


# -- studies sharded across ranks ------------------------------------------------------------------


def shard(n: int, rank: int, world_size: int) -> list[int]:
    """Plan indices of ``rank``: ``rank, rank + world_size, ...`` (round robin)."""
    return list(range(rank, n, world_size))


def run_study_sharded(
    configs: list[RunConfig],
    run_dir: str | Path,
    ctx: DistContext,
    *,
    on_run_start: Callable[[int, RunConfig], None] | None = None,
    on_run_end: Callable[[int, dict[str, Any], bool], None] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> list[dict[str, Any]]:
    """Train this rank's share of ``configs`` (plain single-process runs); after every
    rank is done, rank 0 orders ``results.jsonl`` by plan. Returns, on rank 0, every
    record of the plan in plan order; on the other ranks, their own records."""
    from posenc.experiments.train import train_run

    run_dir = Path(run_dir)
    ids = [c.run_id for c in configs]
    _same_everywhere(ctx, json.dumps(ids), "the study plan")
    cache: dict = {}
    mine = []
    for i in shard(len(configs), ctx.rank, ctx.world_size):
        if on_run_start is not None:
            on_run_start(i, configs[i])
        rec, skipped = train_run(configs[i], run_dir, on_step=on_step, corpus_cache=cache)
        mine.append(rec)
        if on_run_end is not None:
            on_run_end(i, rec, skipped)
    try:  # names the ranks that never arrive (gloo)
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=study_timeout()), wait_all_ranks=True)
    except RuntimeError as err:
        raise _lost(ctx, "waiting for the other ranks' runs", err) from None
    if not ctx.is_main:
        return mine
    order_results(run_dir, ids)
    by_id = {r["run_id"]: r for r in read_results(run_dir)}
    missing = [rid for rid in ids if rid not in by_id]
    if missing:
        raise DistributedError(f"runs {missing} are not in {str(run_dir / RESULTS_FILE)!r} after every rank finished; "
                               "is the run folder on a filesystem every rank shares?")  # fmt: skip
    return [by_id[rid] for rid in ids]
