"""The runs and scores of ``posenc extend`` for one base checkpoint: every rule zero-shot,
fine-tuned with the fine-tune's factor at every length, fine-tuned with the factor that
covers each length, and the training-free baselines; each score with what produced it.

Scores come from the harness's evaluation (``posenc.experiments.train.evaluate_model``
on the run's ``Setup`` restricted to the wanted lengths), so they are the study's
metrics on the study's test examples. The evaluation functions read the model's encoding
instance (``pe.length_dependent``); a length-dependent encoding (dynamic NTK) is scored
by them prefix by prefix, as decoding sees it. Each record states
``length_dependent`` for that reason.

Record of one scored model (``extension.json``'s ``records``; see
``posenc.experiments.extend``)::

    {"task", "seed", "rule", "stage", "train_length", "context", "finetune_length",
     "run_id", "length_dependent",
     "metrics": [{"length", "factor", "rope_parameters", <the harness's metrics>...}]}

Stages (Chen et al. 2023, Peng et al. 2023):

* ``zero-shot``: the base weights, the rule at factor ``covering_factor(n)`` at length ``n``;
* ``fine-tuned``: the weights fine-tuned at ``f L`` with factor ``f``, scored with that
  factor at every length (past ``f L`` this is factor ``f`` judged past its factor);
* ``fine-tuned-covering``: the same weights with the factor covering each length
  (``max(f, ceil(positions / C))``: Peng et al.'s extrapolation setting); a length whose
  covering factor is ``f`` is the same computation as ``fine-tuned`` and its entry is
  copied from it (rules without a factor have no such record);
* ``baseline``: a training-free encoding (ALiBi, T5) trained at ``L``, ``factor`` null.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from posenc.data.text import CharCorpus
from posenc.experiments.config import RunConfig, config_from_dict, replace
from posenc.experiments.extend_rules import (
    Finetune,
    base_rope,
    check_factors,
    check_rules,
    covering_factor,
    has_factor,
    rule_config,
    swap_rule,
    trained_context,
)
from posenc.experiments.results import find_result
from posenc.experiments.train import (
    StepCallback,
    build_model,
    checkpoint_path,
    evaluate_model,
    load_checkpoint,
    setup,
    train_run,
)
from posenc.model import Transformer

Progress = Callable[[str], None]
#: The fine-tune budget of ``extend_one`` when none is given.
DEFAULT_FINETUNE = Finetune()
#: What ``runs`` keeps of a harness record (``results.jsonl``) as a run's provenance.
RUN_KEYS = ("config", "git_commit", "torch_version", "train_step", "cpu_capability", "wall_time_s")


def score(model: Transformer, config: RunConfig, lengths: list[int], cache: dict) -> list[dict]:
    """The harness's metrics of ``model`` at ``lengths`` (``evaluate_model``) on the test
    set of the base run's ``config``: every rule, stage and baseline of a base run is
    scored on the same test set, the one its base run was trained around (a corpus's
    held-out layout depends on the config; synthetic examples on the seed and length)."""
    run_setup = setup(config, cache)
    return evaluate_model(model, dataclasses.replace(run_setup, eval_lengths=sorted(lengths)))


def check_lengths(config: RunConfig, lengths: list[int]) -> None:
    """A corpus run's test set holds the lengths of its ``eval_factors`` only (context and
    tiling); ``ValueError`` naming the factors to train the base run with otherwise."""
    t = config.task
    if t.is_lm and not set(lengths) <= set(t.lm_lengths):
        need = sorted({n // t.train_length for n in lengths} | set(t.factors))
        raise ValueError(
            f"the base run {config.run_id} has a test set for lengths {t.lm_lengths}, not {sorted(lengths)}: "
            f"train it with task.eval_factors = {need}"
        )


def check_disjoint(train: CharCorpus, test: CharCorpus) -> None:
    """``ValueError`` when a scored test token of ``test`` lies in a training span of
    ``train`` (a fine-tune must not train on the test set of its base run)."""
    lo = test.test.starts + test.test.context  # [k] first scored token of each segment
    hi = lo + test.test.scored  # [k] one past the last
    spans = train.train_spans  # [m, 2]
    overlap = (spans[:, None, 0] < hi[None, :]) & (lo[None, :] < spans[:, None, 1])  # [m, k]
    if bool(overlap.any()):
        raise ValueError(
            f"the fine-tune's training text overlaps {int(overlap.any(dim=0).sum())} test segment(s) of its base run "
            "(the held-out layouts differ): set the fine-tune's task.val_tokens so its held-out units cover the base's"
        )


def _load_weights(model: Transformer, checkpoint: Path) -> Transformer:
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    return model.eval()


def _tag(metrics: list[dict[str, Any]], factor: int | None, rope_parameters: dict | None) -> list[dict[str, Any]]:
    """Each metric entry with the factor and the rope parameters that produced it."""
    return [
        {"length": m["length"], "factor": factor, "rope_parameters": rope_parameters}
        | {k: v for k, v in m.items() if k != "length"}
        for m in metrics
    ]


def _rope_parameters(config: RunConfig) -> dict[str, Any]:
    return dict(config.model.encoding_params["rope_parameters"])


def run_entry(record: dict[str, Any] | None, role: str, config: RunConfig, elapsed: float | None = None) -> dict:
    """A run's provenance for ``extension.json``'s ``runs``: its role (``base``,
    ``fine-tune``, ``baseline``) and, from its harness record, config, git commit, torch
    version, training step, CPU capability and wall time (``None`` where not recorded)."""
    entry: dict[str, Any] = {"role": role, **{k: None for k in RUN_KEYS}}
    entry["config"] = config.to_dict()
    if record is not None:
        entry.update({k: record.get(k) for k in RUN_KEYS})
    if entry["wall_time_s"] is None and elapsed is not None:
        entry["wall_time_s"] = round(float(elapsed), 3)
    return entry


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


def base_entry(checkpoint: str | Path) -> tuple[str, dict[str, Any]]:
    """``(run_id, run_entry)`` of a base checkpoint (its harness record when the
    checkpoint sits in a run folder's ``checkpoints/``)."""
    state = load_checkpoint(Path(checkpoint))
    config = config_from_dict(state["config"])
    run_dir = Path(checkpoint).resolve().parent.parent
    record = find_result(run_dir, state["run_id"]) if (run_dir / "results.jsonl").is_file() else None
    return state["run_id"], run_entry(record, "base", config, state["elapsed"])


def extend_one(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    rules: tuple[str, ...],
    factors: tuple[int, ...] = (2, 4, 8),
    finetune: Finetune | None = DEFAULT_FINETUNE,
    cache: dict | None = None,
    on_stage: Progress | None = None,
    on_step: StepCallback | None = None,
    threads: int | None = None,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """``(records, runs)`` of one base checkpoint: zero-shot, fine-tuned and
    fine-tuned-covering per rule; ``runs`` maps each fine-tune's run id to its
    provenance. ``threads``: torch threads of evaluation and fine-tuning."""
    rules, factors = check_rules(rules), check_factors(factors)
    if threads is not None:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    cache = {} if cache is None else cache
    config, model = load_base(checkpoint)
    base_id = load_checkpoint(Path(checkpoint))["run_id"]
    L, C = config.task.train_length, trained_context(config)
    lengths = sorted({L, *(f * L for f in factors)})
    check_lengths(config, lengths)
    common = {"task": config.task.label, "seed": config.train.seed, "train_length": L, "context": C}
    stage = on_stage or (lambda _msg: None)
    records, runs = [], {}
    for rule in rules:
        stage(f"zero-shot {rule}")
        metrics = []
        for n in lengths:
            s = covering_factor(config, n)
            cfg, swapped = swap_rule(model, config, rule, s)
            metrics += _tag(score(swapped, config, [n], cache), s, _rope_parameters(cfg))
        records.append(
            {**common, "rule": rule, "stage": "zero-shot", "finetune_length": None, "run_id": base_id}
            | {"length_dependent": bool(swapped.pe.length_dependent), "metrics": metrics}
        )
    if finetune is None:
        return records, runs
    f = finetune.factor
    for rule in rules:
        stage(f"fine-tune {rule} at {f * L}")
        ft_cfg = finetune_config(config, rule, finetune, checkpoint)
        if threads is not None:
            ft_cfg = replace(ft_cfg, train={"threads": threads})
        if config.task.is_lm:
            check_disjoint(setup(ft_cfg, cache).corpus, setup(config, cache).corpus)
        harness, _ = train_run(ft_cfg, out_dir / "finetune", on_step=on_step, corpus_cache=cache)
        runs[ft_cfg.run_id] = run_entry(harness, "fine-tune", ft_cfg)
        ckpt = checkpoint_path(out_dir / "finetune", ft_cfg.run_id)
        cfg, tuned = swap_rule(model, config, rule, f)
        fixed = _tag(score(_load_weights(tuned, ckpt), config, lengths, cache), f, _rope_parameters(cfg))
        ft = {**common, "rule": rule, "finetune_length": f * L, "run_id": ft_cfg.run_id}
        ft["length_dependent"] = bool(tuned.pe.length_dependent)
        records.append({**ft, "stage": "fine-tuned", "metrics": fixed})
        if not has_factor(rule):
            continue
        covering = []
        for m in fixed:
            s = covering_factor(config, m["length"], f)
            if s == f:  # the same model, factor and examples as the fine-tuned entry
                covering.append(m)
                continue
            cfg, wide = swap_rule(model, config, rule, s)
            metrics = score(_load_weights(wide, ckpt), config, [m["length"]], cache)
            covering += _tag(metrics, s, _rope_parameters(cfg))
        records.append({**ft, "stage": "fine-tuned-covering", "metrics": covering})
    return records, runs


def baseline_record(
    config: RunConfig,
    encoding: str,
    out_dir: str | Path,
    *,
    factors: tuple[int, ...],
    cache: dict | None = None,
    on_step: StepCallback | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train ``encoding`` with the base run's config (harness, ``<out>/base``) and score
    it at ``L`` and every ``s * L``: ``(record, run entry)`` of a training-free encoding."""
    cache = {} if cache is None else cache
    L, C = config.task.train_length, trained_context(config)
    lengths = sorted({L, *(f * L for f in factors)})
    top = covering_factor(config, max(lengths))  # the baseline's model must hold top * C positions
    b_cfg = replace(config, model={"encoding": encoding, "encoding_params": {}})
    harness, _ = train_run(b_cfg, Path(out_dir) / "base", on_step=on_step, corpus_cache=cache)
    s = setup(b_cfg, cache)
    b_model = _load_weights(
        build_model(b_cfg, s.vocab_size, max(s.max_len, top * C + 1)),
        checkpoint_path(Path(out_dir) / "base", b_cfg.run_id),
    )
    record = {
        "task": config.task.label,
        "seed": config.train.seed,
        "train_length": L,
        "context": C,
        "rule": encoding,
        "stage": "baseline",
        "finetune_length": None,
        "run_id": b_cfg.run_id,
        "length_dependent": bool(b_model.pe.length_dependent),
        "metrics": _tag(score(b_model, b_cfg, lengths, cache), None, None),
    }
    return record, run_entry(harness, "baseline", b_cfg)


def finetune_config(config: RunConfig, rule: str, finetune: Finetune, checkpoint: str | Path) -> RunConfig:
    """The harness config that fine-tunes ``checkpoint`` with ``rule`` at ``factor * L``."""
    f = finetune.factor
    swapped = rule_config(config, rule, f)
    batch = finetune.batch_size or max(1, config.train.batch_size // f)
    t, fL = config.task, f * config.task.train_length
    task: dict[str, Any] = {"train_length": fL, "eval_factors": [1]}
    if t.is_lm:
        # The fine-tune trains around held-out units that cover its base run's, so it
        # never trains on the test set the extension scores (check_disjoint verifies it):
        # the same segments, scored tokens and stride, and validation segments long enough
        # to make up the difference. Its own end-of-run score is at fL only (extend
        # scores it separately).
        base = t.held_out()
        base_unit = base.test_context + base.test_scored + base.val_context + base.val_scored
        short = base_unit - fL - base.test_scored - fL
        val = max(fL, -(-short // fL) * fL)  # per segment: a multiple of fL, at least fL
        task |= {"eval_segments": base.segments, "eval_tokens": base.segments * base.test_scored}
        task |= {"val_tokens": base.segments * val, "sliding_stride": t.sliding_stride}
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
