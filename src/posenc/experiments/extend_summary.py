"""``extension.json`` -> tables: the metric per rule, stage and length with 95% intervals
pooled over seeds, the fine-tuned models past their fine-tuning length with both factors;
the gate on synthetic runs; the schema check of ``extension.json``. The published
orderings are checked in ``extend_claims``.

**The gate** (as the study's ``summary.learned``): a synthetic record whose exact match
at the training length ``L`` is below ``KEEP_BAR`` did not keep the task (a base run that
never learned it, or a fine-tune that lost it); its scores past ``L`` say nothing about
extension, so no table cell or comparison uses it, and each row says how many seeds kept
the task. Corpus records have no bar.

**A cell** pools the seeds that kept the task (``intervals``): perplexity =
``exp(total NLL / total scored tokens)`` with the two-stage block bootstrap over seeds and
test segments (``nll_segments`` non-overlapping, ``nll_sliding_segments`` sliding);
exact match = the mean over seeds with the two-stage bootstrap over seeds and test
examples (``exact_hits`` of ``samples``), Wilson's interval where every seed scored 0
or every seed 1. Synthetic tasks are reported by exact match only: per-token accuracy
has no per-example counts for an interval (it stays in the records).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from posenc.experiments.intervals import SEGMENTS, fmt_interval, ppl_interval, rate_interval
from posenc.experiments.summary import LEARNED_BAR, TableData

FORMAT = 2
STAGES = ("zero-shot", "fine-tuned", "fine-tuned-covering", "baseline")


#: Exact match at ``L`` a synthetic record needs to count (``summary.LEARNED_BAR``).
KEEP_BAR = LEARNED_BAR
#: Per metric, the counts its interval is computed from.
COUNTS = {**SEGMENTS, "exact_match": "exact_hits"}


def primary_metric(data: dict[str, Any], task: str) -> str:
    rec = next(r for r in data["records"] if r["task"] == task)
    return "ppl" if "ppl" in rec["metrics"][0] else "exact_match"


def task_names(data: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(r["task"] for r in data["records"]))


def at_length(record: dict[str, Any], n: int) -> dict[str, Any]:
    """The metrics entry of ``record`` at length ``n``; ``ValueError`` when it has none."""
    for m in record["metrics"]:
        if m["length"] == n:
            return m
    raise ValueError(f"record {record['rule']} {record['stage']} seed {record['seed']} has no length {n}")


def kept(record: dict[str, Any], bar: float = KEEP_BAR) -> bool:
    """True for a synthetic record whose exact match at its training length is at least
    ``bar`` (the model kept the task in distribution, as scored: a fine-tuned record with
    its factor), and for every corpus record (no bar)."""
    m = at_length(record, record["train_length"])
    return "exact_match" not in m or m["exact_match"] >= bar


def runs_by_stage(data: dict[str, Any], task: str, *, only_kept: bool = True) -> dict[tuple[str, str], dict[int, dict]]:
    """``{(rule, stage): {seed: record}}`` of one task: only the records that ``kept`` the
    task unless ``only_kept`` is false; every ``(rule, stage)`` of the task is a key."""
    out: dict[tuple[str, str], dict[int, dict]] = {}
    for r in task_records(data, task):
        by_seed = out.setdefault((r["rule"], r["stage"]), {})
        if not only_kept or kept(r):
            by_seed[r["seed"]] = r
    return out


def series(data: dict[str, Any], task: str, key: str) -> dict[tuple[str, str], dict[int, dict[int, float]]]:
    """``{(rule, stage): {seed: {length: value}}}`` of one task and metric, from the
    records that ``kept`` the task (a ``(rule, stage)`` none of whose seeds kept it is
    left out)."""
    return {
        rs: {seed: {m["length"]: m[key] for m in r["metrics"]} for seed, r in by_seed.items()}
        for rs, by_seed in runs_by_stage(data, task).items()
        if by_seed
    }


def metric_keys(data: dict[str, Any], task: str) -> tuple[str, ...]:
    """The task's metrics, primary first: ``(ppl, ppl_sliding)`` or ``(exact_match,)``."""
    return ("ppl", "ppl_sliding") if primary_metric(data, task) == "ppl" else ("exact_match",)


