"""``extension.json`` -> tables: the metric per rule, stage and length (mean ± std over
seeds), the fine-tuned models past their fine-tuning length with both factors, and the
published orderings checked seed by seed; the schema check of ``extension.json``.

Published orderings (Chen et al. 2023, Position Interpolation; Peng et al. 2023, YaRN;
bloc97 2023, NTK-aware scaling), checked at lengths ``E > L`` (``f L`` = the
fine-tuning length, ``f`` its factor):

1. direct extrapolation fails: ``none`` zero-shot at ``E`` is worse than at ``L``;
2. PI zero-shot beats direct: ``linear`` zero-shot better than ``none`` zero-shot;
3. NTK-aware zero-shot beats PI zero-shot: ``ntk`` better than ``linear``;
4. after fine-tuning PI recovers most of the in-range metric (``E <= f L``): the fraction
   ``(none_zs(E) - linear_ft(E)) / (none_zs(E) - none_zs(L))`` is > 0.5
   (1 = back to the in-range value, > 1 = better than in range);
5. YaRN fine-tuned beats PI fine-tuned, both with factor ``f`` (Peng et al.'s Table 1
   judges its factor-2 models also past their factor);
6. corpora only: YaRN extrapolates past its fine-tuning length when its factor covers
   ``E`` (Peng et al.: the factor-32 model fine-tuned on 64k tokens, scored to 128k):
   ``yarn`` fine-tuned-covering at ``E > f L`` better than ``yarn`` fine-tuned at ``f L``;
7. synthetic tasks only: PI fine-tuning extends retrieval faster than direct
   fine-tuning (Chen et al.'s passkey retrieval, ``E <= f L``): ``linear`` fine-tuned
   better than ``none`` fine-tuned.

"Better" is lower perplexity (corpora) or higher accuracy (synthetic tasks), strictly.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from posenc.experiments.summary import Cell, TableData

FORMAT = 2
STAGES = ("zero-shot", "fine-tuned", "fine-tuned-covering", "baseline")


def primary_metric(data: dict[str, Any], task: str) -> str:
    rec = next(r for r in data["records"] if r["task"] == task)
    return "ppl" if "ppl" in rec["metrics"][0] else "token_accuracy"


def task_names(data: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(r["task"] for r in data["records"]))


def series(data: dict[str, Any], task: str, key: str) -> dict[tuple[str, str], dict[int, dict[int, float]]]:
    """``{(rule, stage): {seed: {length: value}}}`` of one task and metric."""
    out: dict[tuple[str, str], dict[int, dict[int, float]]] = defaultdict(dict)
    for r in data["records"]:
        if r["task"] == task:
            out[(r["rule"], r["stage"])][r["seed"]] = {m["length"]: m[key] for m in r["metrics"]}
    return out


def metric_keys(data: dict[str, Any], task: str) -> tuple[str, str]:
    """The task's two metrics, primary first: ``(ppl, ppl_sliding)`` or ``(token_accuracy, exact_match)``."""
    return ("ppl", "ppl_sliding") if primary_metric(data, task) == "ppl" else ("token_accuracy", "exact_match")


METRIC_NAMES = {
    "ppl": "perplexity, non-overlapping",
    "ppl_sliding": "perplexity, sliding window",
    "token_accuracy": "per-token accuracy",
    "exact_match": "exact match",
}


def _records(data: dict[str, Any], task: str) -> list[dict[str, Any]]:
    recs = [r for r in data["records"] if r["task"] == task]
    if not recs:
        raise ValueError(f"no records of task {task!r}; tasks: {task_names(data)}")
    return recs


def factors_at(data: dict[str, Any], task: str, stage: str) -> dict[int, int]:
    """``{length: factor}`` of ``stage`` in ``task`` (the factor depends on the length only)."""
    return {m["length"]: m["factor"] for r in _records(data, task) if r["stage"] == stage for m in r["metrics"]}


def _row_label(rule: str, stage: str, ft_len: int | None) -> str:
    if stage == "fine-tuned-covering":
        return f"{rule} fine-tuned@{ft_len}, factor covering the length"
    if stage == "fine-tuned":
        return f"{rule} fine-tuned@{ft_len}"
    return f"{rule} {stage}"


def _digits(key: str) -> int:
    return 2 if key.startswith("ppl") else 3


