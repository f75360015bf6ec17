"""A study's runs trained by several processes: worker processes on one machine
(``posenc study --jobs N``, ``run_study_parallel``) or the ranks of a ``torchrun`` job
(``run_study_sharded``).

Small models do not use two or more cores well: a copy run of the quick preset takes
~50-75 s with two torch threads and ~100 s with one, so two one-thread runs side by side
finish a study sooner than one two-thread run after another (docs/results.md, "Time").

``run_study_parallel`` starts ``jobs`` worker processes (spawned, not forked: torch's
thread pools do not survive a fork), each taking the next unfinished run from a shared
queue and calling ``train_run`` on it, which is what ``run_study`` does in one process,
so a record is the same whichever process trained it (same config, same thread count).
Results are appended under ``results.jsonl``'s lock, checkpoints are atomic, and a
re-run skips finished runs, so an interrupted parallel study resumes like a sequential
one. The workers report start / step / end / error on a queue; the caller's hooks get
the run's index in the plan, so a progress display can show one bar per active run.
At the end ``results.jsonl`` is put back in plan order (runs are appended as they finish).
A ``StudyPlan`` with a learning-rate sweep (``posenc.experiments.study``) is trained in
its two phases: first every run of phase 1, then phase 2 at the rates chosen from
phase 1's records (a fresh pool of workers per phase; under torchrun every rank waits
for the others' sweep runs, reads them from ``results.jsonl`` and plans the same phase
2, which is checked equal on every rank).
Plugins reach the workers: a spawned worker reads ``POSENC_PLUGINS`` and the entry points
itself and is handed the parent's other plugins (``registry.plugin_specs()``: ``--plugin``,
``load_plugins``), which it loads before its first run. Under torchrun every rank runs
the same command line, so its ``--plugin`` options and ``POSENC_PLUGINS`` reach every rank.

Under torchrun, plan entry ``i`` (phase 2's entries numbered after phase 1's) is
trained by rank ``i % world_size`` as a plain
single-process ``train_run`` (which appends its line to ``results.jsonl`` under the file
lock); after a monitored barrier rank 0 puts ``results.jsonl`` in plan order, so the
file equals the single-process study's (apart from wall times).

A run that raises stops the study: the other workers are terminated (their checkpoints
stay; the same command resumes them) and the error is raised in the caller, with its
original type where it can be pickled. A worker that dies without a word (killed,
out of memory) is a ``StudyWorkerError`` naming the run.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import queue
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posenc.experiments.config import RunConfig, config_from_dict, default_threads
from posenc.experiments.distributed import DistContext, DistributedError, study_timeout
from posenc.experiments.results import RESULTS_FILE, order_results, read_results
from posenc.experiments.study import StudyPlan, as_plan
from posenc.experiments.train import StepCallback, train_run
from posenc.registry import load_plugins, plugin_specs

#: Seconds between two progress messages of one worker (the last step is always sent).
STEP_REPORT_S = 0.25


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_jobs(runs: int, cores: int | None = None) -> int:
    """Worker processes for ``runs`` runs: one per core, at most 8 (each holds its own
    torch, ~0.3 GB) and at most one per run."""
    cores = available_cores() if cores is None else cores
    return max(1, min(cores, 8, runs))


def plan_jobs(
    jobs: int | None, threads: int | None, pending: int, *, launched: bool = False, cores: int | None = None
) -> tuple[int, int | None, str | None]:
    """``(jobs, threads, note)`` for a study with ``pending`` runs to train: ``jobs`` None
    means ``default_jobs``; with more than one job and ``threads`` None each run gets
    ``max(1, min(2, cores // jobs))`` threads. Under torchrun (``launched``) the ranks are
    the processes, so ``jobs`` must be unset or 1. ``note`` warns when ``jobs x threads``
    exceeds the cores."""
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ValueError(f"--jobs must be an integer >= 1, got {jobs!r}")
    if launched:
        if jobs not in (None, 1):
            raise ValueError("--jobs cannot be combined with torchrun: the ranks already train runs side by side")
        return 1, threads, None
    cores = available_cores() if cores is None else cores
    jobs = default_jobs(pending, cores) if jobs is None else jobs
    if jobs > 1 and threads is None:
        threads = default_threads(cores // jobs)
    per = threads or default_threads(cores)
    note = None
    if jobs * per > cores:
        note = (
            f"{jobs} processes x {per} threads > {cores} cores: they will compete "
            f"(--jobs {max(1, cores // per)} or --threads {max(1, cores // jobs)} would not)"
        )
    return jobs, threads, note


class StudyWorkerError(RuntimeError):
    """A worker process died without reporting (killed, out of memory)."""


def _worker(tasks, messages, configs: list[dict[str, Any]], run_dir: str, parent: int, plugins: list[str] = ()) -> None:
    """Loop of one worker process: load the parent's ``plugins`` (``--plugin`` files and
    modules are not in the environment), train the runs whose plan indices arrive on
    ``tasks`` (``None`` ends the loop) and report on ``messages``. If the parent process ``parent``
    dies (SIGKILL, or a SIGTERM that skips its clean-up), the worker exits at its next step
    rather than train the rest of the study unseen; its run resumes from the checkpoint."""
    cache: dict = {}  # corpora, shared by this worker's runs
    try:
        load_plugins(list(plugins))
    except Exception as err:  # reported like a run's error: the parent stops the study
        messages.put(("error", -1, pickle.dumps(RuntimeError(f"{type(err).__name__}: {err}"))))
        return
    while os.getppid() == parent and (i := tasks.get()) is not None:
        last = [0.0]

        def on_step(step: int, steps: int, loss: float, i: int = i, last: list[float] = last) -> None:
            if os.getppid() != parent:
                os._exit(3)
            now = time.monotonic()
            if step == steps or now - last[0] >= STEP_REPORT_S:
                last[0] = now
                messages.put(("step", i, step, steps, loss))

        messages.put(("start", i, os.getpid()))
        try:
            record, skipped = train_run(config_from_dict(configs[i]), run_dir, on_step=on_step, corpus_cache=cache)
        except BaseException as err:  # reported to the parent, which stops the study
            try:
                payload = pickle.dumps(err)
            except Exception:
                payload = pickle.dumps(RuntimeError(f"{type(err).__name__}: {err}"))
            messages.put(("error", i, payload))
            return
        messages.put(("end", i, record, skipped))


def run_study_parallel(
    configs: StudyPlan | list[RunConfig],
    run_dir: str | Path,
    jobs: int,
    *,
    on_run_start: Callable[[int, RunConfig], None] | None = None,
    on_run_end: Callable[[int, dict[str, Any], bool], None] | None = None,
    on_step: Callable[[int, int, int, float], None] | None = None,
) -> list[dict[str, Any]]:
    """Train every run of ``configs`` (a ``StudyPlan``, phase 1 then phase 2, or a list
    of runs) not yet in ``<run_dir>/results.jsonl`` with ``jobs`` worker processes;
    return all their records in plan order.

    ``on_run_start(i, config)`` and ``on_run_end(i, record, skipped)`` are called in this
    process as runs start and finish (in any order within a phase; ``i`` is the index in
    ``plan.outline``); ``on_step(i, step, steps, loss)`` a few times a second per active
    run. Runs already finished are reported as skipped without starting a worker. Each
    config's ``train.threads`` is the torch threads of the worker that trains it: give
    ``jobs x threads <= cores``.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
    plan = as_plan(configs)
    run_dir = Path(run_dir)
    hooks = (on_run_start, on_run_end, on_step)
    before = [r["run_id"] for r in read_results(run_dir)]  # these lines never move
    first, trained = _run_phase(list(plan.first), 0, run_dir, jobs, hooks)
    second = plan.second_phase(first)
    later, trained_later = _run_phase(second, len(first), run_dir, jobs, hooks)
    if trained or trained_later:  # appended as runs finished: the new lines in plan order
        order_results(run_dir, [c.run_id for c in [*plan.first, *second]], kept=before)
    return first + later


def _run_phase(
    configs: list[RunConfig], offset: int, run_dir: Path, jobs: int, hooks
) -> tuple[list[dict[str, Any]], bool]:
    """``run_study_parallel`` on one phase whose runs are plan entries ``offset + j``:
    its records in order, and whether any run was trained."""
    on_run_start, on_run_end, on_step = hooks
    done = {r["run_id"]: r for r in read_results(run_dir)}
    records: list[dict[str, Any] | None] = [None] * len(configs)
    pending = []
    for j, cfg in enumerate(configs):
        if cfg.run_id in done:
            if on_run_start is not None:
                on_run_start(offset + j, cfg)
            records[j] = done[cfg.run_id]
            if on_run_end is not None:
                on_run_end(offset + j, done[cfg.run_id], True)
        else:
            pending.append(j)
    if pending:

        def shifted(hook):
            return None if hook is None else (lambda j, *rest: hook(offset + j, *rest))

        _train_pending(configs, pending, run_dir, min(jobs, len(pending)), records, *(shifted(h) for h in hooks))
    return records, bool(pending)  # type: ignore[return-value]


def _train_pending(configs, pending, run_dir, jobs, records, on_run_start, on_run_end, on_step) -> None:
    ctx = mp.get_context("spawn")
    tasks, messages = ctx.Queue(), ctx.Queue()
    for i in pending:
        tasks.put(i)
    for _ in range(jobs):
        tasks.put(None)
    dicts = [c.to_dict() for c in configs]
    workers = [
        ctx.Process(
            target=_worker,
            args=(tasks, messages, dicts, str(run_dir), os.getpid(), plugin_specs()),
            daemon=True,
            name=f"posenc-study-{k}",
        )
        for k in range(jobs)
    ]
    running: dict[int, int] = {}  # worker pid -> plan index of its current run
    left = set(pending)
    try:
        for w in workers:
            w.start()
        while left:
            try:
                msg = messages.get(timeout=1.0)
            except queue.Empty:
                _check_alive(workers, running, configs)
                continue
            kind, i = msg[0], msg[1]
            if kind == "start":
                running[msg[2]] = i
                if on_run_start is not None:
                    on_run_start(i, configs[i])
            elif kind == "step":
                if on_step is not None:
                    on_step(i, msg[2], msg[3], msg[4])
            elif kind == "end":
                records[i] = msg[2]
                left.discard(i)
                if on_run_end is not None:
                    on_run_end(i, msg[2], msg[3])
            else:  # "error"
                raise pickle.loads(msg[2])
        for w in workers:
            w.join()
    finally:
        for w in workers:
            if w.is_alive():
                w.terminate()  # SIGTERM: checkpoints are atomic, the same command resumes
        for w in workers:
            if w.pid is not None:
                w.join()
        tasks.close()
        messages.close()


def _check_alive(workers, running: dict[int, int], configs: list[RunConfig]) -> None:
    """Raise when a worker died without reporting (SIGKILL, out of memory, a crash at
    start), or when every worker is gone with runs left."""
    for w in workers:
        if not w.is_alive() and w.exitcode not in (0, None):
            during = f" during run {configs[running[w.pid]].run_id!r}" if w.pid in running else ""
            raise StudyWorkerError(
                f"study worker {w.pid} died (exit code {w.exitcode}){during}; "
                "run the same command again to resume (finished runs are kept)"
            )
    if not any(w.is_alive() for w in workers):
        raise StudyWorkerError("every study worker exited with runs left; run the same command again to resume")


# -- studies sharded across the ranks of a torchrun job --------------------------------------------


def shard(n: int, rank: int, world_size: int) -> list[int]:
    """Plan indices of ``rank``: ``rank, rank + world_size, ...`` (round robin)."""
    return list(range(rank, n, world_size))


def run_study_sharded(
    configs: StudyPlan | list[RunConfig],
    run_dir: str | Path,
    context: DistContext,
    *,
    on_run_start: Callable[[int, RunConfig], None] | None = None,
    on_run_end: Callable[[int, dict[str, Any], bool], None] | None = None,
    on_step: StepCallback | None = None,
) -> list[dict[str, Any]]:
    """Train this rank's share of ``configs`` (a ``StudyPlan``, phase 1 then phase 2, or
    a list of runs; plain single-process runs); after every rank is done, rank 0 orders
    ``results.jsonl`` by plan. Returns, on rank 0, every record of the plan in plan
    order; on the other ranks, their own records."""
    plan = as_plan(configs)
    run_dir = Path(run_dir)
    before = [r["run_id"] for r in read_results(run_dir)]  # read before the collective: no rank has trained yet
    context.check_same(json.dumps([c.run_id for c in plan.outline]), "the study plan")
    cache: dict = {}
    mine: list[dict[str, Any]] = []

    def train(phase: list[RunConfig], offset: int) -> None:
        for i in shard(offset + len(phase), context.rank, context.world_size):
            if i < offset:
                continue
            cfg = phase[i - offset]
            if on_run_start is not None:
                on_run_start(i, cfg)
            record, skipped = train_run(cfg, run_dir, on_step=on_step, corpus_cache=cache)
            mine.append(record)
            if on_run_end is not None:
                on_run_end(i, record, skipped)

    train(list(plan.first), 0)
    second: list[RunConfig] = []
    if plan.later:
        context.wait_for_all(study_timeout(), "waiting for the other ranks' sweep runs (phase 1)")
        try:
            second = plan.second_phase(read_results(run_dir))
        except ValueError as err:
            raise DistributedError(f"{err}; is the run folder on a filesystem every rank shares?") from None
        context.check_same(json.dumps([c.run_id for c in second]), "the study's phase 2 (the chosen learning rates)")
        train(second, len(plan.first))
    context.wait_for_all(study_timeout(), "waiting for the other ranks' runs")
    if not context.is_main:
        return mine
    ids = [c.run_id for c in [*plan.first, *second]]
    order_results(run_dir, ids, kept=before)
    by_id = {r["run_id"]: r for r in read_results(run_dir)}
    missing = [rid for rid in ids if rid not in by_id]
    if missing:
        raise DistributedError(
            f"runs {missing} are not in {str(run_dir / RESULTS_FILE)!r} after every rank finished; "
            "is the run folder on a filesystem every rank shares?"
        )
    return [by_id[rid] for rid in ids]
