"""Context extension: how far each RoPE scaling rule stretches a model trained at length L.

A RoPE model is trained at length ``L`` with the study harness (``train_run``). Then,
for every rule (Hugging Face ``rope_parameters``, see ``posenc.rope_frequencies``):

* **zero-shot**: the model's encoding is swapped for the rule's (same weights, a new
  ``rope`` module built from the rule's parameters) with ``factor = s`` and scored at
  length ``s * L`` for every ``s`` in ``factors`` (and at ``L`` with factor 1, where
  every rule equals plain RoPE);
* **fine-tuned**: the swapped model (factor ``f = finetune_factor``) is trained for
  ``finetune_steps`` more steps at length ``f * L`` with the harness (``train_run``
  with ``train.init_from`` = the base checkpoint; same steps, batch, lr for every rule),
  then scored at ``L`` and every ``s * L`` with that one encoding.

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
(schema below, read by the HTML report), ``<out>/extension.md`` (tables) and
``<out>/plots/extension_<task>.png``::

    {"format": 1, "kind": "posenc-extension", "command": str, "git_commit": str,
     "torch_version": str, "rules": [...], "factors": [...], "baselines": [...],
     "baselines_missing": [...], "finetune": {"factor", "steps", "batch_size", "lr", "warmup"},
     "base_runs": [{"task", "seed", "run_id", "checkpoint", "train_length", "context",
                    "wall_time_s"}],
     "records": [{"task", "seed", "rule", "stage", "train_length", "context",
                  "finetune_length", "metrics": [{"length", "factor", <metric>...}]}]}

``stage`` is ``zero-shot``, ``fine-tuned`` or ``baseline``; ``<metric>`` is ``ppl`` and
``ppl_sliding`` (corpora) or ``exact_match`` and ``token_accuracy`` (synthetic tasks);
``factor`` is the rule's factor at that length (``null`` for baselines).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from posenc.data.synthetic import SYNTHETIC_TASKS, SyntheticTask
from posenc.experiments.config import TASKS, RunConfig, config_from_dict, replace
from posenc.experiments.evaluate import lm_metrics, synthetic_metrics
from posenc.experiments.extend_rules import (  # noqa: F401 (re-exported)
    RULES,
    base_rope,
    check_factor,
    check_factors,
    check_rules,
    rule_config,
    rule_parameters,
    swap_rule,
    trained_context,
)
from posenc.experiments.extend_summary import FORMAT, STAGES, validate_extension  # noqa: F401
from posenc.experiments.results import atomic_write_bytes, git_commit
from posenc.experiments.train import (
    StepCallback,
    build_model,
    checkpoint_path,
    load_checkpoint,
    setup,
    train_run,
)
from posenc.functional.checks import did_you_mean
from posenc.model import Transformer
from posenc.registry import available

BASELINES: tuple[str, ...] = ("alibi", "t5")
# -- presets --------------------------------------------------------------------------------
# Sized for 2 CPU cores: 2 tasks x 3 seeds, 6 rules, 2 baselines, 300 fine-tuning steps
# per rule. See docs/extension.md for the measured time.
_QUICK_TASKS = {
    "shakespeare": {
        "task": {"train_length": 32, "eval_factors": [1, 2, 4, 8], "eval_tokens": 2048, "sliding_stride": 32},
        "model": {"dim": 64, "num_layers": 2, "num_heads": 4},
        "train": {"steps": 600, "batch_size": 32, "lr": 3e-3, "warmup": 50},
    },
    "copy": {  # the study's quick copy setting, where RoPE learns copy (exact match 1.0 in range)
        "task": {"train_length": 8, "num_symbols": 32, "eval_samples": 64},
        "model": {"dim": 64, "num_layers": 2, "num_heads": 4},
        "train": {"steps": 4000, "batch_size": 64, "lr": 3e-3, "warmup": 100},
    },
}
_SMOKE_TASKS = {
    "shakespeare": {
        "task": {
            "train_length": 8,
            "max_chars": 100_000,
            "eval_factors": [1, 2, 4],
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


@dataclasses.dataclass(frozen=True)
class Finetune:
    """The fine-tuning budget, the same for every rule: ``steps`` at length
    ``factor * L`` with ``batch_size`` (default: the base batch divided by ``factor``,
    so a step sees as many tokens as a base step), ``lr`` and ``warmup``."""

    factor: int = 4
    steps: int = 200
    batch_size: int | None = None
    lr: float = 1e-3
    warmup: int = 15

    def __post_init__(self) -> None:
        check_factor("finetune_factor", self.factor)
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"finetune {name} must be an int >= 1, got {v!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"finetune lr must be > 0, got {self.lr!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"finetune warmup must be an int >= 0, got {self.warmup!r}")


PRESETS: dict[str, tuple[dict[str, dict], tuple[int, ...], Finetune]] = {
    "quick": (_QUICK_TASKS, (0, 1, 2), Finetune(steps=300)),
    "smoke": (_SMOKE_TASKS, (0,), Finetune(factor=2, steps=4, warmup=1)),
}


def finetune_settings(preset: str, *, factor: int | None = None, steps: int | None = None) -> Finetune | None:
    """The preset's fine-tuning budget with ``factor``/``steps`` overridden; ``steps=0``
    means no fine-tuning (``None``). Unknown presets and negative steps are refused."""
    if preset not in PRESETS:
        raise ValueError(
            f"unknown preset {preset!r}; available: {sorted(PRESETS)}{did_you_mean(preset, sorted(PRESETS))}"
        )
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f"--finetune-steps must be an int >= 0, got {steps!r}")
    if steps == 0:
        return None
    base = PRESETS[preset][2]
    return dataclasses.replace(base, factor=base.factor if factor is None else factor, steps=steps or base.steps)


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


# -- evaluation --------------------------------------------------------------------------------


def _evaluate(
    model: torch.nn.Module, config: RunConfig, lengths: list[int], cache: dict, max_factor: int
) -> list[dict[str, Any]]:
    t = config.task
    if t.is_lm:
        factors = sorted({1, max_factor, *(n // t.train_length for n in lengths)})
        s = setup(dataclasses.replace(config, task=dataclasses.replace(t, eval_factors=tuple(factors))), cache)
        return lm_metrics(model, s.corpus, lengths, eval_tokens=s.eval_tokens, stride=s.stride)
    task = SyntheticTask(t.name, t.num_symbols)
    return synthetic_metrics(model, task, lengths, samples=t.eval_samples, seed=config.train.seed)


def _load_weights(model: Transformer, checkpoint: Path) -> Transformer:
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    return model.eval()


def _tag(metrics: list[dict[str, Any]], factor: int | None) -> list[dict[str, Any]]:
    return [{"length": m["length"], "factor": factor, **{k: v for k, v in m.items() if k != "length"}} for m in metrics]


def load_base(checkpoint: str | Path) -> tuple[RunConfig, Transformer]:
    """The config and model of a finished run checkpoint of a plain RoPE model."""
    state = load_checkpoint(Path(checkpoint))
    config = config_from_dict(state["config"])
    if state["step"] < config.train.steps:
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} is of an unfinished run (step {state['step']} of {config.train.steps})"
        )
    base_rope(config)
    s = setup(config)
    model = build_model(config, s.vocab_size, s.max_len)
    model.load_state_dict(state["model"])
    return config, model.eval()


Progress = Callable[[str], None]


def extend_one(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    rules: tuple[str, ...] = RULES,
    factors: tuple[int, ...] = (2, 4, 8),
    finetune: Finetune | None = Finetune(),
    baselines: tuple[str, ...] = (),
    cache: dict | None = None,
    on_stage: Progress | None = None,
    on_step: StepCallback | None = None,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Every record of one base checkpoint: zero-shot and fine-tuned per rule, baselines.
    ``threads``: torch threads of evaluation and fine-tuning (default: the harness's)."""
    rules, factors = check_rules(rules), check_factors(factors)
    if threads is not None:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    cache = {} if cache is None else cache
    config, model = load_base(checkpoint)
    L, C = config.task.train_length, trained_context(config)
    lengths = sorted({L, *(f * L for f in factors)})
    top = max(factors)
    common = {"task": config.task.label, "seed": config.train.seed, "train_length": L, "context": C}
    stage = on_stage or (lambda _msg: None)
    records = []
    for rule in rules:
        stage(f"zero-shot {rule}")
        metrics = []
        for n in lengths:
            _, swapped = swap_rule(model, config, rule, n // L)
            metrics += _tag(_evaluate(swapped, config, [n], cache, top), n // L)
        records.append({**common, "rule": rule, "stage": "zero-shot", "finetune_length": None, "metrics": metrics})
    if finetune is not None:
        f = finetune.factor
        for rule in rules:
            stage(f"fine-tune {rule} at {f * L}")
            ft_cfg = finetune_config(config, rule, finetune, checkpoint)
            if threads is not None:
                ft_cfg = replace(ft_cfg, train={"threads": threads})
            train_run(ft_cfg, out_dir / "finetune", on_step=on_step, corpus_cache=cache)
            tuned = swap_rule(model, config, rule, f)[1]
            _load_weights(tuned, checkpoint_path(out_dir / "finetune", ft_cfg.run_id))
            metrics = _tag(_evaluate(tuned, config, lengths, cache, top), f)
            records.append(
                {**common, "rule": rule, "stage": "fine-tuned", "finetune_length": f * L, "metrics": metrics}
            )
    for name in baselines:
        stage(f"baseline {name}")
        records.append(baseline_record(config, name, out_dir, factors=factors, cache=cache, on_step=on_step))
    return records


def baseline_record(
    config: RunConfig,
    encoding: str,
    out_dir: str | Path,
    *,
    factors: tuple[int, ...],
    cache: dict | None = None,
    on_step: StepCallback | None = None,
) -> dict[str, Any]:
    """Train ``encoding`` with the base run's config (harness, ``<out>/base``) and score
    it at ``L`` and every ``s * L``: the reference row of a training-free encoding."""
    cache = {} if cache is None else cache
    L, C, top = config.task.train_length, trained_context(config), max(factors)
    b_cfg = replace(config, model={"encoding": encoding, "encoding_params": {}})
    train_run(b_cfg, Path(out_dir) / "base", on_step=on_step, corpus_cache=cache)
    s = setup(b_cfg, cache)
    b_model = _load_weights(
        build_model(b_cfg, s.vocab_size, max(s.max_len, top * C + 1)),
        checkpoint_path(Path(out_dir) / "base", b_cfg.run_id),
    )
    metrics = _tag(_evaluate(b_model, b_cfg, sorted({L, *(f * L for f in factors)}), cache, top), None)
    return {
        "task": config.task.label,
        "seed": config.train.seed,
        "train_length": L,
        "context": C,
        "rule": encoding,
        "stage": "baseline",
        "finetune_length": None,
        "metrics": metrics,
    }


def finetune_config(config: RunConfig, rule: str, finetune: Finetune, checkpoint: str | Path) -> RunConfig:
    """The harness config that fine-tunes ``checkpoint`` with ``rule`` at ``factor * L``."""
    f = finetune.factor
    swapped = rule_config(config, rule, f)
    batch = finetune.batch_size or max(1, config.train.batch_size // f)
    task: dict[str, Any] = {"train_length": f * config.task.train_length, "eval_factors": [1]}
    if config.task.is_lm:
        task["sliding_stride"] = None  # the harness default for the longer length
        if config.task.eval_tokens is not None:
            task["eval_tokens"] = max(config.task.eval_tokens, f * config.task.train_length)
            task["eval_tokens"] += -task["eval_tokens"] % (f * config.task.train_length)
    else:
        task["eval_samples"] = 8  # the harness's own end-of-run score; extend scores separately
    return replace(
        swapped,
        task=task,
        train={
            "steps": finetune.steps,
            "batch_size": batch,
            "lr": float(finetune.lr),
            "warmup": finetune.warmup,
            "checkpoint_every": finetune.steps,
            "init_from": str(checkpoint),
        },
    )


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
        for c in checkpoints:
            load_base(c)  # a missing, unfinished or non-RoPE checkpoint fails here
    else:
        plan_base(preset, tasks=tasks, seeds=seeds)
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
    base_runs, records = [], []
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
        # One base run's records are kept in <out>/records/, keyed by everything that
        # determines them, so running the command again (or with more seeds) reuses them.
        # Baselines are kept apart, so adding one later reuses the rules' records.
        key = json.dumps(
            [
                state["run_id"],
                list(rules),
                list(factors),
                [],
                None if finetune is None else dataclasses.asdict(finetune),
            ]
        )
        saved = _saved(out_dir, state["run_id"], key)
        if saved.is_file():
            records += json.loads(saved.read_text(encoding="utf-8"))
        else:
            new = extend_one(
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
            atomic_write_bytes(saved, json.dumps(new).encode())
            records += new
        for name in present:
            saved = _saved(out_dir, f"{state['run_id']}__{name}", json.dumps([state["run_id"], name, list(factors)]))
            if saved.is_file():
                records.append(json.loads(saved.read_text(encoding="utf-8")))
                continue
            stage(f"baseline {name}")
            b_cfg = cfg if threads is None else replace(cfg, train={"threads": threads})
            rec = baseline_record(b_cfg, name, out_dir, factors=factors, cache=cache, on_step=on_step)
            atomic_write_bytes(saved, json.dumps(rec).encode())
            records.append(rec)
    return {
        "format": FORMAT,
        "kind": "posenc-extension",
        "command": command,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "rules": list(rules),
        "factors": list(factors),
        "baselines": list(present),
        "baselines_missing": missing,
        "finetune": None if finetune is None else dataclasses.asdict(finetune),
        "base_runs": base_runs,
        "records": records,
    }
