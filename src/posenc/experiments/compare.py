"""A leaderboard without retraining the baselines: rank one encoding (a plugin or a
built-in) among finished records, e.g. the full preset's committed
``docs/data/study_results.jsonl``.

``plan_compare`` plans only the encoding's runs of a preset (``plan_phases`` with
``encodings=[name]``; with the preset's learning-rate sweep, phase 1 and phase 2 as in
``posenc study``) and checks that every baseline record of the same task and seed
was trained with exactly the same config but the encoding: the ``task``, ``model`` and
``train`` sections must be equal except ``model.encoding``, ``model.encoding_params``,
``train.randomized_positions`` (what makes an encoding variant), ``train.threads``
(speed only, left out of the run id too) and, when the preset sweeps, ``train.lr``
within the sweep's grid (each encoding's rate is its own sweep's choice; the tables
use ``summary.selected``). A difference is a ``ValueError`` naming the
run and the differing keys, never a silent unfair comparison; so are baseline records
trained with another preset (another config for the same task and seed), a task or
seed of the plan that no baseline covers, and a task whose baselines are incomplete
(``incomplete``: an encoding without a run at one of the plan's seeds or sweep rates).
``merge`` joins the baselines and the new records; ``leaderboard_tables`` ranks the
encoding (``standings``) and adds the study's own tables (``summary.tables``, with
Kazemnejad et al.'s mean ranks).

The commands: ``posenc compare NAME`` (``posenc.pipeline.compare`` trains and writes);
docs/plugins.md walks through one with the DAPE example plugin.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from posenc.experiments.config import RunConfig
from posenc.experiments.results import RESULTS_FILE, validate_record
from posenc.experiments.study import StudyPlan, plan_phases
from posenc.experiments.summary import (
    Cell,
    TableData,
    group,
    in_distribution,
    is_lm,
    learned,
    ratio,
    selected,
    tables,
)

#: Config keys that make an encoding variant (they may differ from the baselines').
ENCODING_KEYS = (("model", "encoding"), ("model", "encoding_params"), ("train", "randomized_positions"))
#: Config keys that change speed, not what is computed (left out of the run id too).
SPEED_KEYS = (("train", "threads"),)
#: The committed records of the full preset under the current protocol (docs/results.md,
#: "Results"), relative to the repository.
DEFAULT_BASELINES = "docs/data/study_results.jsonl"


@dataclasses.dataclass
class Comparison:
    """One encoding's runs to train and the baseline records it is ranked among."""

    name: str  # the encoding label (``NAME`` or ``NAME+randpos``)
    preset: str
    configs: list[RunConfig]
    baselines: list[dict[str, Any]]
    source: str  # where the baseline records came from
    outside: int = 0  # baseline records of tasks or seeds outside the plan (not shown)
    replaced: int = 0  # baseline records of ``name`` itself (its runs are trained here)
    plan: StudyPlan | None = None  # the phases of ``configs`` (``configs`` is ``plan.outline``)


def default_baselines() -> Path:
    """``docs/data/study_results.jsonl`` of the current directory, else of the posenc
    checkout this module comes from; ``FileNotFoundError`` when neither exists."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        if (root / DEFAULT_BASELINES).is_file():
            return root / DEFAULT_BASELINES
    raise FileNotFoundError(
        f"no baseline records at {DEFAULT_BASELINES!r} (it ships with the posenc repository); "
        "pass --baselines FILE (a results.jsonl of `posenc study`)"
    )


def read_baselines(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``results.jsonl`` file, or of a run folder holding one; each
    checked by ``validate_record``. Missing or empty is a ``FileNotFoundError``/``ValueError``."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no baseline records at {str(path)!r} (a results.jsonl of `posenc study`)")
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"baseline file {str(path)!r} line {i} is corrupt: {err.msg}") from None
        records.append(validate_record(rec, f"baseline file {str(path)!r} line {i}"))
    if not records:
        raise ValueError(f"baseline file {str(path)!r} holds no records")
    return records


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a ``RunConfig.to_dict()``) without ``ENCODING_KEYS`` and ``SPEED_KEYS``."""
    out = {section: dict(values) for section, values in config.items()}
    for section, key in ENCODING_KEYS + SPEED_KEYS:
        out.get(section, {}).pop(key, None)
    return out


def config_diff(
    ours: dict[str, Any], theirs: dict[str, Any], lr_grid: tuple[float, ...] = ()
) -> list[tuple[str, Any, Any]]:
    """``(section.key, ours, theirs)`` for every key of the two comparable configs whose
    values differ (a key missing on one side is ``<missing>``); ``train.lr`` is not a
    difference when ``theirs`` is one of ``lr_grid`` (a swept study's rates)."""
    a, b = comparable(ours), comparable(theirs)
    if lr_grid and b.get("train", {}).get("lr") in lr_grid:
        a.get("train", {}).pop("lr", None)
        b["train"].pop("lr", None)
    diffs = []
    for section in sorted(set(a) | set(b)):
        sa, sb = a.get(section, {}), b.get(section, {})
        for key in sorted(set(sa) | set(sb)):
            va, vb = sa.get(key, "<missing>"), sb.get(key, "<missing>")
            if va != vb:
                diffs.append((f"{section}.{key}", va, vb))
    return diffs


