"""Context extension: how far each RoPE scaling rule stretches a model trained at length L.

A RoPE model is trained at length ``L`` with the study harness (``train_run``). Then,
for every rule (Hugging Face ``rope_parameters``, see ``posenc.rope_frequencies``):

* **zero-shot**: the model's encoding is swapped for the rule's (same weights, a new
  ``rope`` module built from the rule's parameters) and scored at ``L`` and at ``s * L``
  for every ``s`` in ``factors`` with the factor that covers the length
  (``covering_factor``: ``s`` for both presets' tasks; 1 at ``L``, where every rule
  equals plain RoPE);
* **fine-tuned**: the swapped model (factor ``f = finetune_factor``) is trained for
  ``finetune_steps`` more steps at length ``f * L`` with the harness (``train_run``
  with ``train.init_from`` = the base checkpoint; same steps, batch, lr for every rule),
  then scored at ``L`` and every ``s * L`` twice: with factor ``f`` at every length
  (stage ``fine-tuned``; past ``f * L`` that is factor ``f`` judged past its factor) and
  with the factor covering each length, at least ``f`` (stage ``fine-tuned-covering``,
  Peng et al.'s extrapolation setting; rules with a factor only).

Training-free baselines that need no RoPE (ALiBi, T5, when registered) are trained at
``L`` with the same harness settings and scored at the same lengths.

Rules (``C`` = the trained context in positions: ``L`` for a corpus, the longest
training sequence for a synthetic task; ``r`` = rotary dimension; ``theta`` = base):

=========  =====================================================================
none       plain RoPE, positions past ``C`` extrapolated (rope_type ``default``)
linear     position interpolation, Chen et al. 2023: ``inv_freq / s``
ntk        static NTK-aware (bloc97 2023): rope_type ``default`` with
           ``rope_theta = theta * s ** (r / (r - 2))``; equals Hugging Face
           ``dynamic`` with factor 1 evaluated at length ``s * C``
dynamic    dynamic NTK (emozilla 2023; Hugging Face ``dynamic``, factor ``s``,
           ``max_position_embeddings = C``): at length ``n > C`` the base becomes
           ``theta * (s n / C - s + 1) ** (r / (r - 2))``; lengths ``<= C`` unchanged
yarn       YaRN, Peng et al. 2023: ``factor = s``, ``original_max_position_embeddings
           = C``, ``beta_fast = 32``, ``beta_slow = 1`` (paper defaults), attention
           temperature: cos/sin times ``0.1 ln s + 1``
llama3     Llama 3.1 rule: ``factor = s``, ``low_freq_factor = 1``,
           ``high_freq_factor = 4``, ``original_max_position_embeddings = C``
=========  =====================================================================

Outputs (``posenc.pipeline.extension.write_extension_outputs``): ``<out>/extension.json``
(schema below, read by the HTML report and, committed as ``docs/data/extension.json``,
by docs/extension.md), ``<out>/extension.md`` (tables) and ``<out>/plots/extension_<task>.png``::

    {"format": 2, "kind": "posenc-extension", "command": str, "git_commit": str,
     "torch_version": str, "cpu_capability": str, "python_version": str, "threads": int,
     "rules": [...], "factors": [...], "baselines": [...], "baselines_missing": [...],
     "finetune": {"factor", "steps", "batch_size", "lr", "warmup"} | null,
     "base_runs": [{"task", "seed", "run_id", "checkpoint", "train_length", "context",
                    "wall_time_s"}],
     "runs": {run_id: {"role", "config", "git_commit", "torch_version", "train_step",
                       "cpu_capability", "wall_time_s"}},
     "records": [{"task", "seed", "rule", "stage", "train_length", "context",
                  "finetune_length", "run_id", "length_dependent",
                  "metrics": [{"length", "factor", "rope_parameters", <metric>...}]}]}

The top-level provenance (command, commit, torch, CPU capability, threads) is that of the
command, which sets its torch threads before any work (``threads``, default
``default_threads()``), also when every score is a saved one (records saved by an earlier
command of the same commit and request, ``<out>/records/``); ``runs`` holds that of each
trained model (``role``: ``base``, ``fine-tune`` or ``baseline``), and each record names
the run whose weights it scored.
``stage`` is ``zero-shot``, ``fine-tuned``, ``fine-tuned-covering`` or ``baseline``
(``posenc.experiments.extend_score``); ``<metric>`` are the harness's metrics
(``posenc.experiments.evaluate``: ``ppl`` and ``ppl_sliding`` for corpora, ``exact_match``
and ``token_accuracy`` for synthetic tasks, with their counts); ``factor`` and
``rope_parameters`` are the rule's at that length (``null`` for baselines);
``length_dependent`` is the scored encoding's (dynamic NTK: scored prefix by prefix).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import torch

from posenc.data.synthetic import SYNTHETIC_TASKS
from posenc.experiments.config import TASKS, RunConfig, config_from_dict, default_threads, replace
from posenc.experiments.extend_rules import (  # noqa: F401 (re-exported)
    RULES,
    Finetune,
    base_rope,
    check_factor,
    check_factors,
    check_rules,
    covering_factor,
    rule_config,
    rule_parameters,
    swap_rule,
    trained_context,
)
from posenc.experiments.extend_score import (  # noqa: F401 (re-exported)
    Progress,
    base_entry,
    baseline_record,
    check_lengths,
    extend_one,
    finetune_config,
    load_base,
    run_entry,
)
from posenc.experiments.extend_summary import FORMAT, STAGES, validate_extension  # noqa: F401
from posenc.experiments.results import atomic_write_bytes, git_commit
from posenc.experiments.train import StepCallback, checkpoint_path, load_checkpoint, train_run
from posenc.functional.checks import did_you_mean
from posenc.registry import available

BASELINES: tuple[str, ...] = ("alibi", "t5")
# -- presets --------------------------------------------------------------------------------
# Sized for 2 CPU cores: 2 tasks x 3 seeds, 6 rules, 2 baselines, 300 fine-tuning steps
# per rule. The test sets are the harness's (held-out corpus segments of at least 65536
# scored characters; 256 copy examples per length). A corpus base run's eval_factors must
# include every extension factor: its test set is the one the extension scores.
_QUICK_TASKS = {
    "shakespeare": {
        "task": {"train_length": 32, "eval_factors": [1, 2, 4, 8]},  # the harness's stride L/4
        "model": {"dim": 64, "num_layers": 2, "num_heads": 4},
        "train": {"steps": 600, "batch_size": 32, "lr": 3e-3, "warmup": 50},
    },
    "copy": {  # the study's quick copy setting, where RoPE learns copy (exact match 1.0 in range)
        "task": {"train_length": 8, "num_symbols": 32, "eval_samples": 256},
        "model": {"dim": 64, "num_layers": 2, "num_heads": 4},
        "train": {"steps": 4000, "batch_size": 64, "lr": 3e-3, "warmup": 100},
    },
}
_SMOKE_TASKS = {
    "shakespeare": {
        "task": {
            "train_length": 8,
            "max_chars": 100_000,
            "eval_factors": [1, 2, 4, 8],
            "eval_segments": 2,
            "eval_tokens": 256,
            "sliding_stride": 8,
        },
        "model": {"dim": 16, "num_layers": 1, "num_heads": 2},
        "train": {"steps": 10, "batch_size": 8, "lr": 3e-3, "warmup": 2},
    },
    "copy": {
        "task": {"train_length": 3, "num_symbols": 4, "eval_samples": 8},
        "model": {"dim": 16, "num_layers": 1, "num_heads": 2},
        "train": {"steps": 10, "batch_size": 8, "lr": 3e-3, "warmup": 2},
    },
}


PRESETS: dict[str, tuple[dict[str, dict], tuple[int, ...], Finetune]] = {
    "quick": (_QUICK_TASKS, (0, 1, 2), Finetune(steps=300)),
    "smoke": (_SMOKE_TASKS, (0,), Finetune(factor=2, steps=4, warmup=1)),
}


def finetune_settings(
    preset: str, *, factor: int | None = None, steps: int | None = None, lr: float | None = None
) -> Finetune | None:
    """The preset's fine-tuning budget with ``factor``/``steps``/``lr`` overridden;
    ``steps=0`` means no fine-tuning (``None``). Unknown presets, negative steps and a
    learning rate that is not positive are refused (``Finetune`` checks the values)."""
    if preset not in PRESETS:
        raise ValueError(
            f"unknown preset {preset!r}; available: {sorted(PRESETS)}{did_you_mean(preset, sorted(PRESETS))}"
        )
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f"--finetune-steps must be an int >= 0, got {steps!r}")
    if steps == 0:
        return None
    base = PRESETS[preset][2]
    return dataclasses.replace(
        base,
        factor=base.factor if factor is None else factor,
        steps=steps or base.steps,
        lr=base.lr if lr is None else lr,
    )


def plan_base(
    preset: str = "quick", *, tasks: list[str] | None = None, seeds: list[int] | None = None, threads: int | None = None
) -> list[RunConfig]:
    """The RoPE base runs of a preset: one per task and seed."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {sorted(PRESETS)}")
    per_task, default_seeds, _ = PRESETS[preset]
    task_names = list(tasks) if tasks is not None else list(per_task)
    if not task_names:
        raise ValueError("no tasks given")
    configs = []
    for task in task_names:
        if task not in TASKS or task == "text":
            names = [t for t in TASKS if t != "text"]
            raise ValueError(f"unknown task {task!r}; available: {names}.{did_you_mean(task, names)}")
        base = per_task.get(task) or per_task["copy" if task in SYNTHETIC_TASKS else "shakespeare"]
        for seed in seeds if seeds is not None else default_seeds:
            d = {k: dict(v) for k, v in base.items()}
            d["task"]["name"] = task
            d["model"]["encoding"] = "rope"
            d["train"]["seed"] = seed
            if threads is not None:
                d["train"]["threads"] = threads
            configs.append(config_from_dict(d))
    return configs


