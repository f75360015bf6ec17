"""``results.jsonl``: one JSON line per finished run, appended atomically.

Schema of a line (``validate_record``; read by ``read_results``, the one loader of the
study's tables, plots and HTML report)::

    {"run_id": str, "task": str, "encoding": str, "seed": int, "train_length": int,
     "config": {...}, "git_commit": str, "torch_version": str, "wall_time_s": float,
     "train_step": "fast" | "reference", "cpu_capability": str,   # optional: absent in older records
     "metrics": [{"length": int, "exact_match": float, "token_accuracy": float,
                  "samples": int, "exact_hits": int, "tokens": int, "token_hits": int}, ...]
                 # or [{"length": int, "ppl": float, "ppl_sliding": float, "tokens": int,
                 #      "segment_tokens": int, "sliding_stride": int, "nll_segments": [float],
                 #      "nll_sliding_segments": [float]}, ...]
                 # for LM; records written before the counts existed hold only the first three keys
     "validation": {"metric": "exact_match" | "ppl", "value": float, "higher_is_better": bool, "size": int},
     "metrics_random": [...],   # runs with randomized positions: metrics at Ruoss et al.'s test positions
     "corpus": {"name": str, "sha256": str, "chars": int, "python_version": str,
                "test_tokens": int, "validation_tokens": int},   # corpora
     "probes": {...}}   # posenc.experiments.diagnose.probe_metrics: the mechanism probes past L
    # validation, metrics_random, corpus and probes are optional: absent in older records

The counts let every interval be recomputed from the record: ``exact_hits / samples``
is ``exact_match`` and ``exp(sum(nll_segments) / tokens)`` is ``ppl``
(``posenc.experiments.stats``).

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
from collections.abc import Iterable
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
#: Provenance keys (str) that records written before they existed lack.
PROVENANCE_KEYS = ("train_step", "cpu_capability")
#: Evaluation keys that older records lack; ``metrics_random`` only with randomized
#: positions, ``corpus`` only for corpora.
EVALUATION_KEYS = ("validation", "metrics_random", "corpus", "probes")
#: The keys of ``record["probes"]`` (``posenc.experiments.diagnose.probe_metrics``).
PROBES_KEYS = ("version", "kind", "train_length", "window", "conditions", "reference", "lengths", "attention")
OPTIONAL_KEYS = PROVENANCE_KEYS + EVALUATION_KEYS
SYNTHETIC_METRICS = ("length", "exact_match", "token_accuracy", "samples", "exact_hits", "tokens", "token_hits")
LM_METRICS = (
    "length",
    "ppl",
    "ppl_sliding",
    "tokens",
    "segment_tokens",
    "sliding_stride",
    "nll_segments",
    "nll_sliding_segments",
)
#: The metric keys of records written before the counts existed.
LEGACY_METRICS = (SYNTHETIC_METRICS[:3], LM_METRICS[:3])
VALIDATION_KEYS = ("metric", "value", "higher_is_better", "size")
CORPUS_KEYS = ("name", "sha256", "chars", "python_version", "test_tokens", "validation_tokens")


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
    for key in PROVENANCE_KEYS:
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
    _check_metrics(record["metrics"], where, "metrics")
    if "metrics_random" in record:
        _check_metrics(record["metrics_random"], where, "metrics_random")
    if "validation" in record:
        _check_validation(record["validation"], where)
    if "corpus" in record:
        _check_corpus(record["corpus"], where)
    if "probes" in record and (not isinstance(record["probes"], dict) or not set(PROBES_KEYS) <= set(record["probes"])):
        raise ValueError(f"{where}: probes must be probe_metrics's dict with the keys {PROBES_KEYS}")
    return record


def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _check_metrics(metrics: Any, where: str, key: str) -> None:
    """Every entry of ``record[key]`` has one of the key sets and counts consistent with its rates."""
    if not isinstance(metrics, list) or not metrics:
        raise ValueError(f"{where}: {key} must be a non-empty list")
    sets = [tuple(sorted(k)) for k in (SYNTHETIC_METRICS, LM_METRICS, *LEGACY_METRICS)]
    for m in metrics:
        if not isinstance(m, dict) or tuple(sorted(m)) not in sets:
            raise ValueError(
                f"{where}: every {key} entry needs an int 'length' and the keys {SYNTHETIC_METRICS} or {LM_METRICS} "
                f"(older records: {LEGACY_METRICS[0]} or {LEGACY_METRICS[1]}), got {m!r}"
            )
        if not _is_int(m["length"], 1):
            raise ValueError(f"{where}: metric length must be a positive int, got {m['length']!r}")
        for k in ("exact_match", "token_accuracy", "ppl", "ppl_sliding"):
            if k in m and not _is_number(m[k]):
                raise ValueError(f"{where}: metric {k} must be a number, got {m[k]!r}")
        if "exact_hits" in m:
            _check_synthetic_counts(m, where)
        if "nll_segments" in m:
            _check_lm_counts(m, where)


def _check_synthetic_counts(m: dict[str, Any], where: str) -> None:
    for hits, n, rate in (("exact_hits", "samples", "exact_match"), ("token_hits", "tokens", "token_accuracy")):
        if not _is_int(m[n], 1) or not _is_int(m[hits]) or m[hits] > m[n]:
            raise ValueError(f"{where}: {hits}={m[hits]!r} must be an int in [0, {n}={m[n]!r}]")
        if abs(m[hits] / m[n] - m[rate]) > 1e-12:
            raise ValueError(f"{where}: {rate}={m[rate]!r} is not {hits} / {n} = {m[hits]}/{m[n]}")


def _check_lm_counts(m: dict[str, Any], where: str) -> None:
    if not _is_int(m["tokens"], 1) or not _is_int(m["segment_tokens"], 1) or m["tokens"] % m["segment_tokens"]:
        raise ValueError(
            f"{where}: tokens={m['tokens']!r} must be a multiple of segment_tokens={m['segment_tokens']!r}"
        )
    k = m["tokens"] // m["segment_tokens"]
    for key, ppl in (("nll_segments", "ppl"), ("nll_sliding_segments", "ppl_sliding")):
        nll = m[key]
        if not isinstance(nll, list) or len(nll) != k or not all(_is_number(v) and v >= 0 for v in nll):
            raise ValueError(f"{where}: {key} must be {k} numbers >= 0 (one per segment), got {nll!r}")
        if not math.isclose(math.exp(sum(nll) / m["tokens"]), m[ppl], rel_tol=1e-9):
            raise ValueError(f"{where}: {ppl}={m[ppl]!r} is not exp(sum({key}) / tokens)")


def _check_validation(v: Any, where: str) -> None:
    if not isinstance(v, dict) or sorted(v) != sorted(VALIDATION_KEYS):
        raise ValueError(f"{where}: validation must have the keys {VALIDATION_KEYS}, got {v!r}")
    expected = {"exact_match": True, "ppl": False}
    if v["metric"] not in expected or v["higher_is_better"] is not expected[v["metric"]]:
        raise ValueError(
            f"{where}: validation metric must be 'exact_match' (higher_is_better true) or 'ppl' (false), got {v!r}"
        )
    if not _is_number(v["value"]) or not _is_int(v["size"], 1):
        raise ValueError(f"{where}: validation value must be a number and size a positive int, got {v!r}")


def _check_corpus(c: Any, where: str) -> None:
    if not isinstance(c, dict) or sorted(c) != sorted(CORPUS_KEYS):
        raise ValueError(f"{where}: corpus must have the keys {CORPUS_KEYS}, got {c!r}")
    for k in ("name", "sha256", "python_version"):
        if not isinstance(c[k], str) or not c[k]:
            raise ValueError(f"{where}: corpus {k} must be a non-empty string, got {c[k]!r}")
    for k in ("chars", "test_tokens", "validation_tokens"):
        if not _is_int(c[k], 1):
            raise ValueError(f"{where}: corpus {k} must be a positive int, got {c[k]!r}")


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


def order_results(run_dir: str | Path, run_ids: list[str], kept: Iterable[str] = ()) -> None:
    """Rewrite ``results.jsonl`` (atomically, under the results lock): the lines of
    ``kept`` (the run ids the file held before this command) first, where they are, then
    the lines of ``run_ids`` in that order, then any others as they were. A results file
    thus only grows at its end: a line written by an earlier command never moves, so the
    first ``N`` lines of a file stay the same records (the generated pages of docs/ are
    built from the first ``N`` lines of a committed file)."""
    run_dir = Path(run_dir)
    kept = set(kept)
    with _locked(run_dir):
        records = read_results(run_dir)
        rank = {rid: i for i, rid in enumerate(run_ids)}

        def key(r: dict[str, Any]) -> tuple[int, int]:
            return (0, 0) if r["run_id"] in kept else (1, rank.get(r["run_id"], len(rank)))

        ordered = sorted(records, key=key)  # stable: kept lines, and the others, keep their order
        text = "".join(json.dumps(r, sort_keys=False, allow_nan=False) + "\n" for r in ordered)
        atomic_write_bytes(run_dir / RESULTS_FILE, text.encode("utf-8"))
