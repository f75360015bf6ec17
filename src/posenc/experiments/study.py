"""Studies: encodings x tasks x seeds, run one after another into one run folder.

``plan_phases`` turns a preset plus overrides into a ``StudyPlan``; ``run_study``
trains whatever is not finished yet (finished runs are skipped, an interrupted one
resumes from its checkpoint). ``posenc.pipeline.study.write_study_outputs`` turns
``results.jsonl`` into markdown tables, plots and the HTML report.

A preset with ``lr_sweep`` (``full``) runs in two phases. Phase 1, the learning-rate
sweep: the first seed of the plan (seed 0) of every (task, encoding) at every rate of
``LR_GRID``. Phase 2, once phase 1 has finished: the other seeds at the rate that
``summary.choose_lr`` picks from phase 1 on the in-distribution validation score
(``record["validation"]``: fresh examples of lengths 1..L, or held-out text at L; never
the test lengths), ties to the preset's rate, then the smaller one. A re-run reads the
finished sweep from ``results.jsonl``, chooses the same rates and skips what is done.
Without a sweep there is one phase: every run at the preset's rate.

An encoding may be given as ``NAME+randpos`` to train it with randomized positions
(Ruoss et al. 2023).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from posenc.data.synthetic import SYNTHETIC_TASKS, SyntheticTask
from posenc.experiments.config import QUICK_ENCODINGS, RANDPOS, TASKS, RunConfig, config_from_dict
from posenc.experiments.summary import PRESET_LR, choose_lr
from posenc.experiments.train import StepCallback, train_run
from posenc.functional.checks import did_you_mean
from posenc.registry import available, create_for_model

#: The learning rates of a sweep (``Preset.lr_sweep``), the presets' own in the middle.
LR_GRID: tuple[float, ...] = (1e-3, PRESET_LR, 1e-2)

# Per-task settings of each preset (model, training length, steps...). See docs/results.md
# for why these values: the quick preset must fit 15 minutes on 2 CPU cores and still
# learn copy in distribution (exact match >= 0.95 for sinusoidal, rope, alibi, t5; timed
# with 64 test examples per length, before eval_samples became 256).
_QUICK_SYNTHETIC = {
    "task": {"train_length": 8, "num_symbols": 32, "eval_samples": 256},
    "model": {"dim": 64, "num_layers": 2, "num_heads": 4},
    "train": {"steps": 4000, "batch_size": 64, "lr": PRESET_LR, "warmup": 100},
}
_QUICK_LM = {
    "task": {"train_length": 64},
    "model": {"dim": 64, "num_layers": 2, "num_heads": 4},
    "train": {"steps": 1000, "batch_size": 32, "lr": PRESET_LR, "warmup": 100},
}
# The full preset trains each run exactly like the quick one (so the quick study is its
# seed-0 slice at the preset's rate) and is longer in breadth: every task, every encoding,
# 3 seeds, and the learning-rate sweep on seed 0 (3 rates), so 5 runs per (task, encoding)
# instead of 3. A synthetic run took ~105 s and a language-modelling run ~50 s on one core
# (measured with 64 test examples per length).
_FULL_SYNTHETIC = _QUICK_SYNTHETIC
_FULL_LM = _QUICK_LM
# Task-specific settings on top of a preset's synthetic ones. count: with 32 symbols and
# n <= 8 the queried symbol almost always occurs once, so answering "1" scored 0.92 for
# every encoding (measured, docs/results.md); 4 symbols (counts drawn from 1..min(n, 8),
# answers of fixed width: posenc.data.synthetic). recall (multi-query associative recall
# with distinct keys): n pairs need 2n symbols, so 128 symbols give 64 keys and 64 values,
# enough for every test length up to 8L = 64. recall trains 10000 steps: at 4000 steps
# rope reached 0.50 and xpos 0.22 mean exact match over n = 1..8 (its loss drops suddenly,
# after the 4000-step schedule has decayed the rate); at 10000 steps rope, xpos and fire
# reached 1.00 and alibi 0.98 (seed 0, measured; t5, sinusoidal and kerple 0.14-0.21).
_TASK_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "count": {"task": {"num_symbols": 4}},
    "recall": {"task": {"num_symbols": 128}, "train": {"steps": 10000}},
}
#: Randomized positions (Ruoss et al. 2023) are studied for these encodings in the full preset.
FULL_RANDPOS = ("sinusoidal", "rope", "alibi", "t5")


# Seconds-long runs that exercise the whole pipeline (tests, trying a new encoding).
_SMOKE_SYNTHETIC = {
    "task": {"train_length": 3, "num_symbols": 4, "eval_samples": 8},
    "model": {"dim": 16, "num_layers": 1, "num_heads": 2},
    "train": {"steps": 20, "batch_size": 8, "lr": 3e-3, "warmup": 5},
}
_SMOKE_LM = {
    "task": {"train_length": 8, "max_chars": 100_000, "eval_factors": [1, 2, 4], "eval_tokens": 8192},
    "model": {"dim": 16, "num_layers": 1, "num_heads": 2},
    "train": {"steps": 20, "batch_size": 8, "lr": 3e-3, "warmup": 5},
}


@dataclasses.dataclass(frozen=True)
class Preset:
    """A study's default encodings, tasks and seeds and its run settings; ``lr_sweep``:
    the first seed runs at every rate of ``LR_GRID`` and the others at the chosen one."""

    name: str
    encodings: tuple[str, ...]
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    synthetic: dict[str, Any]
    lm: dict[str, Any]
    lr_sweep: bool = False


def presets() -> dict[str, Preset]:
    """``quick`` (the default of ``posenc study``), ``full`` (with the learning-rate
    sweep) and ``smoke`` (seconds)."""
    every = tuple(available())
    return {
        "smoke": Preset("smoke", ("sinusoidal", "none"), ("copy",), (0,), _SMOKE_SYNTHETIC, _SMOKE_LM),
        "quick": Preset("quick", QUICK_ENCODINGS, ("copy", "shakespeare"), (0,), _QUICK_SYNTHETIC, _QUICK_LM),
        "full": Preset(
            "full",
            every + tuple(e + RANDPOS for e in FULL_RANDPOS if e in every),
            (*SYNTHETIC_TASKS, "shakespeare", "stdlib"),
            (0, 1, 2),
            _FULL_SYNTHETIC,
            _FULL_LM,
            lr_sweep=True,
        ),
    }


def with_lr(config: RunConfig, lr: float) -> RunConfig:
    """``config`` trained at learning rate ``lr``."""
    return dataclasses.replace(config, train=dataclasses.replace(config.train, lr=lr))


@dataclasses.dataclass(frozen=True)
class StudyPlan:
    """A study's runs in one or two phases.

    ``first``: the runs that can start now (with a sweep, phase 1: the sweep seed of every
    (task, encoding) at every rate of ``lr_grid``; without one, every run). ``later``
    (with a sweep only): the other seeds' runs as planned at the preset's rate
    ``preferred_lr``; ``second_phase`` gives them the rate chosen from phase 1.
    ``missing``: preset encodings left out (see ``plan_phases``)."""

    first: tuple[RunConfig, ...]
    later: tuple[RunConfig, ...] = ()
    lr_grid: tuple[float, ...] = ()
    preferred_lr: float = PRESET_LR
    missing: tuple[str, ...] = ()

    @property
    def outline(self) -> list[RunConfig]:
        """Every run in plan order, phase 2 at the preset's rate: tasks, encodings, seeds
        and steps are final, phase 2's learning rates are not (progress bars, counts)."""
        return [*self.first, *self.later]

    def second_phase(self, records: list[dict[str, Any]]) -> list[RunConfig]:
        """Phase 2's runs: ``later`` at the rate ``choose_lr`` picks from the records of
        phase 1 among ``records`` (a ``ValueError`` while one is missing). Empty
        without a sweep."""
        if not self.later:
            return []
        ids = {c.run_id for c in self.first}
        sweep = [r for r in records if r["run_id"] in ids]
        unfinished = sorted(ids - {r["run_id"] for r in sweep})
        if unfinished:
            raise ValueError(
                f"the learning-rate sweep (phase 1) has {len(unfinished)} unfinished run(s), e.g. "
                f"{unfinished[0]!r}: phase 2's rates are chosen from all of them (run the study to finish phase 1)"
            )
        chosen = choose_lr(sweep, self.preferred_lr)
        return [with_lr(c, chosen[(c.task.label, c.encoding_label)]) for c in self.later]

    def runs(self, records: list[dict[str, Any]]) -> list[RunConfig]:
        """Every run in plan order, phase 2 at its chosen rates (``second_phase``)."""
        return [*self.first, *self.second_phase(records)]

    def pending(self, records: list[dict[str, Any]]) -> int:
        """How many runs are still to train, given the finished ``records``: phase 2
        counts in full until phase 1 has finished (its run ids are not known before)."""
        done = {r["run_id"] for r in records}
        left = sum(c.run_id not in done for c in self.first)
        if left:
            return left + len(self.later)
        return sum(c.run_id not in done for c in self.second_phase(records))

    def describe(self, records: list[dict[str, Any]] = ()) -> list[str]:
        """The plan in sentences (``posenc study --dry-run``), with what ``records``
        (the run folder's finished runs) already hold."""
        done = {r["run_id"] for r in records}
        pairs = len({(c.task.label, c.encoding_label) for c in self.outline})
        if not self.later and not self.lr_grid:
            seeds = sorted({c.train.seed for c in self.first})
            return [
                f"one phase: {len(self.first)} runs ({pairs} task/encoding pairs x seeds {_ints(seeds)}) at the "
                f"preset's learning rates, {sum(c.run_id in done for c in self.first)} finished"
            ]
        sweep_seed = self.first[0].train.seed
        rates = ", ".join(f"{lr:g}" for lr in self.lr_grid)
        lines = [
            f"phase 1, learning-rate sweep: {len(self.first)} runs, seed {sweep_seed} of each of the {pairs} "
            f"task/encoding pairs at lr {rates}; {sum(c.run_id in done for c in self.first)} finished"
        ]
        if not self.later:
            return lines + ["phase 2: none (no other seeds)"]
        seeds = sorted({c.train.seed for c in self.later})
        head = (
            f"phase 2, after phase 1: {len(self.later)} runs, seeds {_ints(seeds)} of each pair at the lr of phase 1 "
            "with the best in-distribution validation score (exact match on fresh examples of lengths 1..L, "
            f"perplexity on held-out text at L; never the test lengths), ties to {self.preferred_lr:g} then the "
            "smaller lr"
        )
        if any(c.run_id not in done for c in self.first):
            return lines + [head + "; its learning rates are fixed when phase 1 has finished"]
        second = self.second_phase(list(records))
        counts: dict[float, int] = {}
        for lr in {(c.task.label, c.encoding_label): c.train.lr for c in second}.values():
            counts[lr] = counts.get(lr, 0) + 1
        chosen = ", ".join(f"{lr:g} for {n}" for lr, n in sorted(counts.items()))
        return lines + [head + f"; chosen: {chosen} pairs; {sum(c.run_id in done for c in second)} finished"]