def _saved(out_dir: Path, name: str, key: str) -> Path:
    return out_dir / "records" / f"{name}__{hashlib.sha256(key.encode()).hexdigest()[:10]}.json"


def check_request(
    preset: str = "quick",
    *,
    rules: tuple[str, ...] = RULES,
    factors: tuple[int, ...] | None = None,
    baselines: tuple[str, ...] | None = None,
    checkpoints: list[str] | None = None,
    tasks: list[str] | None = None,
    seeds: list[int] | None = None,
) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...], list[str]]:
    """Validate a request before any work: ``(rules, factors, baselines present,
    baselines not registered)``; a ``ValueError`` names the first bad input."""
    rules = check_rules(rules)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {sorted(PRESETS)}")
    factors = check_factors(factors if factors is not None else (2, 4, 8))
    wanted = BASELINES if baselines is None else tuple(baselines)
    for b in wanted:
        if not isinstance(b, str) or b in RULES or b == "rope":
            raise ValueError(f"baseline {b!r} must be a non-RoPE encoding (e.g. {list(BASELINES)})")
    registered = available()
    if checkpoints:
        configs = [load_base(c)[0] for c in checkpoints]  # a missing, unfinished or non-RoPE checkpoint fails here
    else:
        configs = plan_base(preset, tasks=tasks, seeds=seeds)
    for cfg in configs:  # a corpus's test set must hold every extension length
        check_lengths(cfg, [f * cfg.task.train_length for f in (1, *factors)])
    return rules, factors, tuple(b for b in wanted if b in registered), [b for b in wanted if b not in registered]


