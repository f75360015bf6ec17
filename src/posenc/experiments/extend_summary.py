"""``extension.json`` -> tables: the metric per rule, stage and length (mean ± std over
seeds), and the published orderings checked seed by seed.

Published orderings (Chen et al. 2023, Position Interpolation; Peng et al. 2023, YaRN;
bloc97 2023, NTK-aware scaling), checked at every length ``E > L``:

1. direct extrapolation fails: ``none`` zero-shot at ``E`` is worse than at ``L``;
2. PI zero-shot beats direct: ``linear`` zero-shot better than ``none`` zero-shot;
3. NTK-aware zero-shot beats PI zero-shot: ``ntk`` better than ``linear``;
4. after fine-tuning PI recovers most of the in-range metric: the fraction
   ``(none_zs(E) - linear_ft(E)) / (none_zs(E) - base(L))`` is > 0.5
   (1 = back to the in-range value, > 1 = better than in range);
5. YaRN fine-tuned is at least as good as PI fine-tuned.

"Better" is lower perplexity (corpora) or higher per-token accuracy (synthetic tasks).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from posenc.experiments.summary import Cell, TableData

FORMAT = 1
STAGES = ("zero-shot", "fine-tuned", "baseline")


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


def _label(rule: str, stage: str, rec_ft: int | None) -> str:
    if stage == "fine-tuned":
        return f"{rule} fine-tuned@{rec_ft}"
    return f"{rule} {stage}"


def extension_tables(data: dict[str, Any]) -> list[TableData]:
    """Per task and metric: rows = rule x stage (then baselines), columns = lengths."""
    out = []
    for task in task_names(data):
        recs = [r for r in data["records"] if r["task"] == task]
        lm = "ppl" in recs[0]["metrics"][0]
        keys = (
            (("ppl", "perplexity, non-overlapping"), ("ppl_sliding", "perplexity, sliding window"))
            if lm
            else (("token_accuracy", "per-token accuracy"), ("exact_match", "exact match"))
        )
        L = recs[0]["train_length"]
        lengths = sorted({m["length"] for r in recs for m in r["metrics"]})
        ft_len = {r["rule"]: r["finetune_length"] for r in recs if r["stage"] == "fine-tuned"}
        seeds = len({r["seed"] for r in recs})
        spread = f"mean ± std over {seeds} seeds" if seeds > 1 else "1 seed"
        for key, name in keys:
            s = series(data, task, key)
            rows = []
            for (rule, stage), by_seed in s.items():
                cells = [Cell.of([v[n] for v in by_seed.values() if n in v]) for n in lengths]
                rows.append([_label(rule, stage, ft_len.get(rule)), *(c.fmt(3 if not lm else 2) for c in cells)])
            cols = ["rule / stage", *(f"{n} ({n // L}L)" for n in lengths)]
            out.append(
                TableData(f"{task}: {name}, trained at L={L} ({spread}); zero-shot factor = length/L", cols, rows)
            )
    return out


def _better(lm: bool, a: float, b: float) -> bool:
    """``a`` strictly better than ``b`` (lower perplexity, higher accuracy)."""
    return a < b if lm else a > b


def orderings(data: dict[str, Any], task: str) -> list[dict[str, Any]]:
    """The five published claims at every length ``E > L``: per claim and length, the
    seeds where it holds (strictly: a tie is not agreement), the ties, the seeds
    compared, and the two means (or the recovery)."""
    key = primary_metric(data, task)
    lm = key == "ppl"
    s = series(data, task, key)
    recs = [r for r in data["records"] if r["task"] == task]
    L = recs[0]["train_length"]
    lengths = sorted({m["length"] for r in recs for m in r["metrics"] if m["length"] > L})
    claims = []

    def compare(name: str, a: tuple[str, str], b: tuple[str, str], *, a_len=None, b_len=None, worse=False):
        """Seeds where ``a`` is strictly better than ``b`` (strictly worse with ``worse``)."""
        if a not in s or b not in s:
            return
        for n in lengths:
            seeds = sorted(set(s[a]) & set(s[b]))
            va = [s[a][k][a_len or n] for k in seeds]
            vb = [s[b][k][b_len or n] for k in seeds]
            pairs = list(zip(va, vb, strict=True))
            holds = sum(_better(lm, y, x) if worse else _better(lm, x, y) for x, y in pairs)
            claims.append(
                {
                    "claim": name,
                    "length": n,
                    "holds": holds,
                    "ties": sum(x == y for x, y in pairs),
                    "seeds": len(seeds),
                    "a": statistics.fmean(va),
                    "b": statistics.fmean(vb),
                }
            )

    compare(
        "1. direct extrapolation fails (none zero-shot at E worse than at L)",
        ("none", "zero-shot"),
        ("none", "zero-shot"),
        b_len=L,
        worse=True,
    )
    compare("2. PI zero-shot beats direct (linear better than none)", ("linear", "zero-shot"), ("none", "zero-shot"))
    compare(
        "3. NTK-aware zero-shot beats PI zero-shot (ntk better than linear)",
        ("ntk", "zero-shot"),
        ("linear", "zero-shot"),
    )
    base, lin, none = ("none", "zero-shot"), ("linear", "fine-tuned"), ("none", "zero-shot")
    if lin in s and base in s:
        for n in lengths:
            seeds = sorted(set(s[lin]) & set(s[base]))
            rec = []
            for k in seeds:
                gap = s[none][k][n] - s[base][k][L]
                rec.append((s[none][k][n] - s[lin][k][n]) / gap if gap else float("nan"))
            ok = [r for r in rec if r == r]
            claims.append(
                {
                    "claim": "4. PI fine-tuned recovers most of the in-range metric (recovery > 0.5)",
                    "length": n,
                    "holds": sum(r > 0.5 for r in ok),
                    "ties": 0,
                    "seeds": len(seeds),
                    "a": statistics.fmean(ok) if ok else float("nan"),
                    "b": None,
                    "recovery": rec,
                }
            )
    compare("5. YaRN fine-tuned beats PI fine-tuned", ("yarn", "fine-tuned"), ("linear", "fine-tuned"))
    return claims


def ordering_tables(data: dict[str, Any]) -> list[TableData]:
    out = []
    for task in task_names(data):
        key = primary_metric(data, task)
        claims = orderings(data, task)
        if not claims:
            continue
        lengths = sorted({c["length"] for c in claims})
        by_claim: dict[str, dict[int, dict]] = defaultdict(dict)
        for c in claims:
            by_claim[c["claim"]][c["length"]] = c
        rows = []
        for name, per in by_claim.items():
            cells = []
            for n in lengths:
                c = per.get(n)
                if c is None:
                    cells.append("-")
                elif c["b"] is None:
                    cells.append(f"{c['holds']}/{c['seeds']} (recovery {c['a']:.2f})")
                else:
                    ties = f", {c['ties']} tied" if c["ties"] else ""
                    cells.append(f"{c['holds']}/{c['seeds']}{ties} ({c['a']:.3g} vs {c['b']:.3g})")
            rows.append([name, *cells])
        out.append(
            TableData(
                f"{task}: published orderings by {key}, seeds where each holds strictly (ties apart; means)",
                ["claim", *map(str, lengths)],
                rows,
            )
        )
    return out


def validate_extension(data: Any) -> dict[str, Any]:
    """Check an ``extension.json`` dict against the schema; ``ValueError`` naming what is wrong."""
    keys = {
        "format",
        "kind",
        "command",
        "git_commit",
        "torch_version",
        "rules",
        "factors",
        "baselines",
        "baselines_missing",
        "finetune",
        "base_runs",
        "records",
    }
    if not isinstance(data, dict) or set(data) != keys:
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"extension data must have keys {sorted(keys)}, got {got}")
    if data["format"] != FORMAT or data["kind"] != "posenc-extension":
        raise ValueError(f"not a posenc extension file (format {data['format']!r}, kind {data['kind']!r})")
    rec_keys = {"task", "seed", "rule", "stage", "train_length", "context", "finetune_length", "metrics"}
    for i, r in enumerate(data["records"]):
        if not isinstance(r, dict) or set(r) != rec_keys:
            raise ValueError(f"records[{i}] must have keys {sorted(rec_keys)}")
        if r["stage"] not in STAGES:
            raise ValueError(f"records[{i}].stage must be one of {STAGES}, got {r['stage']!r}")
        if not r["metrics"]:
            raise ValueError(f"records[{i}].metrics is empty")
        for m in r["metrics"]:
            if not isinstance(m.get("length"), int) or "factor" not in m:
                raise ValueError(f"records[{i}] metric {m!r} needs an int length and a factor")
            if not ({"ppl", "ppl_sliding"} <= set(m) or {"exact_match", "token_accuracy"} <= set(m)):
                raise ValueError(f"records[{i}] metric {m!r} has neither ppl nor exact_match/token_accuracy")
    return data


def read_extension(path: str | Path) -> dict[str, Any]:
    """The validated dict of an ``extension.json`` file; ``ValueError`` when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"extension file {str(path)!r} does not exist (run `posenc extend` first)")
    return validate_extension(json.loads(path.read_text(encoding="utf-8")))