def _ints(values: list[int]) -> str:
    return ", ".join(map(str, values))


def parse_encoding(label: str) -> tuple[str, bool]:
    """``"rope+randpos"`` -> ``("rope", True)``; the name must be registered."""
    if not isinstance(label, str) or not label:
        raise ValueError(f"encoding must be a non-empty name, got {label!r}")
    name, rand = (label[: -len(RANDPOS)], True) if label.endswith(RANDPOS) else (label, False)
    if name not in available():
        raise ValueError(
            f"unknown encoding {name!r}; available: {available()} (append {RANDPOS!r} for randomized positions)"
        )
    return name, rand


def plan_study(
    preset: str = "quick",
    *,
    encodings: list[str] | None = None,
    tasks: list[str] | None = None,
    seeds: list[int] | None = None,
    steps: int | None = None,
    text_path: str | None = None,
    threads: int | None = None,
    lr_sweep: bool | None = None,
    lr_grid: Sequence[float] | None = None,
) -> tuple[list[RunConfig], list[str]]:
    """``(runs, left out)`` of ``plan_phases`` with the same arguments, where ``runs``
    are the runs that can start now: every run without a sweep, phase 1 (the sweep)
    with one; ``run_study`` on ``plan_phases``' plan trains phase 2 too."""
    plan = plan_phases(
        preset,
        encodings=encodings,
        tasks=tasks,
        seeds=seeds,
        steps=steps,
        text_path=text_path,
        threads=threads,
        lr_sweep=lr_sweep,
        lr_grid=lr_grid,
    )
    return list(plan.first), list(plan.missing)