def plan_compare(
    name: str,
    preset: str = "full",
    *,
    baselines: str | Path | None = None,
    tasks: list[str] | None = None,
    seeds: list[int] | None = None,
    threads: int | None = None,
) -> Comparison:
    """The runs of ``name`` in ``preset`` (restricted to ``tasks``/``seeds``) and the
    baseline records of the same tasks and seeds, checked to share their configs."""
    plan = plan_phases(preset, encodings=[name], tasks=tasks, seeds=seeds, threads=threads)
    configs = plan.outline
    label = configs[0].encoding_label
    source = Path(baselines) if baselines is not None else default_baselines()
    records = read_baselines(source)
    ours: dict[tuple[str, int], dict[str, Any]] = {}
    for c in configs:  # a sweep's runs of one task and seed differ only in train.lr
        ours.setdefault((c.task.label, c.train.seed), c.to_dict())
    kept, outside, replaced, unfair = [], 0, 0, []
    for rec in records:
        key = (rec["task"], rec["seed"])
        if key not in ours:
            outside += 1
        elif rec["encoding"] == label:
            replaced += 1
        elif diff := config_diff(ours[key], rec["config"], plan.lr_grid):
            unfair.append((rec, diff))
        else:
            kept.append(rec)
    if unfair:
        raise ValueError(_unfair_message(name, preset, source, unfair))
    covered = {(r["task"], r["seed"]) for r in kept}
    uncovered = [f"{task} seed {seed}" for task, seed in ours if (task, seed) not in covered]
    if uncovered:
        have = sorted({(r["task"], r["seed"]) for r in records})
        raise ValueError(
            f"no baseline records in {str(source)!r} for {', '.join(uncovered)}: choose --tasks/--seeds they cover "
            f"({', '.join(f'{t} seed {s}' for t, s in have[:12])}{', ...' if len(have) > 12 else ''})"
        )
    # the preset's encodings that the file holds anywhere: each must be complete on every task
    preset_encodings = {c.encoding_label for c in plan_phases(preset, tasks=tasks, seeds=seeds).outline}
    expected = ({r["encoding"] for r in records} & preset_encodings) - {label}
    if gaps := incomplete(kept, plan, expected):
        done = sorted({t for t, _ in ours} - {t for t, _, _ in gaps})
        shown = "; ".join(f"{t} {enc}: {what}" for t, enc, what in gaps[:4])
        raise ValueError(
            f"the baseline records in {str(source)!r} are incomplete ({len(gaps)} encoding(s) of "
            f"{', '.join(sorted({t for t, _, _ in gaps}))}: {shown}{', ...' if len(gaps) > 4 else ''}), so a rank "
            "would be among part of the encodings (their runs may still be training): choose --tasks whose "
            f"baselines are complete{' (' + ', '.join(done) + ')' if done else ''}"
        )
    return Comparison(label, preset, configs, kept, str(source), outside, replaced, plan)


def incomplete(baselines: list[dict[str, Any]], plan: StudyPlan, encodings: set[str]) -> list[tuple[str, str, str]]:
    """``(task, encoding, what is missing)`` for every one of ``encodings`` (and every
    other encoding of ``baselines``) without a record on a task of ``plan`` at one of
    the plan's seeds of that task or, when the plan sweeps, at one of the grid's rates on
    the sweep seed: a rank needs every baseline encoding of a task on the same seeds,
    each at its sweep's chosen rate."""
    seeds: dict[str, set[int]] = {}
    sweep: dict[str, set[int]] = {}
    for c in plan.outline:
        seeds.setdefault(c.task.label, set()).add(c.train.seed)
    if plan.lr_grid:  # phase 1 (the sweep seed at every rate) is plan.first
        for c in plan.first:
            sweep.setdefault(c.task.label, set()).add(c.train.seed)
    have: dict[tuple[str, str], dict[int, set]] = {}
    for r in baselines:
        have.setdefault((r["task"], r["encoding"]), {}).setdefault(r["seed"], set()).add(r["config"]["train"]["lr"])
    gaps = []
    for task in seeds:
        for enc in sorted(encodings | {e for t, e in have if t == task}):
            by_seed = have.get((task, enc), {})
            missing = [f"seed {s}" for s in sorted(seeds[task]) if s not in by_seed]
            for s in sorted(sweep.get(task, ())):
                if s in by_seed and (rates := sorted(set(plan.lr_grid) - by_seed[s])):
                    missing.append(f"seed {s} at lr {', '.join(f'{lr:g}' for lr in rates)}")
            if missing:
                gaps.append((task, enc, "no runs" if not by_seed else ", ".join(missing)))
    return gaps