def extension_tables(data: dict[str, Any]) -> list[TableData]:
    """Per task and metric: rows = each rule zero-shot, each rule fine-tuned (with the
    factor covering the length where the rule has a factor, Peng et al.'s setting), the
    baselines; columns = lengths. The fine-tune's factor judged past it is in
    ``past_factor_tables``."""
    out = []
    for task in task_names(data):
        recs = _records(data, task)
        L = recs[0]["train_length"]
        lengths = sorted({m["length"] for r in recs for m in r["metrics"]})
        ft_len = {r["rule"]: r["finetune_length"] for r in recs if r["stage"] == "fine-tuned"}
        seeds = len({r["seed"] for r in recs})
        spread = f"mean ± std over {seeds} seeds" if seeds > 1 else "1 seed"
        for key in metric_keys(data, task):
            s = series(data, task, key)
            covered = {rule for rule, stage in s if stage == "fine-tuned-covering"}
            rows = []
            for (rule, stage), by_seed in s.items():
                if stage == "fine-tuned" and rule in covered:
                    continue
                cells = [Cell.of([v[n] for v in by_seed.values() if n in v]) for n in lengths]
                rows.append([_row_label(rule, stage, ft_len.get(rule)), *(c.fmt(_digits(key)) for c in cells)])
            cols = ["rule / stage", *(f"{n} ({n // L}L)" for n in lengths)]
            title = f"{task}: {METRIC_NAMES[key]}, trained at L={L} ({spread}); factor covering the length"
            out.append(TableData(title, cols, rows))
    return out


def past_factor_tables(data: dict[str, Any]) -> list[TableData]:
    """Per task and metric, the fine-tuned models at every length past the fine-tuning
    length, side by side: with the factor covering the length (Peng et al.'s setting for
    YaRN's extrapolation) and with the fine-tune's factor, judged past its factor."""
    out = []
    for task in task_names(data):
        recs = _records(data, task)
        ft = [r for r in recs if r["stage"] == "fine-tuned-covering"]
        if not ft:
            continue
        f_len = ft[0]["finetune_length"]
        fixed, covering = factors_at(data, task, "fine-tuned"), factors_at(data, task, "fine-tuned-covering")
        past = sorted(n for n in covering if n > f_len)
        if not past:
            continue
        seeds = len({r["seed"] for r in recs})
        for key in metric_keys(data, task):
            s = series(data, task, key)
            cols, rows = ["rule, fine-tuned@" + str(f_len)], []
            for n in past:
                cols += [f"{n}, factor {covering[n]} (covers {n})", f"{n}, factor {fixed[n]} judged past its factor"]
            for rule in dict.fromkeys(r["rule"] for r in ft):
                row = [rule]
                for n in past:
                    for stage in ("fine-tuned-covering", "fine-tuned"):
                        row.append(Cell.of([v[n] for v in s[(rule, stage)].values()]).fmt(_digits(key)))
                rows.append(row)
            spread = f"mean ± std over {seeds} seeds" if seeds > 1 else "1 seed"
            title = f"{task}: {METRIC_NAMES[key]} past the fine-tuning length {f_len} ({spread})"
            out.append(TableData(title, cols, rows))
    return out


def _better(lm: bool, a: float, b: float) -> bool:
    """``a`` strictly better than ``b`` (lower perplexity, higher accuracy)."""
    return a < b if lm else a > b