def _check_grid(lr_grid: Sequence[float]) -> tuple[float, ...]:
    grid = tuple(lr_grid)
    if not grid or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in grid):
        raise ValueError(f"lr_grid must be a non-empty list of learning rates, got {lr_grid!r}")
    if any(not (math.isfinite(v) and v > 0) for v in grid) or len(set(grid)) != len(grid):
        raise ValueError(f"lr_grid must hold distinct positive learning rates, got {lr_grid!r}")
    return tuple(float(v) for v in grid)


def normalized_length(task: str, num_symbols: int, train_length: int) -> int:
    """The ``length`` of the ``normalized`` encoding in a causal study: the longest
    training input, ``SyntheticTask(task, num_symbols).sequence_length(L) - 1`` tokens
    for a synthetic task (the model reads every token but the last), ``L`` for a corpus
    (training windows of ``L`` tokens)."""
    if task in SYNTHETIC_TASKS:
        return SyntheticTask(task, num_symbols).sequence_length(train_length) - 1
    return train_length


def plan_phases(
    preset: str = "quick",
    *,
    encodings: list[str] | None = None,
    tasks: list[str] | None = None,
    seeds: list[int] | None = None,
    steps: int | None = None,
    text_path: str | None = None,
    threads: int | None = None,
    lr_sweep: bool | None = None,
    lr_grid: Sequence[float] | None = None,
) -> StudyPlan:
    """The runs of a study as a ``StudyPlan``. ``lr_sweep`` (default: the preset's):
    the first seed of ``seeds`` runs at every rate of ``lr_grid`` (default ``LR_GRID``),
    the other seeds later at the chosen rate. ``missing``: the preset encodings left out
    (only without ``encodings``): those not registered in this installation, and those
    that cannot be built at the preset's model sizes (with the reason). Encodings named
    in ``encodings`` are never left out: a bad one is an error.

    ``normalized`` gets ``encoding_params = {"length": normalized_length(...)}``, the
    longest training input, so that in a causal model a position's vector does not
    depend on how many tokens follow it. With randomized positions it gets none (its
    training positions go past that length), so a causal study cannot build it: named,
    an error; from a preset, left out."""
    all_presets = presets()
    if preset not in all_presets:
        raise ValueError(f"unknown preset {preset!r}; available: {sorted(all_presets)}")
    p = all_presets[preset]
    sweep = p.lr_sweep if lr_sweep is None else lr_sweep
    if not isinstance(sweep, bool):
        raise TypeError(f"lr_sweep must be true, false or None (the preset's), got {lr_sweep!r}")
    if lr_grid is not None and not sweep:
        raise ValueError(f"lr_grid is given but the {preset!r} study has no sweep: pass lr_sweep=True (--lr-sweep)")
    grid = _check_grid(LR_GRID if lr_grid is None else lr_grid) if sweep else ()
    missing: list[str] = []
    if encodings is None:
        chosen = []
        for label in p.encodings:
            (chosen if label.removesuffix(RANDPOS) in available() else missing).append(label)
    else:
        chosen = list(encodings)
    if not chosen:
        raise ValueError("no encodings to study")
    parsed = [parse_encoding(e) for e in chosen]
    task_names = list(tasks) if tasks is not None else list(p.tasks)
    if not task_names:
        raise ValueError("no tasks to study")
    for t in task_names:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; available: {list(TASKS)}.{did_you_mean(t, list(TASKS))}")
    seed_list = list(seeds) if seeds is not None else list(p.seeds)
    if not seed_list:
        raise ValueError("no seeds to study")
    first: list[RunConfig] = []
    later: list[RunConfig] = []
    unbuildable: dict[str, str] = {}
    for task in task_names:
        base = p.synthetic if task in SYNTHETIC_TASKS else p.lm
        for name, rand in parsed:
            for seed in seed_list:
                cfg = _run_config(base, task, name, rand, seed, steps=steps, text_path=text_path, threads=threads)
                err = _build_error(cfg)
                if err is not None:
                    if encodings is not None:  # asked for by name: an error, not a silent skip
                        raise ValueError(f"encoding {name!r} cannot be built for task {task!r}: {err}")
                    unbuildable.setdefault(cfg.encoding_label, err)
                    continue
                if not sweep:
                    first.append(cfg)
                elif seed == seed_list[0]:
                    first += [with_lr(cfg, lr) for lr in grid]
                else:
                    later.append(cfg)
    missing += [f"{label} ({err})" for label, err in unbuildable.items()]
    return StudyPlan(tuple(first), tuple(later), grid, float(base["train"]["lr"]), tuple(missing))