def interval(records: list[dict[str, Any]], key: str, n: int) -> tuple[float, float, float]:
    """``(estimate, lo, hi)`` of ``key`` at length ``n`` pooled over ``records`` (one per
    seed; the module docstring says how), with its 95% interval."""
    if key not in COUNTS:
        raise ValueError(f"no interval for metric {key!r}; metrics: {sorted(COUNTS)}")
    if not records:
        raise ValueError(f"no records to pool for {key} at length {n}")
    entries = [at_length(r, n) for r in records]
    if key == "exact_match":
        return rate_interval([(m["exact_hits"], m["samples"]) for m in entries])
    return ppl_interval([(m[COUNTS[key]], m["segment_tokens"]) for m in entries])


def _cells(by_seed: dict[int, dict], total: int, key: str, lengths: list[int]) -> list[str]:
    """A row's ``runs`` column (``k of n`` seeds that kept the task) and one cell per
    length: the pooled interval, or "did not keep the task" where no seed did."""
    runs = f"{len(by_seed)} of {total}"
    if not by_seed:
        return [runs, f"did not keep the task (exact match at L < {KEEP_BAR})"] + ["–"] * (len(lengths) - 1)
    recs = list(by_seed.values())
    return [runs, *(fmt_interval(interval(recs, key, n)) for n in lengths)]


METRIC_NAMES = {
    "ppl": "perplexity, non-overlapping",
    "ppl_sliding": "perplexity, sliding window",
    "token_accuracy": "per-token accuracy",
    "exact_match": "exact match",
}


def task_records(data: dict[str, Any], task: str) -> list[dict[str, Any]]:
    recs = [r for r in data["records"] if r["task"] == task]
    if not recs:
        raise ValueError(f"no records of task {task!r}; tasks: {task_names(data)}")
    return recs


def factors_at(data: dict[str, Any], task: str, stage: str) -> dict[int, int]:
    """``{length: factor}`` of ``stage`` in ``task`` (the factor depends on the length only)."""
    return {m["length"]: m["factor"] for r in task_records(data, task) if r["stage"] == stage for m in r["metrics"]}


def _row_label(rule: str, stage: str, ft_len: int | None) -> str:
    if stage == "fine-tuned-covering":
        return f"{rule} fine-tuned@{ft_len}, factor covering the length"
    if stage == "fine-tuned":
        return f"{rule} fine-tuned@{ft_len}"
    return f"{rule} {stage}"


def _spread(recs: list[dict[str, Any]]) -> str:
    seeds = len({r["seed"] for r in recs})
    return (
        f"95% intervals over {seeds} seeds and the test {'segments' if 'ppl' in recs[0]['metrics'][0] else 'examples'}"
    )


def extension_tables(data: dict[str, Any]) -> list[TableData]:
    """Per task and metric: rows = each rule zero-shot, each rule fine-tuned (with the
    factor covering the length where the rule has a factor, Peng et al.'s setting), the
    baselines; columns = the seeds that kept the task, then the lengths; cells =
    ``estimate [lo, hi]`` (module docstring). The fine-tune's factor judged past it is in
    ``past_factor_tables``."""
    out = []
    for task in task_names(data):
        recs = task_records(data, task)
        L = recs[0]["train_length"]
        lengths = sorted({m["length"] for r in recs for m in r["metrics"]})
        ft_len = {r["rule"]: r["finetune_length"] for r in recs if r["stage"] == "fine-tuned"}
        every = runs_by_stage(data, task, only_kept=False)
        good = runs_by_stage(data, task)
        covered = {rule for rule, stage in every if stage == "fine-tuned-covering"}
        for key in metric_keys(data, task):
            rows = []
            for (rule, stage), by_seed in good.items():
                if stage == "fine-tuned" and rule in covered:
                    continue
                total = len(every[(rule, stage)])
                rows.append([_row_label(rule, stage, ft_len.get(rule)), *_cells(by_seed, total, key, lengths)])
            cols = ["rule / stage", "seeds kept", *(f"{n} ({n // L}L)" for n in lengths)]
            title = f"{task}: {METRIC_NAMES[key]}, trained at L={L} ({_spread(recs)}); factor covering the length"
            out.append(TableData(title, cols, rows))
    return out


