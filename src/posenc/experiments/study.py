"""Studies: encodings x tasks x seeds, run one after another into one run folder.

``plan_study`` turns a preset plus overrides into a list of ``RunConfig``;
``run_study`` trains whatever is not finished yet (finished runs are skipped, an
interrupted one resumes from its checkpoint). ``posenc.pipeline.study.write_study_outputs``
turns ``results.jsonl`` into markdown tables, plots and the HTML report.

An encoding may be given as ``NAME+randpos`` to train it with randomized positions
(Ruoss et al. 2023).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posenc.data.synthetic import SYNTHETIC_TASKS
from posenc.experiments.config import QUICK_ENCODINGS, RANDPOS, TASKS, RunConfig, config_from_dict
from posenc.experiments.train import StepCallback, train_run
from posenc.functional.checks import did_you_mean
from posenc.registry import available, create_for_model

# Per-task settings of each preset (model, training length, steps...). See docs/results.md
# for why these values: the quick preset must fit 15 minutes on 2 CPU cores and still
# learn copy in distribution (exact match >= 0.95 for sinusoidal, rope, alibi, t5).
_QUICK_SYNTHETIC = {
    "task": {"train_length": 8, "num_symbols": 32, "eval_samples": 64},
    "model": {"dim": 64, "num_layers": 2, "num_heads": 4},
    "train": {"steps": 4000, "batch_size": 64, "lr": 3e-3, "warmup": 100},
}
_QUICK_LM = {
    "task": {"train_length": 64},
    "model": {"dim": 64, "num_layers": 2, "num_heads": 4},
    "train": {"steps": 1000, "batch_size": 32, "lr": 3e-3, "warmup": 100},
}
# The full preset trains each run exactly like the quick one (so the quick study is its
# seed-0 slice) and is longer in breadth: every task, every encoding, 3 seeds. A synthetic
# run takes ~105 s and a language-modelling run ~50 s on one core (measured), so the 504
# runs already take ~13 core-hours (~6.5 hours on 2 cores); longer runs would not fit.
_FULL_SYNTHETIC = _QUICK_SYNTHETIC
_FULL_LM = _QUICK_LM
# Task-specific settings on top of a preset's synthetic ones. count: with 32 symbols and
# n <= 8 the queried symbol almost always occurs once, so answering "1" scored 0.92 for
# every encoding (measured, docs/results.md); 4 symbols spread the counts over 1..n.
_TASK_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {"count": {"task": {"num_symbols": 4}}}
#: Randomized positions (Ruoss et al. 2023) are studied for these encodings in the full preset.
FULL_RANDPOS = ("sinusoidal", "rope", "alibi", "t5")


# Seconds-long runs that exercise the whole pipeline (tests, trying a new encoding).
_SMOKE_SYNTHETIC = {
    "task": {"train_length": 3, "num_symbols": 4, "eval_samples": 8},
    "model": {"dim": 16, "num_layers": 1, "num_heads": 2},
    "train": {"steps": 20, "batch_size": 8, "lr": 3e-3, "warmup": 5},
}
_SMOKE_LM = {
    "task": {"train_length": 8, "max_chars": 100_000, "eval_factors": [1, 2, 4]},
    "model": {"dim": 16, "num_layers": 1, "num_heads": 2},
    "train": {"steps": 20, "batch_size": 8, "lr": 3e-3, "warmup": 5},
}


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    encodings: tuple[str, ...]
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    synthetic: dict[str, Any]
    lm: dict[str, Any]


def presets() -> dict[str, Preset]:
    """``quick`` (the default of ``posenc study``), ``full`` and ``smoke`` (seconds)."""
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
        ),
    }


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
) -> tuple[list[RunConfig], list[str]]:
    """The runs of a study, and the preset encodings left out (only without
    ``encodings``): those not registered in this installation, and those that cannot be
    built at the preset's model sizes (with the reason). Encodings named in
    ``encodings`` are never left out: a bad one is an error."""
    all_presets = presets()
    if preset not in all_presets:
        raise ValueError(f"unknown preset {preset!r}; available: {sorted(all_presets)}")
    p = all_presets[preset]
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
    configs = []
    unbuildable: dict[str, str] = {}
    for task in task_names:
        base = p.synthetic if task in SYNTHETIC_TASKS else p.lm
        for name, rand in parsed:
            for seed in seed_list:
                d = {k: dict(v) for k, v in base.items()}
                for section, values in _TASK_OVERRIDES.get(task, {}).items():
                    d[section].update(values)
                d["task"]["name"] = task
                if task == "text":
                    d["task"]["text_path"] = text_path
                d["model"]["encoding"] = name
                d["train"].update(seed=seed, randomized_positions=rand)
                if steps is not None:
                    d["train"]["steps"] = steps
                if threads is not None:
                    d["train"]["threads"] = threads
                cfg = config_from_dict(d)
                err = _build_error(cfg)
                if err is not None:
                    if encodings is not None:  # asked for by name: an error, not a silent skip
                        raise ValueError(f"encoding {name!r} cannot be built for task {task!r}: {err}")
                    unbuildable.setdefault(cfg.encoding_label, err)
                    continue
                configs.append(cfg)
    missing += [f"{label} ({err})" for label, err in unbuildable.items()]
    return configs, missing


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


def run_study(
    configs: list[RunConfig],
    run_dir: str | Path,
    *,
    on_run_start: Callable[[int, RunConfig], None] | None = None,
    on_run_end: Callable[[int, dict[str, Any], bool], None] | None = None,
    on_step: StepCallback | None = None,
) -> list[dict[str, Any]]:
    """Train every run of ``configs`` not yet in ``<run_dir>/results.jsonl``; return
    all their records (in plan order)."""
    run_dir = Path(run_dir)
    cache: dict = {}
    records = []
    for i, cfg in enumerate(configs):
        if on_run_start is not None:
            on_run_start(i, cfg)
        rec, skipped = train_run(cfg, run_dir, on_step=on_step, corpus_cache=cache)
        records.append(rec)
        if on_run_end is not None:
            on_run_end(i, rec, skipped)
    return records