def _run_config(
    base: dict[str, Any],
    task: str,
    name: str,
    rand: bool,
    seed: int,
    *,
    steps: int | None,
    text_path: str | None,
    threads: int | None,
) -> RunConfig:
    """One run of a preset: its ``base`` settings, the task's overrides, the encoding
    (``normalized`` with a fixed length, see ``plan_phases``) and the seed."""
    d = {k: dict(v) for k, v in base.items()}
    for section, values in _TASK_OVERRIDES.get(task, {}).items():
        d[section].update(values)
    d["task"]["name"] = task
    if task == "text":
        d["task"]["text_path"] = text_path
    d["model"]["encoding"] = name
    if name == "normalized" and not rand:
        length = normalized_length(task, d["task"].get("num_symbols", 16), d["task"]["train_length"])
        d["model"]["encoding_params"] = {**d["model"].get("encoding_params", {}), "length": length}
    d["train"].update(seed=seed, randomized_positions=rand)
    if steps is not None:
        d["train"]["steps"] = steps
    if threads is not None:
        d["train"]["threads"] = threads
    return config_from_dict(d)


def _build_error(cfg: RunConfig) -> str | None:
    """Why the encoding of ``cfg`` cannot be built at the run's model sizes, or ``None``."""
    m = cfg.model
    try:
        create_for_model(
            m.encoding,
            dict(m.encoding_params),
            dim=m.dim,
            num_heads=m.num_heads,
            head_dim=m.dim // m.num_heads,
            max_len=None,
            causal=True,
        )
    except (ValueError, TypeError) as err:
        return str(err)
    return None


