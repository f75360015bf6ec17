"""The mechanism probes of trained runs that were recorded without them: from a study
folder (``results.jsonl`` + ``checkpoints/``) or from run checkpoints.

A record that already has ``probes`` (runs evaluated with them) is used as it is; for
the others the probes are computed from ``checkpoints/<run_id>.pt`` and, in a folder,
kept in ``probes.jsonl`` (one ``{"run_id", "probes"}`` line per run, rewritten
atomically), so a second call reads them instead of recomputing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posenc.experiments.diagnose import PROBES_VERSION, probe_metrics
from posenc.experiments.results import RESULTS_FILE, atomic_write_bytes, read_results
from posenc.experiments.train import checkpoint_path, load_trained

PROBES_FILE = "probes.jsonl"
#: ``on_run(done, total, label)`` after each run is read or probed (progress bars).
RunCallback = Callable[[int, int, str], None]


def checkpoint_probes(checkpoint: str | Path, **options: Any) -> dict[str, Any]:
    """A record of a finished run's checkpoint: ``run_id``, ``task``, ``encoding``,
    ``seed``, ``train_length`` and ``probes`` (``probe_metrics(**options)``)."""
    config, model, run_setup = load_trained(checkpoint)
    return {
        "run_id": config.run_id,
        "task": config.task.label,
        "encoding": config.encoding_label,
        "seed": config.train.seed,
        "train_length": config.task.train_length,
        "probes": probe_metrics(model, run_setup, **options),
    }


def read_probes(folder: str | Path) -> dict[str, dict[str, Any]]:
    """``{run_id: probes}`` of ``<folder>/probes.jsonl`` (empty when absent); lines of
    another ``PROBES_VERSION`` are left out (they are recomputed)."""
    path = Path(folder) / PROBES_FILE
    if not path.exists():
        return {}
    out = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{str(path)!r} line {i} is corrupt ({err.msg}); delete the file to recompute") from None
        if row.get("probes", {}).get("version") == PROBES_VERSION:
            out[row["run_id"]] = row["probes"]
    return out


def _write_probes(folder: Path, probes: dict[str, dict[str, Any]]) -> None:
    text = "".join(json.dumps({"run_id": k, "probes": v}, allow_nan=False) + "\n" for k, v in probes.items())
    atomic_write_bytes(folder / PROBES_FILE, text.encode("utf-8"))


def study_probes(
    folder: str | Path, *, save: bool = True, on_run: RunCallback | None = None, **options: Any
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every record of ``<folder>/results.jsonl`` with its ``probes``: its own, those of
    ``probes.jsonl``, or computed from its checkpoint (then saved to ``probes.jsonl``
    unless ``save`` is False). Returns the records and a sentence per run left out
    (neither probes nor a checkpoint)."""
    folder = Path(folder)
    if not (folder / RESULTS_FILE).exists():
        raise ValueError(f"{str(folder)!r} has no {RESULTS_FILE}: give a study folder or checkpoint files")
    records = read_results(folder)
    saved = read_probes(folder)
    out, skipped = [], []
    for i, rec in enumerate(records):
        label = f"{rec['task']} / {rec['encoding']} / seed {rec['seed']}"
        probes = rec.get("probes")
        if not probes or probes.get("version") != PROBES_VERSION:
            probes = saved.get(rec["run_id"])
        if probes is None:
            ckpt = checkpoint_path(folder, rec["run_id"])
            if not ckpt.exists():
                skipped.append(f"{label}: no probes in its record and no checkpoint {str(ckpt)!r}")
                if on_run is not None:
                    on_run(i + 1, len(records), label)
                continue
            probes = checkpoint_probes(ckpt, **options)["probes"]
            saved[rec["run_id"]] = probes
            if save:
                _write_probes(folder, saved)
        out.append({**rec, "probes": probes})
        if on_run is not None:
            on_run(i + 1, len(records), label)
    return out, skipped
