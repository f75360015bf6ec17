"""Where a process stands in a ``torchrun`` job, and the collectives that training and
sharded studies use (docs/distributed.md).

A ``DistContext`` of world size 1 (``SINGLE_PROCESS``) is a plain process without a
process group: every collective returns at once. Under ``torchrun`` (``launched()``),
``init()`` joins the process group and returns this rank's context. The training loop
is ``train_run(config, run_dir, context=...)`` in experiments/train.py, one loop for
one process and for N (DistributedDataParallel over the global batch); a study sharded
over the ranks is ``run_study_sharded`` in experiments/parallel.py.

Timeouts: collectives fail after ``POSENC_DIST_TIMEOUT`` seconds (default 60); the
barrier that ends a study waits ``POSENC_DIST_STUDY_TIMEOUT`` seconds (default 86400)
for the slowest shard. A rank that dies is reported by ``torchrun``, which stops the
others; the survivors raise ``DistributedError`` and should leave with ``exit_now``
(the broken group cannot be destroyed safely).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import inspect
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from posenc.experiments.config import default_threads

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


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


@dataclasses.dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job. The defaults are one process without a
    process group (``SINGLE_PROCESS``), where every collective below returns at once."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: no process group
    device: torch.device = torch.device("cpu")

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

    def log(self, message: str) -> None:
        """A note on stderr from rank 0 of a job of several processes (silent in one process)."""
        if self.world_size > 1 and self.is_main:
            print(f"[posenc rank 0/{self.world_size}] {message}", file=sys.stderr, flush=True)

    def lost(self, what: str, err: BaseException) -> DistributedError:
        """The error of a collective that failed with ``err``."""
        return DistributedError(
            f"rank {self.rank}/{self.world_size}: {what} failed ({_first_line(err)}); another rank died or did not "
            f"answer within {collective_timeout():g} s ({ENV_TIMEOUT}). Run the same command again to resume from "
            "the last checkpoint."
        )

    @contextlib.contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Turns a ``RuntimeError`` of the block (gloo and nccl report a dead peer or a
        timeout so) into a ``DistributedError`` naming ``what``; in one process, nothing."""
        if self.world_size == 1:
            yield
            return
        try:
            yield
        except RuntimeError as err:
            raise self.lost(what, err) from None

    def broadcast(self, obj: Any, what: str) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj if self.is_main else None]
        try:
            dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        except (RuntimeError, ValueError) as err:
            raise self.lost(what, err) from None
        return box[0]

    def check_same(self, value: str, what: str) -> None:
        """Every rank must hold the same ``value`` (same config, same plan)."""
        if self.world_size == 1:
            return
        values: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(values, value)
        except (RuntimeError, ValueError) as err:
            raise self.lost(f"comparing {what}", err) from None
        if len(set(values)) != 1:
            raise DistributedError(f"the ranks disagree on {what}: {values}; launch every rank with the same arguments")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place (inside ``collective``)."""
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` itself in one process, else DDP without per-forward buffer syncs:
        buffers are position caches that every rank computes alike (synced once at
        construction)."""
        if self.world_size == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
        no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, **no_sync)

    def wait_for_all(self, timeout_s: float, what: str) -> None:
        """A barrier that names the ranks that never arrive (gloo's ``monitored_barrier``)."""
        if self.world_size == 1:
            return
        try:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
        except RuntimeError as err:
            raise self.lost(what, err) from None


SINGLE_PROCESS = DistContext()


def oversubscription(threads: int | None) -> str | None:
    """A warning when this machine's processes x torch threads exceed its cores, else None.
    ``threads`` is a run's ``train.threads`` (None: ``min(2, cores)``)."""
    cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or "1")
    per = threads or default_threads(cores)
    if local * per <= cores:
        return None
    return (
        f"{local} processes x {per} threads > {cores} cores on this machine: they will compete; "
        f"pass --threads {max(1, cores // local)} (or set train.threads)"
    )


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
            raise DistributedError(
                f"rank {rank}/{world}: could not form the {chosen} process group within {timeout.total_seconds():g} s "
                f"({_first_line(err)}); start every rank with the same MASTER_ADDR/MASTER_PORT (or rendezvous endpoint)"
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