def _unfair_message(name: str, preset: str, source: Path, unfair: list) -> str:
    keys = sorted({k for _, diff in unfair for k, _, _ in diff})
    shown = []
    for rec, diff in unfair[:3]:
        parts = "; ".join(f"{k} {theirs!r} (baseline) vs {mine!r} ({name})" for k, mine, theirs in diff[:6])
        shown.append(f"{rec['run_id']}: {parts}")
    more = f" (and {len(unfair) - 3} more)" if len(unfair) > 3 else ""
    return (
        f"{len(unfair)} baseline records in {str(source)!r} were trained with another config than the "
        f"{preset!r} preset gives {name!r} for the same task and seed (differing keys: {', '.join(keys)}), "
        f"so the comparison would not be fair: {' | '.join(shown)}{more}. Use the preset the baselines were "
        "trained with (--preset), or baselines of this preset"
    )


def merge(comparison: Comparison, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The baselines and the records of ``comparison``'s runs, both phases of a sweep
    (``ValueError`` when one of its runs has no record)."""
    by_id = {r["run_id"]: r for r in records}
    plan = comparison.plan
    runs = list(comparison.configs if plan is None else plan.first)
    if plan is not None and all(c.run_id in by_id for c in runs):
        runs = plan.runs(records)  # phase 2 at the rates chosen from phase 1
    missing = [c.run_id for c in runs if c.run_id not in by_id]
    if missing:
        raise ValueError(f"no record of the runs {missing} of {comparison.name!r}")
    return comparison.baselines + [by_id[c.run_id] for c in runs]


def _window(record: dict[str, Any], key: str, factor: int = 2) -> float | None:
    L = record["train_length"]
    vals = [m[key] for m in record["metrics"] if L < m["length"] <= factor * L]
    return statistics.fmean(vals) if vals else None


def _criteria(lm: bool, L: int, lengths: set[int]) -> list[tuple[str, Any, bool, bool]]:
    """``(label, record -> value or None, higher is better, gated)`` of a task's
    standings; a gated criterion ranks only runs that learned the task in distribution."""
    if lm:
        at_l = (
            f"ppl at L={L}",
            lambda r: {m["length"]: m["ppl"] for m in r["metrics"]}[r["train_length"]],
            False,
            False,
        )
        return [at_l] + [
            (f"ppl({f}L) / ppl(L)", lambda r, f=f: ratio(r, f * r["train_length"]), False, False)
            for f in (2, 8)
            if f * L in lengths
        ]
    return [
        (f"exact match 1..{L}", in_distribution, True, False),
        (f"token accuracy ({L}, {2 * L}]", lambda r: _window(r, "token_accuracy"), True, True),
    ]


def standings(name: str, records: list[dict[str, Any]]) -> TableData:
    """Where ``name`` places on every task: for synthetic tasks exact match in
    distribution (over every run: the measure of learning itself) and token accuracy on
    ``(L, 2L]`` (the mean-rank quantity, ranked only among runs that learned the task in
    distribution: ``summary.learned``; ``name`` without such a run "did not learn", with
    its exact match over 1..L), for corpora perplexity at L and its growth at 2L and 8L
    (not gated); each as ``name``'s mean over seeds, its rank among the encodings (1 =
    best) and the best encoding. Only ``selected(records)`` count."""
    rows = []
    for task, by_enc in group(selected(records)).items():
        if name not in by_enc:
            continue
        first = by_enc[name][0]
        lengths = {m["length"] for m in first["metrics"]}
        for label, value, higher, gated in _criteria(is_lm([first]), first["train_length"], lengths):
            means = {}
            for enc, recs in by_enc.items():
                vals = [v for r in recs if (not gated or learned(r)) and (v := value(r)) is not None]
                if vals:
                    means[enc] = Cell.of(vals)
            if gated and not any(learned(r) for r in by_enc[name]):
                em = statistics.fmean(in_distribution(r) for r in by_enc[name])
                best = max(means, key=lambda e: means[e].mean) if means else None
                shown = "-" if best is None else f"{best} {means[best].fmt(3)}"
                rows.append([task, label, "-", f"did not learn (exact match 1..L {em:.2f})", shown])
                continue
            if name not in means:
                continue
            order = sorted(means, key=lambda e: -means[e].mean if higher else means[e].mean)
            mine = means[name].mean
            rank = 1 + sum((m.mean > mine) if higher else (m.mean < mine) for m in means.values())
            best = order[0]
            rows.append([task, label, means[name].fmt(3), f"{rank} of {len(means)}", f"{best} {means[best].fmt(3)}"])
    return TableData(
        f"{name} against the baselines (mean ± std over seeds; rank 1 = best, ties share the better rank; past L "
        "on synthetic tasks only runs that learned in distribution are ranked)",
        ["task", "criterion", name, "rank", "best"],
        rows,
    )


def leaderboard_tables(name: str, records: list[dict[str, Any]]) -> list[TableData]:
    """``standings`` first, then the study's tables of the merged records (per task and
    metric, and the mean rank over synthetic tasks), as in docs/results.md."""
    return [standings(name, records), *tables(records)]