def as_plan(configs: StudyPlan | Sequence[RunConfig]) -> StudyPlan:
    """``configs`` as a ``StudyPlan``: a plan as it is, a list of runs as one phase."""
    if isinstance(configs, StudyPlan):
        return configs
    configs = list(configs)
    for c in configs:
        if not isinstance(c, RunConfig):
            raise TypeError(f"configs must be a StudyPlan or RunConfig objects, got {type(c).__name__}")
    return StudyPlan(tuple(configs))


def run_study(
    configs: StudyPlan | Sequence[RunConfig],
    run_dir: str | Path,
    *,
    on_run_start: Callable[[int, RunConfig], None] | None = None,
    on_run_end: Callable[[int, dict[str, Any], bool], None] | None = None,
    on_step: StepCallback | None = None,
) -> list[dict[str, Any]]:
    """Train every run of ``configs`` (a ``StudyPlan``: phase 1, then phase 2 at the
    chosen rates; or a list of runs) not yet in ``<run_dir>/results.jsonl``; return all
    their records in plan order. The hooks get plan indices: phase 2's run ``j`` is
    ``len(plan.first) + j``, as in ``plan.outline``."""
    plan = as_plan(configs)
    run_dir = Path(run_dir)
    cache: dict = {}
    records: list[dict[str, Any]] = []

    def train(phase: list[RunConfig], offset: int) -> None:
        for j, cfg in enumerate(phase):
            if on_run_start is not None:
                on_run_start(offset + j, cfg)
            rec, skipped = train_run(cfg, run_dir, on_step=on_step, corpus_cache=cache)
            records.append(rec)
            if on_run_end is not None:
                on_run_end(offset + j, rec, skipped)

    train(list(plan.first), 0)
    train(plan.second_phase(records), len(plan.first))
    return records
