"""``results.jsonl``: one JSON line per finished run, appended atomically.

Schema of a line (``validate_record``; read by ``read_results``, the one loader of the
study's tables, plots and HTML report)::

    {"run_id": str, "task": str, "encoding": str, "seed": int, "train_length": int,
     "config": {...}, "git_commit": str, "torch_version": str, "wall_time_s": float,
     "train_step": "fast" | "reference", "cpu_capability": str,   # optional: absent in older records
     "metrics": [{"length": int, "exact_match": float, "token_accuracy": float}, ...]}
                 # or [{"length": int, "ppl": float, "ppl_sliding": float}, ...] for LM

Appending rewrites the whole file to a temporary file in the same folder and
``os.replace``s it over the old one under an exclusive lock, so a reader (or a killed
writer) sees either the old file or the new one, never a half-written line.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.jsonl"
KEYS = (
    "run_id",
    "task",
    "encoding",
    "seed",
    "train_length",
    "config",
    "git_commit",
    "torch_version",
    "wall_time_s",
    "metrics",
)
#: Provenance keys that records written before they existed lack.
OPTIONAL_KEYS = ("train_step", "cpu_capability")
SYNTHETIC_METRICS = ("length", "exact_match", "token_accuracy")
LM_METRICS = ("length", "ppl", "ppl_sliding")


def git_commit() -> str:
    """The commit of the posenc source tree (``+dirty`` if modified), or ``unknown``."""
    root = Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out + ("+dirty" if dirty else "")


def validate_record(record: Any, where: str = "record") -> dict[str, Any]:
    """Check one results line against the schema; ``ValueError`` naming what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"{where} is not a JSON object")
    missing = [k for k in KEYS if k not in record]
    if missing:
        raise ValueError(f"{where} is missing {', '.join(map(repr, missing))}")
    unknown = sorted(set(record) - set(KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        expected = f"{sorted(KEYS)} and optionally {list(OPTIONAL_KEYS)}"
        raise ValueError(f"{where} has unknown keys {unknown}, expected {expected}")
    for key in OPTIONAL_KEYS:
        if key in record and not isinstance(record[key], str):
            raise ValueError(f"{where}: {key!r} must be str, got {record[key]!r}")
    types = {
        "run_id": str,
        "task": str,
        "encoding": str,
        "seed": int,
        "train_length": int,
        "config": dict,
        "git_commit": str,
        "torch_version": str,
        "wall_time_s": float,
        "metrics": list,
    }
    for key, typ in types.items():
        value = record[key]
        ok = isinstance(value, (int, float)) if typ is float else isinstance(value, typ)
        if not ok or (typ is int and isinstance(value, bool)):
            raise ValueError(f"{where}: {key!r} must be {typ.__name__}, got {value!r}")
    if not record["metrics"]:
        raise ValueError(f"{where}: metrics is empty")
    for m in record["metrics"]:
        if not isinstance(m, dict) or tuple(sorted(m)) not in (
            tuple(sorted(SYNTHETIC_METRICS)),
            tuple(sorted(LM_METRICS)),
        ):
            raise ValueError(
                f"{where}: every metrics entry needs an int 'length' and the keys {SYNTHETIC_METRICS} or "
                f"{LM_METRICS}, got {m!r}"
            )
        if not isinstance(m["length"], int) or m["length"] <= 0:
            raise ValueError(f"{where}: metric length must be a positive int, got {m['length']!r}")
        for k, v in m.items():
            if k != "length" and (not isinstance(v, (int, float)) or math.isnan(v)):
                raise ValueError(f"{where}: metric {k} must be a number, got {v!r}")
    return record


def read_results(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of ``<run_dir>/results.jsonl``, each checked by ``validate_record``.

    A missing file is an empty list (a run folder where no run has finished yet); a caller
    that needs results says so with its own error (``posenc.pipeline.report.study_results``,
    ``posenc.pipeline.study.write_study_outputs``). A corrupt or malformed line is a
    ``ValueError`` naming the file and line: nothing is skipped.
    """
    path = Path(run_dir) / RESULTS_FILE
    if not path.exists():
        return []
    records = []
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"results file {str(path)!r} line {i} is corrupt: {err.msg}") from None
            records.append(validate_record(rec, f"results file {str(path)!r} line {i}"))
    return records


@contextlib.contextmanager
def _locked(run_dir: Path):
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, fsync, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def append_result(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Append one validated record to ``<run_dir>/results.jsonl`` atomically.

    A record whose ``run_id`` is already in the file is a ``ValueError`` (a finished run
    is never recorded twice)."""
    validate_record(record)
    run_dir = Path(run_dir)
    line = json.dumps(record, sort_keys=False, allow_nan=False) + "\n"
    with _locked(run_dir):
        existing = read_results(run_dir)  # also refuses to extend a corrupt file
        if any(r["run_id"] == record["run_id"] for r in existing):
            raise ValueError(f"run {record['run_id']!r} is already in {str(run_dir / RESULTS_FILE)!r}")
        path = run_dir / RESULTS_FILE
        old = path.read_bytes() if path.exists() else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        atomic_write_bytes(path, old + line.encode("utf-8"))


def find_result(run_dir: str | Path, run_id: str) -> dict[str, Any] | None:
    """The record of ``run_id`` in ``<run_dir>/results.jsonl``, or ``None``."""
    for rec in read_results(run_dir):
        if rec["run_id"] == run_id:
            return rec
    return None


def order_results(run_dir: str | Path, run_ids: list[str]) -> None:
    """Rewrite ``results.jsonl`` with the lines of ``run_ids`` first, in that order, then
    any others as they were (atomically, under the results lock)."""
    run_dir = Path(run_dir)
    with _locked(run_dir):
        records = read_results(run_dir)
        rank = {rid: i for i, rid in enumerate(run_ids)}
        ordered = sorted(records, key=lambda r: rank.get(r["run_id"], len(rank)))  # stable for the others
        text = "".join(json.dumps(r, sort_keys=False, allow_nan=False) + "\n" for r in ordered)
        atomic_write_bytes(run_dir / RESULTS_FILE, text.encode("utf-8"))