def past_factor_tables(data: dict[str, Any]) -> list[TableData]:
    """Per task and metric, the fine-tuned models at every length past the fine-tuning
    length, side by side: with the factor covering the length (Peng et al.'s setting for
    YaRN's extrapolation) and with the fine-tune's factor, judged past its factor."""
    out = []
    for task in task_names(data):
        recs = task_records(data, task)
        ft = [r for r in recs if r["stage"] == "fine-tuned-covering"]
        if not ft:
            continue
        f_len = ft[0]["finetune_length"]
        fixed, covering = factors_at(data, task, "fine-tuned"), factors_at(data, task, "fine-tuned-covering")
        past = sorted(n for n in covering if n > f_len)
        if not past:
            continue
        every, good = runs_by_stage(data, task, only_kept=False), runs_by_stage(data, task)
        for key in metric_keys(data, task):
            cols, rows = ["rule, fine-tuned@" + str(f_len)], []
            for n in past:
                for stage in ("fine-tuned-covering", "fine-tuned"):
                    what = f"covers {n}" if stage == "fine-tuned-covering" else "judged past its factor"
                    f = (covering if stage == "fine-tuned-covering" else fixed)[n]
                    cols += [f"seeds kept, factor {f}", f"{n}, factor {f} ({what})"]
            for rule in dict.fromkeys(r["rule"] for r in ft):
                row = [rule]
                for n in past:
                    for stage in ("fine-tuned-covering", "fine-tuned"):
                        row += _cells(good[(rule, stage)], len(every[(rule, stage)]), key, [n])
                rows.append(row)
            title = f"{task}: {METRIC_NAMES[key]} past the fine-tuning length {f_len} ({_spread(recs)})"
            out.append(TableData(title, cols, rows))
    return out


#: The top-level keys of ``extension.json`` (format 2).
KEYS = (
    "format",
    "kind",
    "command",
    "git_commit",
    "torch_version",
    "cpu_capability",
    "python_version",
    "threads",
    "rules",
    "factors",
    "baselines",
    "baselines_missing",
    "finetune",
    "base_runs",
    "runs",
    "records",
)
RECORD_KEYS = ("task", "seed", "rule", "stage", "train_length", "context", "finetune_length", "run_id")
RECORD_KEYS += ("length_dependent", "metrics")
#: The fields every metrics entry of a corpus / a synthetic task holds.
LM_FIELDS = {"ppl", "ppl_sliding", "nll_segments", "nll_sliding_segments", "segment_tokens"}
SYNTHETIC_FIELDS = {"exact_match", "token_accuracy", "exact_hits", "samples"}
RUN_KEYS = ("role", "config", "git_commit", "torch_version", "train_step", "cpu_capability", "wall_time_s")


def validate_extension(data: Any) -> dict[str, Any]:
    """Check an ``extension.json`` dict against the schema; ``ValueError`` naming what is wrong."""
    if isinstance(data, dict) and data.get("kind") == "posenc-extension" and data.get("format") != FORMAT:
        raise ValueError(
            f"extension file of format {data.get('format')!r}, this posenc reads format {FORMAT} "
            "(run `posenc extend` again: finished training runs are reused)"
        )
    if not isinstance(data, dict) or set(data) != set(KEYS):
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"extension data must have keys {sorted(KEYS)}, got {got}")
    if data["kind"] != "posenc-extension":
        raise ValueError(f"not a posenc extension file (kind {data['kind']!r})")
    for run_id, run in data["runs"].items():
        if not isinstance(run, dict) or set(run) != set(RUN_KEYS):
            raise ValueError(f"runs[{run_id!r}] must have keys {sorted(RUN_KEYS)}")
    for i, r in enumerate(data["records"]):
        if not isinstance(r, dict) or set(r) != set(RECORD_KEYS):
            raise ValueError(f"records[{i}] must have keys {sorted(RECORD_KEYS)}")
        if r["stage"] not in STAGES:
            raise ValueError(f"records[{i}].stage must be one of {STAGES}, got {r['stage']!r}")
        if r["run_id"] not in data["runs"]:
            raise ValueError(f"records[{i}].run_id {r['run_id']!r} is not in runs (the run that produced it)")
        if not r["metrics"]:
            raise ValueError(f"records[{i}].metrics is empty")
        for m in r["metrics"]:
            if not isinstance(m.get("length"), int) or "factor" not in m or "rope_parameters" not in m:
                raise ValueError(f"records[{i}] metric {m!r} needs an int length, a factor and rope_parameters")
            if not (LM_FIELDS <= set(m) or SYNTHETIC_FIELDS <= set(m)):
                raise ValueError(
                    f"records[{i}] metric at length {m['length']} needs the fields {sorted(LM_FIELDS)} (a corpus) or "
                    f"{sorted(SYNTHETIC_FIELDS)} (a synthetic task): the values and the counts of their intervals"
                )
    return data


def read_extension(path: str | Path) -> dict[str, Any]:
    """The validated dict of an ``extension.json`` file; ``ValueError`` when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"extension file {str(path)!r} does not exist (run `posenc extend` first)")
    return validate_extension(json.loads(path.read_text(encoding="utf-8")))
