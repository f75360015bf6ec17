"""Study results (``results.jsonl``, one finished run per line) as tables for the HTML report.

Schema of one line (written by ``posenc study``)::

    {"run_id": str, "task": str, "encoding": str, "seed": int, "train_length": int,
     "config": {...}, "git_commit": str, "torch_version": str, "wall_time_s": float,
     "metrics": [{"length": int, "exact_match": float, "token_accuracy": float}, ...]}

or, for language modelling, metrics ``[{"length": int, "ppl": float, "ppl_sliding": float}, ...]``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import statistics
from typing import Any

REQUIRED = {"run_id": str, "task": str, "encoding": str, "seed": int, "train_length": int, "metrics": list}
#: The metric each table shows, in order of preference: higher is better except ppl.
PRIMARY = ("exact_match", "ppl", "token_accuracy", "ppl_sliding")


def load_results(study_dir: str | pathlib.Path) -> list[dict[str, Any]]:
    """Read ``study_dir/results.jsonl``; malformed lines raise ``ValueError`` naming the
    file and line. A missing file raises ``FileNotFoundError``."""
    path = pathlib.Path(study_dir) / "results.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no study results at {path} (expected results.jsonl in study_dir)")
    runs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            run = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not JSON ({err.msg})") from None
        if not isinstance(run, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(run).__name__}")
        for key, typ in REQUIRED.items():
            if key not in run:
                raise ValueError(f"{path}:{lineno}: run is missing {key!r}")
            if not isinstance(run[key], typ) or isinstance(run[key], bool):
                raise ValueError(f"{path}:{lineno}: {key!r} must be {typ.__name__}, got {run[key]!r}")
        for m in run["metrics"]:
            if not isinstance(m, dict) or not isinstance(m.get("length"), int):
                raise ValueError(f"{path}:{lineno}: every metrics entry needs an int 'length', got {m!r}")
        runs.append(run)
    return runs


@dataclasses.dataclass(frozen=True)
class StudyTable:
    """One task: mean (and std over seeds) of ``metric`` per (encoding, train_length) and
    evaluation length."""

    task: str
    metric: str
    lengths: list[int]
    rows: list[tuple[str, int, list[tuple[float, float, int] | None]]]  # (encoding, L, [(mean, std, n)])

    @property
    def higher_is_better(self) -> bool:
        return not self.metric.startswith("ppl")


def summarize(runs: list[dict[str, Any]]) -> list[StudyTable]:
    """One table per task and metric (metrics in ``PRIMARY`` order, then the rest
    alphabetically), each metric averaged over seeds."""
    tables = []
    for task in sorted({r["task"] for r in runs}):
        task_runs = [r for r in runs if r["task"] == task]
        keys = {k for r in task_runs for m in r["metrics"] for k in m if k != "length"}
        for metric in [k for k in PRIMARY if k in keys] + sorted(keys - set(PRIMARY)):
            tables.append(_table(task, task_runs, metric))
    return tables


def _table(task: str, task_runs: list[dict[str, Any]], metric: str) -> StudyTable:
    lengths = sorted({m["length"] for r in task_runs for m in r["metrics"]})
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in task_runs:
        groups.setdefault((r["encoding"], r["train_length"]), []).append(r)
    rows = []
    for (enc, tl), group in sorted(groups.items()):
        cells = []
        for n in lengths:
            vals = [
                float(m[metric])
                for r in group
                for m in r["metrics"]
                if m["length"] == n and isinstance(m.get(metric), (int, float))
            ]
            vals = [v for v in vals if math.isfinite(v)]
            if vals:
                std = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cells.append((statistics.fmean(vals), std, len(vals)))
            else:
                cells.append(None)
        rows.append((enc, tl, cells))
    return StudyTable(task=task, metric=metric, lengths=lengths, rows=rows)