def run_extension(
    preset: str = "quick",
    out_dir: str | Path = "runs/extend",
    *,
    tasks: list[str] | None = None,
    seeds: list[int] | None = None,
    checkpoints: list[str] | None = None,
    rules: tuple[str, ...] = RULES,
    factors: tuple[int, ...] | None = None,
    finetune: Finetune | None = None,
    baselines: tuple[str, ...] | None = None,
    base_dir: str | Path | None = None,
    threads: int | None = None,
    command: str = "",
    on_stage: Progress | None = None,
    on_step: StepCallback | None = None,
) -> dict[str, Any]:
    """Train (or reuse) the RoPE base runs, extend each, return the ``extension.json`` dict.

    ``checkpoints`` (finished RoPE runs) replace the preset's base runs; ``base_dir``
    (default ``<out>/base``) is where base runs are trained, so pointing it at a study
    folder reuses its finished runs when the configs are equal.
    """
    rules, factors, present, missing = check_request(
        preset, rules=rules, factors=factors, baselines=baselines, checkpoints=checkpoints, tasks=tasks, seeds=seeds
    )
    finetune = PRESETS[preset][2] if finetune is None else finetune
    torch.set_num_threads(threads or default_threads())  # the recorded `threads`, reused records or not
    out_dir = Path(out_dir)
    base_dir = Path(base_dir) if base_dir is not None else out_dir / "base"
    stage = on_stage or (lambda _msg: None)
    cache: dict = {}
    if checkpoints:
        ckpts = [Path(c) for c in checkpoints]
    else:
        ckpts = []
        for cfg in plan_base(preset, tasks=tasks, seeds=seeds, threads=threads):
            stage(f"base rope {cfg.task.label} seed {cfg.train.seed}")
            train_run(cfg, base_dir, on_step=on_step, corpus_cache=cache)
            ckpts.append(checkpoint_path(base_dir, cfg.run_id))
    base_runs, records, runs = [], [], {}
    commit = git_commit()
    for c in ckpts:
        state = load_checkpoint(c)
        cfg = config_from_dict(state["config"])
        base_runs.append(
            {
                "task": cfg.task.label,
                "seed": cfg.train.seed,
                "run_id": state["run_id"],
                "checkpoint": str(c),
                "train_length": cfg.task.train_length,
                "context": trained_context(cfg),
                "wall_time_s": round(float(state["elapsed"]), 1),
            }
        )
        run_id, entry = base_entry(c)
        runs[run_id] = entry
        # One base run's records are kept in <out>/records/, keyed by everything that
        # determines them (the source commit included: scores of other code are not
        # reused), so running the command again (or with more seeds) reuses them.
        # Baselines are kept apart, so adding one later reuses the rules' records.
        ft = None if finetune is None else dataclasses.asdict(finetune)
        key = json.dumps([FORMAT, commit, state["run_id"], list(rules), list(factors), ft])
        saved = _saved(out_dir, state["run_id"], key)
        if saved.is_file():
            new, new_runs = json.loads(saved.read_text(encoding="utf-8"))
        else:
            new, new_runs = extend_one(
                c,
                out_dir,
                rules=rules,
                factors=factors,
                finetune=finetune,
                cache=cache,
                on_stage=stage,
                on_step=on_step,
                threads=threads,
            )
            atomic_write_bytes(saved, json.dumps([new, new_runs]).encode())
        records += new
        runs.update(new_runs)
        for name in present:
            key = json.dumps([FORMAT, commit, state["run_id"], name, list(factors)])
            saved = _saved(out_dir, f"{state['run_id']}__{name}", key)
            if saved.is_file():
                rec, b_run = json.loads(saved.read_text(encoding="utf-8"))
            else:
                stage(f"baseline {name}")
                b_cfg = cfg if threads is None else replace(cfg, train={"threads": threads})
                rec, b_run = baseline_record(b_cfg, name, out_dir, factors=factors, cache=cache, on_step=on_step)
                atomic_write_bytes(saved, json.dumps([rec, b_run]).encode())
            records.append(rec)
            runs[rec["run_id"]] = b_run
    return {
        "format": FORMAT,
        "kind": "posenc-extension",
        "command": command,
        "git_commit": commit,
        "torch_version": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python_version": platform.python_version(),
        "threads": torch.get_num_threads(),
        "rules": list(rules),
        "factors": list(factors),
        "baselines": list(present),
        "baselines_missing": missing,
        "finetune": ft_settings(finetune),
        "base_runs": base_runs,
        "runs": runs,
        "records": records,
    }


def ft_settings(finetune: Finetune | None) -> dict[str, Any] | None:
    """The fine-tune budget as ``extension.json`` stores it (``None``: no fine-tune)."""
    return None if finetune is None else dataclasses.asdict(finetune)