def orderings(data: dict[str, Any], task: str, key: str | None = None) -> list[dict[str, Any]]:
    """The published claims at every length ``E > L`` by ``key`` (default the task's
    primary metric): per claim and length, the seeds where it holds (strictly: a tie is
    not agreement), the ties, the seeds compared, and the two means (or the recovery).
    Claims 4 and 7 are checked where the fine-tune's factor covers ``E`` (``E <= f L``),
    claim 6 past it; claim 6 only on corpora, claim 7 only on synthetic tasks."""
    key = key or primary_metric(data, task)
    lm = key.startswith("ppl")
    s = series(data, task, key)
    recs = _records(data, task)
    L = recs[0]["train_length"]
    lengths = sorted({m["length"] for r in recs for m in r["metrics"] if m["length"] > L})
    f_len = next((r["finetune_length"] for r in recs if r["stage"] == "fine-tuned"), None)
    inside = [n for n in lengths if f_len is not None and n <= f_len]
    past = [n for n in lengths if f_len is not None and n > f_len]
    claims = []

    def compare(name, a, b, at, *, b_len=None, worse=False):
        """Seeds where ``a`` is strictly better than ``b`` (strictly worse with ``worse``)."""
        if a not in s or b not in s:
            return
        for n in at:
            seeds = sorted(set(s[a]) & set(s[b]))
            va = [s[a][k][n] for k in seeds]
            vb = [s[b][k][b_len or n] for k in seeds]
            pairs = list(zip(va, vb, strict=True))
            holds = sum(_better(lm, y, x) if worse else _better(lm, x, y) for x, y in pairs)
            ties = sum(x == y for x, y in pairs)
            a_mean, b_mean = statistics.fmean(va), statistics.fmean(vb)
            claims.append({"claim": name, "length": n, "holds": holds, "ties": ties, "seeds": len(seeds)})
            claims[-1].update(a=a_mean, b=b_mean)

    zs = "zero-shot"
    compare(CLAIMS[1], ("none", zs), ("none", zs), lengths, b_len=L, worse=True)
    compare(CLAIMS[2], ("linear", zs), ("none", zs), lengths)
    compare(CLAIMS[3], ("ntk", zs), ("linear", zs), lengths)
    lin, none = ("linear", "fine-tuned"), ("none", zs)
    if lin in s and none in s:
        for n in inside:
            seeds = sorted(set(s[lin]) & set(s[none]))
            rec = []
            for k in seeds:
                gap = s[none][k][n] - s[none][k][L]
                rec.append((s[none][k][n] - s[lin][k][n]) / gap if gap else float("nan"))
            ok = [r for r in rec if r == r]
            mean = statistics.fmean(ok) if ok else float("nan")
            claims.append(
                {"claim": CLAIMS[4], "length": n, "holds": sum(r > 0.5 for r in ok), "ties": 0}
                | {"seeds": len(seeds), "a": mean, "b": None, "recovery": rec}
            )
    compare(CLAIMS[5], ("yarn", "fine-tuned"), ("linear", "fine-tuned"), lengths)
    if lm:
        compare(CLAIMS[6], ("yarn", "fine-tuned-covering"), ("yarn", "fine-tuned"), past, b_len=f_len)
    else:
        compare(CLAIMS[7], ("linear", "fine-tuned"), ("none", "fine-tuned"), inside)
    return claims


#: The published claims ``orderings`` checks, by number (Chen et al. 2023: 2, 4, 7;
#: bloc97 2023: 3; Peng et al. 2023: 5, 6).
CLAIMS = {
    1: "1. direct extrapolation fails (none zero-shot at E worse than at L)",
    2: "2. PI zero-shot beats direct (linear better than none)",
    3: "3. NTK-aware zero-shot beats PI zero-shot (ntk better than linear)",
    4: "4. PI fine-tuned recovers most of the in-range metric (recovery > 0.5; E <= fine-tuning length)",
    5: "5. YaRN fine-tuned beats PI fine-tuned (both with the fine-tune's factor)",
    6: "6. YaRN extrapolates past its fine-tuning length (factor covering E: better at E than at fine-tuning length)",
    7: "7. PI fine-tuning extends retrieval faster than direct fine-tuning (linear fine-tuned better than none)",
}


def ordering_tables(data: dict[str, Any]) -> list[TableData]:
    """Per task and metric (both of each task's), the claims of ``orderings`` by length."""
    out = []
    for task in task_names(data):
        for key in metric_keys(data, task):
            claims = orderings(data, task, key)
            if not claims:
                continue
            lengths = sorted({c["length"] for c in claims})
            by_claim: dict[str, dict[int, dict]] = defaultdict(dict)
            for c in claims:
                by_claim[c["claim"]][c["length"]] = c
            rows = [[name, *(claim_cell(per.get(n)) for n in lengths)] for name, per in by_claim.items()]
            title = f"{task}: published orderings by {key}, seeds where each holds strictly (ties apart; means)"
            out.append(TableData(title, ["claim", *map(str, lengths)], rows))
    return out


def claim_cell(c: dict[str, Any] | None) -> str:
    """One cell of an ordering table: ``holds/seeds`` (ties), then the means or the recovery."""
    if c is None:
        return "-"
    if c["b"] is None:
        return f"{c['holds']}/{c['seeds']} (recovery {c['a']:.2f})"
    ties = f", {c['ties']} tied" if c["ties"] else ""
    return f"{c['holds']}/{c['seeds']}{ties} ({c['a']:.3g} vs {c['b']:.3g})"


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
            if not ({"ppl", "ppl_sliding"} <= set(m) or {"exact_match", "token_accuracy"} <= set(m)):
                raise ValueError(f"records[{i}] metric {m!r} has neither ppl nor exact_match/token_accuracy")
    return data


def read_extension(path: str | Path) -> dict[str, Any]:
    """The validated dict of an ``extension.json`` file; ``ValueError`` when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"extension file {str(path)!r} does not exist (run `posenc extend` first)")
    return validate_extension(json.loads(path.read_text(encoding="utf-8")))
